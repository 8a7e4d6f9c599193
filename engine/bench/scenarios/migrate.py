"""Live migrate of the benchmark disk (2 GiB; 256 MiB with ``--quick``) off our NFS to a
local file: time, MB/s and the bytes copied twice.

The benchmark disk is seeded data, not a bootable system: its VM runs SeaBIOS, finds
nothing to boot and keeps running, which is all a block mirror needs. Two rows:

- **through the API, no writer**: ``POST /recover`` with ``boot`` (128 MiB, no network),
  then ``POST /sessions/{name}/migrate`` to a directory under the daemon's export
  directory, the job polled every 50 ms until it ends (QMP ``blockdev-mirror`` then
  ``block-job-complete``: ``engine.vm.migrate.mirror`` in the daemon). The VM writes
  nothing (SeaBIOS idles), so "copied twice" should be 0.
- **with a writer**: the same mirror function while the disk is written: HMP ``qemu-io
  disk0 "write -P 0x5a OFF 64k"`` every 100 ms at seeded random 64 KiB-aligned offsets
  (what the guest would write, through QEMU's block layer, so the mirror's dirty bitmap
  sees it). QEMU's monitor takes one client at a time and the daemon holds its VMs'
  monitors, so for this row the VM is started by the bench (``engine.vm``'s
  ``Supervisor``, the same command line builder) on the ``nfs://`` URL of a session
  published through the API, and the bench calls ``mirror`` itself; the writer thread
  shares the VM's QMP client (one lock per exchange).

Figure: seconds from the migrate request to the pivot. Extras: MB/s (the disk's size
over that time), ``bytes_copied`` (QEMU's count), ``copied_twice`` (``bytes_copied`` −
the disk's size: what the mirror copied again because it was written after it was
copied), and for the writer its writes and bytes. The daemon is restarted before each
run (an empty chunk cache: the mirror decompresses every chunk, as right after a
recovery). The target file is removed after each run. Threads: the writer (one thread, stopped and joined in a ``finally``).
"""
from __future__ import annotations

import random
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from engine.bench import guestvm
from engine.bench.core import OURS, Measure, Row
from engine.bench.scenarios.verify import wait_job

NAME = "migrate"
GROUP = "live migrate"
PEERS: tuple[str, ...] = ()
MEMORY_MIB = 128
WRITE = 64 << 10
WRITE_EVERY_S = 0.1


def rows(ctx) -> int:  # noqa: ANN001, ARG001
    return 2


def figures(size: int, bytes_copied: int, seconds: float) -> dict[str, Any]:
    """A migrate's extras: MB/s of the disk and the bytes copied twice."""
    return {"bytes": size, "bytes_copied": bytes_copied, "copied_twice": max(0, bytes_copied - size),
            "mb_s": round(size / seconds / 1e6, 1) if seconds > 0 else None, "seconds": round(seconds, 3)}


class Writer(threading.Thread):
    """Writes 64 KiB of 0x5a at a seeded random aligned offset every 100 ms through HMP
    ``qemu-io`` until stopped."""

    def __init__(self, vm, size: int, seed: int = 13) -> None:  # noqa: ANN001
        super().__init__(name="bench-migrate-writer", daemon=True)
        self.vm = vm
        self.size = size
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.writes = 0
        self.error: str | None = None

    def run(self) -> None:
        q = self.vm.qmp()
        while not self.halt.wait(WRITE_EVERY_S):
            off = self.rng.randrange(self.size // WRITE) * WRITE
            try:
                out = q.hmp(f'qemu-io disk0 "write -P 0x5a {off} {WRITE}"')
            except Exception as e:  # noqa: BLE001 - reported by the run, which fails on it
                self.error = f"{type(e).__name__}: {e}"
                return
            if "error" in out.lower() or "fail" in out.lower():  # its report goes to QEMU's stdout
                self.error = f"qemu-io said: {out.strip()[:200]}"
                return
            self.writes += 1


def _target_dir(ctx, name: str) -> Path:  # noqa: ANN001
    return ctx.ours.work / "cache" / "exports" / name  # the daemon's default export directory


def via_api(ctx) -> Measure:  # noqa: ANN001
    d = ctx.ours
    name = ctx.session_name("mig")
    to = _target_dir(ctx, name)
    try:
        d.api("POST", "/recover", {"point": ctx.point, "name": name, "boot": True, "memory_mib": MEMORY_MIB,
                                   "cpus": 1, "net": "none"})
        t0 = time.perf_counter()
        job = wait_job(d, d.api("POST", f"/sessions/{name}/migrate", {"to": str(to)}))
        seconds = time.perf_counter() - t0
    finally:
        guestvm.stop_api(d, name, ctx.log)
        shutil.rmtree(to, ignore_errors=True)
    res = job["result"]
    if res.get("mode") != "live":
        raise RuntimeError(f"the migrate was not live: {res}")
    disk = res["disks"][0]
    return Measure(seconds, figures(int(disk["bytes"]), int(disk["bytes_copied"]), seconds))


def with_writer(ctx, vms: guestvm.LocalVMs) -> Measure:  # noqa: ANN001
    from engine.vm.migrate import mirror

    d = ctx.ours
    name = ctx.session_name("migw")
    target = ctx.work / "migrate" / f"{name}.img"
    target.parent.mkdir(parents=True, exist_ok=True)
    vm = None
    try:
        view = d.api("POST", "/sessions", {"point": ctx.point, "name": name})
        disk = view["disks"][0]
        vm = vms.start("migw", d.target(name, disk["name"], disk["size"]).url, memory_mib=MEMORY_MIB, fw_cfg=None)
        w = Writer(vm, int(disk["size"]))
        w.start()
        try:
            time.sleep(0.5)  # the writer is under way before the copy starts
            t0 = time.perf_counter()
            res = mirror(vm, 0, str(target), "raw")
            seconds = time.perf_counter() - t0
        finally:
            w.halt.set()
            w.join(30)
        if w.error is not None:
            raise RuntimeError(f"the writer failed: {w.error}")
    finally:
        if vm is not None:
            vms.end(vm)
        ctx.unpublish(name)
        target.unlink(missing_ok=True)
    return Measure(seconds, {**figures(int(res["bytes"]), int(res["bytes_copied"]), seconds),
                             "writes": w.writes, "written_bytes": w.writes * WRITE})


def _note(row: Row) -> None:
    """The medians of the extras, said in the row's notes (the report shows the figure only)."""
    s = row.results.get(OURS)
    if s is None:
        return
    mb = [x["mb_s"] for x in s.extras if x.get("mb_s")]
    twice = [x["copied_twice"] for x in s.extras]
    if mb:
        row.notes.append(f"median {statistics.median(mb):.0f} MB/s; bytes copied twice (median): "
                         f"{statistics.median(twice):.0f}")


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    common = {"client": "QEMU's nfs:// driver (libnfs) → blockdev-mirror → raw file (cache=none where possible)",
              "disk_size": ctx.size, "vm": f"the benchmark disk, SeaBIOS (nothing to boot), {MEMORY_MIB} MiB, no network",
              "cache": "chunk cache emptied (daemon restarted) before each run: the copy decompresses every chunk"}
    row = ctx.row("migrate/api-idle", "live migrate through the API (POST /sessions/{name}/migrate), VM not writing",
                  GROUP, "s", "lower", {**common, "writer": "none (SeaBIOS idles)"})
    yield _noted(ctx.measure(row, {OURS: partial(via_api, ctx)}, before=lambda _n: ctx.ours.restart()))
    row = ctx.row("migrate/with-writes", "live migrate (engine.vm.migrate.mirror) while 64 KiB is written every 100 ms",
                  GROUP, "s", "lower",
                  {**common, "writer": "HMP qemu-io 'write -P 0x5a OFF 64k' every 100 ms, seeded random aligned offsets",
                   "driver": "the bench runs the VM and calls mirror itself (QMP is one client at a time)"})
    try:
        vms = guestvm.LocalVMs(ctx.work / "migrate-vms")
    except Exception as e:  # noqa: BLE001 - reported in the row
        row.error = f"{type(e).__name__}: {e}"
        yield row
        return
    try:
        yield _noted(ctx.measure(row, {OURS: partial(with_writer, ctx, vms)}, before=lambda _n: ctx.ours.restart()))
    finally:
        vms.close()


def _noted(row: Row) -> Row:
    _note(row)
    return row
