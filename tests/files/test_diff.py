"""files diff: two restore points of an ext4 guest (mke2fs -d, no mount) after known
changes list exactly those changes; unchanged data is not read; moved but equal files
are not reported."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine.files import fs as fsmod
from engine.files.diff import BlockDiff, diff
from engine.files.point import PointFiles
from engine.stack import Stack
from tests.cli import ok
from tests.files.images import MiB, backup_images, ext4_image

T0 = 1_600_000_000


def first_tree(src: Path) -> None:
    src.mkdir()
    (src / "docs").mkdir()
    for i in range(200):  # small files sharing the repository's 256 KiB blocks
        (src / "docs" / f"note{i:03d}.txt").write_bytes(os.urandom(3000 + i))
    (src / "big-to-delete.bin").write_bytes(os.urandom(4 * MiB))
    (src / "keep.bin").write_bytes(os.urandom(2 * MiB + 5))
    (src / "encrypt-me.doc").write_bytes(os.urandom(300_000))
    (src / "chmod-me.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "old-name.txt").write_text("renamed later\n")
    (src / "sub").mkdir()
    (src / "sub" / "gone.txt").write_text("deleted later\n")
    os.symlink("keep.bin", src / "link")
    os.utime(src / "encrypt-me.doc", (T0, T0))


def change_tree(src: Path) -> None:
    """The known changes, directories' times put back (they follow from their entries).
    mke2fs -d keeps whole seconds of ctime: the changes start in a new second, so the
    ctimes they set differ from the first image's."""
    time.sleep(1.01 - time.time() % 1)
    times = {p: os.stat(p).st_mtime_ns for p in [src, src / "sub", src / "docs"]}
    (src / "big-to-delete.bin").unlink()
    (src / "sub" / "gone.txt").unlink()
    (src / "added.bin").write_bytes(os.urandom(6 * MiB))
    (src / "sub" / "new.txt").write_text("new\n")
    doc = src / "encrypt-me.doc"  # ransomware: same size, same mtime, other bytes
    doc.write_bytes(os.urandom(300_000))
    os.utime(doc, (T0, T0))
    os.chmod(src / "chmod-me.sh", 0o755)
    os.rename(src / "old-name.txt", src / "new-name.txt")
    for p, t in times.items():
        os.utime(p, ns=(t, t))


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diff")
    src = tmp / "src"
    first_tree(src)
    os.chmod(src / "chmod-me.sh", 0o644)
    img = ext4_image(tmp / "a.img", src, 64 * MiB)
    a = backup_images(tmp / "repo", [img], vm="web")
    same = backup_images(tmp / "repo", [img], vm="web")  # the same image again: the same chunks
    change_tree(src)
    b = backup_images(tmp / "repo", [ext4_image(tmp / "b.img", src, 64 * MiB)], vm="web")
    return tmp, a, same, b


EXPECTED = [
    {"path": "/added.bin", "change": "added", "type": "file"},
    {"path": "/big-to-delete.bin", "change": "deleted", "type": "file"},
    {"path": "/chmod-me.sh", "change": "modified", "type": "file", "content": False, "fields": ["mode", "ctime"]},
    {"path": "/encrypt-me.doc", "change": "modified", "type": "file", "content": True, "fields": ["ctime"]},
    {"path": "/new-name.txt", "change": "added", "type": "file"},
    {"path": "/old-name.txt", "change": "deleted", "type": "file"},
    {"path": "/sub/gone.txt", "change": "deleted", "type": "file"},
    {"path": "/sub/new.txt", "change": "added", "type": "file"},
]


def test_diff_lists_exactly_the_known_changes(points):
    tmp, a, _, b = points
    r = ok("files", "diff", "--repo", tmp / "repo", a, b, "--json").json()
    assert r["changes"] == EXPECTED
    assert r["filesystem"] == "ext4" and r["changed_blocks"][0] > 0
    text = ok("files", "diff", "--repo", tmp / "repo", a, b, "disk0", "/sub").out.splitlines()
    assert text == ["deleted    /sub/gone.txt", "added      /sub/new.txt"]


def test_files_that_moved_with_equal_bytes_are_compared_not_reported(points):
    """The rebuilt image placed unchanged files elsewhere: their runs differ, their bytes not."""
    tmp, a, _, b = points
    with Stack.open(tmp / "repo") as stack:
        fa = PointFiles(stack, stack.repo.point(a)).filesystem(None)
        fb = PointFiles(stack, stack.repo.point(b)).filesystem(None)
        moved = [p for p in ["/keep.bin"] + [f"/docs/note{i:03d}.txt" for i in range(200)]
                 if fa.open_file(fa.stat(p)).volume_runs() != fb.open_file(fb.stat(p)).volume_runs()]
        assert moved, "the second image kept every file in place: this test no longer tests moves"
        changed = {c.path for c in diff(fa, fb, BlockDiff(PointFiles(stack, stack.repo.point(a)).disks,
                                                          PointFiles(stack, stack.repo.point(b)).disks))}
        assert not changed & set(moved)


def test_equal_chunks_are_not_read(points, monkeypatch):
    """Two points of the same image: every block map entry is equal, so no file byte is read."""
    tmp, a, same, _ = points
    reads = []
    real = fsmod.TskFile.read
    monkeypatch.setattr(fsmod.TskFile, "read", lambda self, off, n: reads.append(self.entry.path) or real(self, off, n))
    with Stack.open(tmp / "repo") as stack:
        pa, ps = PointFiles(stack, stack.repo.point(a)), PointFiles(stack, stack.repo.point(same))
        blocks = BlockDiff(pa.disks, ps.disks)
        assert blocks.count() == [0]
        assert list(diff(pa.filesystem(None), ps.filesystem(None), blocks)) == []
        assert reads == []
        # without block maps every file's bytes are compared, and still equal
        assert list(diff(pa.filesystem(None), ps.filesystem(None), None)) == []
        assert "/keep.bin" in reads


def test_diff_of_a_path_missing_in_both_is_a_clear_error(points):
    tmp, a, _, b = points
    from tests.cli import run

    r = run("files", "diff", "--repo", tmp / "repo", a, b, "/nowhere")
    assert r.rc != 0 and "no '/nowhere'" in r.err and "Traceback" not in r.err


def test_bytes_changed_in_place_are_found_and_neighbours_in_the_block_are_not_reported(points, monkeypatch):
    """A file overwritten in place (same runs, same metadata): only the ranges in differing
    blocks are read, and of the files sharing those blocks only it is reported."""
    tmp, a, _, _ = points
    target = "/docs/note100.txt"
    with Stack.open(tmp / "repo") as stack:
        fs = PointFiles(stack, stack.repo.point(a)).filesystem(None)
        runs = fs.open_file(fs.stat(target)).volume_runs()
    assert runs and runs[0][2] >= 3100
    img = tmp / "c.img"
    img.write_bytes((tmp / "a.img").read_bytes())
    with open(img, "r+b") as f:  # a bare ext4 disk: volume offsets are disk offsets
        f.seek(runs[0][1] + 100)
        f.write(os.urandom(50))
    c = backup_images(tmp / "repo", [img], vm="web")
    reads: list[str] = []
    real = fsmod.TskFile.read
    monkeypatch.setattr(fsmod.TskFile, "read", lambda self, off, n: reads.append(self.entry.path) or real(self, off, n))
    r = ok("files", "diff", "--repo", tmp / "repo", a, c, "--json").json()
    assert r["changes"] == [{"path": target, "change": "modified", "type": "file", "content": True, "fields": []}]
    assert r["changed_blocks"] == [1]
    with Stack.open(tmp / "repo") as stack:
        pa, pc = PointFiles(stack, stack.repo.point(a)), PointFiles(stack, stack.repo.point(c))
        assert [ch.path for ch in diff(pa.filesystem(None), pc.filesystem(None), BlockDiff(pa.disks, pc.disks))] == [target]
    assert target in reads and "/keep.bin" not in reads and len(set(reads)) < 200


def test_a_looping_hostile_filesystem_ends():
    from tests.files.hostile_fs import hostile_fs

    assert list(diff(hostile_fs(), hostile_fs())) == []


def test_a_corrupted_chunk_makes_its_file_unreadable_and_the_rest_is_still_compared(tmp_path):
    from tests.cli import run
    from tests.files.test_ext4 import _corrupt_chunk_under

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(4 * MiB))
    (src / "b.txt").write_text("before\n")
    img = ext4_image(tmp_path / "d.img", src, 64 * MiB)
    a = backup_images(tmp_path / "repo", [img])
    with Stack.open(tmp_path / "repo") as stack:
        fs = PointFiles(stack, stack.repo.point(a)).filesystem(None)
        (_, voff, _), = fs.open_file(fs.stat("/a.bin")).volume_runs()  # type: ignore[misc]
        (_, boff, _), = fs.open_file(fs.stat("/b.txt")).volume_runs()  # type: ignore[misc]
    with open(img, "r+b") as f:  # both changed in place, same sizes and metadata
        f.seek(voff + 2 * MiB)
        f.write(os.urandom(4096))
        f.seek(boff)
        f.write(b"after!\n")
    b = backup_images(tmp_path / "repo", [img])
    _corrupt_chunk_under(tmp_path / "repo", b, voff + 2 * MiB)
    r = run("files", "diff", "--repo", tmp_path / "repo", a, b, "--json")
    assert r.rc == 1 and "Traceback" not in r.err
    changes = r.json()["changes"]
    assert [(c["path"], c["change"]) for c in changes] == [("/a.bin", "unreadable"), ("/b.txt", "modified")]
    assert "a.bin" in changes[0]["error"] and "disk0 offset" in changes[0]["error"]
    assert changes[1]["content"] is True
