#!/usr/bin/env bash
# The main job: sets up .venv with the training extra (see setup_env.sh) and runs scripts/train.py. Extra arguments
# go to the script (`bash scripts/run_train.sh --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COLT5_EXTRAS="${COLT5_EXTRAS:-train}"
source "$root/scripts/setup_env.sh"
cd "$root"
exec "$COLT5_PYTHON" scripts/train.py "$@"
