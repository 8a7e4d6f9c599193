"""The boot's recorded block I/O replayed against our NFS and against the local file.

Under TCG a boot is mostly the CPU's emulation; replaying only the reads the boot made
isolates the disk. How the trace is recorded, and why this way: QEMU's own trace event
``blk_co_preadv`` (Debian's QEMU has the ``log`` trace backend: ``-trace
enable=blk_co_preadv -D FILE``) logs every read the guest's block device issues, with
offset and length, in order, at the block layer above the format and protocol drivers,
so the trace is the same whatever the disk's source. One boot of the local image to
``GUEST-DONE`` (oneshot) is recorded, once per run. blkdebug has no read log, and
recording at our NFS server would see libnfs's splitting and QEMU's alignment instead
of the guest's requests; the trace event sees exactly what the guest asked for.

The replay reads the same offsets and lengths in the same order, one at a time (the
guest's boot is mostly one request at a time): against instantnfs with the in-repo NFS
client (``engine.nfs.client``, READs of at most 1 MiB, on a session published for the
row, mounted and looked up before the clock starts; the chunk cache emptied by a daemon
restart before each run, as a first boot from a backup), and against the local image
with ``pread`` under ``O_DIRECT`` (QEMU's ``cache=none``; buffered with the file's pages
dropped first where the filesystem has no O_DIRECT). A second row replays with the chunk
cache warm (one untimed replay first): the NFS round trips alone, without decompression.
The writes of the boot are not replayed (a few KiB: the agent's value and counter).
Figure: ms for the whole replay; extras: reads, bytes.

Threads: the NFS replay runs an asyncio loop in the bench's thread; nothing else.
"""
from __future__ import annotations

import asyncio
import mmap
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

from engine.bench import guestvm
from engine.bench.core import OURS, Goal, Measure, Row
from engine.bench.guestvm import Read

NAME = "boot-trace"
GROUP = "VM boot: disk I/O replay"
PEERS: tuple[str, ...] = ()
LOCAL = "local"
MEMORY_MIB = 256
NFS_MAX = 1 << 20


def rows(ctx) -> int:  # noqa: ANN001, ARG001
    return 2


def record(ctx, image: Path) -> list[Read]:  # noqa: ANN001
    """Boot a copy of ``image`` to GUEST-DONE under QEMU with the read trace on; its reads."""
    from engine.vm.guest import DONE, guest_config
    from engine.vm.qemu import DiskSpec, VMFiles, VMSpec, accel_verdict, command_line, prepare_files

    work = ctx.work / "boot-trace"
    copy = guestvm.fresh_copy(image, work / "guest.img")
    accel = accel_verdict(work / "probe")
    spec = VMSpec(name="trace", disks=[DiskSpec(str(copy))], memory_mib=MEMORY_MIB, net="none",
                  fw_cfg=guest_config("trace", value="trace", mode="oneshot"), accel=accel)
    files = VMFiles(work / "vm")
    prepare_files(spec, files)
    log = work / "trace.log"
    cmd = [*command_line(spec, files, accel=accel), "-trace", "enable=blk_co_preadv", "-D", str(log)]
    with open(files.qemu_log, "wb") as out:
        p = subprocess.Popen(cmd, cwd=files.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + guestvm.BOOT_TIMEOUT
        while DONE not in (files.serial.read_text(errors="replace") if files.serial.exists() else ""):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the traced boot did not reach {DONE}: "
                                   f"{files.serial.read_text(errors='replace')[-1500:] if files.serial.exists() else ''}")
            time.sleep(guestvm.POLL_S)
    finally:
        if p.poll() is None:
            p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    reads = guestvm.parse_trace(log.read_text(errors="replace"))
    if not reads:
        raise RuntimeError(f"the trace {log} holds no blk_co_preadv event (is QEMU's trace backend 'log'?)")
    return reads


async def _replay_nfs(ctx, point: str, reads: Sequence[Read]) -> Measure:  # noqa: ANN001
    from engine.nfs.client import NFSClient

    d = ctx.ours
    name = ctx.session_name("trace")
    loop = asyncio.get_running_loop()
    view = await loop.run_in_executor(None, lambda: d.api("POST", "/sessions", {"point": point, "name": name}))
    c = await NFSClient.connect(d.address, d.ports["mount"], d.ports["nfs"])
    try:
        root = await c.mount(d.export)
        fh = await c.lookup(await c.lookup(root, name), f"{view['disks'][0]['name']}.img")
        got = 0
        t0 = time.perf_counter()
        for r in reads:
            at, end = r.offset, r.offset + r.length
            while at < end:
                data, eof = await c.read(fh, at, min(NFS_MAX, end - at))
                got += len(data)
                at += len(data)
                if eof or not data:
                    break
        seconds = time.perf_counter() - t0
    finally:
        await c.close()
        await loop.run_in_executor(None, lambda: d.unpublish(name))
    return Measure(seconds * 1e3, {"reads": len(reads), "bytes": got})


def replay_nfs(ctx, point: str, reads: Sequence[Read]) -> Measure:  # noqa: ANN001
    return asyncio.run(_replay_nfs(ctx, point, reads))


def replay_local(image: Path, reads: Sequence[Read]) -> Measure:
    """The reads against the local image, O_DIRECT when the filesystem has it."""
    size = max(r.length for r in reads)
    buf = mmap.mmap(-1, (size + 4095) // 4096 * 4096)  # page aligned, as O_DIRECT wants
    try:
        fd, direct = os.open(image, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        fd, direct = os.open(image, os.O_RDONLY), False
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        got = 0
        t0 = time.perf_counter()
        for r in reads:
            got += os.preadv(fd, [memoryview(buf)[: r.length]], r.offset)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    return Measure(seconds * 1e3, {"reads": len(reads), "bytes": got, "o_direct": direct})


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    row = ctx.row("boot-trace/replay", "replay of the guest's boot reads (QEMU trace): from the backup over NFS vs the "
                  "local raw file", GROUP, "ms", "lower",
                  {"client": "in-repo NFS client (engine.nfs.client), queue depth 1, READ ≤ 1 MiB vs pread (O_DIRECT)",
                   "trace": "QEMU -trace blk_co_preadv of one oneshot boot to GUEST-DONE (reads only, in order)",
                   "cache": "instantnfs: chunk cache emptied (daemon restarted) before each run; packs in the page cache"},
                  Goal("≤ 1.1× the local file (the boot's goal, the disk alone)", peer=LOCAL, ratio=1.1))
    warm = ctx.row("boot-trace/replay-warm", "replay of the guest's boot reads, chunk cache warm (the NFS path alone) "
                   "vs the local raw file", GROUP, "ms", "lower",
                   {**row.conditions, "cache": "instantnfs: one untimed replay first, so every chunk is decompressed "
                                               "already; packs in the page cache"})
    try:
        point, image = guestvm.guest_point(ctx)
        ctx.step("boot-trace: recording a boot's reads")
        reads = record(ctx, image)
    except Exception as e:  # noqa: BLE001 - reported in the row
        row.error = warm.error = f"{type(e).__name__}: {e}"
        yield row
        yield warm
        return
    row.conditions["trace_summary"] = warm.conditions["trace_summary"] = guestvm.trace_summary(reads)
    local = ctx.work / "boot-trace" / "guest.img"

    def cold(name: str) -> None:
        if name == OURS:
            ctx.ours.restart()

    systems = {OURS: partial(replay_nfs, ctx, point, reads), LOCAL: partial(replay_local, local, reads)}
    yield ctx.measure(row, systems, before=cold)
    yield ctx.measure(warm, systems, warmup=True)
