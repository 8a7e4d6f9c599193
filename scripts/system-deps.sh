#!/usr/bin/env bash
# Install the Debian packages instantnfs needs, only those that are missing.
#   system-deps.sh build   compiler and headers for the Cython extension
#   system-deps.sh test    the above plus the real NFS clients, QEMU and the guest-builder tools
# Runs apt-get as root (or through sudo); prints what it installs.
set -euo pipefail
what=${1:-build}
pkgs=(gcc libc6-dev python3-dev)
if [ "$what" = test ]; then
  pkgs+=(qemu-utils qemu-block-extra qemu-system-x86 libnfs-utils
         linux-image-amd64 busybox-static e2fsprogs fdisk dosfstools mtools cpio kmod)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "instantnfs: missing system packages (${missing[*]}) and no apt-get here; install them by hand" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "instantnfs: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
echo "instantnfs: installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q >/dev/null
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
