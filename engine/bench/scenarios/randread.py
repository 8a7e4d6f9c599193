"""Random reads of 4 KiB and 64 KiB at queue depth 1, 16 and 64, over 1 and 8 connections.

What a booting guest and a database do. The client is the suite's load generator
(``loadgen``: raw ONC RPC, spread over processes, its own CPU recorded; a run where the
client used 90 % of a core is flagged client-bound). All reads are warm: one full pass
over each system's disk comes first (the chunk cache holds the whole disk; Ganesha's
image and the local file are in the page cache; the FUSE mounts have read everything
once). Peers: Ganesha, borg and restic mounts (their files read with ``pread``), the
local file. The FUSE mounts' file pages are dropped before each of their runs: borg keeps
them in the kernel's page cache, where random reads would measure the page cache, not
borg.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from engine.bench import loadgen
from engine.bench.clients import qemu_bench
from engine.bench.core import OURS, Goal, Row, Target

NAME = "rand-read"
GROUP = "random reads"
PEERS = ("ganesha", "borg", "borg-fixed", "restic", "local")
MIB = 1 << 20
FULL = [(s, d, c) for s in (4096, 65536) for c in (1, 8) for d in (1, 16, 64)]
FUSE = ("borg", "borg-fixed", "restic")
QUICK = [(4096, 1, 1), (4096, 16, 1), (65536, 16, 8)]


def combos(ctx) -> list[tuple[int, int, int]]:  # noqa: ANN001
    return QUICK if ctx.quick else FULL


def goal(size: int) -> Goal:
    if size == 4096:
        return Goal("≥ 1.5× Ganesha", peer="ganesha", ratio=1.5)
    return Goal("≥ 1.0× Ganesha", peer="ganesha", ratio=1.0)


def rows(ctx) -> int:  # noqa: ANN001
    return len(combos(ctx))


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    session = ctx.session_name("rand")
    targets: dict[str, Target] = {OURS: ctx.ours.publish(ctx.point, session)[0]}
    for name in PEERS:
        if name in ctx.peers:
            targets[name] = ctx.peers[name].read_target()

    def drop(name: str) -> None:
        if name in FUSE:
            ctx.peers[name].drop_caches()

    try:
        ctx.step("random reads: a full pass over each system first")
        for t in targets.values():
            qemu_bench(t, MIB, 16, t.size // MIB)
        for size, depth, conns in combos(ctx):
            k = f"{size >> 10}K"
            row = ctx.row(f"rand-read/{k}/qd{depth}/c{conns}", f"random {k}iB reads, QD{depth}, {conns} connection{'s' * (conns > 1)}",
                          GROUP, "IOPS", "higher",
                          {"client": "load generator (raw RPC over processes; pread on files)", "transfer": size,
                           "queue_depth": depth, "connections": conns, "cache": "warm"},
                          goal(size), peers=PEERS)
            spec = loadgen.LoadSpec(op="read", size=size, depth=depth, connections=conns, seconds=ctx.settings.seconds)
            yield ctx.measure(row, {n: partial(loadgen.run_load, t, spec) for n, t in targets.items()}, before=drop)
    finally:
        ctx.unpublish(session)
