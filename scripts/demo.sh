#!/usr/bin/env bash
# Set everything up and run the main job on embedded defaults: build a small bootable
# guest and back it up into a demo repository (both reused on later runs), start the
# daemon, publish the restore point, boot the VM under QEMU from the daemon's nfs:// URL
# printing its heartbeat, and print the URLs and commands to try. Ctrl-C stops it.
# Serves on 127.0.0.1 unless told otherwise: pass --bind 0.0.0.0 (or an address) for ESXi.
# Extra arguments go to 'instantnfs demo' (see --help).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh demo  # build deps + QEMU and the guest builder's tools
exec .venv/bin/instantnfs demo --bind 127.0.0.1 "$@"
