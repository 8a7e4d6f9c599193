"""The daemon's memory with 16 sessions published and read, against its cache setting.

A daemon of its own (on 127.0.0.3) per run, with ``chunk_cache_mib`` set to the row's
figure; 16 sessions of the same restore point are published and the load generator
reads random 64 KiB blocks from all of them at once (16 connections, one per session),
then one sequential pass of one disk fills the chunk cache. The row's figure is the
resident set after the reads (``VmRSS``); the peak (``VmHWM``) is in the extras. The goal
says what a user sizing a recovery server needs: memory is the cache setting plus a
bounded overhead, whatever the number of sessions.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from functools import partial

from engine.bench import loadgen
from engine.bench.clients import qemu_bench
from engine.bench.core import OURS, Goal, Measure, Row
from engine.bench.ours import OurDaemon

NAME = "memory"
GROUP = "daemon memory"
PEERS: tuple[str, ...] = ()
MIB = 1 << 20
SESSIONS = 16
OVERHEAD = 256 * MIB
ADDRESS = "127.0.0.3"


def settings(ctx) -> tuple[int, ...]:  # noqa: ANN001
    return (256 * MIB,) if ctx.quick else (256 * MIB, 1024 * MIB)


def rows(ctx) -> int:  # noqa: ANN001
    return len(settings(ctx))


def one(ctx, cache_bytes: int) -> Measure:  # noqa: ANN001
    work = ctx.work / f"memory-{cache_bytes >> 20}"
    shutil.rmtree(work, ignore_errors=True)  # a new daemon with no sessions each round
    d = OurDaemon(work, ctx.repo, ADDRESS, cache_bytes)
    d.start()
    try:
        targets = [d.publish(ctx.point, f"vm{i}")[0] for i in range(SESSIONS)]
        spec = loadgen.LoadSpec(op="read", size=64 << 10, depth=4, connections=SESSIONS, seconds=ctx.settings.seconds)
        load = loadgen.run_load(targets, spec)
        qemu_bench(targets[0], MIB, 16, targets[0].size // MIB)
        mem = d.memory()
        return Measure(mem["VmRSS"] / MIB, {"rss_bytes": mem["VmRSS"], "peak_bytes": mem["VmHWM"],
                                            "read_iops": round(load.value), "sessions": SESSIONS})
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    for cache in settings(ctx):
        row = ctx.row(f"memory/rss/cache-{cache >> 20}M", f"daemon RSS, {SESSIONS} sessions read, chunk cache {cache >> 20} MiB",
                      GROUP, "MiB", "lower",
                      {"client": "load generator (64 KiB random reads, 16 connections) + qemu-img bench pass",
                       "sessions": SESSIONS, "chunk_cache": cache, "cache": "filled"},
                      Goal(f"≤ cache + {OVERHEAD >> 20} MiB", absolute=(cache + OVERHEAD) / MIB))
        yield ctx.measure(row, {OURS: partial(one, ctx, cache)})
