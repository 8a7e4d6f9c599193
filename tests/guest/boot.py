"""Boot the test guest (engine.vm.guest) with QEMU from its own disk, as the tests need it.

No ``-kernel``: the firmware (SeaBIOS, or OVMF with ``firmware="efi"``) boots syslinux
from the disk's FAT partition. The disk goes on the bus asked for (``-drive`` per bus:
virtio, scsi = virtio-scsi + scsi-hd, sata = AHCI + ide-hd, ide = the PIIX controller);
the agent's orders go in through ``-fw_cfg`` (``guest_config``); the serial console is
written to a file the tests read.

``start_guest(...)`` returns a ``RunningGuest`` (wait_for a marker, kill); ``boot_guest
(disk, value)`` is a oneshot boot: it returns a ``BootResult`` only when the console shows
``GUEST-HEARTBEAT ok <this run's id>`` and ``GUEST-DONE``, else raises ``BootError`` with
the end of the console log.

Acceleration: KVM when ``/dev/kvm`` is usable. On these machines ``/dev/kvm`` is a
nested device that may not run the guest (no console output, "KVM internal error", or
QEMU dying at once), so a KVM start with no console output after ``kvm_probe_s`` seconds
(20) or that dies is abandoned and the guest restarts under TCG (``-accel tcg -cpu
max``). The verdict is remembered for the rest of the process; ``INSTANTNFS_GUEST_ACCEL
=kvm|tcg`` forces one.

Command line (one oneshot boot, timed)::

    python tests/guest/boot.py DISK_SPEC [VALUE] [--bus virtio|scsi|sata|ide] [--efi]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.vm.guest import (  # noqa: E402
    DATACHECK,
    DONE,
    HEARTBEAT,
    OVMF_CODE,
    OVMF_VARS,
    VALUE_CHARS,
    fw_cfg_args,
    guest_config,
)

QEMU = os.environ.get("INSTANTNFS_QEMU", "qemu-system-x86_64")
BUSES = ("virtio", "scsi", "sata", "ide")

_kvm_verdict: str | None = None  # None: not tried; "ok" or the reason it is unusable


class BootError(AssertionError):
    """The guest did not boot to the markers asked for."""


@dataclass(frozen=True, slots=True)
class BootResult:
    console_log: str
    seconds: float      # qemu start -> GUEST-DONE on the console
    accel: str          # "kvm" or "tcg"
    run_id: str
    heartbeat_s: float  # qemu start -> heartbeat on the console
    kvm_fallback: str | None = None  # why KVM was abandoned in this call, if it was

    @property
    def datacheck_ok(self) -> bool:
        return f"{DATACHECK} ok" in self.console_log


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.split(":", 1)[0] in ("nfs", "nbd", "iscsi", "json")


def _tail(text: str, n: int = 25) -> str:
    return "\n".join("  | " + ln for ln in text.replace("\r", "").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive_args(spec: str, bus: str, *, snapshot: bool = False, index: int = 0) -> list[str]:
    """The QEMU arguments that attach the raw disk ``spec`` on ``bus``."""
    opts = f"file={spec.replace(',', ',,')},format=raw,cache=none" + (",snapshot=on" if snapshot else "")
    if bus == "virtio":
        return ["-drive", f"{opts},if=virtio"]
    if bus == "ide":
        return ["-drive", f"{opts},if=ide,index={index}"]
    node = f"disk{index}"
    if bus == "scsi":
        return ["-device", f"virtio-scsi-pci,id=scsi{index}", "-drive", f"{opts},if=none,id={node}",
                "-device", f"scsi-hd,drive={node},bus=scsi{index}.0"]
    if bus == "sata":
        return ["-device", f"ahci,id=ahci{index}", "-drive", f"{opts},if=none,id={node}",
                "-device", f"ide-hd,drive={node},bus=ahci{index}.0"]
    raise ValueError(f"bus must be one of {BUSES}")


@dataclass
class RunningGuest:
    proc: subprocess.Popen[bytes]
    serial_log: Path
    stderr_log: Path
    accel: str
    run_id: str
    started: float
    forwards: dict[int, int] = field(default_factory=dict)  # guest port -> host port on 127.0.0.1
    kvm_fallback: str | None = None

    def text(self) -> str:
        return self.serial_log.read_text(errors="replace").replace("\r", "")

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first console line matching the regex ``pattern``; BootError on timeout or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            for line in text.splitlines():
                if rx.search(line):
                    return line
            if self.proc.poll() is not None:
                raise BootError(f"qemu exited {self.proc.returncode} before {pattern!r}; "
                                f"qemu: {self.stderr_log.read_text(errors='replace')[-500:]}\n"
                                f"console:\n{_tail(text)}")
            if time.monotonic() > deadline:
                raise BootError(f"timeout: no {pattern!r} after {timeout:.0f} s ({self.accel})\nconsole:\n{_tail(text)}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a power cut: what the guest did not sync is lost."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BootError(f"qemu did not exit within {timeout:.0f} s\nconsole:\n{_tail(self.text())}") from None


def _command(accel: str, disk: str, bus: str, firmware: str, work: Path, run_id: str, config: bytes | None,
             forwards: dict[int, int], net: bool, mem_mb: int, snapshot: bool) -> tuple[list[str], Path, Path]:
    serial = work / f"serial-{run_id}.log"
    err = work / f"qemu-{run_id}.log"
    accel_args = ["-enable-kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    cmd = [QEMU, "-name", f"instantnfs-guest-{run_id}", *accel_args, "-m", str(mem_mb), "-smp", "1",
           "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
           "-serial", f"file:{serial}", "-no-reboot"]
    if firmware == "efi":
        vars_copy = work / f"ovmf-vars-{run_id}.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        cmd += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={vars_copy}"]
    elif firmware == "bios":
        # nothing bootable: SeaBIOS reboots after 1 s, which -no-reboot turns into an exit
        cmd += ["-boot", "reboot-timeout=1000"]
    else:
        raise ValueError("firmware must be bios or efi")
    cmd += drive_args(disk, bus, snapshot=snapshot)
    if config is not None:
        cmd += fw_cfg_args(config, work / f"config-{run_id}")
    if net or forwards:
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in forwards.items())
        cmd += ["-netdev", f"user,id=net0{fwd}", "-device", "virtio-net-pci,netdev=net0"]
    serial.touch()
    return cmd, serial, err


def start_guest(disk_spec: str | os.PathLike[str], *, bus: str = "virtio", firmware: str = "bios",
                config: bytes | None = None, run_id: str | None = None, net: bool = False,
                forwards: dict[int, int] | None = None, work_dir: str | os.PathLike[str] | None = None,
                accel: str | None = None, kvm_probe_s: float = 20.0, mem_mb: int = 256,
                snapshot: bool = False) -> RunningGuest:
    """Start QEMU on the guest disk; ``forwards``: guest tcp port -> host port (0: pick one)."""
    global _kvm_verdict
    if shutil.which(QEMU) is None:
        raise BootError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    if bus not in BUSES:
        raise ValueError(f"bus must be one of {BUSES}")
    spec = str(disk_spec)
    if not _is_url(spec) and not os.access(spec, os.R_OK | (0 if snapshot else os.W_OK)):
        raise BootError(f"disk {spec} is not readable and writable")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="guest-boot-"))
    work.mkdir(parents=True, exist_ok=True)
    fwd = {g: (h or free_port()) for g, h in (forwards or {}).items()}
    rid = run_id or uuid.uuid4().hex[:16]
    mode = accel or os.environ.get("INSTANTNFS_GUEST_ACCEL", "auto")
    if mode not in ("auto", "kvm", "tcg"):
        raise ValueError("accel must be auto, kvm or tcg")
    if mode == "auto":
        mode = "kvm" if kvm_usable() and _kvm_verdict in (None, "ok") else "tcg"
    fallback = None
    while True:
        cmd, serial, err = _command(mode, spec, bus, firmware, work, rid, config, fwd, net, mem_mb, snapshot)
        with open(err, "wb") as errf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf)
        g = RunningGuest(proc, serial, err, mode, rid, time.monotonic(), fwd, fallback)
        if mode != "kvm" or _kvm_verdict == "ok":
            return g
        # the KVM probe: any console output means the guest runs
        deadline = time.monotonic() + kvm_probe_s
        reason = None
        while reason is None:
            if serial.stat().st_size > 0 and "KVM internal error" not in err.read_text(errors="replace"):
                _kvm_verdict = "ok"
                return g
            if proc.poll() is not None:
                reason = f"qemu exited {proc.returncode}: {err.read_text(errors='replace')[-300:]}"
            elif "KVM internal error" in err.read_text(errors="replace"):
                reason = "KVM internal error"
            elif time.monotonic() > deadline:
                reason = f"no console output after {kvm_probe_s:.0f} s"
            else:
                time.sleep(0.1)
        g.kill()
        _kvm_verdict = reason
        if accel == "kvm":
            raise BootError(f"KVM is not usable here: {reason}")
        fallback, mode = reason, "tcg"


def boot_guest(disk_spec: str | os.PathLike[str], value: str, timeout: float = 300.0, *, bus: str = "virtio",
               firmware: str = "bios", accel: str | None = None, kvm_probe_s: float = 20.0,
               log_dir: str | os.PathLike[str] | None = None, mem_mb: int = 256,
               snapshot: bool = False) -> BootResult:
    """A oneshot boot: the guest writes ``value`` to /var/heartbeat.txt, syncs, powers off.

    ``snapshot``: QEMU sends the guest's writes to a throw-away overlay (a read-only
    export); the boot and the guest's data check still prove every block it read."""
    if not value or not set(value) <= VALUE_CHARS:
        raise ValueError(f"value {value!r} must be one word of [A-Za-z0-9._:-]")
    run_id = uuid.uuid4().hex[:16]
    g = start_guest(disk_spec, bus=bus, firmware=firmware, config=guest_config(run_id, value=value, mode="oneshot"),
                    run_id=run_id, work_dir=log_dir, accel=accel, kvm_probe_s=kvm_probe_s, mem_mb=mem_mb,
                    snapshot=snapshot)
    try:
        g.wait_for(rf"^{HEARTBEAT} ok {run_id} ", timeout)
        t_hb = time.monotonic()
        g.wait_for(rf"^{DONE} {run_id}$", max(1.0, timeout - (t_hb - g.started)))
        t_done = time.monotonic()
        g.wait_exit(30)
    except BootError as e:
        raise BootError(f"guest boot from {disk_spec} on {bus}/{firmware} failed: {e}") from None
    finally:
        if g.proc.poll() is None:
            g.kill()
    return BootResult(console_log=g.text(), seconds=round(t_done - g.started, 3), accel=g.accel, run_id=run_id,
                      heartbeat_s=round(t_hb - g.started, 3), kvm_fallback=g.kvm_fallback)


def main(argv: list[str] | None = None) -> int:
    from engine.vm.guest import ensure_guest

    ap = argparse.ArgumentParser(description="Boot the instantnfs test guest once (oneshot) and time it.")
    ap.add_argument("disk", nargs="?", help="disk image path or nfs:// URL (the guest writes to it); "
                    "default: a copy of the cached guest")
    ap.add_argument("value", nargs="?", default=f"hb-{int(time.time())}")
    ap.add_argument("--bus", default="virtio", choices=BUSES)
    ap.add_argument("--efi", action="store_true", help="boot with OVMF instead of SeaBIOS")
    ap.add_argument("--accel", default=None, choices=("auto", "kvm", "tcg"))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--snapshot", action="store_true", help="guest writes go to a throw-away overlay")
    args = ap.parse_args(argv)
    disk = args.disk
    if disk is None:
        disk = os.path.join(tempfile.mkdtemp(prefix="guest-"), "guest.img")
        shutil.copyfile(ensure_guest().disk, disk)
    try:
        r = boot_guest(disk, args.value, args.timeout, bus=args.bus, firmware="efi" if args.efi else "bios",
                       accel=args.accel, snapshot=args.snapshot)
    except BootError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 2
    for line in r.console_log.splitlines():
        if line.startswith("GUEST-"):
            print("guest:", line)
    if r.kvm_fallback:
        print(f"KVM abandoned: {r.kvm_fallback}")
    print(f"OK accel={r.accel} bus={args.bus} heartbeat={r.heartbeat_s:.2f}s done={r.seconds:.2f}s")
    return 0 if r.datacheck_ok else 3


if __name__ == "__main__":
    sys.exit(main())
