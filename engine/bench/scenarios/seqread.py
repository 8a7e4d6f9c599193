"""Sequential 1 MiB reads with ``qemu-img bench``, queue depth 1 and 16, cold and warm.

Three cache states per queue depth:

- **cold**: instantnfs restarted before each of its runs (an empty decompression cache;
  the pack files may still be in the kernel page cache, so decompression is measured);
  each peer's own caches dropped (``Peer.drop_caches``);
- **cold, packs dropped**: as cold, and the repository's packs (the peers: their files)
  dropped from the page cache with ``posix_fadvise(DONTNEED)``: the disk is read too;
- **warm**: after one full pass (the chunk cache holds the whole disk).

Then, per queue depth and cold state, instantnfs' cold figure as a fraction of its warm
one (each cold run over the warm median; goal ≥ 0.8×): how much of the warm speed a
first read keeps.

Every run reads the whole disk once. Peers: Ganesha serving the raw image over NFS,
borg and restic mounts (the disk file under the FUSE mount), the local file. The FUSE
mounts' file pages are dropped before each of their runs in every state: borg keeps
them in the kernel's page cache, so a second read would measure the page cache, not
borg (their own in-process caches stay as the state leaves them). They read the first
512 MiB of the disk per run, not all of it: at their 30-250 MB/s a whole 2 GiB disk
would take minutes per run, and the figure is a rate.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from engine.bench.clients import qemu_bench
from engine.bench.core import OURS, Goal, Row, Samples, Target

NAME = "seq-read"
GROUP = "sequential reads"
PEERS = ("ganesha", "borg", "borg-fixed", "restic", "local")
MIB = 1 << 20
DEPTHS = (1, 16)
STATES = ("cold", "cold-dropped", "warm")
FUSE = ("borg", "borg-fixed", "restic")
FUSE_READ = 512  # MiB a FUSE peer reads per run: at 30-250 MB/s a whole 2 GiB disk takes minutes


def goal(depth: int, state: str) -> Goal:
    if state == "warm":
        return Goal("≥ 1.2× Ganesha", peer="ganesha", ratio=1.2)
    if depth == 16:
        return Goal("≥ 1500 MB/s", absolute=1500.0)
    return Goal("≥ 1.0× Ganesha", peer="ganesha", ratio=1.0)


def rows(ctx) -> int:  # noqa: ANN001 - the runner's Context
    return len(DEPTHS) * len(STATES) + len(DEPTHS) * (len(STATES) - 1)


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    session = ctx.session_name("seq")
    ours = ctx.ours.publish(ctx.point, session)[0]
    count = ctx.size // MIB
    targets: dict[str, Target] = {OURS: ours}
    measured: dict[tuple[str, int], Row] = {}
    for name in PEERS:
        if name in ctx.peers:
            targets[name] = ctx.peers[name].read_target()
    try:
        for state in STATES:
            for depth in DEPTHS:
                row = ctx.row(f"seq-read/1M/qd{depth}/{state}", f"sequential 1 MiB reads, QD{depth}, {state}", GROUP,
                              "MB/s", "higher",
                              {"client": "qemu-img bench (nfs:// for NFS servers, the file for mounts)",
                               "transfer": MIB, "queue_depth": depth, "connections": 1, "cache": state,
                               "span": f"the whole disk (borg, restic: its first {FUSE_READ} MiB)"},
                              goal(depth, state), peers=PEERS)
                systems = {n: partial(qemu_bench, t, MIB, depth, min(count, FUSE_READ) if n in FUSE else count)
                           for n, t in targets.items()}
                measured[(state, depth)] = ctx.measure(row, systems, before=_before(ctx, state), warmup=state == "warm")
                yield measured[(state, depth)]
    finally:
        ctx.unpublish(session)
    for state in STATES[:-1]:
        for depth in DEPTHS:
            yield cold_over_warm(ctx, measured[(state, depth)], measured[("warm", depth)], state, depth)


def cold_over_warm(ctx, cold: Row, warm: Row, state: str, depth: int) -> Row:  # noqa: ANN001
    """Our cold runs as fractions of our warm median (no peer: a property of ours)."""
    row = ctx.row(f"seq-read/1M/qd{depth}/{state}-over-warm", f"sequential 1 MiB reads, QD{depth}, {state} / warm",
                  GROUP, "× warm", "higher",
                  {"client": "qemu-img bench", "transfer": MIB, "queue_depth": depth, "connections": 1,
                   "cache": f"{state} over warm", "derived_from": [cold.id, warm.id]},
                  Goal("≥ 0.8× warm", absolute=0.8))
    if cold.error or warm.error or OURS not in cold.results or OURS not in warm.results:
        row.error = f"needs both {cold.id} and {warm.id}"
        return row
    w = warm.results[OURS].median
    row.results[OURS] = Samples([v / w for v in cold.results[OURS].values])
    return row


def _before(ctx, state: str) -> Callable[[str], None]:  # noqa: ANN001
    def before(name: str) -> None:
        if name in FUSE:  # their files' pages: else the kernel's page cache is measured, not them
            ctx.peers[name].drop_caches()
        elif state == "warm":
            return
        elif name == OURS:
            ctx.ours.restart()
            if state == "cold-dropped":
                ctx.ours.drop_pack_pages()
        elif state == "cold-dropped":
            ctx.peers[name].drop_caches()

    return before
