"""A full cache volume: NoSpace for the write that does not fit, and everything written
before it reads back, before and after a reopen; the cache goes on serving."""
from __future__ import annotations

import pytest

from engine.errors import NoSpace
from engine.writecache import WriteCache
from tests.conftest import small_tmpfs
from tests.writecache.model import pattern


@pytest.fixture
def small_volume(tmp_path):
    with small_tmpfs(tmp_path / "full", "2m") as mnt:
        yield mnt


def test_full_volume_raises_nospace_and_keeps_data(backup_repo, small_volume):
    base = backup_repo.disk()
    size = base.size
    expected = bytearray(backup_repo.image)
    wc = WriteCache.create(small_volume / "c", base)
    chunk = 96 << 10
    seed = 0
    failed_at = None
    for i in range(64):  # 6 MiB of writes on a 2 MiB volume
        off = (i * 5 * chunk + 1000 * i) % (size - chunk)
        seed += 1
        data = pattern(seed, chunk)
        try:
            wc.write(off, data, stable=i % 4 == 0)
        except NoSpace:
            failed_at = i
            break
        expected[off : off + chunk] = data
    assert failed_at is not None, "a 2 MiB volume took 6 MiB of writes"
    assert failed_at > 3, "the volume was full before any write"
    assert wc.read(0, size) == bytes(expected)

    # Already-dirty granules are allocated: rewriting them still works on the full volume.
    first = 0
    again = pattern(999, 4096)
    wc.write(first + 8192, again)
    expected[first + 8192 : first + 8192 + 4096] = again
    # A write mixing dirty granules and new ones fails without touching the dirty ones.
    with pytest.raises(NoSpace):
        wc.write(first, pattern(1000, 2 << 20))
    assert wc.read(0, size) == bytes(expected)

    wc.commit()
    wc.close()
    with WriteCache.open(small_volume / "c", base) as wc2:
        assert wc2.read(0, size) == bytes(expected)


def test_create_on_full_volume_raises_nospace(backup_repo, small_volume):
    filler = small_volume / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(64 << 10))
                f.flush()
        except OSError:
            pass
    with pytest.raises(NoSpace):
        WriteCache.create(small_volume / "c", backup_repo.disk(), granule=512)
