"""``WriteCache.needs_no_copy``: the datastore runs a small UNSTABLE write inline (no
thread hand-off) only when the write reads nothing from the backup, i.e. copies no
granule of the base. The answer must say exactly that."""
from __future__ import annotations

import random

from engine.writecache import WriteCache
from tests.writecache.model import pattern


class CountingBase:
    """The backup disk, counting the reads the write cache makes of it."""

    def __init__(self, disk) -> None:
        self.disk = disk
        self.size = disk.size
        self.reads = 0

    def read(self, offset, length):
        return b"".join(self.readv(offset, length))

    def readv(self, offset, length):
        self.reads += 1
        return self.disk.readv(offset, length)

    async def aread(self, offset, length):
        return self.readv(offset, length)


def test_edges_and_the_partial_last_granule(backup_repo, tmp_path):
    base = CountingBase(backup_repo.disk())
    g = 4096
    with WriteCache.create(tmp_path / "c", base, granule=g) as wc:
        size = wc.size
        assert size % g  # the fixture's disk ends in a partial granule
        tail = size - size % g
        assert wc.needs_no_copy(0, g) and wc.needs_no_copy(8 * g, 3 * g)
        assert not wc.needs_no_copy(1, g - 1)  # unaligned start in a clean granule
        assert not wc.needs_no_copy(0, g + 1)  # unaligned end in a clean granule
        assert not wc.needs_no_copy(tail + 1, size - tail - 1)
        assert wc.needs_no_copy(tail, size - tail)  # the disk's end is no unaligned edge
        wc.write(4 * g, pattern(1, 100))  # granule 4 is dirty now
        assert wc.needs_no_copy(4 * g + 10, 50)  # both edges in granule 4
        assert wc.needs_no_copy(4 * g + 10, g - 10)  # start in 4, end aligned
        assert wc.needs_no_copy(3 * g, g + 10)  # start aligned, end in 4
        assert not wc.needs_no_copy(4 * g + 10, g)  # end in clean granule 5
        assert not wc.needs_no_copy(3 * g + 10, g)  # start in clean granule 3


def test_it_says_exactly_whether_a_write_reads_the_base(backup_repo, tmp_path):
    """For random writes, the answer beforehand equals whether the write then read the base."""
    base = CountingBase(backup_repo.disk())
    g = 4096
    rng = random.Random(9)
    with WriteCache.create(tmp_path / "c", base, granule=g) as wc:
        size = wc.size
        seen = {True: 0, False: 0}
        for i in range(400):
            if i % 4 == 0:
                offset = rng.randrange(0, size)
                n = size - offset  # some writes run to the disk's (unaligned) end
            else:
                offset = rng.randrange(0, 64 * g)
                n = rng.choice([1, 100, g - 1, g, g + 1, 3 * g, rng.randrange(1, 5 * g)])
            n = min(n, size - offset, 1 << 20)
            answer = wc.needs_no_copy(offset, n)
            before = base.reads
            wc.write(offset, pattern(i, n))
            assert answer == (base.reads == before), (offset, n, answer)
            seen[answer] += 1
        assert seen[True] > 50 and seen[False] > 50  # both answers were exercised
