"""Boot of the test guest from a backup over our NFS, against booting it from a local file.

The guest is ``engine.vm.guest``'s (syslinux from its own disk, a Linux kernel, a busybox
agent that reads its data files back and reports on the serial console), backed up once
into the run's repository (``guestvm.guest_point``). Rows:

- **boot to GUEST-DONE**: instantnfs is ``POST /recover`` with ``boot`` and a oneshot
  guest configuration (the clock runs from the request: publish, QEMU start, firmware,
  kernel, the agent's data check and write, ``GUEST-DONE`` on the console read through
  ``GET /vms/{name}/console``); the local file is the same image copied to the work
  directory, started by ``engine.vm``'s ``Supervisor`` in the bench process with the
  same settings (the accel the daemon's probe picks, memory, virtio-blk, ``cache=none``,
  no network, one CPU; the clock from ``start``). Median of 5 runs each (``--quick``: 3),
  alternating; the chunk cache is emptied (daemon restart) before each instantnfs run, so
  every boot is a first boot from the backup. Goal: <= 1.1x the local file.
- **disk read time during boot**: under TCG the CPU's emulation dominates the boot, so
  the disk's share is read from QEMU itself: ``query-blockstats`` (``rd_total_time_ns``,
  the sum of every read's latency; ``rd_bytes``; ``rd_operations``) at ``GUEST-READY``
  of a run-mode boot. QEMU's monitor takes one client and the daemon holds the monitors
  of its VMs, so here both VMs are started by the bench (the instantnfs one on the
  ``nfs://`` URL of a session published through the API, exactly the URL the daemon's
  own VMs open). ``--pairs`` runs each.

Threads: none of its own; every boot is waited for with a timeout. It refuses nothing
itself; a boot that does not reach its marker is the row's error with the console's tail.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial

from engine.bench import guestvm
from engine.bench.core import OURS, Goal, Measure, Row

NAME = "boot"
GROUP = "VM boot"
PEERS: tuple[str, ...] = ()
LOCAL = "local"
MEMORY_MIB = 256


def runs(ctx) -> int:  # noqa: ANN001
    return 3 if ctx.quick else 5


def rows(ctx) -> int:  # noqa: ANN001, ARG001
    return 2


class Boots:
    """The state the rows share: the guest's point and image, the local VMs."""

    def __init__(self, ctx) -> None:  # noqa: ANN001
        self.ctx = ctx
        self.point, self.image = guestvm.guest_point(ctx)
        self.local = guestvm.LocalVMs(ctx.work / "boot-vms")
        self.copy = ctx.work / "boot-local" / "guest.img"

    def config(self, mode: str) -> bytes:
        from engine.vm.guest import guest_config

        return guest_config("bench", value="bench", mode=mode, heartbeat_s=5.0)

    # -- boot to GUEST-DONE --

    def ours_done(self) -> Measure:
        from engine.vm.guest import DONE

        d = self.ctx.ours
        name = self.ctx.session_name("boot")
        t0 = time.perf_counter()
        try:
            r = d.api("POST", "/recover", {"point": self.point, "name": name, "boot": True, "memory_mib": MEMORY_MIB,
                                           "cpus": 1, "disk_bus": "virtio", "net": "none",
                                           "guest_config": self.config("oneshot").decode()})
            seconds = guestvm.wait_console_api(d, [name], DONE, t0=t0)[name]
            accel = r["vm"]["accel"]
        finally:
            guestvm.stop_api(d, name, self.ctx.log)
        if accel != self.local.accel:
            raise RuntimeError(f"the daemon's VM ran under {accel}, the local one under {self.local.accel}")
        return Measure(seconds, {"accel": accel})

    def local_done(self) -> Measure:
        from engine.vm.guest import DONE

        guestvm.fresh_copy(self.image, self.copy)
        t0 = time.perf_counter()
        vm = self.local.start("boot", str(self.copy), memory_mib=MEMORY_MIB, fw_cfg=self.config("oneshot"))
        try:
            vm.wait_for(DONE, guestvm.BOOT_TIMEOUT)
            seconds = time.perf_counter() - t0
        finally:
            self.local.end(vm)
        return Measure(seconds, {"accel": self.local.accel})

    # -- the disk's share --

    def _stats_at_ready(self, source: str) -> Measure:
        from engine.vm.guest import READY

        t0 = time.perf_counter()
        vm = self.local.start("stats", source, memory_mib=MEMORY_MIB, fw_cfg=self.config("run"))
        try:
            vm.wait_for(READY, guestvm.BOOT_TIMEOUT)
            ready = time.perf_counter() - t0
            st = guestvm.blockstats(vm.qmp().execute("query-blockstats"))
        finally:
            self.local.end(vm)
        read_s = st["rd_total_time_ns"] / 1e9
        return Measure(read_s * 1e3, {**st, "ready_s": round(ready, 3), "disk_share": round(read_s / ready, 4)})

    def ours_stats(self) -> Measure:
        d = self.ctx.ours
        name = self.ctx.session_name("bootst")
        try:
            view = d.api("POST", "/sessions", {"point": self.point, "name": name})
            disk = view["disks"][0]
            url = d.target(name, disk["name"], disk["size"]).url
            return self._stats_at_ready(url)
        finally:
            self.ctx.unpublish(name)

    def local_stats(self) -> Measure:
        return self._stats_at_ready(str(guestvm.fresh_copy(self.image, self.copy)))

    def cold(self, name: str) -> None:
        if name == OURS:
            self.ctx.step("boot: restarting instantnfs (an empty chunk cache)")
            self.ctx.ours.restart()


def _error_rows(ctx, e: Exception) -> Iterator[Row]:  # noqa: ANN001
    for rid in ("to-done", "disk-read-time"):
        row = ctx.row(f"boot/{rid}", f"boot of the test guest ({rid})", GROUP, "s", "lower", {})
        row.error = f"{type(e).__name__}: {e}"
        yield row


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    try:
        b = Boots(ctx)
    except Exception as e:  # noqa: BLE001 - every row says why there is no guest
        yield from _error_rows(ctx, e)
        return
    try:
        from engine.vm.qemu import drive_cache

        local_cache = drive_cache(str(guestvm.fresh_copy(b.image, b.copy)))
        common = {"disk": "the test guest's 128 MiB raw disk (not the seeded disk)",
                  "guest": "engine.vm.guest (syslinux, Linux, busybox agent)",
                  "accel": b.local.accel, "memory_mib": MEMORY_MIB, "cpus": 1, "disk_bus": "virtio",
                  "drive_cache": f"instantnfs none, local {local_cache}", "net": "none",
                  "cache": "instantnfs: chunk cache emptied (daemon restarted) before each run; "
                           "local: a fresh copy of the image before each run"}
        row = ctx.row("boot/to-done", "boot of the test guest to GUEST-DONE: from the backup over NFS vs a local raw file",
                      GROUP, "s", "lower",
                      {**common, "client": "QEMU's nfs:// driver (libnfs) vs QEMU on the local file",
                       "instantnfs": "POST /recover boot=true, oneshot guest; clock from the request",
                       "local": "engine.vm Supervisor.start of the copied image; clock from the start",
                       "runs": runs(ctx)},
                      Goal("≤ 1.1× the local file", peer=LOCAL, ratio=1.1))
        yield ctx.measure(row, {OURS: b.ours_done, LOCAL: b.local_done}, before=b.cold,
                          pairs=runs(ctx))
        row = ctx.row("boot/disk-read-time", "boot's disk read time (QMP query-blockstats rd_total_time) to GUEST-READY",
                      GROUP, "ms", "lower",
                      {**common, "client": "QEMU's nfs:// driver (libnfs) vs QEMU on the local file",
                       "figure": "sum of the read latencies QEMU saw on disk0 until GUEST-READY (run mode); extras: "
                                 "rd_bytes, rd_operations, ready_s, disk_share = read time / time to READY",
                       "instantnfs": "session published through the API; VM started by the bench on its nfs:// URL "
                                     "(QMP is one client at a time: the daemon's VMs' monitors are the daemon's)"})
        ctx.measure(row, {OURS: partial(b.ours_stats), LOCAL: partial(b.local_stats)}, before=b.cold)
        if b.local.accel == "tcg":
            row.notes.append("under TCG a read's latency includes the wait for QEMU's main loop while the emulated CPU "
                             "holds it (milliseconds per read here): the boot-trace rows measure the disk alone")
        yield row
    finally:
        b.local.close()
