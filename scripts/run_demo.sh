#!/usr/bin/env bash
# The main job: sets everything up (cached), starts ComfyUI headless, queues the
# two-ControlNet MIControlNet example workflow through the HTTP API, writes the
# image and the balance map into ./output (or --output DIR), stops the server.
# See "python -m headless.demo --help" (or README) for the flags.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$BC_REPO"
exec "$BC_PYTHON" -m headless.demo "$@"
