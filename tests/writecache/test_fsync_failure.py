"""Issue 8 finding 7: after a failed fdatasync the write cache never claims durability
again (Linux may drop the pages it could not write; a retried fsync then returns 0)."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine import writecache
from engine.errors import WriteCacheError
from engine.nfs.nfs3_convert import status_of
from engine.nfs.nfs3_types import nfsstat3
from engine.writecache import WriteCache


class FailOnce:
    """An fdatasync that fails with EIO the first time, then succeeds (as Linux may)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fdatasync(fd)


@pytest.fixture
def failing_sync(monkeypatch):
    f = FailOnce()
    monkeypatch.setattr(writecache, "_fdatasync", f)
    return f


def test_failed_fdatasync_fails_the_commit_and_every_later_one(backup_repo, tmp_path, failing_sync, caplog):
    wc = WriteCache.create(tmp_path / "wc", backup_repo.disk())
    try:
        wc.write(4096, b"a" * 4096)
        with caplog.at_level(logging.ERROR, logger="instantnfs.writecache"):
            with pytest.raises(WriteCacheError) as ei:
                wc.commit()
        assert failing_sync.calls == 1
        assert status_of(ei.value) == nfsstat3.NFS3ERR_IO
        lines = [r.getMessage() for r in caplog.records if r.name == "instantnfs.writecache"]
        assert len(lines) == 1 and str(wc.path) in lines[0] and "EIO" in lines[0], lines
        # the retried COMMIT would succeed at the syscall: the cache must not
        with pytest.raises(WriteCacheError, match="failed"):
            wc.commit()
        with pytest.raises(WriteCacheError, match="failed"):
            wc.write(0, b"b" * 512)
        with pytest.raises(WriteCacheError):
            wc.write(8192, b"c" * 4096, stable=True)
        assert failing_sync.calls == 1, "a failed cache synced again"
        # reads still work: the newest bytes (the export can still take the disk away)
        assert wc.read(4096, 4096) == b"a" * 4096
        assert wc.read(0, 512) == backup_repo.image[:512]
        st = wc.stats()
        assert st.failed == "fdatasync: EIO"
    finally:
        wc.close()  # closing a failed cache does not sync, does not raise
    assert failing_sync.calls == 1


def test_failed_cache_refuses_async_writes_and_commits(backup_repo, tmp_path, failing_sync):
    pool = ThreadPoolExecutor(2)
    wc = WriteCache.create(tmp_path / "wc", backup_repo.disk(), executor=pool)

    async def go() -> None:
        await wc.awrite(0, b"x" * 4096)
        with pytest.raises(WriteCacheError):
            await wc.acommit()
        with pytest.raises(WriteCacheError):
            await wc.acommit()
        with pytest.raises(WriteCacheError):
            await wc.awrite(0, b"y" * 4096, stable=True)
        assert await wc.aread(0, 4096) is not None

    try:
        asyncio.run(go())
        assert wc.read(0, 4096) == b"x" * 4096
        assert wc.stats().failed == "fdatasync: EIO"
    finally:
        wc.close()
        pool.shutdown()


def test_a_cache_without_failure_still_commits_and_reopens(backup_repo, tmp_path):
    wc = WriteCache.create(tmp_path / "wc", backup_repo.disk())
    wc.write(0, b"z" * 4096, stable=True)
    assert wc.stats().failed is None
    wc.close()
    wc = WriteCache.open(tmp_path / "wc", backup_repo.disk())
    try:
        assert wc.read(0, 4096) == b"z" * 4096
    finally:
        wc.close()
