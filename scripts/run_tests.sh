#!/usr/bin/env bash
# The test command: sets everything up (cached) and runs the whole suite on
# the real ComfyUI runtime. Extra arguments go to pytest (e.g. -k balance).
set -euo pipefail
export BC_WITH_DEV=1
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

# The browser test drives Debian's chromium through Playwright.
if ! command -v chromium >/dev/null 2>&1 && [ -z "${BC_CHROMIUM:-}" ]; then
  echo "[run_tests] installing Debian's chromium for the browser test" >&2
  _sudo=""; [ "$(id -u)" = 0 ] || _sudo="sudo"
  $_sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -qq chromium >/dev/null
fi

# Besides the cached venv (6.5 GB) and model files (5.5 GB under .cache), the
# suite writes up to about 4 GB of temporary files (model copies, training
# checkpoints); say so up front rather than fail with a full disk.
_tmp="${TMPDIR:-/tmp}"
_free_gb=$(df -Pk "$_tmp" 2>/dev/null | awk 'NR==2 {print int($4 / 1048576)}') || _free_gb=""
if [ -n "$_free_gb" ] && [ "$_free_gb" -lt 4 ]; then
  echo "[run_tests] warning: only ${_free_gb} GB free in $_tmp; the suite needs about 4 GB there" >&2
fi

cd "$BC_REPO"
exec "$BC_PYTHON" -m pytest tests "$@"
