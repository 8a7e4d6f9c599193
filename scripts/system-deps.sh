#!/usr/bin/env bash
# Install the Debian packages instantnfs needs, only those that are missing.
#   system-deps.sh build   compiler and headers for the Cython extension
#   system-deps.sh demo    the above plus what the demo needs to build and boot the test guest
#   system-deps.sh test    the above plus the real NFS clients, OVMF and the test-only tools
# Runs apt-get as root (or through sudo); prints what it installs.
set -euo pipefail
what=${1:-build}
case "$what" in build|demo|test) ;; *) echo "usage: system-deps.sh [build|demo|test]" >&2; exit 2 ;; esac
pkgs=(gcc libc6-dev python3-dev liblz4-dev)  # liblz4-dev: engine/_codec.pyx links the system liblz4
pkgs+=(libfuse3-dev pkg-config fuse3)  # pyfuse3 (files mount) builds against libfuse3; fusermount3
if [ "$what" = demo ] || [ "$what" = test ]; then
  # engine/vm/guest.py builds the guest without mounting (sfdisk, mkfs.ext4 -d, mtools,
  # syslinux --offset, its own cpio writer) and boots it from nfs:// (qemu-block-extra).
  # No linux-image-amd64: without a readable /boot/vmlinuz-* the builder takes the kernel
  # out of Debian's package (apt-get download + dpkg-deb -x, depmod from kmod), never
  # installing it (that would run kernel and bootloader hooks on the host).
  pkgs+=(qemu-system-x86 qemu-block-extra busybox-static e2fsprogs fdisk dosfstools mtools
         syslinux syslinux-common syslinux-efi cpio kmod
         ovmf)  # EFI firmware for VMs backed up with --firmware efi (a per-VM copy of OVMF_VARS_4M.fd)
fi
if [ "$what" = test ]; then
  pkgs+=(qemu-utils libnfs-utils libtirpc3 netbase
         linux-image-amd64  # the fast guest-builder tests use the host's kernel (the debian path is a slow test)
         iproute2 util-linux  # these two: the benchmark's private network namespace (unshare, ip)
         ntfs-3g xfsprogs btrfs-progs exfatprogs  # tests/files: guest filesystems built without a mount
         systemd  # systemd-analyze verify: tests/control checks contrib/systemd/instantnfs.service
         binutils)  # as + ld: tests/vm reassembles the accel probe's boot sector from its source
fi
here=$(cd "$(dirname "$0")/.." && pwd)
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "instantnfs: need root (or sudo) for: $*" >&2; return 1; fi
}
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# rpcinfo (a libtirpc portmapper client the tests use) comes only with Debian's rpcbind
# package, whose service would take port 111 from our own portmapper: take the binary
# out of the package into .tools/bin instead of installing the service.
fetch_rpcinfo() {
  [ "$what" = test ] || return 0
  command -v rpcinfo >/dev/null || [ -x "$here/.tools/bin/rpcinfo" ] && return 0
  local tmp
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download -q rpcbind >/dev/null 2>&1); then
    as_root apt-get update -q >/dev/null  # no package lists yet
    (cd "$tmp" && apt-get download -q rpcbind >/dev/null 2>&1) \
      || { rm -rf "$tmp"; echo "instantnfs: could not fetch rpcinfo (Debian package rpcbind)" >&2; return 1; }
  fi
  (cd "$tmp" && dpkg-deb -x rpcbind_*.deb x)
  mkdir -p "$here/.tools/bin"
  cp "$tmp/x/usr/sbin/rpcinfo" "$here/.tools/bin/rpcinfo"
  rm -rf "$tmp"
}
if [ ${#missing[@]} -eq 0 ]; then
  fetch_rpcinfo
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "instantnfs: missing system packages (${missing[*]}) and no apt-get here; install them by hand" >&2
  exit 1
fi
echo "instantnfs: installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
as_root apt-get update -q >/dev/null
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fetch_rpcinfo
