#!/usr/bin/env bash
# Set up a working instantnfs in ./.venv: system packages, the virtualenv, the package
# (editable) and its Cython extension. Idempotent and quick when nothing changed.
#   scripts/setup.sh [build|demo|test]   (demo: also QEMU and the guest builder's tools)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
what=${1:-build}
bash scripts/system-deps.sh "$what"
py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "instantnfs: Python 3.11 or newer is needed ($py is $("$py" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv || { echo "instantnfs: '$py -m venv' failed: install python3-venv" >&2; exit 1; }
fi
extra=$([ "$what" = test ] && echo "[test,lint]" || echo "")
stamp=.venv/.setup-stamp-$what
want=$(cat setup.py pyproject.toml $(find engine -name "*.pyx" -o -name "*.pxd" | sort) engine/nfs/fastlane.py engine/nfs/transport.py 2>/dev/null | sha256sum | cut -c1-16)
built=true
for so in engine/_blockmap engine/_codec engine/nfs/_wire engine/nfs/_fastlane_c engine/nfs/_transport_c; do
  ls "$so".*.so >/dev/null 2>&1 || built=false
done
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ "$built" = false ]; then
  echo "instantnfs: installing into .venv (first run takes a minute; log in .venv/setup.log)" >&2
  log=.venv/setup.log
  if ! {
    .venv/bin/python -m pip install -q --upgrade pip &&
    .venv/bin/python -m pip install -q "Cython>=3.0" "numpy>=1.26" "setuptools>=77" wheel &&
    .venv/bin/python -m pip install -q --no-build-isolation -e ".$extra" &&
    .venv/bin/python setup.py -q build_ext --inplace
  } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "instantnfs: set-up failed (whole log: $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
