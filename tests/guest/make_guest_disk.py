"""Build the test guest: a small bootable raw disk and a guest-specific initramfs.

Nothing is mounted and nothing needs root: the disk is a sparse file partitioned with
``sfdisk``, its ext4 root made by ``mkfs.ext4 -E offset=... -d STAGING_DIR`` straight
into the image; the initramfs is a ``newc`` cpio archive written here (so it can hold
``/dev/console`` without ``mknod``).

Disk (64 MiB by default, MBR label ``0x696e6673``):

- p1, from 1 MiB to the end: ext4, label ``guest-root``, fixed UUID. It holds
  busybox-static with its applet links, ``/sbin/init`` (the script below), ``/etc`` and
  data files with known sha256 (``/etc/guest/manifest.sha256``; ``DATA_FILES`` here).

The guest's ``/sbin/init`` remounts ``/`` read-write, prints ``GUEST-HEARTBEAT ok
<run-id>`` (``instantnfs.run=`` on the kernel command line) on the serial console,
checks the data files (``GUEST-DATACHECK ok|FAIL``), writes the ``instantnfs.hb=``
value to ``/var/heartbeat.txt``, bumps ``/var/bootcount``, syncs, remounts ``/``
read-only (so the journal is flushed and host tools such as debugfs see the files),
prints ``GUEST-DONE`` and powers off.

Reproducible: fixed UUIDs, hash seed, MBR id, ``E2FSPROGS_FAKE_TIME``, every staged
file's times pinned and inode ctimes and atimes rewritten with ``debugfs``; the same inputs give
a byte-identical image (a test checks it).

Initramfs: busybox plus only the modules the guest needs to reach its root
(virtio_pci, virtio_blk, ext4, their dependencies from ``modules.dep`` and soft
dependencies from ``modules.softdep``) taken from the host's ``/lib/modules/<kver>``;
its ``/init`` loads them, waits for the root device, mounts it and ``switch_root``\\ s.
Under TCG it boots several seconds faster than Debian's generic 30 MB initramfs.

``ensure_guest()`` builds both (plus a copy of the kernel, since installing packages
rewrites ``/boot``) once into a cache directory keyed by a hash of this file and its
inputs; later runs reuse them. The directory is ``$INSTANTNFS_GUEST_CACHE``, else
``$XDG_CACHE_HOME/instantnfs-test-guest``, else ``/var/tmp/instantnfs-test-guest``.

Command line::

    python tests/guest/make_guest_disk.py disk OUT.img [--size-mb 64]
    python tests/guest/make_guest_disk.py initramfs OUT.cpio [--kver 6.1.0-...]
    python tests/guest/make_guest_disk.py ensure        # build into the cache, print paths
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EPOCH = 1700000000
FS_UUID = "696e6673-7400-4000-8000-000000000001"
HASH_SEED = "696e6673-7400-4000-8000-000000000002"
MBR_ID = "0x696e6673"
PART_START_SECTOR = 2048  # 1 MiB
PART_OFFSET = PART_START_SECTOR * 512
DEFAULT_SIZE_MB = 64
BUSYBOX = os.environ.get("INSTANTNFS_GUEST_BUSYBOX", "/bin/busybox")
ROOT_MODULES = ("virtio_pci", "virtio_blk", "ext4")
# run-id / heartbeat values travel on the kernel command line: keep them one word
VALUE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")

GUEST_INIT = r"""#!/bin/busybox sh
# instantnfs test guest: heartbeat, data check, write, sync, read-only, power off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /proc/self ]  || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ]   || mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -o remount,rw / || echo "GUEST-WARN remount rw failed"
RUN=none; HB=none
for kv in $(cat /proc/cmdline); do
  case "$kv" in
    instantnfs.run=*) RUN=${kv#instantnfs.run=} ;;
    instantnfs.hb=*)  HB=${kv#instantnfs.hb=} ;;
  esac
done
hostname -F /etc/hostname 2>/dev/null
echo "GUEST-HEARTBEAT ok $RUN"
echo "GUEST-INFO kernel=$(uname -r) root=$(grep ' / ' /proc/mounts | grep -v rootfs | cut -d' ' -f1,3,4 | tail -n1)"
# reads every data block through the virtual disk
if (cd / && sha256sum -c -s /etc/guest/manifest.sha256); then
  echo "GUEST-DATACHECK ok"
else
  echo "GUEST-DATACHECK FAIL"
fi
BOOTS=$(( $(cat /var/bootcount 2>/dev/null || echo 0) + 1 ))
echo "$BOOTS" > /var/bootcount
echo "$HB" > /var/heartbeat.txt
echo "boot=$BOOTS run=$RUN value=$HB uptime=$(cut -d' ' -f1 /proc/uptime)" >> /var/heartbeat.log
sync
# flush the journal into place and mark the fs clean: host tools (debugfs) do not
# replay the journal
mount -o remount,ro / || echo "GUEST-WARN remount ro failed"
sync
echo "GUEST-INFO uptime=$(cut -d' ' -f1 /proc/uptime) boots=$BOOTS"
echo "GUEST-DONE"
poweroff -f
sleep 5; echo "GUEST-WARN poweroff failed"; echo o > /proc/sysrq-trigger
"""

INITRAMFS_INIT = r"""#!/bin/busybox sh
# instantnfs guest initramfs: load the root's drivers, mount root, switch_root.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
ROOT=/dev/vda1; FSTYPE=ext4; INIT=/sbin/init
for kv in $(cat /proc/cmdline); do
  case "$kv" in
    root=/dev/*) ROOT=${kv#root=} ;;
    rootfstype=*) FSTYPE=${kv#rootfstype=} ;;
    init=*) INIT=${kv#init=} ;;
  esac
done
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m" || echo "initramfs: insmod $m failed"
done
i=0
while [ ! -b "$ROOT" ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i + 1)); done
[ -b "$ROOT" ] || { echo "initramfs: no root device $ROOT"; ls /dev; poweroff -f; }
mkdir -p /newroot
mount -t "$FSTYPE" -o ro "$ROOT" /newroot || { echo "initramfs: cannot mount $ROOT"; poweroff -f; }
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /proc /sys
exec switch_root /newroot "$INIT"
"""


@dataclass(frozen=True, slots=True)
class DataFile:
    path: str  # absolute, in the guest
    kind: str
    size: int
    seed: int = 0


DATA_FILES = (
    DataFile("/data/random-4m.bin", "random", 4 << 20, 1),
    DataFile("/data/random-512k.bin", "random", 512 << 10, 2),
    DataFile("/data/zeros-1m.bin", "zeros", 1 << 20),
    DataFile("/data/lines.txt", "lines", 20000),
    DataFile("/data/dir with space/note.txt", "note", 0),
)


def data_bytes(f: DataFile) -> bytes:
    if f.kind == "random":
        return hashlib.shake_256(b"instantnfs-guest-%d" % f.seed).digest(f.size)
    if f.kind == "zeros":
        return bytes(f.size)
    if f.kind == "lines":
        return "".join(
            f"instantnfs line {i:06d}: the quick brown fox jumps over the lazy dog\n" for i in range(1, f.size + 1)
        ).encode()
    if f.kind == "note":
        return b"file in a directory whose name contains spaces\n"
    raise ValueError(f.kind)


def expected_sha256() -> dict[str, str]:
    """Guest path -> sha256 of every data file (what the guest checks at boot)."""
    return {f.path: hashlib.sha256(data_bytes(f)).hexdigest() for f in DATA_FILES}


class BuildError(RuntimeError):
    pass


def _run(cmd: list[str], env: dict | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, input=stdin, capture_output=True, env=env)
    if p.returncode != 0:
        raise BuildError(f"{cmd[0]} failed ({p.returncode}): {p.stderr.decode(errors='replace').strip()}")
    return p


def missing_tools() -> list[str]:
    need = ["sfdisk", "mkfs.ext4", "debugfs"]
    out = [t for t in need if shutil.which(t) is None]
    if not os.access(BUSYBOX, os.X_OK):
        out.append(f"{BUSYBOX} (busybox-static)")
    return out


def _check_busybox() -> None:
    with open(BUSYBOX, "rb") as f:
        head = f.read(1 << 20)
    # a dynamically linked ELF names its interpreter (PT_INTERP): the guest has no libc
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        raise BuildError(f"{BUSYBOX} is dynamically linked; install busybox-static")


def _stage_root(stage: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/guest", "proc", "sys", "dev", "run",
              "tmp", "var", "root", "data/dir with space"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    os.chmod(stage / "tmp", 0o1777)
    shutil.copyfile(BUSYBOX, stage / "bin/busybox")
    os.chmod(stage / "bin/busybox", 0o755)
    applets = _run([BUSYBOX, "--list-full"]).stdout.decode().split()
    for rel in sorted(applets):
        if rel in ("sbin/init", "linuxrc", "bin/busybox"):
            continue
        p = stage / rel
        if not p.exists() and not p.is_symlink():
            p.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", p)
    (stage / "sbin/init").write_text(GUEST_INIT)
    os.chmod(stage / "sbin/init", 0o755)
    (stage / "etc/hostname").write_text("instantnfs-guest\n")
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\n")
    (stage / "etc/fstab").write_text("/dev/vda1 / ext4 defaults 0 1\n")
    for f in DATA_FILES:
        (stage / f.path.lstrip("/")).write_bytes(data_bytes(f))
    manifest = "".join(f"{h}  {p}\n" for p, h in sorted(expected_sha256().items()))
    (stage / "etc/guest/manifest.sha256").write_text(manifest)
    for root, dirs, files in os.walk(stage):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(stage, (EPOCH, EPOCH))


def build_disk(out: str | os.PathLike, size_mb: int = DEFAULT_SIZE_MB) -> Path:
    """Write the guest disk image to ``out`` (replaced atomically)."""
    if size_mb < 24:
        raise BuildError("the guest disk needs at least 24 MiB")
    missing = missing_tools()
    if missing:
        raise BuildError("missing tools: " + ", ".join(missing))
    _check_busybox()
    out = Path(out)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH), LC_ALL="C")
    with tempfile.TemporaryDirectory(prefix="guest-build-", dir=out.parent) as tmp:
        work = Path(tmp)
        stage = work / "root"
        _stage_root(stage)
        img = work / "disk.img"
        with open(img, "wb") as f:
            f.truncate(size_mb << 20)
        table = f"label: dos\nlabel-id: {MBR_ID}\nunit: sectors\n\nstart={PART_START_SECTOR}, type=83, bootable\n"
        _run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(img)], env=env, stdin=table.encode())
        part_bytes = (size_mb << 20) - PART_OFFSET
        _run(["mkfs.ext4", "-F", "-q", "-b", "4096", "-m", "0", "-L", "guest-root", "-U", FS_UUID,
              "-E", f"offset={PART_OFFSET},hash_seed={HASH_SEED},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
              "-d", str(stage), str(img), f"{part_bytes // 1024}k"], env=env)
        # mke2fs -d copies each staged file's ctime (when we made it) and atime (which
        # reading the file during the copy may have just set, under relatime): pin both
        cmds = []
        for root, dirs, files in os.walk(stage):
            for name in [""] + dirs + files:
                rel = "/" + os.path.relpath(os.path.join(root, name), stage) if name else "/" + os.path.relpath(root, stage)
                rel = "/" if rel in ("/.",) else rel
                cmds.append(f'sif "{rel}" ctime @{EPOCH}\n')
                cmds.append(f'sif "{rel}" atime @{EPOCH}\n')
        script = work / "ctime.debugfs"
        script.write_text("".join(sorted(set(cmds))))
        p = _run(["debugfs", "-w", "-f", str(script), f"{img}?offset={PART_OFFSET}"], env=env)
        errors = [ln for ln in p.stderr.decode(errors="replace").splitlines() if ln and not ln.startswith("debugfs ")]
        if errors:
            raise BuildError("debugfs: " + "; ".join(errors[:5]))
        os.replace(img, out)
    return out


# ---------------------------------------------------------------------- initramfs


def kernel_version(kernel: str | os.PathLike) -> str:
    name = Path(kernel).name
    if not name.startswith("vmlinuz-"):
        raise BuildError(f"cannot tell the kernel version from {kernel}")
    return name.removeprefix("vmlinuz-")


def host_kernel() -> Path:
    env = os.environ.get("INSTANTNFS_GUEST_KERNEL")
    if env:
        return Path(env)
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: [int(x) if x.isdigit() else x for x in
                                                                      p.name.replace("-", ".").split(".")])
    readable = [k for k in kernels if os.access(k, os.R_OK)]
    if not readable:
        raise BuildError("no readable /boot/vmlinuz-* (apt-get install linux-image-amd64)")
    return readable[-1]


def module_closure(kver: str, wanted: tuple[str, ...] = ROOT_MODULES, moddir: str = "/lib/modules") -> list[str]:
    """Module files (relative to the version directory) to load, dependencies first."""
    base = Path(moddir) / kver
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    aliases: dict[str, list[str]] = {}
    alias_file = base / "modules.alias"
    if alias_file.exists():
        for line in alias_file.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "alias":
                aliases.setdefault(parts[1], []).append(parts[2])
    softpre: dict[str, list[str]] = {}
    soft_file = base / "modules.softdep"
    if soft_file.exists():
        for line in soft_file.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "softdep" and parts[2] == "pre:":
                pre = []
                for w in parts[3:]:
                    if w == "post:":
                        break
                    pre.append(w)
                softpre[parts[1].replace("-", "_")] = pre

    def resolve(name: str) -> str | None:
        n = name.replace("-", "_")
        if n in by_name:
            return by_name[n]
        # an alias (crypto-crc32c): prefer the portable generic implementation
        for target in sorted(aliases.get(name, []), key=lambda t: (not t.endswith("_generic"), t)):
            t = target.replace("-", "_")
            if t in by_name:
                return by_name[t]
        return None

    order: list[str] = []
    seen: set[str] = set()

    def visit(mod: str) -> None:
        if mod in seen:
            return
        seen.add(mod)
        name = Path(mod).name.split(".ko")[0].replace("-", "_")
        for s in softpre.get(name, []):
            r = resolve(s)
            if r:
                visit(r)
        for d in reversed(deps.get(mod, [])):  # modules.dep lists the deepest last
            visit(d)
        order.append(mod)

    for w in wanted:
        mod = resolve(w)
        if mod is None:
            cfg = Path("/boot") / f"config-{kver}"
            opt = {"virtio_pci": "VIRTIO_PCI", "virtio_blk": "VIRTIO_BLK", "ext4": "EXT4_FS"}.get(w, w.upper())
            if cfg.exists() and f"CONFIG_{opt}=y" in cfg.read_text():
                continue  # built into the kernel
            raise BuildError(f"module {w} not found for kernel {kver} in {base}")
        visit(mod)
    return order


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, EPOCH, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields)
    buf = head + name.encode() + b"\0"
    buf += b"\0" * (-len(buf) % 4)
    buf += data + b"\0" * (-len(data) % 4)
    return buf


def build_initramfs(out: str | os.PathLike, kver: str, moddir: str = "/lib/modules") -> Path:
    """Write an uncompressed newc initramfs for the guest to ``out``; returns its path."""
    _check_busybox()
    mods = module_closure(kver, ROOT_MODULES, moddir)
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        entries.append((d, stat.S_IFDIR | 0o755, b"", (0, 0)))
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("dev/null", stat.S_IFCHR | 0o666, b"", (1, 3)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes(), (0, 0)))
    for applet in ("sh", "mount", "umount", "insmod", "switch_root", "sleep", "cat", "mkdir", "ls", "poweroff"):
        entries.append((f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox", (0, 0)))
    order = []
    for mod in mods:
        src = Path(moddir) / kver / mod
        data = src.read_bytes()
        name = src.name
        if name.endswith(".xz"):
            data, name = lzma.decompress(data), name[:-3]
        elif name.endswith(".zst"):
            raise BuildError(f"{src}: zstd-compressed modules are not supported here")
        entries.append((f"lib/modules/{name}", stat.S_IFREG | 0o644, data, (0, 0)))
        order.append(name)
    entries.append(("modules.order", stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode(), (0, 0)))
    entries.append(("init", stat.S_IFREG | 0o755, INITRAMFS_INIT.encode(), (0, 0)))
    blob = b"".join(_cpio_entry(n, m, d, r, i + 1) for i, (n, m, d, r) in enumerate(entries))
    blob += _cpio_entry("TRAILER!!!", 0, b"", (0, 0), 0)
    blob += b"\0" * (-len(blob) % 512)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, out)
    return out


def cpio_names(path: str | os.PathLike) -> dict[str, bytes]:
    """Read a newc archive back: name -> data (for tests)."""
    blob = Path(path).read_bytes()
    pos, out = 0, {}
    while pos < len(blob):
        if blob[pos : pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        f = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = f[6], f[11]
        name = blob[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            break
        out[name] = blob[pos : pos + size]
        pos += size
        pos += -pos % 4
    return out


# ---------------------------------------------------------------------- cache


@dataclass(frozen=True, slots=True)
class GuestArtifacts:
    disk: Path       # pristine guest disk: copy it before booting (the guest writes to it)
    initramfs: Path  # the guest-specific initramfs
    kernel: Path     # a copy of the host kernel
    host_initrd: Path | None  # a copy of Debian's initramfs for that kernel, if readable
    kver: str


def cache_dir() -> Path:
    env = os.environ.get("INSTANTNFS_GUEST_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "instantnfs-test-guest"
    return Path("/var/tmp/instantnfs-test-guest")


def _input_key(kernel: Path, size_mb: int) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(f"{size_mb}\0{kernel}\0".encode())
    for p in (kernel, Path(BUSYBOX)):
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def ensure_guest(size_mb: int = DEFAULT_SIZE_MB) -> GuestArtifacts:
    """Build (once) and return the guest disk, initramfs and kernel from the cache."""
    kernel = host_kernel()
    kver = kernel_version(kernel)
    key = _input_key(kernel, size_mb)
    d = cache_dir() / key
    done = d / "artifacts.json"
    if not done.exists():
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        build_disk(d / "guest.img", size_mb)
        t1 = time.monotonic()
        build_initramfs(d / "initramfs.cpio", kver)
        shutil.copyfile(kernel, d / kernel.name)
        host_initrd = Path("/boot") / f"initrd.img-{kver}"
        if os.access(host_initrd, os.R_OK):
            shutil.copyfile(host_initrd, d / host_initrd.name)
        info = {
            "kver": kver,
            "kernel": kernel.name,
            "host_initrd": host_initrd.name if (d / host_initrd.name).exists() else None,
            "disk_sha256": hashlib.sha256((d / "guest.img").read_bytes()).hexdigest(),
            "disk_build_s": round(t1 - t0, 2),
            "initramfs_bytes": (d / "initramfs.cpio").stat().st_size,
        }
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, done)
    info = json.loads(done.read_text())
    return GuestArtifacts(
        disk=d / "guest.img",
        initramfs=d / "initramfs.cpio",
        kernel=d / info["kernel"],
        host_initrd=d / info["host_initrd"] if info["host_initrd"] else None,
        kver=info["kver"],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the instantnfs test guest (no mounting, no root).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("disk", help="write a guest disk image")
    a.add_argument("out")
    a.add_argument("--size-mb", type=int, default=DEFAULT_SIZE_MB)
    b = sub.add_parser("initramfs", help="write the guest-specific initramfs")
    b.add_argument("out")
    b.add_argument("--kver", default=None, help="kernel version (default: the newest in /boot)")
    sub.add_parser("ensure", help="build everything into the cache and print the paths")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "disk":
            t0 = time.monotonic()
            p = build_disk(args.out, args.size_mb)
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            print(f"{p}: {args.size_mb} MiB, sha256 {digest}, built in {time.monotonic() - t0:.2f} s")
        elif args.cmd == "initramfs":
            kver = args.kver or kernel_version(host_kernel())
            p = build_initramfs(args.out, kver)
            print(f"{p}: {p.stat().st_size} bytes for kernel {kver}")
        else:
            art = ensure_guest()
            print(json.dumps({k: str(v) for k, v in art.__dict__.items()} if hasattr(art, "__dict__") else
                             {f: str(getattr(art, f)) for f in art.__slots__}, indent=2))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
