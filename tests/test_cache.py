"""The decompression cache's buffer pool and the readahead's stream detection.

The pool: a block buffer evicted from the cache is decompressed into again only when
nothing references it; a view of a cached chunk (as a transport holds while the bytes
wait to be sent) keeps its bytes intact however many loads and evictions follow. The
readahead: only a read that starts exactly where an earlier one ended makes a stream
sequential; random and strided readers prefetch and hint nothing.
"""
from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.blockmap import ENTRY_DTYPE, KEY_SHIFT, ZERO_PACK, BlockMap
from engine.cache import MAX_STREAMS, ChunkCache, Readahead
from engine.disk import BackupDisk
from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.stack import Stack

BS = 64 * 1024



def _in_threads(run: Callable[[int], None], n: int) -> None:
    """``run(0)`` .. ``run(n - 1)`` at once, each in its own thread; back when all ended."""
    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

def pattern(pack: int, rec: int) -> bytes:
    """The bytes the fake reader 'stores' at (pack, rec)."""
    unit = f"{pack}:{rec};".encode()
    return (unit * (BS // len(unit) + 1))[:BS]


class FakeReader:
    """A chunk reader that writes a known pattern per record into the buffer it is given."""

    block_size = BS

    def __init__(self) -> None:
        self.outs: list[int] = []  # ids of the buffers loads wrote into
        self.fail: set[tuple[int, int]] = set()
        self.hints: list[tuple[int, int, int]] = []

    def read_chunk(self, pack: int, offset: int, clen: int, out: bytearray | None = None) -> bytearray:
        if out is None:
            out = bytearray(BS)
        self.outs.append(id(out))
        view = memoryview(out)  # writes through a view: the buffer's size cannot change
        view[:] = os.urandom(BS)  # scribble first: a reused buffer is overwritten in full
        if (pack, offset) in self.fail:
            raise OSError("injected")
        view[:] = pattern(pack, offset)
        return out

    def submit_hints(self, executor, records) -> None:
        self.hints.extend(records)


def make_map(kinds: str) -> BlockMap:
    """A block map from a string: 'd' a stored block (pack 1, record at i*BS), 'z' zero."""
    e = np.zeros(len(kinds), dtype=ENTRY_DTYPE)
    for i, k in enumerate(kinds):
        if k == "z":
            e[i] = (ZERO_PACK, 0, 0)
        else:
            e[i] = (1, 100, i * BS)
    return BlockMap(e, BS, len(kinds) * BS)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as ex:
        yield ex


# -- buffer reuse --------------------------------------------------------------------------


def test_an_evicted_unreferenced_buffer_is_decompressed_into_again(pool):
    reader = FakeReader()
    cache = ChunkCache(reader, 2 * BS, pool)
    a = cache.get(1, 0, 100)
    a_id = id(a)
    del a
    cache.get(1, BS, 100)
    cache.get(1, 2 * BS, 100)  # evicts (1, 0): nothing references it, it goes to the pool
    assert cache.stats()["pooled"] == 1
    c = cache.get(1, 3 * BS, 100)  # evicts (1, BS) and loads into the pooled buffer
    assert id(c) == a_id and reader.outs[-1] == a_id
    assert cache.reused == 1
    assert bytes(c) == pattern(1, 3 * BS)


def test_a_buffer_with_a_live_view_is_never_handed_out_again(pool):
    """The case the issue names: a view queued for sending must keep its bytes."""
    reader = FakeReader()
    cache = ChunkCache(reader, 4 * BS, pool)
    disk = BackupDisk("d", make_map("d" * 64), cache, Readahead(make_map("d" * 64), cache))
    held = asyncio.run(disk.aread(5 * BS + 100, 1000))[0]  # as a transport holds it
    buf = held.obj
    want = pattern(1, 5 * BS)[100:1100]
    assert bytes(held) == want
    for _round in range(3):  # many loads and evictions, with the pool in use
        for b in range(64):
            if b != 5:
                parts = disk.readv(b * BS, BS)
                assert bytes(parts[0]) == pattern(1, b * BS)
                del parts
    gc.collect()
    assert (1 << KEY_SHIFT | 5 * BS) not in cache  # evicted long ago
    assert bytes(held) == want  # the held bytes never changed
    assert id(buf) not in reader.outs[1:]  # never decompressed into again
    assert all(p is not buf for p in cache._pool)
    assert cache.reused > 0  # the pool was in use: the test tests something
    del held, buf


def test_views_held_across_threads_keep_their_bytes(pool):
    """Readers on several threads hold views while others load and evict."""
    reader = FakeReader()
    cache = ChunkCache(reader, 3 * BS, pool)
    bm = make_map("d" * 32)
    disk = BackupDisk("d", bm, cache, Readahead(bm, cache))
    errors: list[str] = []

    def run(seed: int) -> None:
        rng = np.random.default_rng(seed)
        held = []
        for _ in range(300):
            b = int(rng.integers(0, 32))
            view = disk.readv(b * BS, BS)[0]
            held.append((b, view))
            if len(held) > 4:
                hb, hv = held.pop(0)
                if bytes(hv) != pattern(1, hb * BS):
                    errors.append(f"block {hb} changed under its view")

    _in_threads(run, 4)
    assert errors == []
    assert cache.reused > 0


def test_a_failed_load_is_not_cached_and_its_buffer_not_pooled(pool):
    reader = FakeReader()
    reader.fail.add((1, 0))
    cache = ChunkCache(reader, 2 * BS, pool)
    with pytest.raises(OSError, match="injected"):
        cache.get(1, 0, 100)
    assert 1 << KEY_SHIFT not in cache and cache.stats()["pooled"] == 0
    with pytest.raises(OSError, match="injected"):
        cache.get_future(1, 0, 100).result(10)
    reader.fail.clear()
    assert bytes(cache.get(1, 0, 100)) == pattern(1, 0)


def test_reused_buffers_serve_the_right_bytes_from_a_real_repository(tmp_path):
    """End to end through PackReader: a tiny cache, so nearly every load reuses a buffer."""
    img = tmp_path / "d.img"
    data = os.urandom(6 * BS) + (b"text %d " * 40000)[: 6 * BS] + bytes(BS) + os.urandom(BS)
    img.write_bytes(data)
    Repository.init(tmp_path / "repo", 256 * 1024)
    with Stack.open(tmp_path / "repo", cache_bytes=2 * 256 * 1024) as stack:
        backup(stack.repo, BackupSettings(vm="v"), [str(img)])
        disk = stack.backup_disk(stack.repo.point("latest"), 0)
        for _ in range(3):
            held = [disk.readv(off, 4096) for off in range(0, len(data), 256 * 1024)]
            assert b"".join(disk.readv(0, len(data))) == data
            for off, parts in zip(range(0, len(data), 256 * 1024), held):
                assert b"".join(parts) == data[off : off + 4096]
            del held
        assert stack.cache.reused > 0


# -- readahead -----------------------------------------------------------------------------


class FakeCache:
    """Records prefetches and hints; ``ready`` decides whether a prefetch completes."""

    def __init__(self, ready: bool = True, capacity: int = 1 << 30) -> None:
        self.ready = ready
        self.capacity = capacity
        self.cached: set[int] = set()
        self.prefetched: list[tuple[int, int, int]] = []
        self.hinted: list[tuple[int, int, int]] = []

    def __contains__(self, key: int) -> bool:
        return key in self.cached

    def prefetch(self, pack: int, rec: int, clen: int) -> bool:
        self.prefetched.append((pack, rec, clen))
        if self.ready:
            self.cached.add(pack << KEY_SHIFT | rec)
        return True

    def hint(self, records) -> None:
        self.hinted.extend(records)


NBLOCKS = 256


def _ra(cache: FakeCache, kinds: str = "d" * NBLOCKS) -> Readahead:
    return Readahead(make_map(kinds), cache)  # type: ignore[arg-type]


reads = st.lists(st.tuples(st.integers(0, NBLOCKS * BS - 1), st.integers(1, 3 * BS)), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(reads=reads)
def test_reads_that_never_continue_another_prefetch_nothing(reads):
    """The model: a read prefetches only if it starts where an earlier read ended."""
    ends: set[int] = set()
    cache = FakeCache()
    ra = _ra(cache)
    for off, n in reads:
        continues = off in ends
        before = len(cache.prefetched) + len(cache.hinted)
        ra.after(off, n)
        if not continues:
            assert len(cache.prefetched) + len(cache.hinted) == before, f"read at {off} is no continuation"
        ends.add(off + n)
    if not any(off in {o + m for o, m in reads[:i]} for i, (off, _n) in enumerate(reads)):
        assert cache.prefetched == [] and cache.hinted == [] and ra.sequential == 0


@settings(max_examples=50, deadline=None)
@given(size=st.sampled_from([512, 4096, BS // 2, BS - 512]), stride=st.integers(1, 4), start=st.integers(0, 8))
def test_a_strided_reader_prefetches_nothing(size, stride, start):
    """qemu-img bench -S: each small read in a new block, never where the last one ended."""
    cache = FakeCache()
    ra = _ra(cache)
    for i in range(start, NBLOCKS, stride):
        ra.after(i * BS, size)
    assert cache.prefetched == [] and cache.hinted == [] and ra.sequential == 0


def test_random_4k_reads_prefetch_nothing():
    rng = np.random.default_rng(7)
    cache = FakeCache()
    ra = _ra(cache)
    offs = rng.integers(0, NBLOCKS * BS // 4096, 2000) * 4096
    ends = set()
    for off in offs.tolist():
        if off in ends:
            continue  # a coincidental continuation is sequential by definition
        ra.after(off, 4096)
        ends.add(off + 4096)
    assert cache.prefetched == [] and cache.hinted == []


@pytest.mark.parametrize("size", [4096, 65536, BS, 4 * BS])
def test_a_sequential_reader_prefetches_ahead_of_itself(size):
    cache = FakeCache()
    ra = _ra(cache)
    for off in range(0, 40 * BS, size):
        ra.after(off, size)
        ahead = {rec // BS for _p, rec, _c in cache.prefetched}
        last = (off + size - 1) // BS
        if off > 0:  # from the second read on: the next block is queued
            assert last + 1 in ahead or last + 1 >= NBLOCKS
    assert ra.sequential > 0
    blocks = [rec // BS for _p, rec, _c in cache.prefetched]
    assert len(blocks) == len(set(blocks))  # each block prefetched once
    assert max(blocks) > 40


def test_zero_blocks_are_neither_prefetched_nor_hinted():
    cache = FakeCache()
    ra = _ra(cache, "dz" * (NBLOCKS // 2))
    for off in range(0, 20 * BS, BS):
        ra.after(off, BS)
    assert cache.prefetched and all((rec // BS) % 2 == 0 for _p, rec, _c in cache.prefetched + cache.hinted)


def test_the_window_grows_while_the_reader_catches_up_and_is_bounded():
    slow = FakeCache(ready=False)  # prefetches never finish: the reader always catches up
    ra = _ra(slow)
    for off in range(0, 100 * BS, BS):
        ra.after(off, BS)
    assert ra.streams[-1].depth == ra.max_depth > ra.min_depth
    fast = FakeCache(ready=True)  # every prefetch done before the reader arrives
    ra2 = _ra(fast)
    for off in range(0, 100 * BS, BS):
        ra2.after(off, BS)
    assert ra2.streams[-1].depth == ra2.min_depth


def test_interleaved_streams_are_each_followed():
    cache = FakeCache()
    ra = _ra(cache)
    starts = [i * 30 * BS for i in range(MAX_STREAMS)]
    for step in range(10):
        for s in starts:
            ra.after(s + step * 8192, 8192)
    assert len(ra.streams) == MAX_STREAMS
    first_blocks = {rec // BS for _p, rec, _c in cache.prefetched}
    assert all(s // BS + 1 in first_blocks for s in starts)


def test_a_stream_is_forgotten_after_max_streams_others():
    cache = FakeCache()
    ra = _ra(cache)
    ra.after(0, 4096)
    for i in range(MAX_STREAMS):
        ra.after((10 + 10 * i) * BS, 4096)  # each a new stream
    ra.after(4096, 4096)  # would have continued the first one, which is gone
    assert cache.prefetched == [] and ra.sequential == 0


def test_racing_readers_never_break_the_detector():
    """The loop and an export thread may call ``after`` at once: no exception, bounded table."""
    cache = FakeCache()
    ra = _ra(cache)
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            pos = int(rng.integers(0, NBLOCKS // 2)) * BS
            for _ in range(3000):
                if rng.random() < 0.5:
                    ra.after(pos, 4096)
                    pos += 4096
                else:
                    ra.after(int(rng.integers(0, NBLOCKS * BS - 4096)), 4096)
                assert len(ra.streams) <= MAX_STREAMS + 4  # a race may add one per racer
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    _in_threads(run, 4)
    assert errors == []
    assert ra.sequential > 0
