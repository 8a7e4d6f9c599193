"""Backup ingest: how fast a disk goes into the repository, how big it gets, and a CBT increment.

- **full backup**: the benchmark disk into a fresh repository, read from the page cache:
  ``instantnfs backup`` (the CLI, 1 MiB blocks, LZ4, dedup) beside ``borg create
  --compression lz4`` (its default chunker and fixed 1 MiB chunks) and ``restic backup``;
  the figure is MB/s of the disk's size; the repository's size on disk is a second row
  from the same runs;
- **increment**: 5 % of the disk's 1 MiB blocks rewritten (seeded), then the VM backed up
  again. instantnfs reads only the changed extents (``--changed-extents``, what VMware's
  changed block tracking gives); borg and restic have no such input and read the whole
  image again, deduplicating against the first backup -- which is what a user of theirs
  gets.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from engine.bench.core import OURS, Goal, Measure, Row, Samples, Systems
from engine.bench.ours import cli_backup
from engine.bench.pagecache import tree_bytes

NAME = "ingest"
GROUP = "backup ingest"
PEERS = ("borg", "borg-fixed", "restic")
MIB = 1 << 20
CHANGED = 0.05


def rows(ctx) -> int:  # noqa: ANN001
    return 3


def ours_full(ctx, repo: Path) -> Measure:  # noqa: ANN001
    if repo.exists():
        shutil.rmtree(repo)
    subprocess.run([sys.executable, "-m", "engine.control.cli", "repo", "init", str(repo)], check=True, capture_output=True)
    t0 = time.perf_counter()
    cli_backup(repo, "ingest", ctx.image)
    seconds = time.perf_counter() - t0
    return Measure(ctx.size / seconds / 1e6, {"seconds": round(seconds, 3), "repo_bytes": tree_bytes(repo)})


def make_increment(ctx) -> tuple[Path, Path, int]:  # noqa: ANN001
    """A copy of the image with 5 % of its 1 MiB blocks rewritten, and the extents file."""
    inc = ctx.work / "increment.img"
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(ctx.image), str(inc)], check=True)
    blocks = ctx.size // MIB
    rng = random.Random(7)
    chosen = sorted(rng.sample(range(blocks), max(1, int(blocks * CHANGED))))
    with open(inc, "r+b") as f:
        for b in chosen:
            f.seek(b * MIB)
            f.write(rng.randbytes(MIB))
    extents = ctx.work / "increment.extents"
    extents.write_text("".join(f"{b * MIB} {MIB}\n" for b in chosen))
    return inc, extents, len(chosen) * MIB


def ours_increment(ctx, repo: Path, inc: Path, extents: Path, changed: int) -> Measure:  # noqa: ANN001
    t0 = time.perf_counter()
    out = cli_backup(repo, "ingest", inc, extents)
    seconds = time.perf_counter() - t0
    return Measure(seconds, {"changed_bytes": changed, "stored_bytes": out.get("stored_bytes")})


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    from engine.bench.peers import Workspace

    ws = Workspace(ctx.work / "peers", ctx.image, ctx.size, ctx.log)
    repo = ctx.work / "ingest-repo"
    full = ctx.row("ingest/full", "full backup of the benchmark disk", GROUP, "MB/s", "higher",
                   {"client": "CLI (instantnfs backup / borg create / restic backup)", "source": "page cache",
                    "transfer": MIB}, Goal("≥ 1000 MB/s (2 GiB in 2 s)", absolute=1000.0), peers=PEERS)
    systems: Systems = {OURS: partial(ours_full, ctx, repo)}
    for name in PEERS:
        p = ctx.peers.get(name)
        if p is not None:
            systems[name] = partial(_peer_full, ctx, p, ws)
    before = lambda name: _page_in(ctx.image)  # noqa: E731 - every backup reads its source from memory
    yield ctx.measure(full, systems, before=before)

    size = ctx.row("ingest/repo-size", "repository size after the full backup", GROUP, "MiB", "lower",
                   full.conditions, None, peers=PEERS)
    size.error = full.error
    for n, s in full.results.items():
        out = Samples()
        for e in s.extras:
            out.add(Measure(e["repo_bytes"] / MIB, e))
        size.results[n] = out
    yield size

    inc_row = ctx.row("ingest/increment", f"increment: {CHANGED:.0%} of the blocks changed, backed up again", GROUP, "s",
                      "lower", {"client": "CLI; instantnfs with --changed-extents (CBT), the peers re-read the image",
                                "changed": f"{CHANGED:.0%} of 1 MiB blocks"}, None, peers=PEERS)
    try:
        inc, extents, changed = make_increment(ctx)
    except Exception as e:  # noqa: BLE001
        inc_row.error = f"{type(e).__name__}: {e}"
        yield inc_row
        return
    try:
        systems = {OURS: partial(_ours_inc_round, ctx, repo, inc, extents, changed)}
        for name in PEERS:
            p = ctx.peers.get(name)
            if p is not None:
                systems[name] = partial(_peer_increment, ctx, p, ws, inc)
        yield ctx.measure(inc_row, systems, before=before)
    finally:
        inc.unlink(missing_ok=True)
        extents.unlink(missing_ok=True)
        shutil.rmtree(repo, ignore_errors=True)


def _ours_inc_round(ctx, repo: Path, inc: Path, extents: Path, changed: int) -> Measure:  # noqa: ANN001
    ours_full(ctx, repo)  # each round starts from the full backup alone
    _page_in(inc)
    return ours_increment(ctx, repo, inc, extents, changed)


def _page_in(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass


def _peer_full(ctx, peer, ws) -> Measure:  # noqa: ANN001
    m = peer.backup(ws, ctx.image, "full")
    if m is None:
        raise RuntimeError(f"{peer.name} does not back up")
    seconds = m.extra.get("seconds", m.value)
    return Measure(ctx.size / seconds / 1e6, {**m.extra, "seconds": seconds})


def _peer_increment(ctx, peer, ws, inc: Path) -> Measure:  # noqa: ANN001
    peer.backup(ws, ctx.image, "full")
    _page_in(inc)
    m = peer.backup(ws, inc, "increment", increment_of="full")
    if m is None:
        raise RuntimeError(f"{peer.name} does not back up")
    return Measure(m.extra.get("seconds", m.value), m.extra)


