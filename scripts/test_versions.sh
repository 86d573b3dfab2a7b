#!/usr/bin/env bash
# The test suite on other versions than the pinned ones (constraints.txt), each in a fresh virtual environment of
# its own, rebuilt on every run, so that moving the pins or the ranges is tried deliberately:
#   bash scripts/test_versions.sh newest   the newest release of every dependency, also past the upper bounds of
#                                          pyproject.toml and a machine-wide pip cap (no constraints), in .venv-newest
#   bash scripts/test_versions.sh lowest   the lower bounds of pyproject.toml's dependencies and test extra (their
#                                          own dependencies take the newest that fits), in .venv-lowest
# Prints the installed versions, then runs the suite as scripts/run_tests.sh does; extra arguments go to pytest.
# PYTHON picks the interpreter (default python3; 3.11 or newer, for tomllib).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which="${1:-}"
shift || true
case "$which" in
  newest | lowest) ;;
  *)
    echo "usage: bash scripts/test_versions.sh newest|lowest [pytest arguments]" >&2
    exit 2
    ;;
esac
venv="$root/.venv-$which"
rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
# The requirements of pyproject.toml (dependencies and the test extra): each pinned to its lower bound (lowest), or
# from its lower bound up without an upper bound (newest).
"$venv/bin/python" - "$root/pyproject.toml" "$which" > "$venv/requirements.txt" <<'PY'
import re
import sys
import tomllib

pyproject, which = sys.argv[1:]
project = tomllib.load(open(pyproject, "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    bound = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)[^;]*(;.*)?", requirement)
    if bound is None:
        sys.exit(f"test_versions.sh: {requirement!r} in pyproject.toml has no lower bound (>=) to test")
    name, lower, marker = bound[1], bound[2], bound[3] or ""
    print(f"{name}{'==' if which == 'lowest' else '>='}{lower}{marker}")
if which == "lowest":
    # Triton 3.6's CPU interpreter, which the tests run the kernels in, converts 1-element arrays with int(): an
    # error from numpy 2.4 on (fixed in triton 3.7). Compiled kernels on GPUs are not affected.
    print("numpy<2.4")
PY
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
PIP_CONSTRAINT=/dev/null "${pip[@]}" install -r "$venv/requirements.txt"
"${pip[@]}" install --no-deps -e "$root"
echo "== $which: $("$venv/bin/python" --version) =="
"$venv/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable
cd "$root"
exec "$venv/bin/python" -m pytest -m "not slow" "$@"
