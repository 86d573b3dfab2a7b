#!/usr/bin/env bash
# The test command: sets up .venv (see setup_env.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec "$COLT5_PYTHON" -m pytest -m "not slow" "$@"
