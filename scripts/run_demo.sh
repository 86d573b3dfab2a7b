#!/usr/bin/env bash
# The main job: sets up .venv (see setup_env.sh) and runs scripts/demo.py. Extra arguments go to the script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec "$COLT5_PYTHON" scripts/demo.py "$@"
