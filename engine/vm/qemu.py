"""QEMU's command line for a ``VMSpec``, and whether KVM can run guests here.

What: ``DiskSpec`` / ``VMSpec`` (what the daemon runs: disks from a path or an ``nfs://``
URL, firmware, network, fw_cfg blob), ``command_line`` (the argv of
``qemu-system-x86_64`` for one VM, given the files of its state directory), and
``accel_verdict`` (``"kvm"`` or ``"tcg"``, decided once per QEMU version by a short probe
and remembered in the state directory).

The command line, and why:

- Machine ``q35``, except ``pc`` when a disk is on the ``ide`` bus: only pc's PIIX has a
  real (parallel) IDE controller, the one guests without AHCI drivers need. ``sata`` is
  q35's built-in ICH9 AHCI (``ide.N`` buses) or, on pc, an added ``ahci`` controller;
  ``scsi`` is one ``virtio-scsi-pci`` with a ``scsi-hd`` per disk; ``virtio`` a
  ``virtio-blk-pci`` per disk. The first disk gets ``bootindex=0``.
- Every disk is ``-drive if=none,id=diskN,...,werror=stop,rerror=stop``: an I/O error (an
  NFS outage) pauses the guest instead of handing it an error, and the supervisor
  resumes it once the daemon serves again. ``cache=none`` (O_DIRECT) for URLs and where
  the file's filesystem allows it, else ``writeback``; guest flushes are honoured either
  way. Relative paths are made absolute (QEMU runs in the VM's directory).
- ``-nodefaults -no-user-config -display none``; the serial port goes to a file (never a
  pipe: a VM outlives the daemon that started it), QMP to a unix socket (the
  ``-chardev socket`` spelling of ``-qmp unix:SOCK,server=on,wait=off``, so that a comma
  in the path can be doubled; the path is relative to the VM's directory, where QEMU
  runs, so a long state directory does not hit the 107-byte limit of socket paths),
  ``-pidfile`` (absolute: it names the VM in ``/proc/PID/cmdline``).
- Networks: ``none``; ``user`` (virtio-net on QEMU's user network: the guest reaches the
  host's loopback as 10.0.2.2); ``user-restricted`` (``restrict=on``: no route out at all,
  only the ``hostfwd`` ports in, bound to 127.0.0.1: the isolated lab of ``verify``);
  ``bridge:NAME`` (``qemu-bridge-helper``; the bridge must exist).
- Every user-supplied string inside an option value has its commas doubled (QEMU's
  escape); names and ports are validated before they get there.

The accel probe (``accel_verdict``): no accessible ``/dev/kvm`` means TCG. Otherwise one
QEMU run under KVM, at most ``PROBE_S`` seconds: with a ``kernel``, ``-kernel K -append
console=ttyS0`` and any console output means KVM works; without one, ``BOOT_PROGRAM``, a
boot sector written here that prints ``B``, writes a sector (``W``/``E``), enters
protected (``P``) then long mode (``L``), writes 16 MiB byte by byte the way a kernel's
decompressor does (``M``) and halts. KVM is usable when ``M`` comes within
``PROBE_MEMORY_S`` of ``L``: printing one byte is not enough. The nested KVM of the test
machines prints ``BWPL`` after 3-6 s and then runs that loop at well under 1 MiB/s (a
Debian kernel there decompresses for minutes and prints nothing), while TCG runs the
whole program in a fraction of a second. "KVM internal error", "failed to set MSR", an
early exit or silence also mean TCG. The verdict is kept in ``<state_dir>/accel.json``
keyed by the QEMU version; ``INSTANTNFS_VM_ACCEL=kvm|tcg`` overrides it.

Threads: everything here is plain functions; ``accel_verdict`` holds a module lock, so
concurrent starts probe once. It refuses (``UsageError``) specs with unknown buses,
formats, firmware or networks, bad names, forwards on a network without them, more disks
than a bus takes, and a bridge that does not exist.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UsageError, VMError
from engine.fsutil import write_file_atomic

QEMU = os.environ.get("INSTANTNFS_QEMU", "qemu-system-x86_64")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
FW_CFG_NAME = "opt/instantnfs/config"
BUSES = ("virtio", "scsi", "sata", "ide")
FORMATS = ("raw", "qcow2")
FIRMWARES = ("bios", "efi")
ACCELS = ("auto", "kvm", "tcg")
PROBE_S = 10.0  # the whole KVM probe, at most
PROBE_MEMORY_S = 2.0  # boot program: L -> M (16 MiB written byte by byte) under a usable KVM
MAX_DISKS = {"virtio": 16, "scsi": 16, "sata": 6, "ide": 4}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_BRIDGE = re.compile(r"[A-Za-z0-9_.-]{1,15}")

# The boot program of the probe, as built from BOOT_PROGRAM_S (tests reassemble it).
BOOT_PROGRAM = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cfb88d3baf803b042eebe167db44330c088dacd13b0577302b045baf803eefae4920c02e6"
    "920f0116107d0f20c06683c8010f22c0ea457c080066b810008ed88ec08ed0b050eebf0010000031c0b9000c0000f3ab"
    "c7050010000003200000c7050020000003300000bf00300000b8830000008907050000200083c70881ff0040000075ee"
    "b8001000000f22d80f20e083c8200f22e0b9800000c00f320d000100000f300f20c00d000000800f22c0eac17c000018"
    "0066baf803b04cee49c7c00000800031ffb90000000141880c38ffc7ffc975f6b04deeb00aeef4ebfd0f1f8000000000"
    "0000000000000000ffff0000009acf00ffff00000092cf00ffff0000009aaf001f00f07c000010000800007c00000008"
).ljust(510, b"\0") + b"\x55\xaa"

BOOT_PROGRAM_S = r"""# instantnfs accel probe / write probe: one boot sector (GNU as; ld -Ttext 0x7c00 --oformat binary)
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov %dl, %bl                # the BIOS's boot drive
    mov $0x3f8, %dx             # COM1
    mov $'B', %al               # B: the BIOS ran this sector
    out %al, %dx
    mov $dap, %si               # int 13h AH=43h: write 8 sectors (this one) at LBA 2048
    mov $0x43, %ah
    xor %al, %al
    mov %bl, %dl
    int $0x13
    mov $'W', %al               # W: the write succeeded, E: it failed
    jnc 1f
    mov $'E', %al
1:  mov $0x3f8, %dx
    out %al, %dx
    cli
    in $0x92, %al               # fast A20
    or $2, %al
    out %al, $0x92
    lgdt gdtr
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmp $0x08, $pm
    .code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $'P', %al               # P: protected mode
    out %al, %dx
    mov $0x1000, %edi           # page tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD)
    xor %eax, %eax
    mov $3072, %ecx
    rep stosl
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    mov $0x3000, %edi           # the first GiB, identity-mapped in 2 MiB pages
    mov $0x83, %eax
2:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    cmp $0x4000, %edi
    jne 2b
    mov $0x1000, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax              # PAE
    mov %eax, %cr4
    mov $0xc0000080, %ecx       # EFER.LME
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax        # paging: long mode
    mov %eax, %cr0
    ljmp $0x18, $lm
    .code64
lm:
    mov $0x3f8, %dx             # (rdmsr took edx)
    mov $'L', %al               # L: long mode
    out %al, %dx
    mov $0x800000, %r8          # write 16 MiB byte by byte from 8 MiB up, as a kernel's
    xor %edi, %edi              # decompressor does
    mov $0x1000000, %ecx
3:  mov %cl, (%r8,%rdi)
    inc %edi
    dec %ecx
    jnz 3b
    mov $'M', %al               # M: the 16 MiB are written
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
4:  hlt
    jmp 4b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    # 0x08: 32-bit code
    .quad 0x00cf92000000ffff    # 0x10: data
    .quad 0x00af9a000000ffff    # 0x18: 64-bit code
gdtr:
    .word gdtr - gdt - 1
    .long gdt
dap:
    .byte 0x10, 0
    .word 8
    .word 0x7c00, 0
    .quad 2048
    . = _start + 510
    .byte 0x55, 0xaa
"""


@dataclass(slots=True)
class DiskSpec:
    source: str  # a path, or a URL QEMU opens itself (nfs://HOST/EXPORT/FILE)
    fmt: str = "raw"
    bus: str = "virtio"  # virtio | scsi | sata | ide

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "fmt": self.fmt, "bus": self.bus}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DiskSpec:
        return cls(str(d["source"]), str(d.get("fmt", "raw")), str(d.get("bus", "virtio")))


@dataclass(slots=True)
class VMSpec:
    name: str
    disks: list[DiskSpec]
    memory_mib: int = 256
    cpus: int = 1
    firmware: str = "bios"  # bios | efi
    net: str = "none"  # none | user | user-restricted | bridge:NAME
    forwards: dict[int, int] = field(default_factory=dict)  # guest tcp port -> host port (0: any free one)
    fw_cfg: bytes | None = None  # exposed to the guest as opt/instantnfs/config
    accel: str = "auto"  # auto | kvm | tcg
    owner: str = ""  # who asked for it: a session name, "sandbox:<name>", "verify:<job>"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "disks": [d.to_json() for d in self.disks], "memory_mib": self.memory_mib,
                "cpus": self.cpus, "firmware": self.firmware, "net": self.net,
                "forwards": {str(g): h for g, h in self.forwards.items()},
                "fw_cfg": base64.b64encode(self.fw_cfg).decode() if self.fw_cfg is not None else None,
                "accel": self.accel, "owner": self.owner}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VMSpec:
        fw = d.get("fw_cfg")
        return cls(name=str(d["name"]), disks=[DiskSpec.from_json(x) for x in d["disks"]],
                   memory_mib=int(d.get("memory_mib", 256)), cpus=int(d.get("cpus", 1)),
                   firmware=str(d.get("firmware", "bios")), net=str(d.get("net", "none")),
                   forwards={int(g): int(h) for g, h in (d.get("forwards") or {}).items()},
                   fw_cfg=base64.b64decode(fw) if fw is not None else None,
                   accel=str(d.get("accel", "auto")), owner=str(d.get("owner", "")))


@dataclass(frozen=True, slots=True)
class VMFiles:
    """The files of one VM in its state directory."""

    dir: Path

    @property
    def vm_json(self) -> Path:
        return self.dir / "vm.json"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def serial(self) -> Path:
        return self.dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def efi_vars(self) -> Path:
        return self.dir / "efi-vars.fd"

    @property
    def fw_cfg(self) -> Path:
        return self.dir / "fw_cfg.bin"


def esc(value: str | os.PathLike) -> str:
    """``value`` inside a QEMU option list: commas doubled."""
    return str(value).replace(",", ",,")


def is_url(source: str) -> bool:
    return "://" in source or source.split(":", 1)[0] in ("nfs", "nbd", "iscsi", "json", "blkdebug")


def check_spec(spec: VMSpec) -> None:
    """Refuse (``UsageError``) what QEMU would refuse later or what would escape its option."""
    if not _NAME.fullmatch(spec.name):
        raise UsageError(f"VM name {spec.name!r}: letters, digits and ._:- only, at most 64, starting with a letter or digit")
    if not spec.disks:
        raise UsageError(f"VM {spec.name}: no disks")
    for d in spec.disks:
        if d.bus not in BUSES:
            raise UsageError(f"disk bus {d.bus!r}: one of {', '.join(BUSES)}")
        if d.fmt not in FORMATS:
            raise UsageError(f"disk format {d.fmt!r}: one of {', '.join(FORMATS)}")
        if not d.source or "\0" in d.source:
            raise UsageError("a disk without a source")
    for bus, most in MAX_DISKS.items():
        if sum(d.bus == bus for d in spec.disks) > most:
            raise UsageError(f"at most {most} disks on the {bus} bus")
    if spec.firmware not in FIRMWARES:
        raise UsageError(f"firmware {spec.firmware!r}: bios or efi")
    if spec.accel not in ACCELS:
        raise UsageError(f"accel {spec.accel!r}: auto, kvm or tcg")
    if not (16 <= spec.memory_mib <= 1 << 20) or not (1 <= spec.cpus <= 256):
        raise UsageError(f"memory {spec.memory_mib} MiB / {spec.cpus} CPUs: out of range")
    if spec.net.startswith("bridge:"):
        if not _BRIDGE.fullmatch(spec.net[7:]):
            raise UsageError(f"bridge name {spec.net[7:]!r} is not an interface name")
    elif spec.net not in ("none", "user", "user-restricted"):
        raise UsageError(f"net {spec.net!r}: none, user, user-restricted or bridge:NAME")
    if spec.forwards and spec.net not in ("user", "user-restricted"):
        raise UsageError("port forwards need a user network (user or user-restricted)")
    for g, h in spec.forwards.items():
        if not (1 <= g <= 65535 and 0 <= h <= 65535):
            raise UsageError(f"forward {g} -> {h}: ports are 1-65535 (host 0: any free one)")


def machine(spec: VMSpec) -> str:
    """``pc`` when a disk needs real IDE (PIIX), else ``q35``."""
    return "pc" if any(d.bus == "ide" for d in spec.disks) else "q35"


def drive_cache(source: str) -> str:
    """``none`` (O_DIRECT) where the file can be opened so, and for URLs; else ``writeback``."""
    if is_url(source) or not hasattr(os, "O_DIRECT"):
        return "none"
    try:
        fd = os.open(source, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return "writeback"  # EINVAL: no O_DIRECT on this filesystem; other errors show at start
    os.close(fd)
    return "none"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_forwards(forwards: dict[int, int]) -> dict[int, int]:
    """The host port of each forward, a free one where it says 0."""
    return {g: (h or free_port()) for g, h in sorted(forwards.items())}


def accel_args(accel: str) -> list[str]:
    return ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]


def _disk_args(spec: VMSpec, mach: str) -> list[str]:
    args: list[str] = []
    scsi = any(d.bus == "scsi" for d in spec.disks)
    if scsi:
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    if mach == "pc" and any(d.bus == "sata" for d in spec.disks):
        args += ["-device", "ahci,id=ahci0"]
    n = {bus: 0 for bus in BUSES}
    for i, d in enumerate(spec.disks):
        k = n[d.bus]
        n[d.bus] += 1
        src = d.source if is_url(d.source) else os.path.abspath(d.source)  # QEMU runs in the VM's directory
        args += ["-drive", f"file={esc(src)},format={d.fmt},if=none,id=disk{i},werror=stop,rerror=stop,"
                           f"cache={drive_cache(src)}"]
        if d.bus == "virtio":
            dev = f"virtio-blk-pci,drive=disk{i},id=dev{i}"
        elif d.bus == "scsi":
            dev = f"scsi-hd,drive=disk{i},id=dev{i},bus=scsi0.0,channel=0,scsi-id={k},lun=0"
        elif d.bus == "sata":
            dev = f"ide-hd,drive=disk{i},id=dev{i},bus={'ahci0.' if mach == 'pc' else 'ide.'}{k}"
        else:  # ide: PIIX, two buses of two units
            dev = f"ide-hd,drive=disk{i},id=dev{i},bus=ide.{k // 2},unit={k % 2}"
        args += ["-device", dev + (",bootindex=0" if i == 0 else "")]
    return args


def _net_args(spec: VMSpec, forwards: dict[int, int]) -> list[str]:
    if spec.net == "none":
        return []
    if spec.net.startswith("bridge:"):
        br = spec.net[7:]
        if not Path("/sys/class/net", br, "bridge").is_dir():
            raise UsageError(f"no bridge {br!r} on this host (/sys/class/net/{br}/bridge)")
        netdev = f"bridge,id=n0,br={br}"
    else:
        netdev = "user,id=n0"
        if spec.net == "user-restricted":
            netdev += ",restrict=on"
        for g, h in sorted(forwards.items()):
            netdev += f",hostfwd=tcp:127.0.0.1:{h}-:{g}"
    return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]


def command_line(spec: VMSpec, files: VMFiles, *, accel: str, forwards: dict[int, int] | None = None,
                 qemu: str = QEMU) -> list[str]:
    """The argv that runs ``spec`` (in the directory ``files.dir``: the QMP socket's path
    is relative to it) with its files there; ``accel`` is kvm or tcg,
    ``forwards`` the resolved host ports (``resolve_forwards``). The caller writes
    ``files.fw_cfg`` and ``files.efi_vars`` (``prepare_files``)."""
    check_spec(spec)
    if accel not in ("kvm", "tcg"):
        raise UsageError(f"accel {accel!r}: kvm or tcg")
    mach = machine(spec)
    cmd = [qemu, "-name", esc(spec.name), "-machine", mach, *accel_args(accel),
           "-m", str(spec.memory_mib), "-smp", str(spec.cpus),
           "-nodefaults", "-no-user-config", "-display", "none", "-msg", "timestamp=on",
           "-chardev", f"file,id=serial0,path={esc(files.serial)}", "-serial", "chardev:serial0",
           # relative: QEMU runs in files.dir, and a unix socket's path is limited to 107 bytes
           "-chardev", f"socket,id=qmp0,path={esc(files.qmp.name)},server=on,wait=off",
           "-mon", "chardev=qmp0,mode=control",
           "-pidfile", str(files.pidfile)]
    if spec.firmware == "efi":
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={esc(OVMF_CODE)}",
                "-drive", f"if=pflash,format=raw,unit=1,file={esc(files.efi_vars)}"]
    cmd += _disk_args(spec, mach)
    cmd += _net_args(spec, forwards if forwards is not None else dict(spec.forwards))
    if spec.fw_cfg is not None:
        cmd += ["-fw_cfg", f"name={FW_CFG_NAME},file={esc(files.fw_cfg)}"]
    return cmd


def prepare_files(spec: VMSpec, files: VMFiles) -> None:
    """Write the files the command line names: the fw_cfg blob, the VM's own copy of the
    EFI variable store (kept across starts, like a real machine's NVRAM)."""
    files.dir.parent.mkdir(parents=True, exist_ok=True)
    files.dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(files.dir, 0o700)  # its QMP socket controls the VM (and, through HMP, opens host files)
    if spec.fw_cfg is not None:
        write_file_atomic(files.fw_cfg, spec.fw_cfg)
    if spec.firmware == "efi":
        if not OVMF_CODE.is_file() or not OVMF_VARS.is_file():
            raise UsageError(f"EFI firmware needs {OVMF_CODE} and {OVMF_VARS} (apt-get install ovmf)")
        if not files.efi_vars.exists():
            shutil.copyfile(OVMF_VARS, files.efi_vars)


_versions: dict[str, str] = {}


def qemu_version(qemu: str = QEMU) -> str:
    """``qemu --version``'s first line's version, e.g. "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"."""
    if qemu not in _versions:
        if shutil.which(qemu) is None:
            raise VMError(f"{qemu} is not installed (apt-get install qemu-system-x86)")
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"version\s+(.+)", out.splitlines()[0] if out else "")
        _versions[qemu] = m.group(1).strip() if m else out.strip()
    return _versions[qemu]


def kvm_accessible() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


_accel_lock = threading.Lock()


def accel_verdict(state_dir: Path | str, kernel: Path | str | None = None) -> str:
    """``"kvm"`` or ``"tcg"`` for the VMs of this host (see the design note); remembered in
    ``state_dir/accel.json`` per QEMU version, overridden by ``INSTANTNFS_VM_ACCEL``."""
    forced = os.environ.get("INSTANTNFS_VM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    if forced:
        raise UsageError(f"INSTANTNFS_VM_ACCEL={forced!r}: kvm or tcg")
    if not kvm_accessible():
        return "tcg"
    state = Path(state_dir)
    with _accel_lock:
        version = qemu_version()
        path = state / "accel.json"
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known, dict) and isinstance(known.get(version), dict) and known[version].get("verdict") in ("kvm", "tcg"):
            return str(known[version]["verdict"])
        ok, reason = probe_kvm(state, kernel)
        verdict = "kvm" if ok else "tcg"
        known = known if isinstance(known, dict) else {}
        known[version] = {"verdict": verdict, "reason": reason, "probed": time.time(),
                          "by": f"kernel {kernel}" if kernel else "boot program"}
        state.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, json.dumps(known, indent=1).encode())
        return verdict


def probe_kvm(workdir: Path | str, kernel: Path | str | None = None, timeout: float = PROBE_S) -> tuple[bool, str]:
    """Run one short guest under KVM; (usable, why). Never longer than ``timeout`` (+ the
    kill). Its files live in a temporary directory under ``workdir``, removed after."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvm-probe-", dir=workdir) as tmp:
        d = Path(tmp)
        serial, log = d / "serial.log", d / "qemu.log"
        cmd = [QEMU, "-machine", "q35", *accel_args("kvm"), "-m", "64", "-nodefaults", "-no-user-config",
               "-display", "none", "-chardev", f"file,id=s0,path={esc(serial)}", "-serial", "chardev:s0"]
        if kernel is not None:
            cmd += ["-kernel", str(kernel), "-append", "console=ttyS0"]
        else:
            disk = d / "disk.img"
            with open(disk, "wb") as f:
                f.write(BOOT_PROGRAM)
                f.truncate(2 << 20)
            cmd += ["-drive", f"file={esc(disk)},format=raw,if=none,id=disk0,cache=writeback",
                    "-device", "virtio-blk-pci,drive=disk0,bootindex=0"]
        serial.touch()
        with open(log, "wb") as lf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        t0 = time.monotonic()
        t_l: float | None = None
        try:
            while True:
                out = serial.read_bytes()
                now = time.monotonic()
                err = log.read_text(errors="replace")
                for bad in ("KVM internal error", "failed to set MSR"):
                    if bad in err:
                        return False, f"QEMU under KVM: {bad}"
                if kernel is not None and out.strip():
                    return True, f"the kernel printed {len(out)} bytes under KVM in {now - t0:.1f} s"
                if kernel is None:
                    if t_l is None and b"L" in out:
                        t_l = now
                    if b"M" in out:
                        spent = now - (t_l or now)
                        if spent <= PROBE_MEMORY_S:
                            return True, f"boot program in long mode wrote 16 MiB in {spent:.2f} s under KVM"
                        return False, f"KVM runs, but writing 16 MiB took {spent:.1f} s (nested or starved KVM)"
                if t_l is not None and now - t_l > PROBE_MEMORY_S:
                    return False, f"KVM runs, but writing 16 MiB took more than {PROBE_MEMORY_S:.0f} s (nested or starved KVM)"
                if proc.poll() is not None:
                    return False, f"QEMU exited ({proc.returncode}) under KVM: {err.strip()[-300:]}"
                if now - t0 > timeout:
                    return False, f"no {'console output' if kernel else 'long-mode mark'} under KVM after {timeout:.0f} s (got {out[:16]!r})"
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
