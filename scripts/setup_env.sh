#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs the project into it, editable, with the tested versions.
# Sourced by run_tests.sh, run_train.sh and test_versions.sh. Settings, from the environment:
#   PYTHON             the interpreter that creates the environment (default python3)
#   COLT5_VENV         the environment's folder (default .venv in the repository root)
#   COLT5_EXTRAS       the extras to install (default test)
#   COLT5_CONSTRAINTS  a pip constraints file (default constraints.txt: the tested versions); empty for none
# A reused environment is moved to the pinned versions (pip installs what the constraints ask for).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COLT5_VENV:-$root/.venv}"
constraints="${COLT5_CONSTRAINTS-$root/constraints.txt}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install ${constraints:+--constraint "$constraints"} -e "$root[${COLT5_EXTRAS:-test}]"
export COLT5_PYTHON="$venv/bin/python"
