#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv in the repository root and installs the project into it,
# editable, with the tested versions. Sourced by run_tests.sh and run_train.sh. Settings, from the environment:
#   PYTHON             the interpreter that creates the environment (default python3)
#   COLT5_EXTRAS       the extras to install (default test)
#   COLT5_CONSTRAINTS  a pip constraints file (default constraints.txt: the tested versions); empty for none, e.g. to
#                      keep a torch of your own (a CUDA build) in a reused .venv
# A reused environment is moved to the pinned versions (pip installs what the constraints ask for).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
constraints="${COLT5_CONSTRAINTS-$root/constraints.txt}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install ${constraints:+--constraint "$constraints"} -e "$root[${COLT5_EXTRAS:-test}]"
export COLT5_PYTHON="$venv/bin/python"
