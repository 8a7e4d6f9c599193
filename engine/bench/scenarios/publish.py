"""Publish to first byte: from the API request to the first READ reply, 1 GiB to 1 TiB.

What an orchestrator waits for before it can start a VM. An NFS client is connected and
mounted first; the clock runs from ``POST /sessions`` to the reply of a 4 KiB READ of
the new session's disk (two LOOKUPs between). The disks are sparse with a little data
(1 MiB at the start and in the middle), backed up into the run's repository, so the
figure is what publishing costs, not reading: it should not grow with the disk's size.
Every run, quick or not, measures 1 GiB, 32 GiB and 1 TiB (backing a sparse disk up
takes a second or two whatever its size), so that "flat" is seen in one run window.

The peers have no publish: their nearest step is mounting an archive, so a last row times
``borg mount`` / ``restic mount`` to the first 4 KiB read of the benchmark disk, beside
publishing that same disk.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from functools import partial

from engine.bench.core import OURS, Goal, Measure, Row, Systems
from engine.bench.ours import cli_backup
from engine.nfs.client import NFSClient

NAME = "publish"
GROUP = "publish to first byte"
PEERS = ("borg", "borg-fixed", "restic")
GIB = 1 << 30
MIB = 1 << 20


def sizes(ctx) -> tuple[int, ...]:  # noqa: ANN001, ARG001 - every run: flat from 1 GiB to 1 TiB is the goal
    return (GIB, 32 * GIB, 1 << 40)


def rows(ctx) -> int:  # noqa: ANN001
    return len(sizes(ctx)) + 1


def sparse_point(ctx, size: int) -> str:  # noqa: ANN001
    """Back up a sparse ``size`` disk (1 MiB of data at 0 and at the middle); its point id."""
    path = ctx.work / f"sparse-{size}.img"
    with open(path, "wb") as f:
        f.truncate(size)
        for at in (0, size // 2):
            f.seek(at)
            f.write(os.urandom(MIB))
    try:
        return str(cli_backup(ctx.repo, f"sparse-{size >> 30}g", path, timeout=1800)["id"])
    finally:
        path.unlink(missing_ok=True)


async def _first_byte(ctx, point: str) -> Measure:  # noqa: ANN001
    d = ctx.ours
    c = await NFSClient.connect(d.address, d.ports["mount"], d.ports["nfs"])
    name = ctx.session_name("pub")
    try:
        root = await c.mount(d.export)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        view = await loop.run_in_executor(None, lambda: d.api("POST", "/sessions", {"point": point, "name": name}))
        sess = await c.lookup(root, name)
        fh = await c.lookup(sess, f"{view['disks'][0]['name']}.img")
        data, _ = await c.read(fh, 0, 4096)
        seconds = time.perf_counter() - t0
        if len(data) != 4096:
            raise RuntimeError(f"the first READ returned {len(data)} bytes, not 4096")
        return Measure(seconds * 1e3, {"seconds": seconds})
    finally:
        await c.close()
        await asyncio.get_running_loop().run_in_executor(None, lambda: d.unpublish(name))


def first_byte(ctx, point: str) -> Measure:  # noqa: ANN001
    return asyncio.run(_first_byte(ctx, point))


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    goal = Goal("< 50 ms at every size", absolute=50.0)
    for size in sizes(ctx):
        label = f"{size >> 40} TiB" if size >= 1 << 40 else f"{size >> 30} GiB"
        row = ctx.row(f"publish/sparse-{label.replace(' ', '')}", f"publish → first byte, {label} sparse disk", GROUP, "ms",
                      "lower", {"client": "control API + in-repo NFS client (mounted before)", "disk_size": size,
                                "transfer": 4096, "queue_depth": 1, "connections": 1, "cache": "cold"}, goal)
        try:
            ctx.step(f"publish: backing up a {label} sparse disk")
            point = sparse_point(ctx, size)
        except Exception as e:  # noqa: BLE001 - reported in the row
            row.error = f"{type(e).__name__}: {e}"
            yield row
            continue
        yield ctx.measure(row, {OURS: partial(first_byte, ctx, point)})

    row = ctx.row("publish/bench-disk", "publish (mount for the peers) → first byte, the benchmark disk", GROUP, "ms", "lower",
                  {"client": "control API + NFS client; borg/restic mount + pread", "disk_size": ctx.size,
                   "transfer": 4096, "cache": "cold"}, goal, peers=PEERS)
    systems: Systems = {OURS: partial(first_byte, ctx, ctx.point)}
    for name in PEERS:
        p = ctx.peers.get(name)
        if p is not None:
            systems[name] = partial(_peer_first_byte, ctx, p)
    yield ctx.measure(row, systems)


def _peer_first_byte(ctx, peer) -> Measure:  # noqa: ANN001
    from engine.bench.peers import Workspace

    m = peer.mount_first_byte(Workspace(ctx.work / "peers", ctx.image, ctx.size, ctx.log))
    if m is None:
        raise RuntimeError(f"{peer.name} has no mount")
    return Measure(m.value * 1e3, {**m.extra, "seconds": m.value})
