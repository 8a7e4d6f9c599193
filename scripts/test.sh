#!/usr/bin/env bash
# Set everything up and run the whole test suite: the import contracts, the fast tests
# (with the Cython builds, then with their pure-Python twins), then the slow end-to-end
# group. Extra arguments go to pytest (for every group).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh test
export PATH="$here/.venv/bin:$here/.tools/bin:$PATH"
# every group always runs, so one run shows every failure; the exit status is the first failure's
status=0
# the layering of engine/ (.importlinter): a room imports only the rooms below it
echo "== import contracts" >&2
lint-imports --no-cache || status=$?
echo "== fast tests" >&2
python -m pytest -m "not slow" -q "$@" || status=$?
# the readable twins of the Cython builds (block map, wire codec, fast lane, transports)
# must serve the same daemon (INSTANTNFS_PURE=1)
echo "== fast tests, pure-Python twins" >&2
INSTANTNFS_PURE=1 python -m pytest -m "not slow" -q "$@" || { s=$?; [ "$status" -ne 0 ] || status=$s; }
echo "== slow tests (end to end, crash trials)" >&2
python -m pytest -m slow -q "$@" || { s=$?; [ "$status" -ne 0 ] || status=$s; }
exit "$status"
