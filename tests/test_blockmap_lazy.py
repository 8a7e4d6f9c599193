"""A block map opened from its file is mapped, not loaded: it answers exactly like one
read whole into memory, it is a read-only mapping of the file, and opening a huge one
reads none of it (publish costs the same for a 1 GiB and a 1 PiB disk)."""
from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import _blockmap, _blockmap_py
from engine.errors import RepositoryError
from engine.repo import repository as repository_mod
from engine.repo.format import MAP_HEADER, load_map, map_bytes
from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from tests.images import make_image

IMPLS = [pytest.param(_blockmap, id="cython"), pytest.param(_blockmap_py, id="pure")]
ZERO = 0xFFFFFFFF
ENTRY = _blockmap_py.ENTRY_DTYPE


def _is_file_mapping(a: np.ndarray) -> bool:
    """Whether ``a``'s memory is an mmap (a view of a file mapping, not a copy)."""
    while a is not None:
        if isinstance(a, mmap.mmap):
            return True
        a = getattr(a, "base", None)
    return False


def _rss() -> int:
    """Resident bytes of this process now (a mapped page counts once touched)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@st.composite
def map_files(draw):
    """A block map (block size, disk size, entries: runs of zero and stored blocks) and
    byte ranges and block indexes to ask it about."""
    shift = draw(st.integers(4, 12))
    bs = 1 << shift
    nblocks = draw(st.integers(1, 300))
    tail = draw(st.integers(0, bs - 1))
    disk_size = nblocks * bs if tail == 0 else (nblocks - 1) * bs + tail
    entries = np.zeros(nblocks, dtype=ENTRY)
    i = 0
    while i < nblocks:
        run = draw(st.integers(1, 40))
        if draw(st.booleans()):
            entries["pack"][i : i + run] = ZERO
        else:
            for j in range(i, min(i + run, nblocks)):
                entries[j] = (draw(st.integers(0, (1 << 23) - 1)), draw(st.integers(1, 1 << 22)),
                              draw(st.integers(0, (1 << 40) - 1)))
        i += run
    ranges = draw(st.lists(st.tuples(st.integers(-bs, disk_size + bs), st.integers(-1, 4 * bs)), min_size=1, max_size=20))
    blocks = draw(st.lists(st.integers(-2, nblocks + 1), min_size=1, max_size=20))
    return bs, disk_size, entries, ranges, blocks


def _answer(f, *args):
    """What a call returns, or the type of what it raises (both maps must agree on both)."""
    try:
        r = f(*args)
    except (IndexError, ValueError) as e:
        return type(e)
    return r.tolist() if isinstance(r, np.ndarray) else r


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=map_files())
def test_mapped_map_answers_like_a_loaded_one(impl, tmp_path, m):
    bs, disk_size, entries, ranges, blocks = m
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "0.map"
    path.write_bytes(map_bytes(entries, bs, disk_size))
    info, mapped = load_map(path)
    assert (info.block_size, info.disk_size, info.nblocks) == (bs, disk_size, len(entries))
    assert _is_file_mapping(mapped)
    lazy = impl.BlockMap(mapped, bs, disk_size)
    whole = impl.BlockMap(np.array(entries, copy=True), bs, disk_size)  # read whole into memory
    assert len(lazy) == len(whole)
    for off, length in ranges:
        assert _answer(lazy.translate, off, length) == _answer(whole.translate, off, length)
        assert _answer(lazy.locate, off, length) == _answer(whole.locate, off, length)
    for b in blocks:
        assert _answer(lazy.entry, b) == _answer(whole.entry, b)
        assert _answer(lazy.key, b) == _answer(whole.key, b)


def test_mapped_map_is_read_only(tmp_path):
    entries = np.zeros(4, dtype=ENTRY)
    entries["pack"] = ZERO
    path = tmp_path / "0.map"
    path.write_bytes(map_bytes(entries, 4096, 4 * 4096))
    before = path.read_bytes()
    _, mapped = load_map(path)
    assert not mapped.flags.writeable
    with pytest.raises(ValueError):
        mapped["pack"][0] = 1
    assert path.read_bytes() == before


def test_opening_a_huge_map_reads_none_of_it(tmp_path):
    """A 256 TiB disk's map (4 GiB, sparse here) opens and answers at its far end while
    the process's memory grows by far less than the map: nothing walks its entries."""
    bs = 1 << 20
    disk_size = 256 << 40
    nblocks = disk_size // bs
    path = tmp_path / "0.map"
    with open(path, "wb") as f:
        f.write(MAP_HEADER.pack(b"INFSBMAP", 1, bs, disk_size, nblocks))
        f.truncate(MAP_HEADER.size + nblocks * ENTRY.itemsize)  # holes: entries (0, 0, 0)
        last = np.zeros(2, dtype=ENTRY)
        last[0] = (7, 1234, 5 << 20)
        last[1]["pack"] = ZERO
        f.seek(MAP_HEADER.size + (nblocks - 2) * ENTRY.itemsize)
        f.write(last.tobytes())
    rss_before = _rss()
    for impl in (_blockmap, _blockmap_py):
        info, mapped = load_map(path)
        bm = impl.BlockMap(mapped, info.block_size, info.disk_size)
        assert len(bm) == nblocks
        assert bm.entry(nblocks - 2) == (7, 1234, 5 << 20)
        assert bm.key(nblocks - 1) == -1
        assert bm.translate(disk_size - bs - 10, bs + 10).tolist() == [[7, 5 << 20, 1234, bs - 10, 10], [-1, 0, 0, 0, bs]]
        assert bm.locate(0, 1) == 0  # a hole in this file reads as pack 0, offset 0
        assert _rss() - rss_before < 256 << 20  # < 256 MiB of the 4 GiB map is resident
        del bm, mapped


def test_a_truncated_map_is_refused(tmp_path):
    entries = np.zeros(8, dtype=ENTRY)
    entries["pack"] = ZERO
    path = tmp_path / "0.map"
    path.write_bytes(map_bytes(entries, 4096, 8 * 4096)[:-1])
    with pytest.raises(RepositoryError):
        load_map(path)


@pytest.mark.parametrize("impl", IMPLS)
def test_restore_point_maps_its_block_map(impl, tmp_path, monkeypatch):
    """``RestorePoint.open_blockmap`` gives a read-only mapping of the point's map file,
    answering like the map read whole, and leaves the file as it was."""
    monkeypatch.setattr(repository_mod, "BlockMap", impl.BlockMap)
    bs = 256 * 1024
    src = tmp_path / "d.img"
    make_image(src, ["random", "hole", "zero", "repeat", "repeat", "text", "hole", "random"], bs, tail=4096, seed=3)
    Repository.init(tmp_path / "repo", bs)
    with Repository.open(tmp_path / "repo") as repo:
        backup(repo, BackupSettings(vm="vm"), [str(src)])
        pt = repo.point("latest")
        map_path = pt.path / pt.disks[0].map_file
        raw = map_path.read_bytes()
        mtime = os.stat(map_path).st_mtime_ns
        bm = pt.open_blockmap(0)
        assert type(bm) is impl.BlockMap
        assert _is_file_mapping(bm.entries) and not bm.entries.flags.writeable
        whole = impl.BlockMap(np.frombuffer(raw, dtype=ENTRY, offset=MAP_HEADER.size).copy(), bs, pt.disks[0].size)
        for off in range(0, pt.disks[0].size, 77_777):
            n = min(3 * bs, pt.disks[0].size - off)
            assert bm.translate(off, n).tolist() == whole.translate(off, n).tolist()
        assert [bm.entry(b) for b in range(len(bm))] == [whole.entry(b) for b in range(len(whole))]
        assert map_path.read_bytes() == raw and os.stat(map_path).st_mtime_ns == mtime
