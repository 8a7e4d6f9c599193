"""The write cache against a bytearray model (hypothesis state machine, in process).

Writes at any offset and length (unaligned, across granules and blocks, over dirty/clean
edges, on the partial last granule), reads through read/readv/aread and fragmented
ranges, commits, clean reopen (close + open: a new verifier, everything back), and an
abandoned cache (file descriptors dropped without a commit, as a killed process does:
committed and stable writes survive, nothing else differs but uncommitted writes).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.blockmap import bits_count
from engine.writecache import WriteCache
from tests.writecache.model import DiskModel, pattern
from tests.writecache.strategies import lengths, offsets


def abandon(wc: WriteCache) -> None:
    """Drop a cache the way a killed process does: no commit, no bitmap write."""
    wc._closed = True
    os.close(wc._data_fd)
    os.close(wc._bitmap_fd)


def make_machine(backup_repo):
    image = backup_repo.image
    size = len(image)

    class WriteCacheMachine(RuleBasedStateMachine):
        @initialize(granule=st.sampled_from([512, 4096, 65536]), data=st.data())
        def start(self, granule, data):
            self.dir = tempfile.mkdtemp(prefix="wc-model-")
            self.granule = granule
            self.base = backup_repo.disk()
            self.wc = WriteCache.create(os.path.join(self.dir, "c"), self.base, granule=granule)
            self.model = DiskModel(image)
            self.offsets = offsets(size, granule)
            self.lengths = lengths(granule)
            self.seed = 0

        def teardown(self):
            if hasattr(self, "wc"):
                self.wc.close()
                shutil.rmtree(self.dir, ignore_errors=True)

        def _data(self, length: int) -> bytes:
            self.seed += 1
            return pattern(self.seed, length)

        @rule(data=st.data(), stable=st.booleans(), how=st.sampled_from(["write", "awrite"]))
        def write(self, data, stable, how):
            off = data.draw(self.offsets, label="offset")
            n = min(data.draw(self.lengths, label="length"), size - off)
            buf = self._data(n)
            if how == "write":
                self.wc.write(off, buf, stable=stable)
            else:
                asyncio.run(self.wc.awrite(off, buf, stable=stable))
            self.model.write(off, buf, stable)

        @rule(data=st.data(), stride=st.sampled_from([2, 3]), count=st.integers(17, 60))
        def scatter(self, data, stride, count):
            """Every stride-th granule: a later read crosses many dirty/clean runs."""
            g = self.granule
            first = data.draw(st.integers(0, size // g - stride * count - 1), label="first granule")
            for i in range(count):
                off = (first + i * stride) * g + (i % 3)
                buf = self._data(g - 2 * (i % 3))
                self.wc.write(off, buf)
                self.model.write(off, buf, False)
            got = self.wc.read(first * g, stride * count * g)
            assert got == self.model.read(first * g, stride * count * g)

        @rule(data=st.data(), how=st.sampled_from(["read", "readv", "aread"]))
        def read(self, data, how):
            off = data.draw(self.offsets, label="offset")
            n = data.draw(st.one_of(self.lengths, st.integers(0, 4 * 1024 * 1024)), label="length")
            if how == "read":
                got = self.wc.read(off, n)
            elif how == "readv":
                got = b"".join(self.wc.readv(off, n))
            else:
                got = b"".join(asyncio.run(self.wc.aread(off, n)))
            assert got == self.model.read(off, n)

        @rule(how=st.sampled_from(["commit", "acommit"]))
        def commit(self, how):
            if how == "commit":
                self.wc.commit()
            else:
                asyncio.run(self.wc.acommit())
            self.model.commit()

        @rule()
        def reopen(self):
            old = self.wc.verifier
            self.wc.close()
            self.wc = WriteCache.open(os.path.join(self.dir, "c"), self.base)
            assert self.wc.verifier != old
            assert self.wc.granule == self.granule
            self.model.commit()  # close commits

        @rule()
        def abandon_and_reopen(self):
            abandon(self.wc)
            self.wc = WriteCache.open(os.path.join(self.dir, "c"), self.base)
            self.model.check_after_crash(self.wc.read(0, size))

        @invariant()
        def stats_agree(self):
            if hasattr(self, "wc"):
                st_ = self.wc.stats()
                assert 0 <= st_.dirty_bytes <= size
                assert st_.dirty_granules * self.granule >= st_.dirty_bytes
                # the count kept by DirtyMap.mark is the bitmap's, without a walk of it
                d = self.wc._dirty
                assert st_.dirty_granules == bits_count(d.bits, 0, d.granules)

        @precondition(lambda self: hasattr(self, "wc"))
        @rule()
        def whole_disk(self):
            assert self.wc.read(0, size) == self.model.read(0, size)

    return WriteCacheMachine


def test_write_cache_matches_model(backup_repo):
    machine = make_machine(backup_repo)
    machine.TestCase.settings = settings(
        max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()


@pytest.mark.slow
def test_write_cache_matches_model_long(backup_repo):
    machine = make_machine(backup_repo)
    machine.TestCase.settings = settings(
        max_examples=400, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()
