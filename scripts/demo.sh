#!/usr/bin/env bash
# Set everything up and run the main job on embedded defaults: build a demo repository
# from a generated sample disk (reused on later runs), start the daemon, publish the demo
# restore point and print the nfs:// URLs and commands to try. Ctrl-C stops it.
# Serves on 127.0.0.1 unless told otherwise: pass --bind 0.0.0.0 (or an address) for ESXi.
# Extra arguments go to 'instantnfs demo' (see --help).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh build
exec .venv/bin/instantnfs demo --bind 127.0.0.1 "$@"
