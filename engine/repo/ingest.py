"""Backup ingest: read sources block by block, dedup, compress, append, commit a point.

Pipeline: the calling thread submits blocks to an ingest pool of its own (created per
run, bounded window) and consumes results in order. A worker reads one block (``pread``), pads a
short last block with zeros, drops all-zero blocks, fingerprints the rest (BLAKE3) and
compresses those whose fingerprint is not known yet (LZ4). pread, BLAKE3 and LZ4 release
the GIL, so both cores work. The calling thread alone appends records and updates the
fingerprint table, so a block seen twice in one run is stored once.

Commit order (crash safety): packs are fsynced, then their indexes written; then the
block maps and the manifest are written into ``tmp/point-<id>/`` and fsynced, and that
directory is renamed to ``points/<id>`` (then the directory is fsynced). A crash at any
moment leaves either no restore point or a complete one; the rest is garbage for gc.
On an error, or when its ``cancel`` event is set (checked between blocks), the run
removes what it wrote itself and leaves no restore point (``Cancelled``).

Pools (the rule: no task ever waits for work queued behind itself in its own pool): the
ingest workers hash and compress in the run's own ``ingest`` pool and read the sources;
a source that is a published disk (a write cache over a ``BackupDisk``) loads chunk
misses in the stack's decompression pool (``engine.stack.Stack.executor``), whose tasks never
wait for anything. Sharing one pool deadlocked: workers waited for readahead loads
queued behind themselves.

Committing write caches (``commit_caches``) takes the disks at one instant, the way
``engine.export`` does: a ``DirtyTracker`` per cache, a first pass over the dirty
extents while clients write, then passes over the blocks written meanwhile while that
set shrinks, and a last pass with writes paused. A block re-read in a later pass replaces
its entry, so the point holds each block as it was at the pause.
"""
from __future__ import annotations

import gc
import os
import re
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import blake3
import numpy as np

from engine.blockmap import ZERO_PACK, bits_runs
from engine.errors import Cancelled, InstantNFSError, NoSpace, UsageError
from engine.fsutil import no_space
from engine.repo.format import (
    MANIFEST_FORMAT,
    dump_manifest,
    fingerprints,
    fsync_dir,
    map_bytes,
    read_idx,
    zero_entries,
)
from engine.repo.packs import PackWriter, compress_block, record_header
from engine.repo.repository import Repository, RestorePoint
from engine.repo.sources import DiskSource, Source, open_source, parse_changed_extents

FIRMWARES = ("bios", "efi")
MAX_PASSES = 8  # commit_caches: passes over blocks written meanwhile, the paused one included
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")

Progress = Callable[[int], None]


@dataclass
class BackupSettings:
    vm: str
    cpus: int = 1
    memory_mib: int = 1024
    firmware: str = "bios"
    guest_os: str = "other-64"


def check_vm_name(vm: str) -> str:
    if not _NAME_RE.match(vm) or vm.strip() != vm:
        raise UsageError(
            f"VM name {vm!r} is not allowed: use 1-128 letters, digits, '.', '_', '-' or spaces, "
            "starting with a letter or digit"
        )
    return vm


def disk_names(vm: str, count: int) -> list[str]:
    """VMware's naming: <vm>, <vm>_1, <vm>_2 ... (spaces become '_')."""
    base = vm.replace(" ", "_")
    return [base if i == 0 else f"{base}_{i}" for i in range(count)]


def load_fingerprints(repo: Repository) -> dict[bytes, tuple[int, int, int]]:
    """fingerprint -> (pack, record offset, clen) for every indexed chunk."""
    known: dict[bytes, tuple[int, int, int]] = {}
    for idx in sorted(repo.packs_dir.glob("*.idx")):
        pack, entries = read_idx(idx)
        for fp, off, clen in zip(fingerprints(entries), entries["offset"].tolist(), entries["clen"].tolist()):
            known.setdefault(fp, (pack, off, clen))
    return known


def dirty_extents(cache: Any) -> list[tuple[int, int]]:
    """A write cache's dirty granule runs as sorted, disjoint (offset, length) extents."""
    return bitmap_extents(cache.dirty_bitmap(), cache.granule, cache.size)


def bitmap_extents(bits: np.ndarray, granule: int, size: int) -> list[tuple[int, int]]:
    """The set granules of ``bits`` (LSB first) as sorted, disjoint (offset, length) extents."""
    g = granule
    n = -(-size // g)
    return [(a * g, min((a + c) * g, size) - a * g) for a, c, dirty in bits_runs(bits, 0, n).tolist() if dirty]


def _blocks_to_read(src: Source, bs: int, extents: list[tuple[int, int]] | None) -> np.ndarray:
    """Block indexes that must be read from the source, ascending."""
    nblocks = -(-src.size // bs)
    want = np.zeros(nblocks, dtype=bool)
    for start, length in extents if extents is not None else [(a, b - a) for a, b in src.data_ranges]:
        if length > 0:
            want[start // bs : (start + length - 1) // bs + 1] = True
    return np.flatnonzero(want)


def _check_settings(settings: BackupSettings, ndisks: int) -> str:
    vm = check_vm_name(settings.vm)
    if not ndisks:
        raise UsageError("give at least one disk to back up")
    if settings.firmware not in FIRMWARES:
        raise UsageError(f"firmware must be one of {', '.join(FIRMWARES)}")
    if settings.cpus < 1 or settings.memory_mib < 4:
        raise UsageError("a VM needs at least 1 CPU and 4 MiB of memory")
    return vm


def backup(
    repo: Repository,
    settings: BackupSettings,
    paths: list[str],
    changed_extents: list[str] | None = None,
    progress_start: Callable[[int], Progress] | None = None,
    window: int | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Store one restore point of ``settings.vm`` holding every disk in ``paths``.

    With ``changed_extents`` (one file per disk), only those regions are read and the
    rest is taken from the VM's latest restore point.
    """
    vm = _check_settings(settings, len(paths))
    if changed_extents is not None and len(changed_extents) != len(paths):
        raise UsageError(f"give one --changed-extents file per disk ({len(paths)} disks, {len(changed_extents)} files)")
    started = time.monotonic()
    with repo.lock(f"backup {vm}"):
        parent = repo.latest_point(vm)
        sources: list[Source] = []
        try:
            for p in paths:
                sources.append(open_source(p, repo.tmp_dir))
            extents = None
            if changed_extents is not None:
                if parent is None:
                    raise UsageError(f"--changed-extents needs a previous restore point of VM {vm!r}; there is none")
                extents = [parse_changed_extents(f, src.size) for f, src in zip(changed_extents, sources)]
            return _store(repo, settings, sources, parent, extents, started, progress_start, window, cancel, None)
        finally:
            for src in sources:
                src.close()


def backup_disks(
    repo: Repository,
    settings: BackupSettings,
    disks: list,
    parent: RestorePoint | None = None,
    changed: list[list[tuple[int, int]]] | None = None,
    progress_start: Callable[[int], Progress] | None = None,
    cancel: threading.Event | None = None,
    settle: Iterator[list[list[tuple[int, int]]]] | None = None,
) -> dict:
    """Store a restore point whose sources are ``Disk`` objects (``.size``, ``.read``).

    With ``parent`` and ``changed`` (per disk: sorted, disjoint (offset, length)
    extents), only the changed extents are read; every other block is the parent's. This
    is how a published session's write cache is committed: parent = its restore point,
    changed = its dirty runs.

    ``settle`` (see ``commit_caches``) yields, after the first pass, per disk the extents
    to read again; each is read before the next is asked for.
    """
    _check_settings(settings, len(disks))
    if (parent is None) != (changed is None):
        raise UsageError("changed extents and their parent restore point come together")
    if changed is not None:
        if len(changed) != len(disks):
            raise UsageError(f"{len(disks)} disks but {len(changed)} changed-extent lists")
        for ext, d in zip(changed, disks):
            end = -1
            for off, length in ext:
                if off < end or length <= 0 or off + length > d.size:
                    raise UsageError(f"changed extent {off}+{length} is out of order or outside the disk")
                end = off + length
    started = time.monotonic()
    sources: list[Source] = [DiskSource(getattr(d, "name", f"disk{i}"), d) for i, d in enumerate(disks)]
    with repo.lock(f"commit {settings.vm}"):
        return _store(repo, settings, sources, parent or repo.latest_point(settings.vm), changed, started, progress_start,
                      None, cancel, settle)


def _store(
    repo: Repository,
    settings: BackupSettings,
    sources: list[Source],
    parent: RestorePoint | None,
    extents: list[list[tuple[int, int]]] | None,
    started: float,
    progress_start: Callable[[int], Progress] | None,
    window: int | None,
    cancel: threading.Event | None,
    settle: Iterator[list[list[tuple[int, int]]]] | None,
) -> dict:
    """Ingest ``sources`` and commit the restore point (under the writer lock)."""
    bs = repo.block_size
    vm = settings.vm
    writer: PackWriter | None = None
    point_tmp = None
    committed = False
    try:
        parent_maps: list[np.ndarray | None] = [None] * len(sources)
        if extents is not None:
            assert parent is not None
            if len(parent.disks) != len(sources):
                raise UsageError(
                    f"the previous restore point {parent.id} has {len(parent.disks)} disks, this backup {len(sources)}: "
                    "run a full backup"
                )
            for i, src in enumerate(sources):
                if parent.disks[i].size != src.size:
                    raise UsageError(
                        f"disk {i} changed size since restore point {parent.id} "
                        f"({parent.disks[i].size} -> {src.size} bytes): run a full backup"
                    )
                parent_maps[i] = np.array(parent.open_blockmap(i).entries)
        known = load_fingerprints(repo)
        writer = repo.pack_writer()  # pack ids from the repository's counter: never reused
        # a future and a few tuples per block, none cyclic: the cyclic collector would
        # only rescan the fingerprint table again and again (9 % of the main thread)
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            stats = _ingest(repo, sources, extents if extents is not None else [None] * len(sources), parent_maps, known,
                            writer, progress_start, window, cancel, settle)
        finally:
            if gc_was_on:
                gc.enable()
        _check_cancel(cancel)
        writer.seal()
        _check_cancel(cancel)
        point_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        names = disk_names(vm, len(sources))
        point_tmp = repo.tmp_dir / f"point-{point_id}"
        point_tmp.mkdir()
        disks = []
        for i, (src, entries) in enumerate(zip(sources, stats.pop("entries"))):
            map_file = f"disk{i}.map"
            _write_synced(point_tmp / map_file, map_bytes(entries, bs, src.size))
            stored = int(np.count_nonzero(entries["pack"] != ZERO_PACK))
            disks.append({
                "name": names[i],
                "size": src.size,
                "map_file": map_file,
                "source": src.path if isinstance(src, DiskSource) else os.path.abspath(src.path),
                "source_format": src.format,
                "stored_blocks": stored,
                "zero_blocks": len(entries) - stored,
            })
        stats["elapsed_s"] = round(time.monotonic() - started, 3)
        manifest = {
            "format": MANIFEST_FORMAT,
            "id": point_id,
            "seq": repo.next_seq(),
            "vm": vm,
            "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "cpus": settings.cpus,
            "memory_mib": settings.memory_mib,
            "firmware": settings.firmware,
            "guest_os": settings.guest_os,
            "parent": parent.id if parent else None,
            "incremental": extents is not None,
            "block_size": bs,
            "disks": disks,
            "stats": stats,
        }
        _write_synced(point_tmp / "manifest.json", dump_manifest(manifest))
        fsync_dir(point_tmp)
        _check_cancel(cancel)  # the last moment: after the rename the point exists
        os.rename(point_tmp, repo.points_dir / point_id)
        committed = True
        fsync_dir(repo.points_dir)
        return manifest
    except OSError as e:
        no_space(e, f"on the repository volume ({repo.path}); nothing was committed")
    except NoSpace as e:
        raise NoSpace(f"{e}; nothing was committed") from e
    finally:
        if not committed:
            if point_tmp is not None:
                shutil.rmtree(point_tmp, ignore_errors=True)
            if writer is not None:
                writer.abort()


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled: no restore point was made")


def _write_synced(path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _ingest(
    repo: Repository,
    sources: list[Source],
    extents: Sequence[list[tuple[int, int]] | None],
    parent_maps: list[np.ndarray | None],
    known: dict[bytes, tuple[int, int, int]],
    writer: PackWriter,
    progress_start: Callable[[int], Progress] | None,
    window: int | None,
    cancel: threading.Event | None,
    settle: Iterator[list[list[tuple[int, int]]]] | None,
) -> dict:
    bs = repo.block_size
    zero_block = bytes(bs)
    todo = []
    for i, src in enumerate(sources):
        todo.append(_blocks_to_read(src, bs, extents[i]))
    total_logical = sum(s.size for s in sources)
    advance = progress_start(total_logical) if progress_start else None

    def work(pread: Callable[[int, int], bytes], offset: int, length: int) -> tuple[bytes | None, bytes | None, bytes | None, int]:
        data = pread(offset, length)
        if len(data) != length:
            raise InstantNFSError(f"source shrank while being read (short read at offset {offset})")
        if length < bs:
            data += bytes(bs - length)
        if data == zero_block:
            return None, None, None, length
        fp = blake3.blake3(data).digest()
        if fp in known:
            return fp, None, None, length
        codec, payload = compress_block(data)
        return fp, record_header(codec, payload, bs, fp), payload, length

    st: dict[str, Any] = dict(
        logical_bytes=total_logical,
        read_bytes=0,
        zero_blocks=0,
        data_blocks=0,
        reused_blocks=0,
        new_chunks=0,
        new_chunk_bytes=0,
        payload_bytes=0,
        stored_bytes=0,
    )
    all_entries = []
    for i, src in enumerate(sources):
        parent = parent_maps[i]
        all_entries.append(zero_entries(-(-src.size // bs)) if parent is None else parent.copy())
    workers = max(2, os.cpu_count() or 2)
    depth = window or 4 * workers  # blocks in flight: enough to keep every worker busy

    def ingest_blocks(pool: ThreadPoolExecutor, src: Source, blocks: np.ndarray, entries: np.ndarray,
                      advance: Progress | None) -> int:
        """Read, store and enter ``blocks`` of ``src`` (their old entries are replaced)."""
        entries[blocks] = zero_entries(len(blocks))  # a block read again may have become zeros
        inflight: deque = deque()
        it = iter(blocks.tolist())
        done_bytes = 0

        def submit_next() -> bool:
            b = next(it, None)
            if b is None:
                return False
            off = b * bs
            inflight.append((b, pool.submit(work, src.pread, off, min(bs, src.size - off))))
            return True

        while len(inflight) < depth and submit_next():
            pass
        while inflight:
            _check_cancel(cancel)
            b, fut = inflight.popleft()
            fp, header, payload, length = fut.result()
            submit_next()
            st["read_bytes"] += length
            done_bytes += length
            if fp is not None:
                loc = known.get(fp)
                if loc is None:
                    assert header is not None and payload is not None, "the fingerprint table only grows"
                    loc = writer.append(header, payload, fp)
                    known[fp] = loc
                    st["new_chunks"] += 1
                    st["new_chunk_bytes"] += bs
                    st["payload_bytes"] += len(payload)
                else:
                    st["reused_blocks"] += 1
                e = entries[b]
                e["pack"], e["offset"], e["clen"] = loc
            if advance:
                advance(length)
        return done_bytes

    # the run's own pool: its workers may wait for chunk loads in the stack's decompression pool, never
    # for work queued in this pool (see the design note)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest")
    try:
        for i, src in enumerate(sources):
            done_bytes = ingest_blocks(pool, src, todo[i], all_entries[i], advance)
            if advance:
                advance(src.size - done_bytes)
        passes, again_bytes = 1, 0
        if settle is not None:
            for again in settle:  # the blocks written since the previous pass, read again
                passes += 1
                for i, src in enumerate(sources):
                    blocks = _blocks_to_read(src, bs, again[i])
                    again_bytes += ingest_blocks(pool, src, blocks, all_entries[i], None)
        _check_cancel(cancel)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # only the blocks being read: short
    for entries in all_entries:
        stored = int(np.count_nonzero(entries["pack"] != ZERO_PACK))
        st["data_blocks"] += stored
        st["zero_blocks"] += len(entries) - stored
    if settle is not None:
        st["passes"], st["reread_bytes"] = passes, again_bytes
    st["stored_bytes"] = writer.bytes_written
    unique = st["new_chunks"]
    st["dedup_ratio"] = round(st["data_blocks"] / unique, 3) if unique else None
    payload_bytes = st["payload_bytes"]
    st["compression_ratio"] = round(st["new_chunk_bytes"] / payload_bytes, 3) if payload_bytes else None
    st["entries"] = all_entries
    return st


def commit_caches(
    repo: Repository,
    settings: BackupSettings,
    caches: list[Any],
    parent: RestorePoint,
    progress_start: Callable[[int], Progress] | None = None,
    cancel: threading.Event | None = None,
    on_phase: Callable[[str], None] | None = None,
    max_passes: int = MAX_PASSES,
) -> tuple[dict, dict]:
    """Store the merged disks of write caches (``engine.writecache.WriteCache``) over
    ``parent`` as a new restore point equal to the disks at one instant, while clients
    go on writing (see the design note). Returns (manifest, {"passes", "changed_bytes",
    "reread_bytes"})."""
    trackers = [c.track() for c in caches]  # before the dirty bitmaps: no write escapes both
    try:
        changed = [dirty_extents(c) for c in caches]

        def settle() -> Generator[list[list[tuple[int, int]]], None, None]:
            last: int | None = None
            for _ in range(max_passes - 2):
                again = [bitmap_extents(t.take(), c.granule, c.size) for t, c in zip(trackers, caches)]
                count = sum(n for ext in again for _o, n in ext)
                if count == 0:
                    break
                if on_phase:
                    on_phase("settle")
                yield again
                if last is not None and count >= last:
                    break  # not shrinking: writers outpace us, finish with writes paused
                last = count
            if on_phase:
                on_phase("final")
            with ExitStack() as paused:
                for c in caches:
                    paused.enter_context(c.writes_paused())
                yield [bitmap_extents(t.take(), c.granule, c.size) for t, c in zip(trackers, caches)]

        gen = settle()
        try:
            manifest = backup_disks(repo, settings, caches, parent=parent, changed=changed,
                                    progress_start=progress_start, cancel=cancel, settle=gen)
        finally:
            gen.close()  # writes resume even when the run failed inside the paused pass
    finally:
        for t in trackers:
            t.close()
    st = manifest["stats"]
    return manifest, {"passes": st["passes"], "changed_bytes": sum(n for ext in changed for _o, n in ext),
                      "reread_bytes": st["reread_bytes"]}
