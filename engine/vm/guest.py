"""The bootable test guest: a small raw disk that boots as a production VM does.

What: ``ensure_guest()`` builds (once, into a cache keyed by its inputs) a raw disk that
SeaBIOS and OVMF both boot from: an MBR (syslinux's ``mbr.bin``) with

- p1 (1 MiB .. 32 MiB, type 0xEF, active): FAT with syslinux for BIOS (``ldlinux.sys``
  via ``syslinux --install --offset``) and for EFI (``\\EFI\\BOOT\\BOOTX64.EFI`` =
  ``syslinux.efi`` + ``ldlinux.e64``), the kernel, the guest's own initramfs and
  ``syslinux.cfg`` (serial console ttyS0, ``root=LABEL=guest-root``);
- p2 (32 MiB .. end): ext4 labelled ``ROOT_LABEL`` with busybox-static, the guest agent
  (``/sbin/init``) and data files of known sha256 (``/etc/guest/manifest.sha256``).

Why: a recovered or verified VM must boot from its own disk, whatever the bus it is
given (virtio-blk, virtio-scsi, SATA/AHCI, IDE), so the initramfs carries the drivers of
every bus, ``virtio_net`` and ``qemu_fw_cfg``, and finds its root by label. The agent
reads its orders from the fw_cfg blob ``FW_CFG_NAME`` (``guest_config``) and reports on
the serial console with the markers below; without a blob it runs mode "run" with run
id "none" (the demo).

How, without root and without mounting: the disk is a sparse file partitioned with
``sfdisk``; the FAT is made and filled with mtools at the partition's offset; the ext4
root with ``mkfs.ext4 -E offset=... -d STAGING``; the initramfs is a ``newc`` cpio
written here (it holds ``/dev/console`` without ``mknod``). The kernel is the host's
``/boot/vmlinuz-*`` when readable, else Debian's kernel package fetched with ``apt-get
download`` and unpacked with ``dpkg-deb -x`` into the cache (never installed: that
would run kernel and bootloader hooks on the host); its modules come from the same
tree. Reproducible: fixed UUIDs, serials, MBR id, hash seed, ``E2FSPROGS_FAKE_TIME`` and
``SOURCE_DATE_EPOCH``, staged times pinned: the same inputs give the same bytes.

Threads and processes: everything here blocks (subprocesses); call it from a worker
thread, never an event loop. Two processes may build at once: each builds in its own
temporary directory inside the cache and renames it into place; the loser discards its
copy and uses the winner's.

Refuses: a dynamically linked busybox (the guest has no libc), zstd-compressed modules,
run/value words outside ``VALUE_CHARS`` (they travel in a key=value blob the agent
parses with the shell), a disk under 64 MiB. ``read_guest_file`` never mounts: debugfs
reads the ext4 root in place (a copy with the journal replayed when asked).
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import GuestBuildError

HEARTBEAT = "GUEST-HEARTBEAT"   # line: "GUEST-HEARTBEAT ok <run> n=<k>"
READY = "GUEST-READY"           # services (tcp/http listeners) are up
DONE = "GUEST-DONE"             # oneshot: written, synced, fs read-only, about to power off
COUNTER = "GUEST-COUNTER"       # line: "GUEST-COUNTER <n>" each time n is durably appended
PROBE = "GUEST-PROBE"           # line: "GUEST-PROBE <host>:<port> open|closed"
READBACK = "GUEST-READBACK"     # line: "GUEST-READBACK <value>": read back from the disk after a sync
DATACHECK = "GUEST-DATACHECK"   # line: "GUEST-DATACHECK ok|FAIL"
FW_CFG_NAME = "opt/instantnfs/config"
ROOT_LABEL = "guest-root"

EPOCH = 1700000000
FS_UUID = "696e6673-7400-4000-8000-000000000001"
HASH_SEED = "696e6673-7400-4000-8000-000000000002"
FAT_SERIAL = "696e6673"
MBR_ID = "0x696e6673"
SECTOR = 512
BOOT_START = 2048                     # 1 MiB
BOOT_SECTORS = (31 << 20) // SECTOR   # the FAT: 1 MiB .. 32 MiB
ROOT_START = BOOT_START + BOOT_SECTORS
BOOT_OFFSET = BOOT_START * SECTOR
ROOT_OFFSET = ROOT_START * SECTOR
BOOT_PART_TYPE = 0xEF   # EFI system partition: OVMF takes it, mbr.bin boots it for being active
DISK_SIZE = 128 << 20
MIN_DISK_SIZE = 64 << 20
BUSYBOX = os.environ.get("INSTANTNFS_GUEST_BUSYBOX", "/bin/busybox")
SYSLINUX_MBR = ("/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin")
SYSLINUX_EFI = "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi"
LDLINUX_E64 = "/usr/lib/syslinux/modules/efi64/ldlinux.e64"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
# every disk bus the guest may be given, its network card and the fw_cfg reader
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ahci", "ata_piix",
                 "virtio_net", "qemu_fw_cfg", "ext4")
KCONFIG = {"virtio_pci": "VIRTIO_PCI", "virtio_blk": "VIRTIO_BLK", "virtio_scsi": "SCSI_VIRTIO",
           "sd_mod": "BLK_DEV_SD", "ahci": "SATA_AHCI", "ata_piix": "ATA_PIIX",
           "virtio_net": "VIRTIO_NET", "qemu_fw_cfg": "FW_CFG_SYSFS", "ext4": "EXT4_FS"}
# words of the config blob: the agent splits it with the shell
VALUE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")
KERNEL_SOURCES = ("auto", "host", "debian")

Progress = Callable[[str, str], None]  # (phase, detail): phases kernel, initramfs, root, boot, done

SYSLINUX_CFG = f"""SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND console=ttyS0,115200 root=LABEL={ROOT_LABEL} rootfstype=ext4 panic=-1 quiet loglevel=4
"""

GUEST_INIT = r"""#!/bin/busybox sh
# instantnfs test guest agent (engine/vm/guest.py): orders from fw_cfg, markers on ttyS0.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /proc/self ]  || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ]   || mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -o remount,rw / || echo "GUEST-WARN remount rw failed"
hostname -F /etc/hostname 2>/dev/null
RUN=none; VALUE=; MODE=run; HB_S=5; COUNTER=0; TCP=; HTTP=; PROBE=
CFG=/sys/firmware/qemu_fw_cfg/by_name/opt/instantnfs/config/raw
if [ -r "$CFG" ]; then
  while IFS='=' read -r k v; do
    case "$k" in
      run) RUN=$v ;; value) VALUE=$v ;; mode) MODE=$v ;; heartbeat_s) HB_S=$v ;;
      counter) COUNTER=$v ;; tcp) TCP=$v ;; http) HTTP=$v ;; probe) PROBE=$v ;;
    esac
  done < "$CFG"
fi
N=0
beat() { N=$((N + 1)); echo "GUEST-HEARTBEAT ok $RUN n=$N"; }
beat
echo "GUEST-INFO kernel=$(uname -r) mode=$MODE root=$(grep ' / ' /proc/mounts | grep -v rootfs | cut -d' ' -f1,3 | tail -n1)"
# reads every data block through the virtual disk
if (cd / && sha256sum -c -s /etc/guest/manifest.sha256); then
  echo "GUEST-DATACHECK ok"
else
  echo "GUEST-DATACHECK FAIL"
fi
BOOTS=$(( $(cat /var/bootcount 2>/dev/null || echo 0) + 1 ))
echo "$BOOTS" > /var/bootcount
echo "GUEST-INFO boots=$BOOTS"
[ -n "$VALUE" ] && echo "$VALUE" > /var/heartbeat.txt
echo "boot=$BOOTS run=$RUN value=$VALUE uptime=$(cut -d' ' -f1 /proc/uptime)" >> /var/heartbeat.log
sync
if [ -n "$VALUE" ]; then
  # read the value back from the disk, not from the page cache: what the disk really holds
  echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
  echo "GUEST-READBACK $(cat /var/heartbeat.txt)"
fi
if [ "$MODE" = oneshot ]; then
  # flush the journal into place and mark the fs clean: debugfs does not replay journals
  mount -o remount,ro / || echo "GUEST-WARN remount ro failed"
  sync
  echo "GUEST-INFO uptime=$(cut -d' ' -f1 /proc/uptime) boots=$BOOTS"
  echo "GUEST-DONE $RUN"
  poweroff -f
  sleep 5; echo "GUEST-WARN poweroff failed"; echo o > /proc/sysrq-trigger
fi
if [ -e /sys/class/net/eth0 ]; then
  ifconfig lo 127.0.0.1 up
  if ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up && route add default gw 10.0.2.2; then
    echo "GUEST-INFO net eth0 10.0.2.15/24 gw 10.0.2.2"
  else
    echo "GUEST-WARN network setup failed"
  fi
fi
for p in $TCP; do nc -ll -p "$p" -e /sbin/guest-banner & done
if [ -n "$HTTP" ]; then
  mkdir -p /var/www && echo "instantnfs guest $RUN" > /var/www/index.html
  for p in $HTTP; do httpd -p "$p" -h /var/www || echo "GUEST-WARN httpd $p failed"; done
fi
for hp in $PROBE; do
  if nc -w 2 "${hp%:*}" "${hp##*:}" -e /bin/true </dev/null >/dev/null 2>&1; then
    echo "GUEST-PROBE $hp open"
  else
    echo "GUEST-PROBE $hp closed"
  fi
done
echo "GUEST-READY $RUN"
if [ "$COUNTER" = 1 ]; then
  (
    c=$(tail -n 1 /var/counter.log 2>/dev/null); c=${c:-0}
    while true; do
      c=$((c + 1)); echo "$c" >> /var/counter.log; sync; echo "GUEST-COUNTER $c"; sleep 0.1
    done
  ) &
fi
while true; do sleep "$HB_S"; beat; done
"""

GUEST_BANNER = """#!/bin/busybox sh
echo "instantnfs-guest $(hostname)"
"""

INITRAMFS_INIT = r"""#!/bin/busybox sh
# instantnfs guest initramfs: load every bus's drivers, find the root by label, switch_root.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
ROOT=LABEL=guest-root; FSTYPE=ext4; INIT=/sbin/init
for kv in $(cat /proc/cmdline); do
  case "$kv" in
    root=*) ROOT=${kv#root=} ;;
    rootfstype=*) FSTYPE=${kv#rootfstype=} ;;
    init=*) INIT=${kv#init=} ;;
  esac
done
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m" || echo "initramfs: insmod $m failed"
done
find_root() {
  case "$ROOT" in
    LABEL=*|UUID=*) findfs "$ROOT" 2>/dev/null ;;
    *) [ -b "$ROOT" ] && echo "$ROOT" ;;
  esac
}
i=0; DEV=$(find_root)
while [ -z "$DEV" ] && [ $i -lt 1500 ]; do sleep 0.02; i=$((i + 1)); DEV=$(find_root); done
[ -n "$DEV" ] || { echo "initramfs: no root device $ROOT"; cat /proc/partitions; poweroff -f; }
mkdir -p /newroot
mount -t "$FSTYPE" -o ro "$DEV" /newroot || { echo "initramfs: cannot mount $DEV"; poweroff -f; }
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /proc /sys
exec switch_root /newroot "$INIT"
"""


@dataclass(frozen=True, slots=True)
class Guest:
    """The built guest. ``disk`` is pristine and shared: copy it before writing."""

    disk: Path
    kver: str
    size: int


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


@dataclass(frozen=True, slots=True)
class Kernel:
    """A kernel and the module tree that matches it."""

    vmlinuz: Path
    kver: str
    moddir: Path         # holds <kver>/modules.dep ...
    config: Path | None  # the kernel's .config (to tell built-in drivers)
    origin: str          # "host" or "debian:<package>"


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


# ---------------------------------------------------------------------- the agent's config


def _word(name: str, v: str) -> str:
    if not v or not set(v) <= VALUE_CHARS:
        raise ValueError(f"{name} {v!r} must be one word of [A-Za-z0-9._:-]")
    return v


def _port(p: int) -> int:
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
        raise ValueError(f"port {p!r} must be an integer in 1..65535")
    return p


def guest_config(run: str, *, value: str | None = None, mode: str = "run", heartbeat_s: float = 5.0,
                 counter: bool = False, tcp: Sequence[int] = (), http: Sequence[int] = (),
                 probe: Sequence[str] = ()) -> bytes:
    """The fw_cfg blob (``key=value`` lines) that tells the agent what to do."""
    if mode not in ("run", "oneshot"):
        raise ValueError("mode must be run or oneshot")
    if not 0.1 <= heartbeat_s <= 3600:
        raise ValueError("heartbeat_s must be within 0.1..3600")
    probes = []
    for hp in probe:
        host, sep, port = hp.rpartition(":")
        if not sep or not host or not set(host) <= HOST_CHARS or not port.isdigit():
            raise ValueError(f"probe {hp!r} must be HOST:PORT (an address or lower-case name)")
        probes.append(f"{host}:{_port(int(port))}")
    lines = [f"run={_word('run', run)}", f"mode={mode}", f"heartbeat_s={heartbeat_s:g}",
             f"counter={int(bool(counter))}"]
    if value is not None:
        lines.append(f"value={_word('value', value)}")
    if tcp:
        lines.append("tcp=" + " ".join(str(_port(p)) for p in tcp))
    if http:
        lines.append("http=" + " ".join(str(_port(p)) for p in http))
    if probes:
        lines.append("probe=" + " ".join(probes))
    return ("\n".join(lines) + "\n").encode()


def parse_config(blob: bytes) -> dict[str, str]:
    """The blob back as a dict, as the agent reads it (key up to the first '=')."""
    out = {}
    for line in blob.decode().splitlines():
        k, _, v = line.partition("=")
        out[k] = v
    return out


def fw_cfg_args(config: bytes, path: Path) -> list[str]:
    """Write ``config`` to ``path``; the QEMU arguments that hand it to the guest."""
    path = Path(path)
    path.write_bytes(config)
    return ["-fw_cfg", f"name={FW_CFG_NAME},file={str(path).replace(',', ',,')}"]


# ---------------------------------------------------------------------- tools


def _run(cmd: list[str], env: dict[str, str] | None = None, stdin: bytes | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        p = subprocess.run(cmd, input=stdin, capture_output=True, env=env, cwd=cwd)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{cmd[0]} is not installed (scripts/system-deps.sh demo)") from e
    if p.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd[:3])} failed ({p.returncode}): "
                              f"{p.stderr.decode(errors='replace').strip()[-800:]}")
    return p


def _first(paths: Sequence[str]) -> Path | None:
    for p in paths:
        if os.access(p, os.R_OK):
            return Path(p)
    return None


def missing_tools() -> list[str]:
    """What the builder needs and cannot find (empty: it can build)."""
    out = [t for t in ("sfdisk", "mkfs.ext4", "debugfs", "mformat", "mcopy", "mmd", "syslinux")
           if shutil.which(t) is None]
    if not os.access(BUSYBOX, os.X_OK):
        out.append(f"{BUSYBOX} (busybox-static)")
    if _first(SYSLINUX_MBR) is None:
        out.append("mbr.bin (syslinux-common)")
    for p, pkg in ((SYSLINUX_EFI, "syslinux-efi"), (LDLINUX_E64, "syslinux-efi")):
        if not os.access(p, os.R_OK):
            out.append(f"{p} ({pkg})")
    return out


def _check_busybox() -> None:
    with open(BUSYBOX, "rb") as f:
        head = f.read(1 << 20)
    # a dynamically linked ELF names its interpreter (PT_INTERP): the guest has no libc
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        raise GuestBuildError(f"{BUSYBOX} is dynamically linked; install busybox-static")


# ---------------------------------------------------------------------- kernel


def _version_key(name: str) -> list[object]:
    return [(0, int(x)) if x.isdigit() else (1, x) for x in name.replace("-", ".").split(".")]


def host_kernel() -> Kernel | None:
    """The newest readable /boot/vmlinuz-* whose modules are in /lib/modules, if any."""
    explicit = os.environ.get("INSTANTNFS_GUEST_KERNEL")
    kernels = [Path(explicit)] if explicit else sorted(Path("/boot").glob("vmlinuz-*"),
                                                       key=lambda p: _version_key(p.name))
    for k in reversed(kernels):
        kver = k.name.removeprefix("vmlinuz-")
        if os.access(k, os.R_OK) and (Path("/lib/modules") / kver / "modules.dep").exists():
            cfg = Path("/boot") / f"config-{kver}"
            return Kernel(k, kver, Path("/lib/modules"), cfg if cfg.exists() else None, "host")
    return None


def _depmod() -> str:
    for d in ("", "/usr/sbin/", "/sbin/"):
        p = shutil.which(d + "depmod") if not d else (d + "depmod" if os.access(d + "depmod", os.X_OK) else None)
        if p:
            return p
    raise GuestBuildError("depmod is not installed (kmod)")


def debian_kernel_package() -> str:
    """The versioned kernel package linux-image-amd64 depends on (apt-cache)."""
    p = _run(["apt-cache", "depends", "--important", "linux-image-amd64"])
    for line in p.stdout.decode().splitlines():
        word = line.strip().removeprefix("|").removeprefix("Depends:").strip()
        if word.startswith("linux-image-") and word.endswith("-amd64") and word != "linux-image-amd64":
            return word
    raise GuestBuildError("apt-cache names no linux-image-<version>-amd64 for linux-image-amd64")


def debian_kernel(cache: Path, package: str | None = None, progress: Progress | None = None) -> Kernel:
    """Debian's kernel package, downloaded and unpacked (never installed) under ``cache``.

    Only the kernel, its config and the modules the guest loads are kept (the full
    module tree is ~400 MB)."""
    package = package or debian_kernel_package()
    if not package.startswith("linux-image-") or "/" in package:
        raise GuestBuildError(f"not a kernel package: {package}")
    kver = package.removeprefix("linux-image-")
    dest = cache / "kernels" / package
    if not (dest / "kernel.json").exists():
        if progress:
            progress("kernel", f"apt-get download {package}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".kernel-", dir=dest.parent) as tmp:
            t = Path(tmp)
            _run(["apt-get", "download", "-q", package], cwd=t)
            debs = sorted(t.glob(f"{package}_*.deb"))
            if not debs:
                raise GuestBuildError(f"apt-get download {package} left no .deb")
            _run(["dpkg-deb", "-x", str(debs[0]), str(t / "x")])
            src_mod = t / "x/lib/modules" / kver
            vmlinuz = t / "x/boot" / f"vmlinuz-{kver}"
            if not vmlinuz.exists() or not src_mod.is_dir():
                raise GuestBuildError(f"{package} holds no vmlinuz-{kver} with modules")
            if not (src_mod / "modules.dep").exists():
                # the package leaves modules.dep to depmod in its postinst, which we never run
                _run([_depmod(), "-b", str(t / "x"), kver])
            keep = t / "keep"
            (keep / "modules" / kver).mkdir(parents=True)
            shutil.copyfile(vmlinuz, keep / vmlinuz.name)
            cfg = t / "x/boot" / f"config-{kver}"
            if cfg.exists():
                shutil.copyfile(cfg, keep / cfg.name)
            for meta in src_mod.glob("modules.*"):
                if not meta.name.endswith(".bin"):
                    shutil.copyfile(meta, keep / "modules" / kver / meta.name)
            for rel in module_closure(kver, GUEST_MODULES, t / "x/lib/modules", cfg if cfg.exists() else None):
                (keep / "modules" / kver / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src_mod / rel, keep / "modules" / kver / rel)
            (keep / "kernel.json").write_text(json.dumps({"package": package, "kver": kver, "deb": debs[0].name}))
            try:
                os.rename(keep, dest)
            except OSError:
                if not (dest / "kernel.json").exists():  # not another builder's finished copy
                    raise
    cfg = dest / f"config-{kver}"
    return Kernel(dest / f"vmlinuz-{kver}", kver, dest / "modules", cfg if cfg.exists() else None,
                  f"debian:{package}")


def find_kernel(cache: Path, source: str = "auto", progress: Progress | None = None) -> Kernel:
    """``source``: "host" (/boot), "debian" (the package, unpacked), "auto" (host, else debian)."""
    if source not in KERNEL_SOURCES:
        raise ValueError(f"kernel source must be one of {KERNEL_SOURCES}")
    if source in ("auto", "host"):
        k = host_kernel()
        if k is not None:
            return k
        if source == "host":
            raise GuestBuildError("no readable /boot/vmlinuz-* with its /lib/modules")
    return debian_kernel(cache, progress=progress)


def module_closure(kver: str, wanted: Sequence[str] = GUEST_MODULES, moddir: str | Path = "/lib/modules",
                   config: Path | None = None) -> list[str]:
    """Module files (relative to the version directory) to load, dependencies first.

    Hard dependencies from ``modules.dep``, soft "pre:" ones from ``modules.softdep``
    (aliases resolved through ``modules.alias``, the generic implementation preferred);
    a wanted driver built into the kernel (``CONFIG_X=y`` in ``config``) is skipped."""
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
    builtin = (base / "modules.builtin").read_text().split() if (base / "modules.builtin").exists() else []
    builtin_names = {Path(b).name.split(".ko")[0].replace("-", "_") for b in builtin}
    cfg_text = config.read_text() if config is not None and config.exists() else ""

    def resolve(name: str) -> str | None:
        n = name.replace("-", "_")
        if n in by_name:
            return by_name[n]
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
        found = resolve(w)
        if found is None:
            opt = KCONFIG.get(w, w.upper())
            if w.replace("-", "_") in builtin_names or f"CONFIG_{opt}=y" in cfg_text:
                continue
            raise GuestBuildError(f"module {w} not found for kernel {kver} in {base}")
        visit(found)
    return order


# ---------------------------------------------------------------------- initramfs


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, EPOCH, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields)
    buf = head + name.encode() + b"\0"
    buf += b"\0" * (-len(buf) % 4)
    buf += data + b"\0" * (-len(data) % 4)
    return buf


def _module_bytes(src: Path) -> tuple[str, bytes]:
    data = src.read_bytes()
    name = src.name
    if name.endswith(".xz"):
        return name[:-3], lzma.decompress(data)
    if name.endswith(".zst"):
        raise GuestBuildError(f"{src}: zstd-compressed modules are not supported")
    return name, data


def build_initramfs(kernel: Kernel) -> bytes:
    """An uncompressed newc initramfs: busybox, the guest's modules, ``/init``."""
    _check_busybox()
    mods = module_closure(kernel.kver, GUEST_MODULES, kernel.moddir, kernel.config)
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        entries.append((d, stat.S_IFDIR | 0o755, b"", (0, 0)))
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("dev/null", stat.S_IFCHR | 0o666, b"", (1, 3)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes(), (0, 0)))
    for applet in ("sh", "mount", "umount", "insmod", "switch_root", "sleep", "cat", "mkdir", "ls",
                   "poweroff", "findfs"):
        entries.append((f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox", (0, 0)))
    order = []
    for mod in mods:
        name, data = _module_bytes(kernel.moddir / kernel.kver / mod)
        entries.append((f"lib/modules/{name}", stat.S_IFREG | 0o644, data, (0, 0)))
        order.append(name)
    entries.append(("modules.order", stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode(), (0, 0)))
    entries.append(("init", stat.S_IFREG | 0o755, INITRAMFS_INIT.encode(), (0, 0)))
    blob = b"".join(_cpio_entry(n, m, d, r, i + 1) for i, (n, m, d, r) in enumerate(entries))
    blob += _cpio_entry("TRAILER!!!", 0, b"", (0, 0), 0)
    return blob + b"\0" * (-len(blob) % 512)


def cpio_names(blob: bytes) -> dict[str, bytes]:
    """A newc archive read back: name -> data."""
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


# ---------------------------------------------------------------------- disk


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
    for name, text in (("sbin/init", GUEST_INIT), ("sbin/guest-banner", GUEST_BANNER)):
        (stage / name).write_text(text)
        os.chmod(stage / name, 0o755)
    (stage / "etc/hostname").write_text("instantnfs-guest\n")
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\n")
    (stage / "etc/fstab").write_text(f"LABEL={ROOT_LABEL} / ext4 defaults 0 1\n")
    for f in DATA_FILES:
        (stage / f.path.lstrip("/")).write_bytes(data_bytes(f))
    manifest = "".join(f"{h}  {p}\n" for p, h in sorted(expected_sha256().items()))
    (stage / "etc/guest/manifest.sha256").write_text(manifest)
    for root, dirs, files in os.walk(stage):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(stage, (EPOCH, EPOCH))


def _make_root(img: Path, size: int, work: Path, env: dict[str, str]) -> None:
    stage = work / "root"
    _stage_root(stage)
    _run(["mkfs.ext4", "-F", "-q", "-b", "4096", "-m", "0", "-L", ROOT_LABEL, "-U", FS_UUID,
          "-E", f"offset={ROOT_OFFSET},hash_seed={HASH_SEED},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
          "-d", str(stage), str(img), f"{(size - ROOT_OFFSET) // 1024}k"], env=env)
    # mke2fs -d copies each staged file's ctime (when we made it) and atime (which
    # reading the file during the copy may have just set): pin both
    cmds = set()
    for root, dirs, files in os.walk(stage):
        for name in [""] + dirs + files:
            rel = "/" + os.path.relpath(os.path.join(root, name) if name else root, stage)
            rel = "/" if rel == "/." else rel
            cmds.add(f'sif "{rel}" ctime @{EPOCH}\n')
            cmds.add(f'sif "{rel}" atime @{EPOCH}\n')
    script = work / "ctime.debugfs"
    script.write_text("".join(sorted(cmds)))
    p = _run(["debugfs", "-w", "-f", str(script), f"{img}?offset={ROOT_OFFSET}"], env=env)
    errors = [ln for ln in p.stderr.decode(errors="replace").splitlines() if ln and not ln.startswith("debugfs ")]
    if errors:
        raise GuestBuildError("debugfs: " + "; ".join(errors[:5]))


def _make_boot(img: Path, kernel: Kernel, initramfs: bytes, work: Path, env: dict[str, str]) -> None:
    files = work / "boot"
    files.mkdir()
    shutil.copyfile(kernel.vmlinuz, files / "vmlinuz")
    (files / "initrd.img").write_bytes(initramfs)
    (files / "syslinux.cfg").write_text(SYSLINUX_CFG)
    shutil.copyfile(SYSLINUX_EFI, files / "BOOTX64.EFI")
    shutil.copyfile(LDLINUX_E64, files / "ldlinux.e64")
    for p in files.iterdir():
        os.utime(p, (EPOCH, EPOCH))
    fat = f"{img}@@{BOOT_OFFSET}"
    _run(["mformat", "-i", fat, "-N", FAT_SERIAL, "-v", "GUESTBOOT", "-T", str(BOOT_SECTORS),
          "-h", "64", "-s", "32", "-H", str(BOOT_START), "::"], env=env)
    _run(["mmd", "-i", fat, "::EFI", "::EFI/BOOT"], env=env)
    _run(["mcopy", "-m", "-i", fat, str(files / "vmlinuz"), str(files / "initrd.img"),
          str(files / "syslinux.cfg"), "::"], env=env)
    _run(["mcopy", "-m", "-i", fat, str(files / "BOOTX64.EFI"), str(files / "ldlinux.e64"),
          str(files / "syslinux.cfg"), "::EFI/BOOT/"], env=env)
    _run(["syslinux", "--install", "--offset", str(BOOT_OFFSET), str(img)], env=env)
    mbr = _first(SYSLINUX_MBR)
    assert mbr is not None  # missing_tools() checked it
    code = mbr.read_bytes()[:440]  # the boot code only: the table and disk id stay
    with open(img, "r+b") as f:
        f.write(code)


def build_disk(out: Path, kernel: Kernel, initramfs: bytes, size: int = DISK_SIZE) -> Path:
    """Write the guest's disk image to ``out`` (replaced atomically)."""
    if size < MIN_DISK_SIZE or size % SECTOR:
        raise GuestBuildError(f"the guest disk needs at least {MIN_DISK_SIZE >> 20} MiB, in whole sectors")
    missing = missing_tools()
    if missing:
        raise GuestBuildError("missing: " + ", ".join(missing) + " (scripts/system-deps.sh demo)")
    _check_busybox()
    out = Path(out)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH), SOURCE_DATE_EPOCH=str(EPOCH), LC_ALL="C",
               MTOOLS_SKIP_CHECK="1")
    with tempfile.TemporaryDirectory(prefix=".guest-disk-", dir=out.parent) as tmp:
        work = Path(tmp)
        img = work / "disk.img"
        with open(img, "wb") as f:
            f.truncate(size)
        table = (f"label: dos\nlabel-id: {MBR_ID}\nunit: sectors\n\n"
                 f"start={BOOT_START}, size={BOOT_SECTORS}, type={BOOT_PART_TYPE:x}, bootable\n"
                 f"start={ROOT_START}, type=83\n")
        _run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(img)], env=env, stdin=table.encode())
        _make_root(img, size, work, env)
        _make_boot(img, kernel, initramfs, work, env)
        os.replace(img, out)
    return out


def partitions(image: str | Path) -> list[tuple[int, int, int, bool]]:
    """The MBR's primary partitions: (type, byte offset, byte length, active)."""
    with open(image, "rb") as f:
        mbr = f.read(SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise ValueError(f"{image}: no MBR")
    out = []
    for i in range(4):
        e = mbr[446 + 16 * i : 462 + 16 * i]
        ptype = e[4]
        start = int.from_bytes(e[8:12], "little")
        count = int.from_bytes(e[12:16], "little")
        if ptype and count:
            out.append((ptype, start * SECTOR, count * SECTOR, e[0] == 0x80))
    return out


def root_offset(image: str | Path) -> int:
    """Byte offset of the guest's ext4 root (the first Linux partition of the MBR)."""
    for ptype, off, _, _ in partitions(image):
        if ptype == 0x83:
            return off
    raise ValueError(f"{image}: no Linux partition in the MBR")


# ---------------------------------------------------------------------- reading the guest's files


def _debugfs_cat(target: str, path: str) -> bytes:
    if shutil.which("debugfs") is None:
        raise FileNotFoundError("debugfs is not installed (apt-get install e2fsprogs)")
    if '"' in path or "\n" in path:
        raise ValueError(f"path {path!r}: no quotes or newlines")
    p = subprocess.run(["debugfs", "-R", f'cat "{path}"', target], capture_output=True)
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0 or "not found" in err.lower() or "Bad magic" in err or "bad superblock" in err.lower():
        raise FileNotFoundError(f"{path} in {target}: {err.strip()}")
    return p.stdout


def read_guest_file(image: str | Path, path: str, *, replay_journal: bool = False) -> bytes:
    """The bytes of ``path`` in the guest's ext4 root inside the raw ``image``, unmounted.

    ``replay_journal``: a guest killed while running left metadata in its journal;
    debugfs does not replay it, so the root partition is copied to a temporary file and
    ``e2fsck -fy`` replays (and repairs) it there first. ``image`` is never written."""
    off = root_offset(image)
    if not replay_journal:
        return _debugfs_cat(f"{image}?offset={off}", path)
    if shutil.which("e2fsck") is None:
        raise FileNotFoundError("e2fsck is not installed (apt-get install e2fsprogs)")
    size = next(ln for t, o, ln, _ in partitions(image) if o == off)
    with tempfile.TemporaryDirectory(prefix="guest-root-") as tmp:
        part = Path(tmp) / "root.img"
        with open(image, "rb") as src, open(part, "wb") as dst:
            dst.truncate(size)
            src.seek(off)
            pos = 0
            while pos < size:
                buf = src.read(min(1 << 20, size - pos))
                if not buf:
                    break
                if buf.count(0) != len(buf):
                    dst.seek(pos)
                    dst.write(buf)
                pos += len(buf)
        p = subprocess.run(["e2fsck", "-fy", str(part)], capture_output=True)
        if p.returncode not in (0, 1, 2):  # 1, 2: errors corrected
            raise OSError(f"e2fsck could not repair the guest root of {image} "
                          f"({p.returncode}): {p.stdout.decode(errors='replace')[-500:]}")
        return _debugfs_cat(str(part), path)


# ---------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """$INSTANTNFS_GUEST_CACHE, else $XDG_CACHE_HOME/instantnfs/guest, else ~/.cache/instantnfs/guest."""
    env = os.environ.get("INSTANTNFS_GUEST_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "instantnfs" / "guest"


def _input_key(kernel: Kernel, size: int) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(f"{size}\0{kernel.kver}\0{kernel.origin}\0".encode())
    mbr = _first(SYSLINUX_MBR)
    for p in (kernel.vmlinuz, Path(BUSYBOX), Path(SYSLINUX_EFI), Path(LDLINUX_E64), mbr,
              Path(shutil.which("syslinux") or "syslinux")):
        if p is not None and p.exists():
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


STALE_BUILD_S = 6 * 3600


def _sweep(cache: Path) -> None:
    """Remove what builders killed mid-way left (their ``.``-named temporary directories)."""
    now = time.time()
    for d in (cache, cache / "kernels"):
        try:
            entries = list(d.iterdir())
        except FileNotFoundError:
            continue
        for p in entries:
            try:
                old = p.name.startswith(".") and p.is_dir() and now - p.stat().st_mtime > STALE_BUILD_S
            except FileNotFoundError:
                continue
            if old:
                shutil.rmtree(p, ignore_errors=True)


def ensure_guest(cache_dir: Path | None = None, *, progress: Progress | None = None,
                 kernel_source: str | None = None, size: int = DISK_SIZE) -> Guest:
    """Build the guest once into ``cache_dir`` (default: ``default_cache_dir()``), reuse it.

    ``progress(phase, detail)`` is called as the build goes: "kernel", "initramfs",
    "root", "boot", "done" (nothing when the cache already holds the guest).
    ``kernel_source``: "auto" (default, or $INSTANTNFS_GUEST_KERNEL_SOURCE), "host" or
    "debian" (forces the package download)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    _sweep(cache)
    source = kernel_source or os.environ.get("INSTANTNFS_GUEST_KERNEL_SOURCE", "auto")
    kernel = find_kernel(cache, source, progress)
    key = _input_key(kernel, size)
    d = cache / key
    info_path = d / "guest.json"
    if not info_path.exists():
        if progress:
            progress("kernel", f"{kernel.kver} ({kernel.origin})")
        with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=cache) as tmp:
            t = Path(tmp)
            if progress:
                progress("initramfs", f"{len(GUEST_MODULES)} drivers and their dependencies")
            initramfs = build_initramfs(kernel)
            if progress:
                progress("root", f"ext4 {ROOT_LABEL} and FAT boot partition, {size >> 20} MiB")
            build_disk(t / "guest.img", kernel, initramfs, size)
            if progress:
                progress("boot", "syslinux (BIOS and EFI) installed")
            info = {"kver": kernel.kver, "kernel": kernel.origin, "size": size,
                    "initramfs_bytes": len(initramfs),
                    "disk_sha256": hashlib.sha256((t / "guest.img").read_bytes()).hexdigest()}
            (t / "guest.json").write_text(json.dumps(info, indent=2) + "\n")
            os.chmod(t, 0o755)  # TemporaryDirectory made it private
            try:
                os.rename(t, d)
                os.mkdir(t)  # for TemporaryDirectory's cleanup
            except OSError:
                if not info_path.exists():  # not another builder's finished copy
                    raise
    info = json.loads(info_path.read_text())
    if progress:
        progress("done", str(d / "guest.img"))
    return Guest(disk=d / "guest.img", kver=info["kver"], size=info["size"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.vm.guest [--cache-dir D] [--kernel-source S] [--progress]``:
    build (or find) the guest and print its disk path."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m engine.vm.guest", description="Build the instantnfs test guest.")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: " + str(default_cache_dir()))
    ap.add_argument("--kernel-source", choices=KERNEL_SOURCES, default=None)
    ap.add_argument("--progress", action="store_true", help="say what the build is doing on stderr")
    args = ap.parse_args(argv)

    def say(phase: str, detail: str) -> None:
        print(f"guest: {phase}: {detail}", file=sys.stderr, flush=True)

    try:
        guest = ensure_guest(args.cache_dir, progress=say if args.progress else None, kernel_source=args.kernel_source)
    except GuestBuildError as e:
        print(f"instantnfs: {e}", file=sys.stderr)
        return 1
    print(guest.disk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
