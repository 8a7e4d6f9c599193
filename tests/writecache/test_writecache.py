"""The write cache's contracts outside the model: sandboxes, concurrency, errors, figures,
and the backup left untouched."""
from __future__ import annotations

import asyncio
import os
import struct
import threading

import numpy as np
import pytest

from engine.errors import FileTooLarge, WriteCacheError
from engine.export import export_disk
from engine.writecache import HEADER_SIZE, WriteCache, remove_stale_temporaries
from tests.images import sha256_tree
from tests.writecache.model import pattern


def test_two_sandboxes_over_one_base_read_their_own_data(backup_repo, tmp_path):
    base = backup_repo.disk()
    image = backup_repo.image
    a = WriteCache.temporary(base, tmp_path)
    b = WriteCache.temporary(base, tmp_path)
    assert a.path != b.path and a.verifier != b.verifier
    da, db = pattern(1, 10000), pattern(2, 10000)
    a.write(4000, da)
    b.write(4000, db)
    b.write(1 << 20, db, stable=True)
    assert a.read(4000, 10000) == da
    assert b.read(4000, 10000) == db
    assert a.read(1 << 20, 10000) == image[1 << 20 : (1 << 20) + 10000]
    assert base.read(4000, 10000) == image[4000:14000]
    pa, pb = a.path, b.path
    a.close()
    assert not pa.exists() and pb.exists()
    assert b.read(4000, 10000) == db
    b.close()
    assert not pb.exists()


def test_concurrent_partial_writes_to_one_clean_granule_all_land(backup_repo, tmp_path):
    """Without the granule lock, two copy-on-writes of one granule lose each other's bytes."""
    base = backup_repo.disk()
    image = bytearray(backup_repo.image)
    with WriteCache.create(tmp_path / "c", base, granule=65536) as wc:
        nthreads, rounds = 8, 40
        barrier = threading.Barrier(nthreads)

        def worker(t: int) -> None:
            for r in range(rounds):
                granule = r * 65536 * 3
                barrier.wait()
                wc.write(granule + t * 100 + 7, bytes([t + 1]) * 50)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for r in range(rounds):
            g = r * 65536 * 3
            for t in range(nthreads):
                image[g + t * 100 + 7 : g + t * 100 + 57] = bytes([t + 1]) * 50
        assert wc.read(0, wc.size) == bytes(image)


class PausingBase:
    """A base whose next readv stops until released: it holds a reader mid-read."""

    def __init__(self, disk) -> None:
        self.disk = disk
        self.size = disk.size
        self.armed = False
        self.inside = threading.Event()
        self.release = threading.Event()

    def read(self, offset, length):
        return b"".join(self.readv(offset, length))

    def readv(self, offset, length):
        if self.armed:
            self.armed = False
            self.inside.set()
            self.release.wait(30)
        return self.disk.readv(offset, length)

    async def aread(self, offset, length):
        return self.readv(offset, length)


def test_a_write_does_not_land_in_the_middle_of_a_read(backup_repo, tmp_path):
    """A read of [clean A | dirty B] is held inside the base read of A while a write of
    A and B comes: the read must return all-before or all-after, never old A + new B."""
    image = backup_repo.image
    base = PausingBase(backup_repo.disk())
    g = 4096
    with WriteCache.create(tmp_path / "c", base, granule=g) as wc:
        v1, v2 = pattern(1, g), pattern(2, 2 * g)
        wc.write(g, v1)
        base.armed = True
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(wc.read(0, 2 * g)))
        reader.start()
        assert base.inside.wait(30)
        writer_done = threading.Event()
        writer = threading.Thread(target=lambda: (wc.write(0, v2), writer_done.set()))
        writer.start()
        writer_done.wait(0.5)  # with the lock it waits for the reader; without, it is done
        base.release.set()
        reader.join()
        writer.join()
        assert result[0] in (image[:g] + v1, v2), "a torn read: old A with new B"
        assert wc.read(0, 2 * g) == v2


def test_async_writers_and_readers_agree(backup_repo, tmp_path):
    base = backup_repo.disk()
    expected = bytearray(backup_repo.image)
    with WriteCache.create(tmp_path / "c", base) as wc:

        async def main() -> None:
            writes = []
            for i in range(64):
                off = i * 200_000 + i
                data = pattern(i, 9000)
                expected[off : off + 9000] = data
                writes.append(wc.awrite(off, data, stable=i % 8 == 0))
            await asyncio.gather(*writes)
            await wc.acommit()
            parts = await asyncio.gather(*(wc.aread(off, 1 << 20) for off in range(0, wc.size, 1 << 20)))
            assert b"".join(b"".join(p) for p in parts) == bytes(expected)

        asyncio.run(main())
        st = wc.stats()
        assert st.writes == 64 and st.bytes_written == 64 * 9000
        assert st.commits >= 1


def test_stats_count_dirty_and_allocated_bytes(backup_repo, tmp_path):
    base = backup_repo.disk()
    with WriteCache.create(tmp_path / "c", base, granule=4096) as wc:
        assert wc.stats().dirty_bytes == 0
        wc.write(10, b"x")  # one granule, copied on write
        wc.write(1 << 20, bytes(3 * 4096))  # three whole granules
        wc.write(wc.size - 1, b"y")  # the partial last granule (1024 bytes)
        st = wc.stats()
        assert st.dirty_granules == 5
        assert st.dirty_bytes == 4 * 4096 + 1024
        assert 4 * 4096 + 1024 <= st.allocated_bytes < 1 << 20
        assert wc.is_dirty(0, 1) and not wc.is_dirty(4096, 4096)


def test_write_past_the_end_is_refused(backup_repo, tmp_path):
    base = backup_repo.disk()
    with WriteCache.create(tmp_path / "c", base) as wc:
        with pytest.raises(FileTooLarge):
            wc.write(wc.size - 1, b"ab")
        with pytest.raises(ValueError):
            wc.write(-1, b"a")
        wc.write(wc.size - 2, b"ab")
        assert wc.read(wc.size - 2, 100) == b"ab"
        assert wc.read(wc.size, 10) == b"" and wc.readv(wc.size + 5, 10) == []


def test_open_refuses_another_disk_a_second_owner_and_damage(backup_repo, tmp_path):
    base = backup_repo.disk()
    wc = WriteCache.create(tmp_path / "c", base, base_tag=b"point-1/disk-0")
    with pytest.raises(WriteCacheError, match="in use"):
        WriteCache.open(tmp_path / "c", base)
    with pytest.raises(WriteCacheError, match="already holds"):
        WriteCache.create(tmp_path / "c", base)
    wc.close()
    with pytest.raises(WriteCacheError, match="another disk"):
        WriteCache.open(tmp_path / "c", base, base_tag=b"point-2/disk-0")
    WriteCache.open(tmp_path / "c", base, base_tag=b"point-1/disk-0").close()
    with pytest.raises(WriteCacheError, match="no write cache"):
        WriteCache.open(tmp_path / "nothing", base)
    with pytest.raises(WriteCacheError, match="granule"):
        WriteCache.open_or_create(tmp_path / "c", base, granule=65536)
    bm = tmp_path / "c" / "bitmap"
    raw = bytearray(bm.read_bytes())
    raw[12] ^= 1  # granule size field
    bm.write_bytes(raw)
    with pytest.raises(WriteCacheError, match="CRC"):
        WriteCache.open(tmp_path / "c", base)


def test_persisted_format(backup_repo, tmp_path):
    """Little-endian header (magic, version, granule, size, granules), bitmap at 4096, LSB first."""
    base = backup_repo.disk()
    with WriteCache.create(tmp_path / "c", base, granule=4096) as wc:
        wc.write(3 * 4096, b"z", stable=True)
        wc.write(9 * 4096 + 5, b"z")
        wc.commit()
    raw = (tmp_path / "c" / "bitmap").read_bytes()
    magic, version, granule, size, ngran = struct.unpack_from("<8sIIQQ", raw)
    assert (magic, version, granule, size) == (b"INFS-WC\0", 2, 4096, base.size)
    assert ngran == -(-base.size // 4096)
    bits = np.frombuffer(raw[HEADER_SIZE : HEADER_SIZE + 2], dtype=np.uint8)
    assert list(bits) == [1 << 3, 1 << 1]
    data = (tmp_path / "c" / "data").read_bytes()
    assert data[3 * 4096] == ord("z") and data[3 * 4096 + 1 : 4 * 4096] == backup_repo.image[3 * 4096 + 1 : 4 * 4096]


def test_open_or_create_keeps_a_persistent_session(backup_repo, tmp_path):
    base = backup_repo.disk()
    wc = WriteCache.open_or_create(tmp_path / "s", base, granule=512)
    wc.write(777, b"persist", stable=True)
    v1 = wc.verifier
    wc.close()
    wc = WriteCache.open_or_create(tmp_path / "s", base, granule=512)
    assert wc.granule == 512 and wc.verifier != v1
    assert wc.read(777, 7) == b"persist"
    wc.close()
    assert (tmp_path / "s").exists()


def test_backup_files_untouched_by_writes_commits_and_export(backup_repo, tmp_path):
    before = sha256_tree(backup_repo.root)
    base = backup_repo.disk()
    with WriteCache.create(tmp_path / "c", base, granule=512) as wc:
        rng = np.random.default_rng(3)
        for i in range(200):
            off = int(rng.integers(0, wc.size - 70000))
            wc.write(off, pattern(i, int(rng.integers(1, 70000))), stable=i % 10 == 0)
        wc.commit()
        export_disk(wc, tmp_path / "e.raw")
    assert sha256_tree(backup_repo.root) == before
    assert base.read(0, base.size) == backup_repo.image
    assert os.path.getsize(tmp_path / "e.raw") == base.size


def test_stale_temporaries_are_removed_but_live_ones_kept(backup_repo, tmp_path):
    base = backup_repo.disk()
    live = WriteCache.temporary(base, tmp_path)
    dead = WriteCache.temporary(base, tmp_path)
    dead_path = dead.path
    abandon = dead  # a killed daemon: its descriptors (and flock) go away, the directory stays
    os.close(abandon._data_fd)
    os.close(abandon._bitmap_fd)
    abandon._closed = True
    (tmp_path / "unrelated").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert removed == [dead_path]
    assert not dead_path.exists() and live.path.exists() and (tmp_path / "unrelated").exists()
    live.write(0, b"still fine")
    assert live.read(0, 10) == b"still fine"
    live.close()


def test_a_new_cache_writes_only_its_header_and_reopens_with_its_dirty_count(backup_repo, tmp_path):
    """Creating a cache writes no bitmap (preallocated space reads as zeros), so its cost
    does not grow with the disk; the dirty count survives a reopen (counted from the file)."""
    from engine.writecache_format import BITMAP_FILE, HEADER_SIZE

    base = backup_repo.disk()
    with WriteCache.create(tmp_path / "c", base, granule=4096) as wc:
        raw = (tmp_path / "c" / BITMAP_FILE).read_bytes()
        nbytes = -(-wc.size // 4096 // 8)
        assert len(raw) == HEADER_SIZE + nbytes
        assert raw[HEADER_SIZE:] == bytes(nbytes)
        st = os.stat(tmp_path / "c" / BITMAP_FILE)
        assert st.st_blocks * 512 >= HEADER_SIZE + nbytes  # preallocated: persisting bits needs no new space
        wc.write(0, b"a")
        wc.write(3 * 4096 + 5, bytes(2 * 4096))  # granules 3, 4, 5
        wc.write(0, b"b")  # already dirty: counted once
        assert wc.stats().dirty_granules == 4
    with WriteCache.open(tmp_path / "c", base) as wc:
        assert wc.stats().dirty_granules == 4
        wc.write(4 * 4096, b"c")  # dirty already
        wc.write(8 * 4096, b"d")
        assert wc.stats().dirty_granules == 5
