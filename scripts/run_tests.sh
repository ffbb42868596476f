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

cd "$BC_REPO"
exec "$BC_PYTHON" -m pytest tests "$@"
