#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv in the repository root and installs the project into it.
# Sourced by run_tests.sh and run_train.sh; PYTHON picks the interpreter (default python3); COLT5_EXTRAS picks the
# extras (default test).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # A machine without a GPU gets the CPU build of torch when its pip finds one (find-links); set TORCH_SPEC to
  # choose another build or version.
  "${pip[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
"${pip[@]}" install -e "$root[${COLT5_EXTRAS:-test}]"
export COLT5_PYTHON="$venv/bin/python"
