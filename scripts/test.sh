#!/usr/bin/env bash
# Set everything up and run the whole test suite: fast tests first, then the slow
# end-to-end group. Extra arguments go to pytest (for both groups).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh test
export PATH="$here/.venv/bin:$here/.tools/bin:$PATH"
# both groups always run, so one run shows every failure; the exit status is the worse
status=0
# the layering of engine/ (.importlinter): a room imports only the rooms below it
echo "== import contracts" >&2
lint-imports --no-cache || status=$?
echo "== fast tests" >&2
python -m pytest -m "not slow" -q "$@" || status=$?
echo "== slow tests (end to end, crash trials)" >&2
python -m pytest -m slow -q "$@" || { s=$?; [ "$status" -ne 0 ] || status=$s; }
exit "$status"
