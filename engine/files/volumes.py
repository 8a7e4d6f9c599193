"""What is on a disk: partition tables, LVM logical volumes, or a bare filesystem.

Given disks (anything with ``size`` and ``read(offset, length)``, as ``engine.disk``
offers), ``find_volumes`` returns every volume a filesystem may live on, each a readable
slice (``Volume.read``) named the way users type it: ``disk0`` (a whole disk without a
partition table), ``disk0:1`` (MBR primary 1-4, logical 5+, GPT entry 1+),
``disk0:vg0/root`` (an LVM2 logical volume; its disk is the one holding its first
segment). Understood: MBR with its extended/logical chain, GPT behind its protective
MBR (primary header, else the backup; both CRCs checked), LVM2 physical volumes on a
whole disk or a partition (the label, the metadata area's newest text, linear
segments, possibly spread over several PVs of several disks). An LV of another segment
type (striped over several PVs, thin, raid, mirror, snapshot, cache...) is listed
with ``readable`` False and the reason.

A disk is hostile input: every table is bounds-checked against the disk, loops are
bounded (logical partitions, GPT entries, metadata size, nesting of the LVM text) and
a table that does not hold together raises ``VolumeError`` naming the disk and what is
wrong, never a traceback. Nothing is cached here: reads go to the disk below (whose
decompression cache and readahead serve the repeated ones). Sectors are 512 bytes
(a GPT written for 4096-byte sectors is found too). Immutable values, no threads.
"""
from __future__ import annotations

import bisect
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.errors import InstantNFSError

SECTOR = 512
MAX_LOGICAL = 128  # logical partitions followed in an extended partition's chain
MAX_GPT_ENTRIES = 1024
MAX_LVM_TEXT = 4 << 20  # bytes of LVM metadata text read
MAX_LVM_DEPTH = 32

EXTENDED_TYPES = {0x05, 0x0F, 0x85}
MBR_TYPES = {
    0x01: "FAT12", 0x04: "FAT16", 0x06: "FAT16", 0x07: "NTFS/exFAT", 0x0B: "FAT32", 0x0C: "FAT32 (LBA)",
    0x0E: "FAT16 (LBA)", 0x27: "Windows recovery", 0x82: "Linux swap", 0x83: "Linux", 0x8E: "Linux LVM",
    0xA5: "FreeBSD", 0xA8: "macOS", 0xAF: "HFS+", 0xEE: "GPT protective", 0xEF: "EFI system", 0xFD: "Linux RAID",
}
GPT_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI system",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "48465300-0000-11aa-aa11-00306543ecac": "HFS+",
}


class VolumeError(InstantNFSError):
    """The disk's partition table or LVM metadata cannot be read."""


class Readable(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes at ``offset`` in the volume are at ``disk_offset`` of disk ``disk``."""

    offset: int
    disk: int
    disk_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Volume:
    """A place a filesystem may be: a whole disk, a partition or a logical volume."""

    name: str  # as users type it: disk0, disk0:1, disk0:vg0/root
    disk: int  # index of the (first) disk it is on
    kind: str  # disk, mbr, gpt, lvm
    size: int
    label: str  # partition type, GPT name, LV segment type...
    extents: tuple[Extent, ...] = ()
    readable: bool = True
    why: str = ""  # why not readable
    contains: str = ""  # "a partition table", "an LVM2 physical volume": not a filesystem itself

    @property
    def part(self) -> str:
        return self.name.partition(":")[2]

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "size": self.size, "label": self.label,
                "readable": self.readable, "why": self.why or None, "contains": self.contains or None}


class VolumeReader:
    """The bytes of one volume, read through its disks: ``size`` and ``read`` (cut at the end)."""

    def __init__(self, volume: Volume, disks: Sequence[Readable]) -> None:
        if not volume.readable:
            raise VolumeError(f"{volume.name} cannot be read: {volume.why}")
        self.volume = volume
        self.size = volume.size
        self._disks = disks
        self._ext = volume.extents
        self._starts = [e.offset for e in self._ext]

    def disk_offset(self, offset: int) -> tuple[int, int]:
        """(disk index, offset on that disk) of a byte of the volume."""
        e = self._ext[max(0, bisect.bisect_right(self._starts, offset) - 1)]
        return e.disk, e.disk_offset + (offset - e.offset)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        length = max(0, min(length, self.size - offset))
        out = []
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while length > 0 and i < len(self._ext):
            e = self._ext[i]
            skip = offset - e.offset
            take = min(length, e.length - skip)
            if take <= 0:
                i += 1
                continue
            out.append(self._disks[e.disk].read(e.disk_offset + skip, take))
            offset += take
            length -= take
            i += 1
        return b"".join(out)


# -- partition tables ----------------------------------------------------------------------


def _read(disk: Readable, name: str, offset: int, length: int) -> bytes:
    if offset < 0 or offset + length > disk.size:
        raise VolumeError(f"{name}: a table points past the end of the disk (offset {offset}, disk size {disk.size})")
    return disk.read(offset, length)


def _looks_like_boot_sector(s: bytes) -> bool:
    """A filesystem's boot sector (FAT, NTFS, exFAT) also ends in 55 AA: not an MBR."""
    if s[3:11] in (b"NTFS    ", b"EXFAT   ") or s[3:11] == b"-FVE-FS-":
        return True
    bps = int.from_bytes(s[11:13], "little")
    return s[0] in (0xEB, 0xE9) and bps in (512, 1024, 2048, 4096) and (s[54:57] == b"FAT" or s[82:87] == b"FAT32")


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """(slot 1-4, type, first LBA, sectors) of the non-empty entries; ValueError if not an MBR."""
    out = []
    for i in range(4):
        status, ptype, lba, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * i)
        if status not in (0, 0x80):
            raise ValueError(f"partition entry {i + 1} has status {status:#x}")
        if ptype and count:
            out.append((i + 1, ptype, lba, count))
    return out


def _part(disk_i: int, number: int, kind: str, start: int, size: int, label: str, disk: Readable) -> Volume:
    name = f"disk{disk_i}:{number}"
    if start + size > disk.size:
        return Volume(name, disk_i, kind, size, label, readable=False,
                      why=f"it ends at byte {start + size}, past the end of the disk ({disk.size})")
    return Volume(name, disk_i, kind, size, label, (Extent(0, disk_i, start, size),))


def partitions(disk_i: int, disk: Readable) -> list[Volume] | None:
    """The partitions of a disk, or None when it has no partition table."""
    name = f"disk{disk_i}"
    if disk.size < SECTOR:
        return None
    s0 = disk.read(0, SECTOR)
    if s0[510:512] != b"\x55\xaa" or _looks_like_boot_sector(s0):
        return _gpt(disk_i, disk, name) if _gpt_header_at(disk, SECTOR) else None
    try:
        entries = _mbr_entries(s0)
    except ValueError:
        return None  # 55 AA but no sane entries: not a table we know
    if any(t == 0xEE for _slot, t, _l, _c in entries):
        return _gpt(disk_i, disk, name)
    out: list[Volume] = []
    for slot, ptype, lba, count in entries:
        label = MBR_TYPES.get(ptype, f"type {ptype:#04x}")
        if ptype in EXTENDED_TYPES:
            out.extend(_logical(disk_i, disk, name, lba))
            continue
        out.append(_part(disk_i, slot, "mbr", lba * SECTOR, count * SECTOR, label, disk))
    return out


def _logical(disk_i: int, disk: Readable, name: str, ext_lba: int) -> list[Volume]:
    out = []
    seen: set[int] = set()
    ebr = ext_lba
    number = 5
    while True:
        if ebr in seen:
            raise VolumeError(f"{name}: the chain of logical partitions loops (at sector {ebr})")
        if len(seen) >= MAX_LOGICAL:
            raise VolumeError(f"{name}: more than {MAX_LOGICAL} logical partitions")
        seen.add(ebr)
        s = _read(disk, name, ebr * SECTOR, SECTOR)
        if s[510:512] != b"\x55\xaa":
            raise VolumeError(f"{name}: no extended boot record at sector {ebr} (logical partition {number})")
        _s1, ptype, rel, count = struct.unpack_from("<B3xB3xII", s, 446)
        _s2, ntype, nrel, _ncount = struct.unpack_from("<B3xB3xII", s, 462)
        if ptype and count:
            out.append(_part(disk_i, number, "mbr", (ebr + rel) * SECTOR, count * SECTOR,
                             MBR_TYPES.get(ptype, f"type {ptype:#04x}"), disk))
            number += 1
        if not ntype or not nrel:
            return out
        ebr = ext_lba + nrel


def _gpt_header_at(disk: Readable, offset: int) -> bool:
    return disk.size >= offset + 92 and disk.read(offset, 8) == b"EFI PART"


def _gpt(disk_i: int, disk: Readable, name: str) -> list[Volume]:
    problems = []
    for sector in (SECTOR, 4096):
        if not _gpt_header_at(disk, sector):
            continue
        candidates = [sector]
        hdr = disk.read(sector, 92)
        backup = struct.unpack_from("<Q", hdr, 32)[0] * sector
        if 0 < backup <= disk.size - sector:
            candidates.append(backup)
        last = disk.size // sector * sector - sector
        if last not in candidates:
            candidates.append(last)
        for where in candidates:
            try:
                return _gpt_table(disk_i, disk, name, sector, where)
            except ValueError as e:
                problems.append(f"{'primary' if where == sector else 'backup'} GPT: {e}")
    raise VolumeError(f"{name}: the GPT cannot be read ({'; '.join(problems) or 'no GPT header behind the protective MBR'})")


def _gpt_table(disk_i: int, disk: Readable, name: str, sector: int, where: int) -> list[Volume]:
    if disk.read(where, 8) != b"EFI PART":
        raise ValueError(f"no header at byte {where}")
    hdr = disk.read(where, 92)
    hsize = struct.unpack_from("<I", hdr, 12)[0]
    if not 92 <= hsize <= sector:
        raise ValueError(f"header size {hsize}")
    hdr = disk.read(where, hsize)
    crc = struct.unpack_from("<I", hdr, 16)[0]
    if zlib.crc32(hdr[:16] + b"\0\0\0\0" + hdr[20:]) != crc:
        raise ValueError("header checksum mismatch")
    first, last = struct.unpack_from("<QQ", hdr, 40)
    table_lba, count, esize, ecrc = struct.unpack_from("<QIII", hdr, 72)
    if count > MAX_GPT_ENTRIES or esize < 128 or esize > 4096 or esize % 8:
        raise ValueError(f"{count} entries of {esize} bytes")
    table_off = table_lba * sector
    if table_off + count * esize > disk.size:
        raise ValueError("the entry array is past the end of the disk")
    table = disk.read(table_off, count * esize)
    if zlib.crc32(table) != ecrc:
        raise ValueError("entry array checksum mismatch")
    out = []
    for i in range(count):
        e = table[i * esize : (i + 1) * esize]
        if not any(e[:16]):
            continue
        tguid = _guid(e[:16])
        lo, hi = struct.unpack_from("<QQ", e, 32)
        pname = e[56:128].decode("utf-16-le", "replace").split("\0")[0]
        if hi < lo:
            out.append(Volume(f"disk{disk_i}:{i + 1}", disk_i, "gpt", 0, pname, readable=False,
                              why=f"it ends (sector {hi}) before it starts ({lo})"))
            continue
        label = GPT_TYPES.get(tguid, tguid) + (f" {pname!r}" if pname else "")
        out.append(_part(disk_i, i + 1, "gpt", lo * sector, (hi - lo + 1) * sector, label, disk))
    return out


def _guid(b: bytes) -> str:
    a, b2, c = struct.unpack_from("<IHH", b)
    return f"{a:08x}-{b2:04x}-{c:04x}-{b[8:10].hex()}-{b[10:16].hex()}"


# -- LVM2 ----------------------------------------------------------------------------------

MDA_MAGIC = b" LVM2 x[5A%r0N*>"


@dataclass(frozen=True, slots=True)
class PhysicalVolume:
    uuid: str  # 32 characters, no dashes
    disk: int
    offset: int  # of the PV on the disk
    size: int
    metadata: str  # the newest metadata text of its first metadata area ('' when it has none)


def pv_label(disk: Readable, disk_i: int, offset: int, size: int, where: str) -> PhysicalVolume | None:
    """The LVM2 PV whose label is in one of the first four sectors at ``offset``, or None."""
    if size < 4 * SECTOR:
        return None
    head = disk.read(offset, 4 * SECTOR)
    for i in range(4):
        s = head[i * SECTOR : (i + 1) * SECTOR]
        if s[:8] != b"LABELONE" or s[24:32] != b"LVM2 001":
            continue
        pvh = struct.unpack_from("<I", s, 20)[0]
        if not 32 <= pvh <= SECTOR - 48:
            raise VolumeError(f"{where}: LVM2 label with a PV header at {pvh}")
        uuid = s[pvh : pvh + 32].decode("ascii", "replace")
        pos = pvh + 40
        areas: list[list[tuple[int, int]]] = [[], []]  # data areas, then metadata areas
        which = 0
        while which < 2:
            if pos + 16 > SECTOR:
                raise VolumeError(f"{where}: LVM2 PV header runs past its sector")
            off, sz = struct.unpack_from("<QQ", s, pos)
            pos += 16
            if off == 0 and sz == 0:
                which += 1
                continue
            areas[which].append((off, sz))
        text = ""
        if areas[1]:
            text = _mda_text(disk, offset, size, areas[1][0], where)
        return PhysicalVolume(uuid, disk_i, offset, size, text)
    return None


def _mda_text(disk: Readable, pv_off: int, pv_size: int, area: tuple[int, int], where: str) -> str:
    start, size = area
    if start + size > pv_size or size < SECTOR:
        raise VolumeError(f"{where}: LVM2 metadata area past the end of the PV")
    hdr = disk.read(pv_off + start, SECTOR)
    if hdr[4:20] != MDA_MAGIC:
        raise VolumeError(f"{where}: LVM2 metadata area without its magic")
    roff, rsize, _crc, _flags = struct.unpack_from("<QQII", hdr, 40)
    if rsize == 0:
        return ""
    if rsize > min(MAX_LVM_TEXT, size) or roff >= size or roff < SECTOR:
        raise VolumeError(f"{where}: LVM2 metadata of {rsize} bytes at {roff} in an area of {size}")
    first = min(rsize, size - roff)
    raw = disk.read(pv_off + start + roff, first)
    if first < rsize:  # the circular buffer wraps to just after its header
        raw += disk.read(pv_off + start + SECTOR, rsize - first)
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([-+]?\d+(?:\.\d+)?)|([A-Za-z_][\w.+-]*)|([={}\[\],]))', re.S)


def parse_lvm_text(text: str, where: str = "LVM2 metadata") -> dict:
    """The LVM2 metadata text as nested dicts (sections), lists and scalars."""
    pos = 0
    toks: list[tuple[str, object]] = []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            if text[pos:].strip() == "":
                break
            raise VolumeError(f"{where}: cannot parse the metadata text at character {pos}")
        pos = m.end()
        if m.group(1) is not None:
            continue
        if m.group(2) is not None:
            toks.append(("s", re.sub(r"\\(.)", r"\1", m.group(2)[1:-1])))
        elif m.group(3) is not None:
            toks.append(("n", float(m.group(3)) if "." in m.group(3) else int(m.group(3))))
        elif m.group(4) is not None:
            toks.append(("w", m.group(4)))
        else:
            toks.append(("p", m.group(5)))
    i = 0

    def bad(msg: str) -> VolumeError:
        return VolumeError(f"{where}: {msg}")

    def section(depth: int, closing: str | None) -> dict:
        nonlocal i
        if depth > MAX_LVM_DEPTH:
            raise bad("sections nested too deep")
        out: dict = {}
        while i < len(toks):
            kind, val = toks[i]
            if kind == "p" and val == closing:
                i += 1
                return out
            if kind != "w":
                raise bad(f"expected a name, found {val!r}")
            i += 1
            if i >= len(toks):
                raise bad("ends inside a section")
            k2, v2 = toks[i]
            i += 1
            if (k2, v2) == ("p", "{"):
                out[str(val)] = section(depth + 1, "}")
            elif (k2, v2) == ("p", "="):
                out[str(val)] = value()
            else:
                raise bad(f"expected '=' or '{{' after {val!r}")
        if closing is not None:
            raise bad("a section is not closed")
        return out

    def value() -> object:
        nonlocal i
        if i >= len(toks):
            raise bad("ends before a value")
        kind, val = toks[i]
        i += 1
        if kind in ("s", "n"):
            return val
        if (kind, val) == ("p", "["):
            items: list = []
            while i < len(toks) and toks[i] != ("p", "]"):
                k, v = toks[i]
                i += 1
                if (k, v) == ("p", ","):
                    continue
                if k not in ("s", "n"):
                    raise bad(f"unexpected {v!r} in a list")
                items.append(v)
            i += 1
            return items
        raise bad(f"unexpected {val!r} as a value")

    return section(0, None)


def logical_volumes(pvs: Sequence[PhysicalVolume]) -> list[Volume]:
    """The visible logical volumes of the volume groups described by these PVs."""
    by_uuid = {pv.uuid: pv for pv in pvs}
    groups: dict[str, tuple[int, dict]] = {}  # vg name -> (seqno, its section)
    for pv in pvs:
        if not pv.metadata:
            continue
        where = f"disk{pv.disk}: LVM2 metadata"
        meta = parse_lvm_text(pv.metadata, where)
        for vg, sec in meta.items():
            if isinstance(sec, dict) and "physical_volumes" in sec:
                seq = sec.get("seqno", 0)
                if not isinstance(seq, int):
                    raise VolumeError(f"{where}: bad seqno of {vg}")
                if vg not in groups or seq > groups[vg][0]:
                    groups[vg] = (seq, sec)
    out = []
    for vg, (_seq, sec) in sorted(groups.items()):
        out.extend(_vg_volumes(vg, sec, by_uuid))
    return out


def _num(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or v < 0:
        raise VolumeError(f"{where}: {key} is missing or not a count")
    return v


def _vg_volumes(vg: str, sec: dict, by_uuid: dict[str, PhysicalVolume]) -> list[Volume]:
    where = f"LVM2 volume group {vg}"
    ext = _num(sec, "extent_size", where) * SECTOR
    if ext == 0:
        raise VolumeError(f"{where}: extent size 0")
    pvmap: dict[str, tuple[PhysicalVolume | None, int]] = {}
    for key, pv in (sec.get("physical_volumes") or {}).items():
        if not isinstance(pv, dict):
            continue
        uuid = str(pv.get("id", "")).replace("-", "")
        pvmap[key] = (by_uuid.get(uuid), _num(pv, "pe_start", f"{where} PV {key}") * SECTOR)
    home = next((p.disk for p, _ in pvmap.values() if p is not None), 0)
    out = []
    for lv, lsec in (sec.get("logical_volumes") or {}).items():
        if not isinstance(lsec, dict) or "VISIBLE" not in (lsec.get("status") or []):
            continue
        lwhere = f"{where} LV {lv}"
        extents: list[Extent] = []
        why = ""
        kinds = []
        count = _num(lsec, "segment_count", lwhere)
        if count > 100_000:
            raise VolumeError(f"{lwhere}: {count} segments")
        disk = home
        for n in range(1, count + 1):
            seg = lsec.get(f"segment{n}")
            if not isinstance(seg, dict):
                raise VolumeError(f"{lwhere}: segment {n} is missing")
            stype = str(seg.get("type", "?"))
            start, length = _num(seg, "start_extent", lwhere), _num(seg, "extent_count", lwhere)
            stripes = seg.get("stripes") or []
            if stype != "striped" or seg.get("stripe_count") != 1 or len(stripes) != 2:
                kinds.append(stype if stype != "striped" else f"striped over {seg.get('stripe_count')}")
                why = why or f"segment {n} is {kinds[-1]}: only linear logical volumes are read"
                continue
            pvname, pe = stripes
            pv, pe_start = pvmap.get(str(pvname), (None, 0))
            if pv is None:
                why = why or f"its physical volume {pvname} is not on any disk of this restore point"
                continue
            if not isinstance(pe, int) or pe < 0:
                raise VolumeError(f"{lwhere}: bad extent number in segment {n}")
            doff = pv.offset + pe_start + pe * ext
            if doff + length * ext > pv.offset + pv.size:
                why = why or f"segment {n} lies past the end of its physical volume"
                continue
            if not extents:
                disk = pv.disk
            extents.append(Extent(start * ext, pv.disk, doff, length * ext))
        extents.sort(key=lambda e: e.offset)
        size = sum(_num(lsec[f"segment{n}"], "extent_count", lwhere) for n in range(1, count + 1)) * ext
        pos = 0
        for e in extents:
            if e.offset != pos and not why:
                why = "its segments leave a gap"
            pos = e.offset + e.length
        label = "linear" if not kinds else ", ".join(sorted(set(kinds)))
        name = f"disk{disk}:{vg}/{lv}"
        if why:
            out.append(Volume(name, disk, "lvm", size, label, readable=False, why=why))
        else:
            out.append(Volume(name, disk, "lvm", size, label, tuple(extents)))
    return out


# -- everything together -------------------------------------------------------------------


@dataclass
class Layout:
    """Every volume of a set of disks, in order, and the PVs found."""

    volumes: list[Volume] = field(default_factory=list)
    pvs: list[PhysicalVolume] = field(default_factory=list)

    def find(self, ident: str) -> Volume:
        """``disk0``, ``disk0:1``, ``disk0:vg0/root`` or just ``vg0/root``."""
        for v in self.volumes:
            if v.name == ident or (v.kind == "lvm" and v.part == ident):
                return v
        from engine.errors import NotFound

        names = ", ".join(v.name for v in self.volumes) or "none"
        raise NotFound(f"no volume {ident!r} (volumes: {names})")


def find_volumes(disks: Sequence[Readable]) -> Layout:
    """The volumes of these disks (in the restore point's order: ``disk0`` is the first).
    A disk whose tables cannot be read is one unreadable volume saying why; the other
    disks are still listed (and so are LVs whose PVs are fine)."""
    layout = Layout()
    for i, disk in enumerate(disks):
        try:
            _disk_volumes(layout, i, disk)
        except VolumeError as e:
            layout.volumes = [v for v in layout.volumes if v.disk != i]
            layout.pvs = [pv for pv in layout.pvs if pv.disk != i]
            layout.volumes.append(Volume(f"disk{i}", i, "disk", disk.size, "whole disk", readable=False, why=str(e)))
    for pv in list(layout.pvs):
        try:
            if pv.metadata:
                parse_lvm_text(pv.metadata, f"disk{pv.disk}: LVM2 metadata")
        except VolumeError as e:
            layout.pvs.remove(pv)
            layout.volumes.append(Volume(f"disk{pv.disk}:?", pv.disk, "lvm", 0, "LVM2 metadata", readable=False, why=str(e)))
    try:
        layout.volumes.extend(logical_volumes(layout.pvs))
    except VolumeError as e:
        d = layout.pvs[0].disk if layout.pvs else 0
        layout.volumes.append(Volume(f"disk{d}:?", d, "lvm", 0, "LVM2 volume groups", readable=False, why=str(e)))
    return layout


def _disk_volumes(layout: Layout, i: int, disk: Readable) -> None:
    where = f"disk{i}"
    parts = partitions(i, disk)
    if parts is None:
        pv = pv_label(disk, i, 0, disk.size, where)
        whole = Volume(where, i, "disk", disk.size, "whole disk", (Extent(0, i, 0, disk.size),))
        if pv is not None:
            layout.pvs.append(pv)
            whole = _contains(whole, "an LVM2 physical volume")
        layout.volumes.append(whole)
        return
    layout.volumes.append(_contains(Volume(where, i, "disk", disk.size, "whole disk", (Extent(0, i, 0, disk.size),)),
                                    "a partition table"))
    for p in parts:
        if p.readable:
            pv = pv_label(disk, i, p.extents[0].disk_offset, p.size, p.name)
            if pv is not None:
                layout.pvs.append(pv)
                p = _contains(p, "an LVM2 physical volume")
        layout.volumes.append(p)


def _contains(v: Volume, what: str) -> Volume:
    return Volume(v.name, v.disk, v.kind, v.size, v.label, v.extents, v.readable, v.why, what)
