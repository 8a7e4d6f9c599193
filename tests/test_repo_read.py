"""Backup then read: every byte of every range equals the source image (property tests)."""
from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import _blockmap, _blockmap_py
from engine.repo import repository as repository_mod
from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.stack import Stack
from tests.images import KINDS, make_image

BS = 256 * 1024  # the smallest block size a repository allows: more blocks per image


@pytest.fixture(params=[_blockmap, _blockmap_py], ids=["cython", "pure"])
def impl(request, monkeypatch):
    monkeypatch.setattr(repository_mod, "BlockMap", request.param.BlockMap)
    return request.param


images = st.tuples(
    st.lists(st.sampled_from(KINDS), min_size=1, max_size=12),
    st.integers(0, BS // 512 - 1).map(lambda s: s * 512),
    st.integers(0, 2**32),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=images, data=st.data())
def test_read_equals_source(impl, image, data):
    kinds, tail, seed = image
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "disk.img"
        expect = make_image(src, kinds, BS, tail, seed)
        Repository.init(tmp / "repo", BS)
        with Stack.open(tmp / "repo", cache_bytes=3 * BS) as stack:  # small: evictions happen
            repo = stack.repo
            backup(repo, BackupSettings(vm="vm"), [str(src)])
            disk = stack.backup_disk(repo.point("latest"), 0)
            assert type(disk.map) is impl.BlockMap
            assert disk.size == len(expect)
            assert disk.read(0, disk.size) == expect
            for _ in range(20):
                off = data.draw(st.integers(0, len(expect)), label="offset")
                length = data.draw(st.integers(0, 3 * BS), label="length")
                want = expect[off : off + length]
                assert disk.read(off, length) == want
                assert b"".join(disk.readv(off, length)) == want
                assert b"".join(asyncio.run(disk.aread(off, length))) == want
            assert stack.cache.size <= 3 * BS


def test_dedup_and_zero_blocks_are_not_stored(tmp_path):
    kinds = ["random", "hole", "zero", "repeat", "repeat", "repeat", "text", "text"]
    src = tmp_path / "d.img"
    expect = make_image(src, kinds, BS, seed=7)
    Repository.init(tmp_path / "repo", BS)
    with Stack.open(tmp_path / "repo") as stack:
        repo = stack.repo
        m = backup(repo, BackupSettings(vm="vm"), [str(src)])
        st_ = m["stats"]
        # random, one repeated block, and the text blocks (distinct): hole and zero are not stored
        distinct = len({expect[i * BS : (i + 1) * BS] for i, k in enumerate(kinds) if k not in ("hole", "zero")})
        assert st_["new_chunks"] == distinct
        assert st_["zero_blocks"] == 2
        assert st_["data_blocks"] == 6
        assert m["disks"][0]["stored_blocks"] == 6
        assert stack.backup_disk(repo.point("latest"), 0).read(0, len(expect)) == expect


def test_concurrent_misses_decompress_once(tmp_path):
    src = tmp_path / "d.img"
    expect = make_image(src, ["text"] * 4, BS, seed=3)
    Repository.init(tmp_path / "repo", BS)
    with Stack.open(tmp_path / "repo") as stack:
        repo = stack.repo
        backup(repo, BackupSettings(vm="vm"), [str(src)])
        disk = stack.backup_disk(repo.point("latest"), 0)
        calls: list[tuple[int, int]] = []
        real = repo.reader.read_chunk

        def counting(pack, offset, clen, out=None):
            calls.append((pack, offset))
            return real(pack, offset, clen, out)

        repo.reader.read_chunk = counting  # type: ignore[method-assign]

        async def many():
            return await asyncio.gather(*(disk.aread(BS + i * 100, 100) for i in range(64)))

        parts = asyncio.run(many())
        for i, bufs in enumerate(parts):
            assert b"".join(bufs) == expect[BS + i * 100 : BS + i * 100 + 100]
        target = disk.map.entry(1)
        assert calls.count((target[0], target[2])) == 1  # 64 concurrent misses, one decompression


def test_cache_is_bounded_and_shared_between_points(tmp_path):
    src = tmp_path / "d.img"
    expect = make_image(src, ["random"] * 6, BS, seed=4)
    Repository.init(tmp_path / "repo", BS)
    with Stack.open(tmp_path / "repo", cache_bytes=2 * BS) as stack:
        repo = stack.repo
        backup(repo, BackupSettings(vm="a"), [str(src)])
        backup(repo, BackupSettings(vm="b"), [str(src)])  # all dedup'd: same chunks
        a = stack.backup_disk(repo.point("a@latest"), 0)
        b = stack.backup_disk(repo.point("b@latest"), 0)
        assert a.read(0, 100) == expect[:100]
        loads = stack.cache.loads
        assert b.read(0, 100) == expect[:100]
        assert stack.cache.loads == loads  # one cache entry serves both restore points
        for i in range(6):
            a.read(i * BS, 10)
        assert stack.cache.size <= 2 * BS


def test_sequential_reads_prefetch(tmp_path):
    src = tmp_path / "d.img"
    expect = make_image(src, ["text"] * 12, BS, seed=5)
    Repository.init(tmp_path / "repo", BS)
    with Stack.open(tmp_path / "repo") as stack:
        repo = stack.repo
        backup(repo, BackupSettings(vm="vm"), [str(src)])
        disk = stack.backup_disk(repo.point("latest"), 0)
        for off in range(0, 3 * BS, 64 * 1024):
            assert disk.read(off, 64 * 1024) == expect[off : off + 64 * 1024]
        assert stack.cache.prefetches > 0
        rng = random.Random(1)
        for _ in range(50):
            off = rng.randrange(len(expect))
            assert disk.read(off, 5000) == expect[off : off + 5000]
