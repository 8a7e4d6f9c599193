"""A restore point of several disks: GPT (FAT32 + ext4), MBR with a logical partition,
an LVM2 PV whose LV lies in two segments; ``files ls`` without a volume lists them all
and the other commands ask which one, by name."""
from __future__ import annotations

import os

import pytest

from tests.cli import ok, run
from tests.files.images import (
    MiB,
    backup_images,
    ext4_image,
    lvm_pv,
    lvm_text,
    lvm_uuid,
    part_offsets,
    partitioned,
    put,
    vfat_image,
)


@pytest.fixture(scope="module")
def point(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    # disk0: GPT, an EFI system partition (FAT32) and an ext4 root
    esp_src = {"EFI/BOOT/BOOTX64.EFI": b"MZ" + bytes(1000), "hello.txt": b"from the ESP\n"}
    esp = vfat_image(tmp / "esp.img", 40 * MiB, esp_src, tmp)
    (tmp / "root").mkdir()
    (tmp / "root" / "hello").write_text("from the GPT root\n")
    root = ext4_image(tmp / "root.img", tmp / "root", 32 * MiB)
    d0 = partitioned(tmp / "d0.img", 96 * MiB, "gpt", [
        "start=2048, size=81920, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        "start=83968, size=65536, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4"])
    (p1, _), (p2, _) = part_offsets(d0)
    put(d0, p1, esp)
    put(d0, p2, root)
    # disk1: MBR, a primary swap-typed partition and ext4 in logical partition 5
    (tmp / "logical").mkdir()
    (tmp / "logical" / "hello").write_text("from a logical partition\n")
    lg = ext4_image(tmp / "lg.img", tmp / "logical", 16 * MiB)
    d1 = partitioned(tmp / "d1.img", 48 * MiB, "dos", [
        "start=2048, size=8192, type=82", "start=12288, type=5", "start=14336, size=32768, type=83"])
    put(d1, part_offsets(d1)[1][0], lg)
    with open(d1, "r+b") as f:  # something no tool knows in the swap-typed partition
        f.seek(part_offsets(d1)[0][0])
        f.write(os.urandom(64 * 1024))
    # disk2: a whole-disk LVM2 PV; vg0/root is 12 MiB in two segments (PE 0-1, then PE 3)
    (tmp / "lv").mkdir()
    (tmp / "lv" / "big.bin").write_bytes(os.urandom(6 * MiB))
    (tmp / "lv" / "hello").write_text("from an LVM logical volume\n")
    lv = ext4_image(tmp / "lv.img", tmp / "lv", 12 * MiB)
    d2 = tmp / "d2.img"
    with open(d2, "wb") as f:
        f.truncate(40 * MiB)
    u = lvm_uuid()
    lvm_pv(d2, 0, 40 * MiB, u, lvm_text("vg0", {"pv0": (u, 9)}, {"root": [("pv0", 0, 2), ("pv0", 3, 1)],
                                                                   "thin1": "thin"}))
    data = lv.read_bytes()
    with open(d2, "r+b") as f:
        f.seek(2 * MiB)
        f.write(data[: 8 * MiB])
        f.seek(2 * MiB + 12 * MiB)
        f.write(data[8 * MiB :])
    return tmp, backup_images(tmp / "repo", [d0, d1, d2], vm="multi"), tmp / "lv"


def test_ls_without_a_volume_lists_every_volume_and_what_is_on_it(point):
    tmp, pid, _ = point
    doc = ok("files", "ls", "--repo", tmp / "repo", pid, "--json").json()
    got = {v["name"]: (v["filesystem"], v["readable"]) for v in doc["volumes"]}
    assert got == {
        "disk0": (None, True), "disk0:1": ("fat32", True), "disk0:2": ("ext4", True),
        "disk1": (None, True), "disk1:1": (None, True), "disk1:5": ("ext4", True),
        "disk2": (None, True), "disk2:vg0/root": ("ext4", True), "disk2:vg0/thin1": (None, False),
    }
    notes = {v["name"]: v["note"] for v in doc["volumes"]}
    assert notes["disk0"] == "holds a partition table" and notes["disk2"] == "holds an LVM2 physical volume"
    assert "only linear logical volumes are read" in notes["disk2:vg0/thin1"]
    assert notes["disk1:1"] == "unrecognised filesystem"
    text = ok("files", "ls", "--repo", tmp / "repo", pid).out
    assert "disk2:vg0/root" in text and "Linux filesystem" in text and "EFI system" in text


def test_each_filesystem_by_its_name_and_a_missing_choice_is_explained(point):
    tmp, pid, lvsrc = point
    repo = tmp / "repo"
    assert ok("files", "cat", "--repo", repo, pid, "disk0:2", "/hello").out == "from the GPT root\n"
    assert ok("files", "cat", "--repo", repo, pid, "disk0:1", "/HELLO.TXT").out == "from the ESP\n"
    assert ok("files", "cat", "--repo", repo, pid, "disk1:5", "/hello").out == "from a logical partition\n"
    assert ok("files", "cat", "--repo", repo, pid, "vg0/root", "/hello").out == "from an LVM logical volume\n"
    assert ok("files", "cat", "--repo", repo, pid, "multi_2:vg0/root", "/hello").out == "from an LVM logical volume\n"
    out = tmp / "out"
    ok("files", "get", "--repo", repo, pid, "disk2:vg0/root", "/big.bin", "-o", out)
    assert (out / "big.bin").read_bytes() == (lvsrc / "big.bin").read_bytes()  # across both segments
    r = run("files", "cat", "--repo", repo, pid, "/hello")
    assert r.rc == 2 and "has 4 filesystems: name one of them (DISK:PART): disk0:1 (fat32), disk0:2 (ext4)" in r.err
    r = run("files", "ls", "--repo", repo, pid, "disk2", "/")
    assert r.rc == 2 and "disk2 holds an LVM2 physical volume, not a filesystem" in r.err
    r = run("files", "ls", "--repo", repo, pid, "disk2:vg0/thin1")
    assert r.rc == 2 and "disk2:vg0/thin1 cannot be read: segment 1 is thin" in r.err
    r = run("files", "ls", "--repo", repo, pid, "disk1:1")
    assert r.rc == 2 and "disk1:1: unrecognised filesystem" in r.err
    r = run("files", "ls", "--repo", repo, pid, "disk2:vg0/root", "/", "--json")
    assert r.json()["filesystem"] == "ext4"
    r = run("files", "ls", "--repo", repo, pid, "sub/dir")
    assert r.rc == 2 and "no volume 'sub/dir'" in r.err and "Traceback" not in r.err
