"""BackupDisk's read forms against each other: ``peekv`` gives what ``read`` gives when
every block it touches is cached or zero, None otherwise, and counts the read for
readahead exactly when it answers."""
from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.stack import Stack

BS = 256 * 1024


@pytest.fixture(scope="module")
def repo_image():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # stored, zero, stored, stored (text), zero, zero, stored, and a partial tail
        data = (os.urandom(BS) + bytes(BS) + os.urandom(BS) + (b"line %d\n" * 60000)[:BS] + bytes(2 * BS)
                + os.urandom(BS) + os.urandom(BS // 4))
        img = tmp / "d.img"
        img.write_bytes(data)
        Repository.init(tmp / "repo", BS)
        with Repository.open(tmp / "repo") as r:
            backup(r, BackupSettings(vm="v"), [str(img)])
        yield tmp / "repo", data


ranges = st.tuples(st.integers(0, 9 * BS), st.integers(0, 4 * BS))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reads=st.lists(ranges, min_size=1, max_size=8))
def test_peekv_is_read_once_cached_and_none_before(repo_image, reads):
    repo, data = repo_image
    with Stack.open(repo) as stack:
        disk = stack.backup_disk(stack.repo.point("latest"), 0)
        for off, n in reads:
            want = data[off : off + n]
            stored = any(disk.map.key(b) >= 0 for b in range(off // BS, min(len(disk.map), -(-(off + n) // BS))))
            ra = disk._ra
            state = ra.sequential, [(s.next, s.ahead) for s in ra.streams]
            got = disk.peekv(off, n)
            if got is None:
                assert stored and len(want) > 0  # only a load can make it refuse
                assert (ra.sequential, [(s.next, s.ahead) for s in ra.streams]) == state  # nothing counted
                assert b"".join(asyncio.run(disk.aread(off, n))) == want
                got = disk.peekv(off, n)  # now cached
                assert got is not None
            assert b"".join(got) == want == disk.read(off, n)
            assert all(isinstance(p, memoryview) for p in got)


def test_peekv_counts_a_sequential_stream_as_aread_does(repo_image):
    repo, data = repo_image
    with Stack.open(repo) as stack:
        disk = stack.backup_disk(stack.repo.point("latest"), 0)
        assert disk.read(0, len(data)) == data  # everything cached
        pre = stack.cache.prefetches
        for off in range(0, 4 * BS, 64 * 1024):
            assert b"".join(disk.peekv(off, 64 * 1024)) == data[off : off + 64 * 1024]
        assert disk._ra.sequential == 4 * BS // (64 * 1024) - 1  # every read but the first continued
        assert stack.cache.prefetches == pre  # all cached: nothing to load


def test_read_returns_bytes_not_the_cached_buffer(repo_image):
    repo, data = repo_image
    with Stack.open(repo) as stack:
        disk = stack.backup_disk(stack.repo.point("latest"), 0)
        whole = disk.read(0, BS)
        assert type(whole) is bytes and whole == data[:BS]
        assert type(disk.read(BS, 10)) is bytes  # a zero block
        assert type(disk.read(BS - 5, 10)) is bytes  # across blocks
