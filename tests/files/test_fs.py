"""The filesystem layer on its own: what it reads to open and list (only metadata: not
TSK's detect-all, whose YAFFS2 probe reads 25 MiB of every volume), and lookups."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InstantNFSError, NotFound
from engine.files.fs import FileSystem, UnrecognisedFilesystem
from tests.files.images import MiB, ext4_image


class CountingFile:
    def __init__(self, path) -> None:
        self.f = open(path, "rb")  # noqa: SIM115
        self.size = os.path.getsize(path)
        self.bytes = 0

    def read(self, offset: int, length: int) -> bytes:
        self.bytes += length
        self.f.seek(offset)
        return self.f.read(length)


def test_opening_and_listing_reads_metadata_only(tmp_path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    (src / "big").write_bytes(os.urandom(8 * MiB))
    img = ext4_image(tmp_path / "d.img", src, 4096 * MiB)
    disk = CountingFile(img)
    fs = FileSystem.open(disk, "disk0")
    assert fs.kind == "ext4" and fs.block_size == 4096
    assert disk.bytes <= 256 * 1024, disk.bytes
    names = {e.name for e in fs.listdir("/")}
    assert names == {b"lost+found", b"etc", b"big"}
    assert fs.open_file(fs.stat("/etc/fstab")).read(0, 100) == b"/dev/sda1 / ext4 defaults 0 1\n"
    assert disk.bytes <= 1 * MiB, disk.bytes


def test_lookups(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "c").write_text("c\n")
    fs = FileSystem.open(CountingFile(ext4_image(tmp_path / "d.img", src, 16 * MiB)), "disk0")
    assert fs.stat("/a/b/c").path == "/a/b/c" and fs.stat("a//b/./c").inode == fs.stat("/a/b/c").inode
    assert fs.stat("/").type == "dir"
    with pytest.raises(NotFound, match=r"disk0: '\.\.' is not allowed"):
        fs.stat("/a/../a")
    with pytest.raises(NotFound, match="no '/a/x'"):
        fs.stat("/a/x")
    with pytest.raises(NotFound, match="/a/b/c is not a directory"):
        fs.stat("/a/b/c/d")
    walked = [e.path for e in fs.walk("/")]
    assert sorted(walked) == ["/a", "/a/b", "/a/b/c", "/lost+found"]
    assert walked.index("/a") < walked.index("/a/b") < walked.index("/a/b/c")  # a directory before its contents


def test_random_bytes_are_an_unrecognised_filesystem(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(os.urandom(4 * MiB))
    with pytest.raises(UnrecognisedFilesystem, match="^disk0: unrecognised filesystem$"):
        FileSystem.open(CountingFile(p), "disk0")


def test_xfs_without_the_optional_extra_is_named_with_what_to_install(tmp_path, monkeypatch):
    import sys

    from tests.files.images import sh

    img = tmp_path / "x.img"
    with open(img, "wb") as f:
        f.truncate(320 * MiB)
    sh("mkfs.xfs", "-q", "-f", img)
    monkeypatch.setitem(sys.modules, "engine.files.fs_dissect", None)  # as if dissect.xfs were missing
    with pytest.raises(UnrecognisedFilesystem, match=r"disk0: holds XFS, which needs the optional dissect\.xfs "
                                                     r"\(pip install 'instantnfs\[xfs-btrfs\]', AGPL-licensed\)"):
        FileSystem.open(CountingFile(img), "disk0")


@pytest.fixture(scope="module")
def small_ext4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    src = tmp / "src"
    (src / "d" / "e").mkdir(parents=True)
    for i in range(40):
        (src / "d" / f"file{i}").write_bytes(os.urandom(i * 300))
    os.symlink("d/file1", src / "l")
    return ext4_image(tmp / "d.img", src, 4 * MiB, "-N", "64").read_bytes()


class Mem:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 160 * 1024), st.integers(1, 255)), min_size=1, max_size=40))
def test_a_damaged_filesystem_gives_errors_never_tracebacks(small_ext4, flips):
    """Random bytes in the metadata (superblock, descriptors, inode table, directories)."""
    data = bytearray(small_ext4)
    for at, x in flips:
        data[at] ^= x
    try:
        fs = FileSystem.open(Mem(bytes(data)), "disk0")
        for n, e in enumerate(fs.walk("/")):
            if n > 10_000:
                break
            if e.type == "file":
                f = fs.open_file(e)
                f.data_runs()
                f.read(0, min(e.size, 1 << 20))
    except InstantNFSError:
        pass


def test_extraction_progress_reaches_the_total_and_holes_stay_holes(tmp_path):
    from engine.files.extract import extract, total_bytes

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(os.urandom(100_000))
    with open(src / "d" / "sparse", "wb") as f:
        f.truncate(64 * MiB)
        f.seek(32 * MiB)
        f.write(b"x" * 5000)
    (src / "zeros").write_bytes(bytes(2 * MiB))  # allocated zeros: a hole when extracted
    fs = FileSystem.open(CountingFile(ext4_image(tmp_path / "d.img", src, 64 * MiB)), "disk0")
    entries = [fs.stat("/d"), fs.stat("/zeros")]
    seen = []
    res = extract(fs, entries, tmp_path / "out", progress=seen.append)
    assert sum(seen) == total_bytes(fs, entries) == 100_000 + 64 * MiB + 2 * MiB
    assert res.files == 3 and res.bytes < 2 * MiB + 200_000  # what was read: no hole of the sparse file
    assert (tmp_path / "out" / "zeros").read_bytes() == bytes(2 * MiB)
    assert os.stat(tmp_path / "out" / "zeros").st_blocks == 0
    assert os.stat(tmp_path / "out" / "d" / "sparse").st_blocks * 512 <= 64 * 1024
