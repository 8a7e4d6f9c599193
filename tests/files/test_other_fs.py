"""FAT32 (mkfs.vfat + mtools), NTFS (mkntfs + ntfscp), exFAT (mkfs.exfat, empty: no
tool fills one without a mount) read back; XFS, btrfs, swap, LUKS and an empty volume
named, never a traceback."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.cli import ok, run
from tests.conftest import require_tool
from tests.files.images import MiB, backup_images, sh, vfat_image

MTIME = 1_700_000_001  # odd: FAT keeps 2 s


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
    if kind == "xfs":
        require_tool("mkfs.xfs")
        sh("mkfs.xfs", "-q", "-f", img)
    elif kind == "btrfs":
        require_tool("mkfs.btrfs")
        (tmp_path / "rootdir").mkdir()
        (tmp_path / "rootdir" / "f").write_text("x")
        sh("mkfs.btrfs", "-q", "-f", "--rootdir", tmp_path / "rootdir", img)
    elif kind == "swap":
        require_tool("mkswap")
        sh("mkswap", img)
    elif kind == "luks":
        with open(img, "r+b") as f:  # a LUKS header's magic is all it takes to be named
            f.write(b"LUKS\xba\xbe\x00\x02" + os.urandom(4096))


@pytest.mark.parametrize(("kind", "named"), [("xfs", "holds XFS"), ("btrfs", "holds btrfs"), ("swap", "holds Linux swap"),
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
