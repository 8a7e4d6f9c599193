"""Volumes: MBR (with logical partitions), GPT, LVM2 (real lvm2 fixtures and the test
builder), bare disks, and hostile tables (a clear VolumeError, never a traceback)."""
from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.files.volumes import VolumeError, VolumeReader, find_volumes, parse_lvm_text
from tests.files.images import MiB, lvm_pv, lvm_text, lvm_uuid, part_offsets, partitioned

DATA = Path(__file__).parent / "data"


class Mem:
    """A disk in memory."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytes(data)
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def file_disk(path: Path) -> Mem:
    return Mem(path.read_bytes())


def test_a_disk_without_a_table_is_one_volume():
    layout = find_volumes([Mem(bytes(4 * MiB))])
    assert [(v.name, v.kind, v.size, v.contains) for v in layout.volumes] == [("disk0", "disk", 4 * MiB, "")]


def test_mbr_primary_and_logical_partitions_match_sfdisk(tmp_path):
    img = partitioned(tmp_path / "d.img", 64 * MiB, "dos", [
        "start=2048, size=8192, type=83", "start=10240, size=8192, type=82",
        "start=20480, type=5", "start=22528, size=4096, type=83", "start=28672, size=4096, type=7",
    ])
    want = part_offsets(img)
    layout = find_volumes([file_disk(img)])
    vols = [v for v in layout.volumes if v.kind == "mbr"]
    assert [v.name for v in vols] == ["disk0:1", "disk0:2", "disk0:5", "disk0:6"]
    got = [(v.extents[0].disk_offset, v.size) for v in vols]
    assert got == want
    assert vols[1].label == "Linux swap" and vols[3].label == "NTFS/exFAT"
    assert layout.volumes[0].contains == "a partition table"


def test_gpt_matches_sfdisk_and_the_backup_header_is_used_when_the_primary_is_damaged(tmp_path):
    img = partitioned(tmp_path / "g.img", 64 * MiB, "gpt", [
        "start=2048, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp",
        "start=18432, size=30000, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    ])
    want = part_offsets(img)
    vols = [v for v in find_volumes([file_disk(img)]).volumes if v.kind == "gpt"]
    assert [(v.extents[0].disk_offset, v.size) for v in vols] == want
    assert [v.name for v in vols] == ["disk0:1", "disk0:2"]
    assert vols[0].label == "EFI system 'esp'" and vols[1].label == "Linux filesystem"
    data = bytearray(img.read_bytes())
    data[512 + 60] ^= 0xFF  # the primary header's disk GUID: its CRC fails
    vols2 = [v for v in find_volumes([Mem(data)]).volumes if v.kind == "gpt"]
    assert [(v.extents[0].disk_offset, v.size) for v in vols2] == want
    data[-512 + 60] ^= 0xFF  # and the backup's: the disk is listed, unreadable, saying why
    (v,) = find_volumes([Mem(data)]).volumes
    assert v.name == "disk0" and not v.readable
    assert v.why.startswith("disk0: the GPT cannot be read (primary GPT: header checksum mismatch")


def test_a_looping_chain_of_logical_partitions_makes_that_disk_unreadable_naming_it():
    d = bytearray(4 * MiB)
    d[510:512] = b"\x55\xaa"
    struct.pack_into("<B3xB3xII", d, 446, 0, 0x05, 100, 1000)
    ebr = 100 * 512
    d[ebr + 510 : ebr + 512] = b"\x55\xaa"
    struct.pack_into("<B3xB3xII", d, ebr + 446, 0, 0x83, 1, 10)
    struct.pack_into("<B3xB3xII", d, ebr + 462, 0, 0x05, 0, 10)  # next EBR: itself (relative 0 is "none")
    assert [v.name for v in find_volumes([Mem(d)]).volumes] == ["disk0", "disk0:5"]
    # the first EBR points at a second (sector 100 + 200), which points back at itself
    struct.pack_into("<B3xB3xII", d, ebr + 462, 0, 0x05, 200, 10)
    ebr2 = 300 * 512
    d[ebr2 + 510 : ebr2 + 512] = b"\x55\xaa"
    struct.pack_into("<B3xB3xII", d, ebr2 + 462, 0, 0x05, 200, 10)
    bad, good = find_volumes([Mem(d), Mem(bytes(MiB))]).volumes  # the other disk is still listed
    assert (bad.name, bad.readable, good.name, good.readable) == ("disk0", False, "disk1", True)
    assert bad.why.startswith("disk0: the chain of logical partitions loops")


def test_a_partition_past_the_end_of_the_disk_is_listed_as_unreadable():
    d = bytearray(MiB)
    d[510:512] = b"\x55\xaa"
    struct.pack_into("<B3xB3xII", d, 446, 0, 0x83, 2048, 100_000)
    (v,) = [v for v in find_volumes([Mem(d)]).volumes if v.kind == "mbr"]
    assert not v.readable and "past the end of the disk" in v.why
    with pytest.raises(VolumeError, match="disk0:1 cannot be read"):
        VolumeReader(v, [Mem(d)])


# -- LVM2 ----------------------------------------------------------------------------------


def real_pvs() -> list[Mem]:
    return [Mem(lzma.decompress((DATA / f"lvm-pv{i}.img.xz").read_bytes())) for i in (0, 1)]


def test_the_real_lvm2_fixture_parses_as_lvm2_reported_it():
    """tests/files/data/README.md: what lvs --segments said, in bytes (4 MiB extents, PE 0 at 2 MiB)."""
    layout = find_volumes(real_pvs())
    ext, pe0 = 4 * MiB, 2 * MiB
    lvs = {v.name: v for v in layout.volumes if v.kind == "lvm"}
    assert sorted(lvs) == ["disk0:tvg/data", "disk0:tvg/root", "disk0:tvg/striped"]
    assert [(e.offset, e.disk, e.disk_offset, e.length) for e in lvs["disk0:tvg/root"].extents] == [
        (0, 0, pe0, 2 * ext), (2 * ext, 0, pe0 + 3 * ext, ext)]
    assert [(e.offset, e.disk, e.disk_offset, e.length) for e in lvs["disk0:tvg/data"].extents] == [
        (0, 0, pe0 + 2 * ext, ext), (ext, 1, pe0 + ext, ext)]
    s = lvs["disk0:tvg/striped"]
    assert not s.readable and "striped over 2" in s.why
    assert [pv.uuid for pv in layout.pvs] == ["BWgl75axxn0iIBa4P8bCZ7gB9SaDLnsh", "uQwtj3sgUZlWph7n8VmU0t7sQoR29leT"]
    assert layout.find("tvg/root") is lvs["disk0:tvg/root"]


def test_an_lv_whose_pv_is_missing_is_unreadable():
    (pv0, _pv1) = real_pvs()
    lvs = {v.name: v for v in find_volumes([pv0]).volumes if v.kind == "lvm"}
    assert lvs["disk0:tvg/root"].readable
    assert not lvs["disk0:tvg/data"].readable and "not on any disk of this restore point" in lvs["disk0:tvg/data"].why


def test_reading_an_lv_crosses_its_segments_and_disks():
    pv0, pv1 = real_pvs()
    a, b = bytearray(pv0.data), bytearray(pv1.data)
    ext, pe0 = 4 * MiB, 2 * MiB
    a[pe0 + 2 * ext : pe0 + 3 * ext] = b"A" * ext  # data: segment 1 on disk0 PE 2
    b[pe0 + ext : pe0 + 2 * ext] = b"B" * ext  # segment 2 on disk1 PE 1
    layout = find_volumes([Mem(a), Mem(b)])
    r = VolumeReader(layout.find("disk0:tvg/data"), [Mem(a), Mem(b)])
    assert r.size == 2 * ext
    assert r.read(ext - 3, 6) == b"AAABBB"
    assert r.read(0, 3 * ext) == b"A" * ext + b"B" * ext
    assert r.disk_offset(ext + 5) == (1, pe0 + ext + 5)


def test_the_builder_writes_what_the_parser_reads_like_the_real_thing(tmp_path):
    disk = tmp_path / "pv.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    u = lvm_uuid()
    text = lvm_text("vg0", {"pv0": (u, 15)}, {"root": [("pv0", 0, 2), ("pv0", 5, 1)], "pool": "thin-pool",
                                             "t": "thin"})
    lvm_pv(disk, 0, 64 * MiB, u, text)
    layout = find_volumes([file_disk(disk)])
    lvs = {v.name: v for v in layout.volumes if v.kind == "lvm"}
    ext = 4 * MiB
    assert [(e.offset, e.disk_offset, e.length) for e in lvs["disk0:vg0/root"].extents] == [
        (0, 2 * MiB, 2 * ext), (2 * ext, 2 * MiB + 5 * ext, ext)]
    assert "segment 1 is thin" in lvs["disk0:vg0/t"].why
    assert "thin-pool" in lvs["disk0:vg0/pool"].why


def test_lvm_text_parser_handles_comments_escapes_and_nesting_and_refuses_garbage():
    meta = parse_lvm_text('# c\nvg { a = "x\\"y" # tail\n b = [1, "two"]\n s { n = -3 } }\nversion = 1\n')
    assert meta == {"vg": {"a": 'x"y', "b": [1, "two"], "s": {"n": -3}}, "version": 1}
    for bad in ("vg {", "vg = ", "= 3", "vg { a = { } }", "a " + "{ b " * 100):
        with pytest.raises(VolumeError):
            parse_lvm_text(bad)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=2048), st.integers(0, 8 * 1024), st.sampled_from(["mbr", "gpt", "lvm"]))
def test_hostile_tables_give_unreadable_volumes_never_tracebacks(junk, where, base):
    d = bytearray(2 * MiB)
    if base == "mbr":
        d[510:512] = b"\x55\xaa"
        struct.pack_into("<B3xB3xII", d, 446, 0, 0x05, 8, 1000)
    elif base == "gpt":
        d[510:512] = b"\x55\xaa"
        struct.pack_into("<B3xB3xII", d, 446, 0, 0xEE, 1, 4095)
        d[512:520] = b"EFI PART"
    else:
        d[512:520] = b"LABELONE"
        d[536:544] = b"LVM2 001"
        struct.pack_into("<I", d, 532, 32)
    d[where : where + len(junk)] = junk
    d = d[: 2 * MiB]
    layout = find_volumes([Mem(d)])  # never raises: a bad table is an unreadable volume
    for v in layout.volumes:
        assert v.readable or v.why.startswith(("disk0", "it ends", "its ", "segment", "LVM2")), v.why
        if v.readable:
            r = VolumeReader(v, [Mem(d)])
            r.read(0, 4096)
