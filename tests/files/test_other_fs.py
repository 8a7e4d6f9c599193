"""FAT32 (mkfs.vfat + mtools), NTFS (mkntfs + ntfscp), exFAT (mkfs.exfat, empty: no
tool fills one without a mount) read back; XFS (mkfs.xfs -p protofile) and btrfs
(mkfs.btrfs --rootdir) read through the optional dissect extra, or named without it;
swap, LUKS, an empty and a random volume named, never a traceback."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.cli import ok, run
from tests.conftest import require_tool
from tests.files.images import MiB, backup_images, sh, vfat_image

MTIME = 1_700_000_001  # odd: FAT keeps 2 s
GiB = 1 << 30


def test_fat32_contents_and_times(tmp_path):
    files = {"readme.txt": b"fat file\n", "Docs/Report 2026.doc": os.urandom(300_000), "empty.dat": b"",
             "Docs/Sub/deep.txt": b"deep\n"}
    img = vfat_image(tmp_path / "fat.img", 64 * MiB, files, tmp_path, mtime=MTIME)
    pid = backup_images(tmp_path / "repo", [img])
    doc = ok("files", "ls", "--repo", tmp_path / "repo", pid, "/", "--json").json()
    assert doc["filesystem"] == "fat32" and doc["journal"] is None
    assert {e["name"] for e in doc["entries"]} == {"readme.txt", "Docs", "empty.dat"}
    out = tmp_path / "out"
    r = ok("files", "get", "--repo", tmp_path / "repo", pid, "/", "-o", out, "--preserve", env={"TZ": "UTC"})
    assert "0 hard links" in r.out
    for name, data in files.items():
        p = out / name
        assert p.read_bytes() == data, name
        assert abs(p.stat().st_mtime - MTIME) <= 2, name  # FAT: 2 s resolution, local time (TZ=UTC here)
    assert ok("files", "cat", "--repo", tmp_path / "repo", pid, "/docs/sub/DEEP.TXT").out == "deep\n"  # FAT ignores case


def test_ntfs_files_written_with_ntfscp(tmp_path):
    require_tool("mkntfs", "ntfscp")
    img = tmp_path / "ntfs.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    sh("mkntfs", "-q", "-F", "-Q", "-L", "guest", img)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * MiB + 5))
    small = tmp_path / "small.txt"
    small.write_bytes(b"resident data\n")  # small enough to live inside its MFT record
    sh("ntfscp", "-f", img, big, "big.bin")
    sh("ntfscp", "-f", img, small, "Small.txt")
    pid = backup_images(tmp_path / "repo", [img])
    doc = ok("files", "ls", "--repo", tmp_path / "repo", pid, "--json").json()
    assert doc["filesystem"] == "ntfs" and "$LogFile not replayed" in doc["journal"]
    names = {e["name"] for e in doc["entries"]}
    assert {"big.bin", "Small.txt"} <= names and not any(n.startswith("$") for n in names)
    out = tmp_path / "out"
    ok("files", "get", "--repo", tmp_path / "repo", pid, "/big.bin", "/small.txt", "-o", out)
    assert (out / "big.bin").read_bytes() == big.read_bytes()
    assert (out / "Small.txt").read_bytes() == b"resident data\n"


def test_exfat_is_recognised_and_listed(tmp_path):
    require_tool("mkfs.exfat")
    img = tmp_path / "exfat.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    sh("mkfs.exfat", "-L", "guest", img)
    pid = backup_images(tmp_path / "repo", [img])
    doc = ok("files", "ls", "--repo", tmp_path / "repo", pid, "disk0", "/", "--json").json()
    assert doc["filesystem"] == "exfat"


def _mkfs(kind: str, img, tmp_path) -> None:
    if kind == "swap":
        require_tool("mkswap")
        sh("mkswap", img)
    elif kind == "luks":
        with open(img, "r+b") as f:  # a LUKS header's magic is all it takes to be named
            f.write(b"LUKS\xba\xbe\x00\x02" + os.urandom(4096))


@pytest.mark.parametrize(("kind", "named"), [("swap", "holds Linux swap"),
                                             ("luks", "holds LUKS encrypted volume"), ("zeros", "empty"),
                                             ("random", "unrecognised filesystem")])
def test_other_volumes_are_named_never_a_traceback(tmp_path, kind, named):
    img = tmp_path / f"{kind}.img"
    with open(img, "wb") as f:
        f.truncate(320 * MiB)
        if kind == "random":
            f.write(os.urandom(MiB))
    _mkfs(kind, img, tmp_path)
    pid = backup_images(tmp_path / "repo", [img])
    r = run("files", "ls", "--repo", tmp_path / "repo", pid, "disk0", "/")
    assert r.rc == 2 and f"disk0: {named}" in r.err and "Traceback" not in r.err
    doc = ok("files", "ls", "--repo", tmp_path / "repo", pid, "--json").json()
    (v,) = doc["volumes"]
    assert v["filesystem"] is None and named in v["note"]
    shutil.rmtree(tmp_path / "repo")


def _dissect(what: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"dissect.{what}") is not None


def _xfs_image(img, src, tmp_path) -> None:
    require_tool("mkfs.xfs")
    proto = tmp_path / "proto"
    proto.write_text(
        "/dev/null\n0 0\nd--755 0 0\n"
        f"hello ---644 0 0 {src / 'hello'}\n"
        f"big ---600 1000 1000 {src / 'big'}\n"
        "lnk l--777 0 0 hello\n"
        f"sub d--750 0 0\ndeep ---644 0 0 {src / 'sub' / 'deep'}\n$\n$\n")
    sh("mkfs.xfs", "-q", "-f", "-p", proto, img)


def _btrfs_image(img, src, tmp_path) -> None:
    require_tool("mkfs.btrfs")
    sh("mkfs.btrfs", "-q", "-f", "--rootdir", src, img)


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
def test_xfs_and_btrfs_read_through_the_optional_extra_or_named(tmp_path, kind):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "hello").write_text("hello\n")
    (src / "big").write_bytes(os.urandom(3 * MiB + 3))
    (src / "sub" / "deep").write_text("deep\n")
    os.chmod(src / "sub", 0o750)
    if kind == "btrfs":
        os.symlink("hello", src / "lnk")
        with open(src / "sparse", "wb") as f:
            f.truncate(GiB)
    img = tmp_path / f"{kind}.img"
    with open(img, "wb") as f:
        f.truncate(320 * MiB)
    (_xfs_image if kind == "xfs" else _btrfs_image)(img, src, tmp_path)
    pid = backup_images(tmp_path / "repo", [img])
    if not _dissect(kind):
        r = run("files", "ls", "--repo", tmp_path / "repo", pid, "disk0", "/")
        assert r.rc == 2 and f"needs the optional dissect.{kind}" in r.err
        return
    doc = ok("files", "ls", "--repo", tmp_path / "repo", pid, "/", "--json").json()
    assert doc["filesystem"] == kind
    assert (doc["journal"] is None) == (kind == "btrfs")
    by = {e["name"]: e for e in doc["entries"]}
    assert by["lnk"]["type"] == "symlink" and by["lnk"]["link"] == "hello"
    assert by["sub"]["mode"] == "0750"
    out = tmp_path / "out"
    ok("files", "get", "--repo", tmp_path / "repo", pid, "/", "-o", out, "--preserve")
    assert (out / "big").read_bytes() == (src / "big").read_bytes()
    assert (out / "sub" / "deep").read_text() == "deep\n" and os.readlink(out / "lnk") == "hello"
    if kind == "xfs":
        assert (out / "big").stat().st_uid == (1000 if os.geteuid() == 0 else os.geteuid())
    else:
        assert (out / "sparse").stat().st_size == GiB and (out / "sparse").stat().st_blocks == 0
    assert ok("files", "cat", "--repo", tmp_path / "repo", pid, "/sub/deep").out == "deep\n"


@pytest.mark.slow
def test_a_directory_of_100k_files_lists_and_extracts(tmp_path):
    """One directory of 100k files, listed and extracted through the CLI. Built as XFS
    (a protofile: 2 s), since ``mke2fs -d`` links names into an unindexed directory one
    by one and takes about 12 minutes for 100k."""
    require_tool("mkfs.xfs")
    assert _dissect("xfs"), "the test extra installs dissect.xfs"
    src = tmp_path / "src"
    src.mkdir()
    lines = ["/dev/null", "0 0", "d--755 0 0", "big d--755 0 0"]
    for i in range(100_000):
        f = src / f"{i:06d}"
        f.write_bytes(b"%d\n" % i)
        lines.append(f"file-{i:06d} ---644 0 0 {f}")
    (tmp_path / "proto").write_text("\n".join([*lines, "$", "$", ""]))
    img = tmp_path / "xfs.img"
    with open(img, "wb") as f:
        f.truncate(512 * MiB)
    sh("mkfs.xfs", "-q", "-f", "-p", tmp_path / "proto", img)
    repo = tmp_path / "repo"
    point = backup_images(repo, [img])
    r = ok("files", "find", "--repo", repo, point, "/big", "--name", "file-*")
    assert len(r.out.splitlines()) == 100_000
    out = tmp_path / "out"
    res = ok("files", "get", "--repo", repo, point, "/big", "-o", out, "--json").json()
    assert res["files"] == 100_000 and res["failed"] == []
    assert (out / "big" / "file-099999").read_bytes() == b"99999\n"
    assert len(os.listdir(out / "big")) == 100_000
