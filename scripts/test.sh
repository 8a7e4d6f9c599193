#!/usr/bin/env bash
# Set everything up and run the whole test suite: fast tests first, then the slow
# end-to-end group. Extra arguments go to pytest (for both groups).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh test
export PATH="$here/.venv/bin:$here/.tools/bin:$PATH"
echo "== fast tests" >&2
python -m pytest -m "not slow" -q "$@"
echo "== slow tests (end to end, crash trials)" >&2
python -m pytest -m slow -q "$@"
