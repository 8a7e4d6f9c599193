"""What the recovery product's scenarios share: the test guest backed up, VMs booted
through the daemon's API or beside it, consoles followed, QEMU's block statistics and
block trace read.

- ``guest_point(ctx)``: the bootable test guest (``engine.vm.guest``) backed up into the
  run's repository once per run (a 128 MiB raw disk, seconds to back up); its pristine
  image is the local file the boots are compared with.
- ``wait_console_api`` follows a VM the daemon runs through ``GET /vms/{name}/console``;
  ``LocalVMs`` runs VMs in the bench process with ``engine.vm``'s own ``Supervisor``
  (same command line builder as the daemon's), for the local-file side of a row and for
  what needs QMP while the VM runs: QEMU's monitor takes one client at a time, and the
  daemon holds its VMs' monitors, so ``query-blockstats`` and HMP ``qemu-io`` writes are
  only possible on a VM the bench started itself.
- ``parse_trace`` reads QEMU's ``blk_co_preadv`` trace events (the ``log`` trace
  backend, ``-trace enable=blk_co_preadv -D FILE``): the reads the guest's block device
  made, in order. ``trace_summary`` totals it. ``blockstats`` picks one device's read counters out of
  ``query-blockstats``.

Threads: everything blocks (subprocesses, QMP, HTTP polls) and runs in the bench's own
thread; the only other thread is a migrate row's writer (``engine.bench.scenarios.migrate``).
Every wait has a timeout. Refuses: a trace line that names no offset or length is
skipped, never guessed; a console wait ends with the console's tail in the error.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOOT_TIMEOUT = 600.0  # s: a TCG boot on a loaded 2-core machine, with room; never a measure
POLL_S = 0.1
TRACE_RE = re.compile(r"blk_co_preadv\b.*?\boffset (\d+) bytes (\d+)")



@dataclass(frozen=True)
class Read:
    """One read the guest's disk saw: where and how much."""

    offset: int
    length: int


def parse_trace(text: str) -> list[Read]:
    """The ``blk_co_preadv`` events of a QEMU trace log, in order (other lines skipped).

    A line looks like ``25630@1796071574.05:blk_co_preadv blk 0x.. bs 0x.. offset 0 bytes
    512 flags 0x0``; QEMU's own messages may follow on the same line, so the event is
    matched where it is, not by splitting."""
    out = []
    for m in TRACE_RE.finditer(text):
        length = int(m.group(2))
        if length > 0:
            out.append(Read(int(m.group(1)), length))
    return out


def trace_summary(reads: Sequence[Read]) -> dict[str, int]:
    """Totals of a trace: reads, bytes, distinct bytes (overlaps counted once), the largest read."""
    spans = sorted((r.offset, r.offset + r.length) for r in reads)
    distinct = 0
    end = -1
    for a, b in spans:
        if b <= end:
            continue
        distinct += b - max(a, end)
        end = b
    return {"reads": len(reads), "bytes": sum(r.length for r in reads), "distinct_bytes": distinct,
            "largest": max((r.length for r in reads), default=0)}


def blockstats(stats: list[dict[str, Any]], device: str = "disk0") -> dict[str, int]:
    """One device's read counters from a ``query-blockstats`` reply: bytes, operations,
    total read time (ns, QEMU's sum of each request's latency)."""
    for s in stats:
        if s.get("device") == device or s.get("qdev") == device:
            st = s.get("stats") or {}
            return {"rd_bytes": int(st.get("rd_bytes", 0)), "rd_operations": int(st.get("rd_operations", 0)),
                    "rd_total_time_ns": int(st.get("rd_total_time_ns", 0))}
    raise ValueError(f"query-blockstats names no device {device!r}: {[s.get('device') for s in stats]}")


# -- the guest backed up -----------------------------------------------------------------


def guest_point(ctx) -> tuple[str, Path]:  # noqa: ANN001
    """The test guest backed up into the run's repository (once per run): (point id, its
    pristine image). The guest is built once per host and cached (``ensure_guest``)."""
    from engine.bench.ours import cli_backup
    from engine.vm.guest import ensure_guest

    got: tuple[str, Path] | None = getattr(ctx, "_guest_point", None)
    if got is None or not got[1].exists():
        ctx.step("building / finding the test guest")
        g = ensure_guest()
        image = ctx.work / "guest" / "guest.img"
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(g.disk, image)
        ctx.step("backing up the test guest")
        got = (str(cli_backup(ctx.repo, "guest", image)["id"]), image)
        ctx._guest_point = got  # this run's: the next run has a new repository
        warm_accel(ctx, got[0])
    return got


def warm_accel(ctx, point: str) -> None:  # noqa: ANN001
    """Start and stop one VM through the daemon, so that its one-time KVM probe (up to
    10 s, remembered in its state directory) is not inside the first measured boot."""
    ctx.step("starting one VM untimed (the daemon's accel probe)")
    name = ctx.session_name("probe")
    try:
        ctx.ours.api("POST", "/recover", {"point": point, "name": name, "boot": True, "memory_mib": 64, "net": "none"})
    finally:
        stop_api(ctx.ours, name, ctx.log)


# -- VMs the daemon runs -----------------------------------------------------------------


def wait_console_api(d, names: Sequence[str], marker: str, timeout: float = BOOT_TIMEOUT,  # noqa: ANN001
                     t0: float | None = None) -> dict[str, float]:
    """Seconds (from ``t0``, perf_counter) until each VM's console shows ``marker``;
    ``RuntimeError`` with the tail of the first one that did not, or exited without it."""
    t0 = time.perf_counter() if t0 is None else t0
    seen: dict[str, float] = {}
    offsets = dict.fromkeys(names, 0)
    texts = dict.fromkeys(names, "")
    deadline = time.monotonic() + timeout
    while len(seen) < len(names):
        for n in names:
            if n in seen:
                continue
            r = d.api("GET", f"/vms/{n}/console?offset={offsets[n]}")
            texts[n] = (texts[n] + r["text"])[-8192:]
            offsets[n] = r["offset"]
            if marker in texts[n]:
                seen[n] = time.perf_counter() - t0
            elif r.get("state") == "exited":
                raise RuntimeError(f"VM {n} exited before {marker}; console tail: {texts[n][-1500:]}")
        if len(seen) < len(names):
            if time.monotonic() > deadline:
                late = next(n for n in names if n not in seen)
                raise RuntimeError(f"VM {late}: no {marker} within {timeout:.0f} s; console tail: {texts[late][-1500:]}")
            time.sleep(POLL_S)
    return seen


def stop_api(d, name: str, log: Callable[[str], None]) -> None:  # noqa: ANN001
    """Stop a session's VM and unpublish it (its writes thrown away); a failure is logged."""
    try:
        d.api("POST", f"/sessions/{name}/stop", {"discard": True})
    except Exception as e:  # noqa: BLE001 - cleaning up after a run; the run has its figure or error
        log(f"stopping {name} failed: {e}")


# -- VMs the bench runs ------------------------------------------------------------------


class LocalVMs:
    """VMs run by the bench process itself, with ``engine.vm``'s ``Supervisor`` under
    ``state_dir``; ``accel`` is what the daemon uses (the same probe, on the same host)."""

    def __init__(self, state_dir: Path) -> None:
        from engine.vm.qemu import accel_verdict
        from engine.vm.supervisor import Supervisor

        state_dir.mkdir(parents=True, exist_ok=True)
        self.sup = Supervisor(state_dir)
        self.accel = accel_verdict(state_dir)
        self._n = 0

    def start(self, what: str, source: str, *, memory_mib: int, fw_cfg: bytes | None, bus: str = "virtio"):  # noqa: ANN201
        from engine.vm.qemu import DiskSpec, VMSpec

        self._n += 1
        spec = VMSpec(name=f"{what}{self._n}", disks=[DiskSpec(source, "raw", bus)], memory_mib=memory_mib, cpus=1,
                      net="none", fw_cfg=fw_cfg, accel=self.accel, owner="bench")
        return self.sup.start(spec)

    def end(self, vm) -> None:  # noqa: ANN001
        """Stop (if running) and forget ``vm``, its state directory removed."""
        try:
            if vm.refresh(query=False) != "exited":
                self.sup.stop(vm.name, timeout=10.0)
        finally:
            self.sup.remove(vm.name)
            shutil.rmtree(self.sup.files(vm.name).dir, ignore_errors=True)

    def close(self) -> None:
        for vm in self.sup.list():
            try:
                self.end(vm)
            except Exception:  # noqa: BLE001, S110 - closing after an error: each VM tried
                pass
        self.sup.close()


def fresh_copy(image: Path, dest: Path) -> Path:
    """A copy of the pristine guest image to boot (the guest writes to its disk), synced:
    QEMU reads it with O_DIRECT, which would otherwise wait for the copy's writeback
    inside the measured boot."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    shutil.copyfile(image, dest)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dest
