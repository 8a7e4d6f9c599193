"""Boot the test guest with QEMU and prove it ran; read what it wrote without mounting.

``boot_guest(disk_spec, value, timeout)`` boots the guest disk (see
``make_guest_disk``) by direct kernel boot: the host's kernel (a cached copy), the
guest-specific initramfs by default, the disk as ``-drive file=SPEC,format=raw,
if=virtio,cache=none``. ``disk_spec`` is a path or a URL QEMU opens itself
(``nfs://HOST/EXPORT/guest.img``, needs qemu-block-extra). It returns a ``BootResult``
only when the serial console shows ``GUEST-HEARTBEAT ok <this run's id>`` and
``GUEST-DONE``; otherwise it raises ``BootError`` with the end of the console log.

Acceleration: KVM when ``/dev/kvm`` is usable. On these machines ``/dev/kvm`` is a
nested device that may not run the guest (QEMU prints nothing, or stops with "KVM
internal error", or dies at once on "failed to set MSR"), so a KVM boot with no console
output after ``kvm_probe_s`` seconds (20), or with such an error, or that exits before
the heartbeat without any console output, is abandoned and the boot reruns under TCG (``-accel tcg -cpu
max``). The verdict is remembered for the rest of the process, so only the first boot
pays for the probe. ``INSTANTNFS_GUEST_ACCEL=kvm|tcg`` forces one.

``read_guest_file(image, path)`` reads a file out of the guest's ext4 root with
``debugfs`` (no mount, no journal replay: the guest remounts ``/`` read-only before it
powers off, so its files are in place).

Command line (timing one boot)::

    python tests/guest/boot.py DISK_SPEC [VALUE] [--initrd guest|host|PATH] [--accel auto|kvm|tcg]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

if __package__:
    from .make_guest_disk import PART_OFFSET, VALUE_CHARS, ensure_guest
else:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_guest_disk import PART_OFFSET, VALUE_CHARS, ensure_guest  # noqa: E402

QEMU = os.environ.get("INSTANTNFS_QEMU", "qemu-system-x86_64")
HEARTBEAT = "GUEST-HEARTBEAT ok"
DONE = "GUEST-DONE"

_kvm_verdict: str | None = None  # None: not tried; "ok" or the reason it is unusable


class BootError(AssertionError):
    """The guest did not boot to its heartbeat and done markers."""


@dataclass(frozen=True, slots=True)
class BootResult:
    console_log: str
    seconds: float      # qemu start -> GUEST-DONE on the console
    accel: str          # "kvm" or "tcg"
    run_id: str
    initrd: str
    heartbeat_s: float  # qemu start -> heartbeat on the console
    kvm_fallback: str | None = None  # why KVM was abandoned in this call, if it was

    @property
    def datacheck_ok(self) -> bool:
        return "GUEST-DATACHECK ok" in self.console_log


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _drive_arg(spec: str, snapshot: bool = False) -> str:
    return f"file={spec.replace(',', ',,')},format=raw,if=virtio,cache=none" + (",snapshot=on" if snapshot else "")


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.split(":", 1)[0] in ("nfs", "nbd", "iscsi", "json")


def _tail(text: str, n: int = 20) -> str:
    return "\n".join("  | " + ln for ln in text.replace("\r", "").splitlines()[-n:])


def _run_qemu(accel: str, disk_spec: str, value: str, timeout: float, kernel: Path, initrd: Path,
              log_dir: Path, kvm_probe_s: float, mem_mb: int, snapshot: bool) -> tuple[str, BootResult | str]:
    """One attempt: ("ok", result) | ("fail", reason) | ("kvm-broken", reason)."""
    run_id = str(uuid.uuid4())
    log = log_dir / f"boot-{run_id}.log"
    err = log_dir / f"boot-{run_id}.qemu-stderr"
    append = (f"console=ttyS0 root=/dev/vda1 rootfstype=ext4 rw panic=-1 quiet loglevel=4 "
              f"instantnfs.run={run_id} instantnfs.hb={value}")
    accel_args = ["-enable-kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    cmd = [QEMU, "-name", f"instantnfs-guest-{run_id}", *accel_args, "-m", str(mem_mb), "-smp", "1",
           "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
           "-serial", f"file:{log}", "-no-reboot",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
           "-drive", _drive_arg(disk_spec, snapshot)]
    log.touch()
    with open(err, "wb") as errf:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf)
    t_hb = t_done = None
    text = ""
    try:
        while True:
            text = log.read_text(errors="replace")
            now = time.monotonic()
            if t_hb is None and f"{HEARTBEAT} {run_id}" in text:
                t_hb = now
            if t_done is None and DONE in text:
                t_done = now
            if proc.poll() is not None:
                break
            if accel == "kvm" and t_done is None:
                stderr = err.read_text(errors="replace")
                if "KVM internal error" in stderr:
                    return "kvm-broken", "qemu: KVM internal error"
                if not text and now - t0 > kvm_probe_s:
                    return "kvm-broken", f"no console output after {kvm_probe_s:.0f} s"
            if now - t0 > timeout:
                return "fail", f"timeout after {timeout:.0f} s ({accel})"
            time.sleep(0.05)
        text = log.read_text(errors="replace")
        end = time.monotonic()
        t_hb = t_hb or (end if f"{HEARTBEAT} {run_id}" in text else None)
        t_done = t_done or (end if DONE in text else None)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    stderr = err.read_text(errors="replace").strip()
    if accel == "kvm" and t_hb is None and (not text.strip() or "kvm" in stderr.lower()):
        # e.g. "failed to set MSR 0x10a" + an assertion: QEMU dies before the guest runs
        return "kvm-broken", f"qemu exited {proc.returncode} before the guest ran: {stderr[-300:]}"
    if t_hb is None or t_done is None:
        what = f"heartbeat={'yes' if t_hb else 'no'} done={'yes' if t_done else 'no'}"
        return "fail", f"qemu exited {proc.returncode} ({accel}), {what}; qemu: {stderr[-500:]}\nconsole:\n{_tail(text)}"
    return "ok", BootResult(console_log=text, seconds=round(t_done - t0, 3), accel=accel, run_id=run_id,
                            initrd=str(initrd), heartbeat_s=round(t_hb - t0, 3))


def boot_guest(disk_spec: str | os.PathLike, value: str, timeout: float = 300.0, *, initrd: str = "guest",
               accel: str | None = None, kvm_probe_s: float = 20.0, log_dir: str | os.PathLike | None = None,
               mem_mb: int = 256, snapshot: bool = False) -> BootResult:
    """Boot the guest from ``disk_spec``; it writes ``value`` into /var/heartbeat.txt.

    ``initrd``: "guest" (the small one built by ``make_guest_disk``), "host" (a copy of
    Debian's), or a path. ``timeout`` is per attempt (a KVM attempt that turns out to be
    unusable is abandoned after ``kvm_probe_s`` and does not count against it).
    ``snapshot``: QEMU opens the disk read-only and sends the guest's writes to a
    temporary overlay (``snapshot=on``), for a read-only export; /var/heartbeat.txt is
    then lost with the overlay, but the boot and the guest's data check still prove
    every block it read.
    """
    global _kvm_verdict
    if shutil.which(QEMU) is None:
        raise BootError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    if not value or not set(value) <= VALUE_CHARS:
        raise ValueError(f"value {value!r} must be one word of [A-Za-z0-9._:-]")
    spec = str(disk_spec)
    if not _is_url(spec) and not os.access(spec, os.R_OK | (0 if snapshot else os.W_OK)):
        raise BootError(f"disk {spec} is not readable and writable")
    art = ensure_guest()
    if initrd == "guest":
        initrd_path = art.initramfs
    elif initrd == "host":
        if art.host_initrd is None:
            raise BootError(f"no readable Debian initramfs for kernel {art.kver}")
        initrd_path = art.host_initrd
    else:
        initrd_path = Path(initrd)
    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="guest-boot-"))
    logs.mkdir(parents=True, exist_ok=True)

    mode = accel or os.environ.get("INSTANTNFS_GUEST_ACCEL", "auto")
    if mode not in ("auto", "kvm", "tcg"):
        raise ValueError("accel must be auto, kvm or tcg")
    if mode == "auto":
        mode = "kvm" if kvm_usable() and _kvm_verdict in (None, "ok") else "tcg"
    fallback = None
    status, res = _run_qemu(mode, spec, value, timeout, art.kernel, initrd_path, logs, kvm_probe_s, mem_mb, snapshot)
    if status == "kvm-broken":
        _kvm_verdict = str(res)
        if accel == "kvm":
            raise BootError(f"KVM is not usable here: {res}")
        fallback = str(res)
        status, res = _run_qemu("tcg", spec, value, timeout, art.kernel, initrd_path, logs, kvm_probe_s, mem_mb, snapshot)
    elif status == "ok" and mode == "kvm":
        _kvm_verdict = "ok"
    if status != "ok":
        raise BootError(f"guest boot from {spec} failed: {res}")
    assert isinstance(res, BootResult)
    if fallback:
        res = BootResult(**{**{f: getattr(res, f) for f in BootResult.__slots__}, "kvm_fallback": fallback})
    return res


def read_guest_file(image: str | os.PathLike, path: str, part_offset: int = PART_OFFSET) -> bytes:
    """The bytes of ``path`` in the guest's ext4 root inside the raw ``image`` (debugfs)."""
    if shutil.which("debugfs") is None:
        raise FileNotFoundError("debugfs is not installed (apt-get install e2fsprogs)")
    p = subprocess.run(["debugfs", "-R", f'cat "{path}"', f"{image}?offset={part_offset}"], capture_output=True)
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0 or "File not found" in err or "Bad magic" in err or "not found" in err.lower():
        raise FileNotFoundError(f"{path} in {image}: {err.strip()}")
    return p.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Boot the instantnfs test guest once and time it.")
    ap.add_argument("disk", help="disk image path or nfs:// URL (the guest writes to it)")
    ap.add_argument("value", nargs="?", default=f"hb-{int(time.time())}")
    ap.add_argument("--initrd", default="guest", help="guest | host | PATH (default guest)")
    ap.add_argument("--accel", default=None, choices=("auto", "kvm", "tcg"))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--snapshot", action="store_true", help="guest writes go to a throw-away overlay (read-only disks)")
    args = ap.parse_args(argv)
    try:
        r = boot_guest(args.disk, args.value, args.timeout, initrd=args.initrd, accel=args.accel,
                       snapshot=args.snapshot)
    except BootError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 2
    for line in r.console_log.replace("\r", "").splitlines():
        if line.startswith("GUEST-"):
            print("guest:", line)
    if r.kvm_fallback:
        print(f"KVM abandoned: {r.kvm_fallback}")
    print(f"OK accel={r.accel} initrd={r.initrd} heartbeat={r.heartbeat_s:.2f}s done={r.seconds:.2f}s")
    return 0 if r.datacheck_ok else 3


if __name__ == "__main__":
    sys.exit(main())
