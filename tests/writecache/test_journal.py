"""The journal: a stable write is durable after one record and one fdatasync; torn and
missing records are skipped on replay; a commit voids the records; version 1 caches
(no journal) open after an upgrade; ``peekv`` passes clean ranges to the base."""
from __future__ import annotations

import asyncio
import errno
import os
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import writecache
from engine.errors import WriteCacheError
from engine.writecache import WriteCache
from engine.writecache_format import (
    BITMAP_FILE,
    DATA_FILE,
    HEADER_SIZE,
    JOURNAL_FILE,
    JOURNAL_START,
    MAGIC,
    VERSION,
    Header,
    record_size,
)
from tests.writecache.model import DiskModel, pattern

SIZE = (1 << 20) + 5000  # the last granule is partial


class MemDisk:
    """A base held in memory (what the journal is tested over needs no repository)."""

    def __init__(self, image: bytes, peek: bool = False) -> None:
        self.image = image
        self.size = len(image)
        self.peeked: list[tuple[int, int]] = []
        if peek:
            self.peekv = self._peekv

    def read(self, offset: int, length: int) -> bytes:
        return self.image[offset : offset + length]

    def readv(self, offset: int, length: int) -> list[memoryview]:
        return [memoryview(self.image[offset : offset + length])]

    async def aread(self, offset: int, length: int) -> list[memoryview]:
        return self.readv(offset, length)

    def _peekv(self, offset: int, length: int) -> list[memoryview]:
        self.peeked.append((offset, length))
        return self.readv(offset, length)


IMAGE = pattern(7, SIZE)


def crash_copy(src: Path, dst: Path, keep_data: bool) -> None:
    """The cache's files as a crash may leave them: the journal and bitmap as they are,
    ``data`` as written or, without ``keep_data``, with every unsynced write lost."""
    dst.mkdir()
    for name in (BITMAP_FILE, JOURNAL_FILE):
        shutil.copyfile(src / name, dst / name)
    if keep_data:
        shutil.copyfile(src / DATA_FILE, dst / DATA_FILE)
    else:
        with open(dst / DATA_FILE, "wb") as f:
            f.truncate(os.path.getsize(src / DATA_FILE))


def test_a_stable_write_is_one_record_and_one_fdatasync(tmp_path, monkeypatch):
    synced: list[int] = []
    real = writecache._fdatasync
    monkeypatch.setattr(writecache, "_fdatasync", lambda fd: (synced.append(fd), real(fd)))
    base = MemDisk(IMAGE)
    wc = WriteCache.create(tmp_path / "c", base)
    try:
        data = pattern(1, 6000)
        wc.write(10000, data, stable=True)
        assert synced == [wc._journal.fd]
        assert wc.read(10000, 6000) == data
        crash_copy(tmp_path / "c", tmp_path / "x", keep_data=False)
    finally:
        wc.close()
    with WriteCache.open(tmp_path / "x", base) as back:
        assert back.read(0, SIZE) == IMAGE[:10000] + data + IMAGE[16000:]
        assert back.is_dirty(10000, 1) and not back.is_dirty(0, 8192)


def test_a_commit_voids_the_records_so_a_replay_never_undoes_a_committed_write(tmp_path):
    base = MemDisk(IMAGE)
    with WriteCache.create(tmp_path / "c", base) as wc:
        a, b = pattern(1, 4096), pattern(2, 100)
        wc.write(8192, a, stable=True)
        wc.write(8192, b)  # unstable, over the journalled granule
        wc.commit()
        crash_copy(tmp_path / "c", tmp_path / "x", keep_data=True)
        assert not wc._journal.used
    with WriteCache.open(tmp_path / "x", base) as back:
        assert back.read(8192, 4096) == b + a[100:]


def test_a_full_journal_commits_and_starts_again(tmp_path):
    base = MemDisk(IMAGE)
    with WriteCache.create(tmp_path / "c", base) as wc:
        wc._journal.capacity = 3 * record_size(4096)
        model = bytearray(IMAGE)
        for i in range(10):
            data = pattern(i, 4096)
            wc.write(i * 4096 * 3, data, stable=True)
            model[i * 4096 * 3 : i * 4096 * 3 + 4096] = data
        # records 0-2, then write 3 finds no room: a commit; 4-6, 7 commits; 8-9 recorded
        assert wc.commits == 2 and wc._journal.epoch == 2 and wc._journal.seq == 2
        crash_copy(tmp_path / "c", tmp_path / "x", keep_data=True)
    with open(tmp_path / "x" / DATA_FILE, "r+b") as f:  # the writes since the last commit never reached data
        for i in (8, 9):
            f.seek(i * 4096 * 3)
            f.write(bytes(4096))
    with WriteCache.open(tmp_path / "x", base) as back:
        assert back.read(0, SIZE) == bytes(model)


writes_st = st.lists(
    st.tuples(st.integers(0, SIZE - 1), st.integers(1, 20000), st.booleans()), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(writes=writes_st, damage=st.data(), keep_data=st.booleans())
def test_replay_skips_torn_records_and_keeps_the_others(tmp_path_factory, writes, damage, keep_data):
    """Stable and unstable writes, no commit; then a crash that loses the unsynced data
    writes (or not) and tears some journal records (a flipped byte, a slot never
    written, or the file cut short): what is read back after reopening is, byte by byte,
    what the model allows: every stable write whose record is whole, or an unstable
    write or a stable one whose record was torn."""
    tmp = tmp_path_factory.mktemp("j")
    base = MemDisk(IMAGE)
    model = DiskModel(IMAGE)
    recs: list[tuple[int, int, int, int, bytes]] = []  # (position, record bytes, write offset, length, data)
    pos = JOURNAL_START
    with WriteCache.create(tmp / "c", base) as wc:
        g = wc.granule
        for i, (off, n, stable) in enumerate(writes):
            n = min(n, SIZE - off)
            data = pattern(100 + i, n)
            wc.write(off, data, stable=stable)
            model.write(off, data, False)
            if stable:
                a, b = off // g * g, min(-(-(off + n) // g) * g, SIZE)
                recs.append((pos, record_size(b - a), off, n, data))
                pos += record_size(b - a)
        crash_copy(tmp / "c", tmp / "x", keep_data)
        wc._dirty._unpersisted.clear()  # the close must not commit what the copy lost
        wc.durable = False
    torn = set()
    if recs:
        torn = damage.draw(st.sets(st.integers(0, len(recs) - 1)), label="torn")
        how = damage.draw(st.sampled_from(["flip", "zero", "cut"]), label="how")
        with open(tmp / "x" / JOURNAL_FILE, "r+b") as f:
            if how == "cut" and torn:
                first = min(torn)
                torn = set(range(first, len(recs)))
                f.truncate(recs[first][0] + damage.draw(st.integers(0, recs[first][1] - 1), label="cut at"))
            for t in sorted(torn) if how != "cut" else []:
                p, size = recs[t][0], recs[t][1]
                at = p + damage.draw(st.integers(0, size - 1), label="byte")
                if how == "zero":
                    f.seek(p)
                    f.write(bytes(size))
                else:
                    f.seek(at)
                    byte = f.read(1)
                    f.seek(at)
                    f.write(bytes([byte[0] ^ 0x5A]) if byte else b"\x01")
    for i, (_p, _s, off, n, data) in enumerate(recs):
        if i not in torn:
            model.durable[off : off + n] = np.frombuffer(data, dtype=np.uint8)
    with WriteCache.open(tmp / "x", base) as back:
        model.check_after_crash(back.read(0, SIZE))
    with WriteCache.open(tmp / "x", base) as again:  # the replay is not repeated: a new epoch
        assert not again._journal.used
        assert again.read(0, SIZE) == model.durable.tobytes()
    shutil.rmtree(tmp)


def write_v1_cache(p: Path, image_size: int, granule: int, dirty: dict[int, bytes]) -> None:
    """A cache as instantnfs wrote it before the journal (format version 1): ``data``
    with the dirty granules, ``bitmap`` with a version 1 header and their bits."""
    p.mkdir()
    ngran = -(-image_size // granule)
    head = struct.pack("<8sIIQQ32s", MAGIC, 1, granule, image_size, ngran, b"tag".ljust(32, b"\0"))
    bits = np.zeros(-(-ngran // 8), dtype=np.uint8)
    with open(p / DATA_FILE, "wb") as f:
        f.truncate(image_size)
        for gi, data in dirty.items():
            f.seek(gi * granule)
            f.write(data)
            bits[gi >> 3] |= 1 << (gi & 7)
    with open(p / BITMAP_FILE, "wb") as f:
        f.write((head + struct.pack("<I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0"))
        f.write(bits.tobytes())


def test_a_version_1_cache_opens_reads_and_is_upgraded(tmp_path):
    """A live session's cache written before the upgrade keeps its writes, gets a journal
    and a version 2 header, and takes stable writes; an older daemon refuses it then."""
    base = MemDisk(IMAGE)
    dirty = {0: pattern(1, 4096), 5: pattern(2, 4096), SIZE // 4096: pattern(3, SIZE % 4096)}
    write_v1_cache(tmp_path / "c", SIZE, 4096, dirty)
    expect = bytearray(IMAGE)
    for gi, data in dirty.items():
        expect[gi * 4096 : gi * 4096 + len(data)] = data
    with WriteCache.open(tmp_path / "c", base, base_tag=b"tag") as wc:
        assert wc.read(0, SIZE) == bytes(expect)
        more = pattern(4, 5000)
        wc.write(70000, more, stable=True)
        expect[70000:75000] = more
        crash_copy(tmp_path / "c", tmp_path / "x", keep_data=False)
        shutil.copyfile(tmp_path / "c" / DATA_FILE, tmp_path / "x" / DATA_FILE)
    raw = (tmp_path / "c" / BITMAP_FILE).read_bytes()
    assert Header.decode(raw[:HEADER_SIZE], tmp_path / "c" / BITMAP_FILE).version == VERSION == 2
    assert (tmp_path / "c" / JOURNAL_FILE).exists()
    with WriteCache.open(tmp_path / "x", base, base_tag=b"tag") as back:
        assert back.read(0, SIZE) == bytes(expect)
    # the version 1 reader (it accepted only its own version) refuses the upgraded cache
    _m, version = struct.unpack_from("<8sI", raw)
    assert version != 1


def test_an_unknown_version_is_refused(tmp_path):
    base = MemDisk(IMAGE)
    write_v1_cache(tmp_path / "c", SIZE, 4096, {})
    raw = bytearray((tmp_path / "c" / BITMAP_FILE).read_bytes())
    head = struct.pack("<8sIIQQ32s", MAGIC, 3, 4096, SIZE, -(-SIZE // 4096), bytes(32))
    raw[: len(head) + 4] = head + struct.pack("<I", zlib.crc32(head))
    (tmp_path / "c" / BITMAP_FILE).write_bytes(bytes(raw))
    with pytest.raises(WriteCacheError, match="version 3"):
        WriteCache.open(tmp_path / "c", base)


def test_peekv_passes_clean_ranges_to_the_base_and_refuses_dirty_ones(tmp_path):
    base = MemDisk(IMAGE, peek=True)
    with WriteCache.create(tmp_path / "c", base) as wc:
        wc.write(20000, b"x" * 10)
        assert wc.peekv(20480, 4096) == base.readv(20480, 4096)
        assert base.peeked == [(20480, 4096)]
        assert wc.peekv(16384, 4096) is None  # granule 4 holds the write
        assert wc.peekv(0, 1 << 20) is None
        assert wc.peekv(SIZE - 10, 100) == base.readv(SIZE - 10, 100)
        assert base.peeked[-1] == (SIZE - 10, 100)
    plain = MemDisk(IMAGE)
    with WriteCache.create(tmp_path / "d", plain) as wc:
        assert wc.peekv(0, 4096) is None  # a base without peekv: always the slow path


def test_replay_applies_records_in_the_order_they_were_written(tmp_path):
    base = MemDisk(IMAGE)
    with WriteCache.create(tmp_path / "c", base) as wc:
        first, second = pattern(1, 3000), pattern(2, 1000)
        wc.write(4096, first, stable=True)
        wc.write(5000, second, stable=True)
        crash_copy(tmp_path / "c", tmp_path / "x", keep_data=False)
    expect = bytearray(IMAGE[4096:8192])
    expect[:3000] = first
    expect[5000 - 4096 : 6000 - 4096] = second
    with WriteCache.open(tmp_path / "x", base) as back:
        assert back.read(4096, 4096) == bytes(expect)


def test_inline_stable_writes_share_the_journals_group_sync(tmp_path, monkeypatch):
    """Stable writes from the loop: their pwrites there, one fdatasync of the journal per
    batch of waiters (never of data or bitmap); each survives losing the data file."""
    synced: list[int] = []
    real = writecache._fdatasync
    monkeypatch.setattr(writecache, "_fdatasync", lambda fd: (synced.append(fd), real(fd)))
    base = MemDisk(IMAGE)
    pool = ThreadPoolExecutor(4)
    wc = WriteCache.create(tmp_path / "c", base, executor=pool)
    expect = bytearray(IMAGE)
    writes = [(i * 4096 * 5, pattern(i, 4096)) for i in range(40)]
    for off, data in writes:
        expect[off : off + 4096] = data

    async def go() -> None:
        await asyncio.gather(*(wc.awrite_inline(off, data) for off, data in writes))

    try:
        asyncio.run(go())
        assert synced and set(synced) == {wc._journal.fd}
        assert len(synced) <= len(writes)
        assert wc._journal.seq == len(writes) and wc.commits == 0
        crash_copy(tmp_path / "c", tmp_path / "x", keep_data=False)
    finally:
        wc.close()
        pool.shutdown()
    with WriteCache.open(tmp_path / "x", base) as back:
        assert back.read(0, SIZE) == bytes(expect)


def test_stable_writes_from_one_loop_iteration_share_one_fdatasync(tmp_path, monkeypatch):
    """The group sync starts one loop iteration after its first waiter: writes decoded
    from one receive batch (here: started together) are covered by a single fdatasync."""
    base = MemDisk(IMAGE)
    pool = ThreadPoolExecutor(4)
    wc = WriteCache.create(tmp_path / "c", base, executor=pool)
    wc.write(0, pattern(1, 4096), stable=True)  # zeros laid ahead: the next records go inline
    synced: list[int] = []
    real = writecache._fdatasync
    monkeypatch.setattr(writecache, "_fdatasync", lambda fd: (synced.append(fd), real(fd)))
    writes = [(i * 8192, pattern(i, 4096)) for i in range(1, 17)]

    async def go() -> None:
        await asyncio.gather(*(wc.awrite_inline(off, data) for off, data in writes))

    try:
        asyncio.run(go())
        assert synced == [wc._journal.fd]
        assert wc._journal.seq == 1 + len(writes) and wc.commits == 0
    finally:
        wc.close()
        pool.shutdown()


def test_a_group_sync_that_cannot_start_fails_its_writes_instead_of_hanging(tmp_path):
    base = MemDisk(IMAGE)
    pool = ThreadPoolExecutor(2)
    wc = WriteCache.create(tmp_path / "c", base, executor=pool)
    wc.write(0, pattern(1, 4096), stable=True)
    pool.shutdown()  # as at daemon shutdown: run_in_executor refuses new work

    async def go() -> list:
        return await asyncio.wait_for(asyncio.gather(*(wc.awrite_inline(i * 8192, pattern(i, 4096)) for i in range(1, 4)),
                                                     return_exceptions=True), 10)

    try:
        res = asyncio.run(go())
        assert len(res) == 3 and all(isinstance(r, WriteCacheError) for r in res)
        assert not wc._syncing and not wc._sync_waiters
    finally:
        wc.close()


def test_inline_stable_writes_fall_back_rather_than_block_the_loop(tmp_path):
    """A pause, a commit holding the journal, a full journal or zeros to lay ahead send
    the write to a thread; it is durable all the same."""
    base = MemDisk(IMAGE)
    pool = ThreadPoolExecutor(4)
    wc = WriteCache.create(tmp_path / "c", base, executor=pool)
    expect = bytearray(IMAGE)

    async def write(off: int, seed: int) -> None:
        data = pattern(seed, 4096)
        expect[off : off + 4096] = data
        await wc.awrite_inline(off, data)

    async def go() -> None:
        await write(0, 1)  # the first record lays zeros ahead: in a thread
        assert wc._journal.seq == 1 and wc._journal.zeroed > JOURNAL_START
        with wc._journal.exclusive():  # as a commit holds it
            task = asyncio.ensure_future(write(8192, 2))
            await asyncio.sleep(0.05)
            assert not task.done()  # waits in a thread for the commit, not on the loop
        await task
        assert wc.commits == 1
        wc._journal.capacity = 0  # full: commits
        await write(16384, 3)
        assert wc.commits == 2
        wc._journal.capacity = 1 << 20
        with wc.writes_paused():
            pass
        await write(24576, 4)

    try:
        asyncio.run(go())
        crash_copy(tmp_path / "c", tmp_path / "x", keep_data=True)
    finally:
        wc.close()
        pool.shutdown()
    with open(tmp_path / "x" / DATA_FILE, "r+b") as f:  # the last write was only journalled
        f.seek(24576)
        f.write(bytes(4096))
    with WriteCache.open(tmp_path / "x", base) as back:
        assert back.read(0, SIZE) == bytes(expect)


def test_a_failed_group_sync_fails_its_writes_and_the_cache(tmp_path, monkeypatch):
    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "EIO")

    base = MemDisk(IMAGE)
    pool = ThreadPoolExecutor(2)
    wc = WriteCache.create(tmp_path / "c", base, executor=pool)
    wc.write(0, pattern(1, 4096), stable=True)  # zeros laid ahead: the next records go inline
    monkeypatch.setattr(writecache, "_fdatasync", fail)

    async def go() -> list:
        return await asyncio.gather(*(wc.awrite_inline(i * 8192, pattern(i, 4096)) for i in range(1, 5)),
                                    return_exceptions=True)

    try:
        res = asyncio.run(go())
        assert res and all(isinstance(r, WriteCacheError) for r in res)
        assert wc.failed == "fdatasync: EIO"
        with pytest.raises(WriteCacheError):
            wc.write(0, b"x", stable=True)
    finally:
        wc.close()
        pool.shutdown()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(writes=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 70000)), max_size=8),
       reads=st.lists(st.tuples(st.integers(0, SIZE), st.integers(0, 300000)), min_size=1, max_size=6))
def test_aread_of_dirty_ranges_on_the_loop_matches_the_model(tmp_path_factory, writes, reads):
    """Dirty ranges are read on the loop when the page cache holds them (RWF_NOWAIT),
    with their clean runs from the base: the same bytes as the model."""
    base = MemDisk(IMAGE)
    model = bytearray(IMAGE)
    with WriteCache.create(tmp_path_factory.mktemp("r") / "c", base) as wc:
        for i, (off, n) in enumerate(writes):
            n = min(n, SIZE - off)
            data = pattern(i, n)
            wc.write(off, data)
            model[off : off + n] = data

        async def go() -> list[bytes]:
            return [b"".join(await wc.aread(off, n)) for off, n in reads]

        got = asyncio.run(go())
        for (off, n), g in zip(reads, got):
            assert g == bytes(model[off : off + n])


def test_a_cached_dirty_range_is_read_without_a_thread(tmp_path):
    base = MemDisk(IMAGE)
    with WriteCache.create(tmp_path / "c", base) as wc:
        wc.write(5000, pattern(1, 20000))
        parts = wc._read_nowait(0, 65536)  # written just now: in the page cache
        assert parts is not None
        assert [p for p in parts if isinstance(p, tuple)] == [(0, 4096), (28672, 65536 - 28672)]
