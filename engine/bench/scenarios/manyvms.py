"""Many VMs from one restore point: 1, 4 and 16 sessions read at once.

A recovery server starts several VMs of one backup (a test lab, a sandbox per tester).
Their disks share every chunk, so the decompression cache serves them all: the
aggregate should grow with the sessions until the server's cores are busy, not fall.
Each session is read by its own connection of the load generator (random 4 KiB, queue
depth 16), all at once; the figure is the total. No peer offers sessions.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from engine.bench import loadgen
from engine.bench.core import OURS, Goal, Row

NAME = "many-vms"
GROUP = "many VMs"
PEERS: tuple[str, ...] = ()
COUNTS = (1, 4, 16)


def rows(ctx) -> int:  # noqa: ANN001
    return len(COUNTS)


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    names = [ctx.session_name("vm") for _ in range(max(COUNTS))]
    targets = [ctx.ours.publish(ctx.point, n)[0] for n in names]
    single = None
    try:
        for count in COUNTS:
            goal = None if single is None else Goal("≥ 1.0× one session's total", absolute=single)
            row = ctx.row(f"many-vms/{count}", f"{count} session{'s' * (count > 1)} of one point, random 4 KiB reads, total",
                          GROUP, "IOPS", "higher",
                          {"client": "load generator, one connection per session", "transfer": 4096, "queue_depth": 16,
                           "connections": count, "sessions": count, "cache": "warm"}, goal)
            spec = loadgen.LoadSpec(op="read", size=4096, depth=16, connections=count, seconds=ctx.settings.seconds)
            ctx.measure(row, {OURS: partial(loadgen.run_load, targets[:count], spec)})
            if single is None and OURS in row.results:
                single = row.results[OURS].median
            yield row
    finally:
        ctx.unpublish(*names)
