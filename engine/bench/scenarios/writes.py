"""Writes, reads of a half-written disk, and export.

- random 4 KiB writes, queue depth 16, FILE_SYNC (what ESXi sends: every write durable
  before its reply) and UNSTABLE followed by COMMIT (what QEMU sends), load generator;
- 1 MiB sequential writes, queue depth 16, ``qemu-img bench -w`` (with its final flush);
- 1 MiB sequential reads of a half-dirty disk (64 KiB written through NFS in every
  128 KiB, so every read merges the write cache and the backup) beside the same reads of
  a clean session of the same point;
- export of the half-dirty disk to a raw file on the same volume: instantnfs's export job
  (``POST /sessions/NAME/export``) beside ``qemu-img convert`` from the ``nfs://`` URL,
  what a user without the export job would run.

Peers for the writes: Ganesha writing into a plain copy of the image (its read-write
export), and the local file (a copy of the image on the same volume).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from engine.bench import loadgen
from engine.bench.clients import qemu_bench, qemu_convert
from engine.bench.core import OURS, Goal, Measure, Row, Target
from engine.bench.ours import export_disk

NAME = "writes"
GROUP = "writes"
PEERS = ("ganesha", "local")
MIB = 1 << 20
CLEAN = "clean session"
CONVERT = "qemu-img convert"


def rows(ctx) -> int:  # noqa: ANN001
    return 5


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    names = [ctx.session_name("w"), ctx.session_name("dirty"), ctx.session_name("clean")]
    wt, dirty, clean = (ctx.ours.publish(ctx.point, n)[0] for n in names)
    targets: dict[str, Target] = {OURS: wt}
    for name in PEERS:
        p = ctx.peers.get(name)
        t = p.write_target() if p is not None else None
        if t is not None:
            targets[name] = t
    goal = Goal("≥ 1.2× Ganesha", peer="ganesha", ratio=1.2)
    try:
        for stable, label in (("file_sync", "FILE_SYNC"), ("unstable", "UNSTABLE + COMMIT")):
            row = ctx.row(f"writes/4K/{stable}/qd16", f"random 4 KiB writes, {label}, QD16", GROUP, "IOPS", "higher",
                          {"client": "load generator (raw RPC; pwrite+fsync on files)", "transfer": 4096, "queue_depth": 16,
                           "connections": 1, "stable": label}, goal, peers=PEERS)
            spec = loadgen.LoadSpec(op="write", size=4096, depth=16, connections=1, stable=stable, seconds=ctx.settings.seconds)
            yield ctx.measure(row, {n: partial(loadgen.run_load, t, spec) for n, t in targets.items()})

        row = ctx.row("writes/1M/seq/qd16", "sequential 1 MiB writes, QD16 (with the final flush)", GROUP, "MB/s", "higher",
                      {"client": "qemu-img bench -w", "transfer": MIB, "queue_depth": 16, "connections": 1}, goal, peers=PEERS)
        count = ctx.size // MIB
        before = lambda name: os.sync()  # noqa: E731 - no writeback backlog carried into a run
        yield ctx.measure(row, {n: partial(qemu_bench, t, MIB, 16, count, write=True) for n, t in targets.items()},
                          before=before)

        ctx.step("writes: dirtying half of a session (64 KiB in every 128 KiB)")
        qemu_bench(dirty, 64 << 10, 16, ctx.size // (128 << 10), step=128 << 10, write=True)
        row = ctx.row("writes/half-dirty-read", "sequential 1 MiB reads of a half-written disk, QD16, warm", GROUP, "MB/s",
                      "higher", {"client": "qemu-img bench", "transfer": MIB, "queue_depth": 16, "connections": 1, "cache": "warm",
                                 "compared_with": "the same reads of a clean session"},
                      Goal("≥ 0.8× the clean disk", peer=CLEAN, ratio=0.8))
        yield ctx.measure(row, {OURS: partial(qemu_bench, dirty, MIB, 16, count), CLEAN: partial(qemu_bench, clean, MIB, 16, count)},
                          warmup=True)

        out_dir = ctx.work / "ours" / "cache" / "exports"
        row = ctx.row("writes/export", "export of the half-written disk to a raw file, same volume", GROUP, "MB/s", "higher",
                      {"client": "instantnfs export job / qemu-img convert from nfs://", "cache": "warm"},
                      Goal("≥ 1000 MB/s", absolute=1000.0))
        yield ctx.measure(row, {OURS: partial(_export, ctx, names[1], out_dir, dirty.size),
                                CONVERT: partial(_convert, dirty, out_dir)})
    finally:
        ctx.unpublish(*names)


def _export(ctx, session: str, out_dir: Path, size: int) -> Measure:  # noqa: ANN001
    import time

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "export.raw"
    out.unlink(missing_ok=True)
    t0 = time.monotonic()
    job = export_disk(ctx.ours, session, ctx.disk, out)
    seconds = time.monotonic() - t0
    out.unlink(missing_ok=True)
    return Measure(size / seconds / 1e6, {"seconds": round(seconds, 3), "job": job.get("id")})


def _convert(source: Target, out_dir: Path) -> Measure:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "convert.raw"
    out.unlink(missing_ok=True)
    try:
        return qemu_convert(source, str(out))
    finally:
        out.unlink(missing_ok=True)
