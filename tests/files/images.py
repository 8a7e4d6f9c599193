"""Guest disk builders for the file-level recovery tests: no kernel mount, no loop device.

ext4 through ``mke2fs -d``, vfat through mkfs.vfat + mtools, NTFS through mkntfs +
ntfscp, partition tables through sfdisk on image files, LVM2 physical volumes written
here (label, metadata area, text: checked against real lvm2 output in
tests/files/data). Then ``backup_images`` stores the disks as a restore point.
"""
from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import uuid as uuidlib
import zlib
from pathlib import Path

from tests.conftest import require_tool

MiB = 1 << 20


def sh(*cmd: str | os.PathLike, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


def ext4_image(path: Path, src: Path, size: int, *extra: str) -> Path:
    require_tool("mke2fs")
    path.unlink(missing_ok=True)
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", src, *extra, path, str(size // 1024) + "k",
       env={**os.environ, "E2FSPROGS_FAKE_TIME": "", "MKE2FS_DEVICE_SECTSIZE": "512"})
    return path


def vfat_image(path: Path, size: int, files: dict[str, bytes], tmp: Path, mtime: float | None = None) -> Path:
    """A FAT32 image holding ``files`` ('dir/name': bytes), copied in with mcopy."""
    require_tool("mkfs.vfat", "mcopy", "mmd")
    path.unlink(missing_ok=True)
    sh("mkfs.vfat", "-C", "-F", "32", path, str(size // 1024))
    stage = tmp / "vfat-src"
    made: set[str] = set()
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
    for name, data in files.items():
        p = stage / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if mtime is not None:
            os.utime(p, (mtime, mtime))
        parts = name.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                sh("mmd", "-i", path, "::/" + d, env=env)
                made.add(d)
        sh("mcopy", "-m", "-i", path, p, "::/" + name, env=env)
    return path


def put(disk: Path, offset: int, image: Path) -> None:
    """Copy ``image`` into ``disk`` at ``offset``, leaving its zero blocks as holes."""
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        pos = 0
        while chunk := src.read(MiB):
            if any(chunk):
                dst.seek(offset + pos)
                dst.write(chunk)
            pos += len(chunk)


def partitioned(path: Path, size: int, label: str, parts: list[str]) -> Path:
    """An image of ``size`` bytes with an sfdisk partition table (``label`` dos or gpt;
    ``parts``: sfdisk lines such as 'start=2048, size=20480, type=83')."""
    require_tool("sfdisk")
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    script = f"label: {label}\n" + "".join(p + "\n" for p in parts)
    sh("sfdisk", "--no-reread", "--no-tell-kernel", "-q", path, input=script.encode())
    return path


def part_offsets(path: Path) -> list[tuple[int, int]]:
    """(start, size) in bytes of each partition (not an extended container), as sfdisk reads them back."""
    import json

    out = json.loads(sh("sfdisk", "-J", path).stdout)
    return [(p["start"] * 512, p["size"] * 512) for p in out["partitiontable"]["partitions"]
            if p["type"] not in ("5", "f", "85")]


# -- LVM2 ----------------------------------------------------------------------------------

MDA_MAGIC = b" LVM2 x[5A%r0N*>"


def lvm_uuid() -> str:
    return uuidlib.uuid4().hex[:32]


def lvm_pv(disk: Path, offset: int, size: int, pv_uuid: str, text: str, pe_start: int = 2 * MiB) -> None:
    """Write an LVM2 PV label, one metadata area at 4 KiB and ``text`` into it."""
    mda_start, mda_size = 4096, pe_start - 4096
    label = bytearray(512)
    pvh = bytearray()
    pvh += pv_uuid.encode()
    pvh += struct.pack("<Q", size)
    pvh += struct.pack("<QQ", pe_start, 0) + bytes(16)  # one data area, then the end
    pvh += struct.pack("<QQ", mda_start, mda_size) + bytes(16)  # one metadata area, then the end
    label[0:8] = b"LABELONE"
    struct.pack_into("<QII", label, 8, 1, 0, 32)
    label[24:32] = b"LVM2 001"
    label[32 : 32 + len(pvh)] = pvh
    struct.pack_into("<I", label, 16, zlib.crc32(label[20:]) & 0xFFFFFFFF)  # (not LVM's CRC: unchecked)
    raw = text.encode() + b"\0"
    mda = bytearray(512)
    mda[4:20] = MDA_MAGIC
    struct.pack_into("<IQQ", mda, 20, 1, mda_start, mda_size)
    struct.pack_into("<QQII", mda, 40, 512, len(raw), 0, 0)
    with open(disk, "r+b") as f:
        f.seek(offset + 512)
        f.write(label)
        f.seek(offset + mda_start)
        f.write(mda)
        f.seek(offset + mda_start + 512)
        f.write(raw)


def lvm_text(vg: str, pvs: dict[str, tuple[str, int]], lvs: dict[str, list[tuple[str, int, int]] | str],
             extent_sectors: int = 8192, pe_start_sectors: int = 4096) -> str:
    """Metadata text: ``pvs`` name -> (uuid, pe_count); ``lvs`` name -> linear segments
    [(pv name, first PE, count)], or a segment type (e.g. 'thin') for an unreadable LV."""
    def dashed(u: str) -> str:
        cuts = (6, 4, 4, 4, 4, 4, 6)
        out, i = [], 0
        for c in cuts:
            out.append(u[i : i + c])
            i += c
        return "-".join(out)

    lines = [f"{vg} {{", f'\tid = "{dashed(lvm_uuid())}"', "\tseqno = 3", '\tformat = "lvm2"',
             '\tstatus = ["RESIZEABLE", "READ", "WRITE"]', f"\textent_size = {extent_sectors}", "",
             "\tphysical_volumes {"]
    for name, (u, count) in pvs.items():
        lines += [f"\t\t{name} {{", f'\t\t\tid = "{dashed(u)}"', '\t\t\tdevice = "/dev/sdz"  # a hint',
                  f"\t\t\tpe_start = {pe_start_sectors}", f"\t\t\tpe_count = {count}", "\t\t}"]
    lines += ["\t}", "\tlogical_volumes {"]
    for name, segs in lvs.items():
        lines += [f"\t\t{name} {{", f'\t\t\tid = "{dashed(lvm_uuid())}"', '\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]']
        if isinstance(segs, str):
            lines += ["\t\t\tsegment_count = 1", "\t\t\tsegment1 {", "\t\t\t\tstart_extent = 0", "\t\t\t\textent_count = 1",
                      f'\t\t\t\ttype = "{segs}"', "\t\t\t}", "\t\t}"]
            continue
        lines.append(f"\t\t\tsegment_count = {len(segs)}")
        at = 0
        for i, (pv, pe, count) in enumerate(segs, 1):
            lines += [f"\t\t\tsegment{i} {{", f"\t\t\t\tstart_extent = {at}", f"\t\t\t\textent_count = {count}",
                      '\t\t\t\ttype = "striped"', "\t\t\t\tstripe_count = 1", f'\t\t\t\tstripes = [\n\t\t\t\t\t"{pv}", {pe}\n\t\t\t\t]',
                      "\t\t\t}"]
            at += count
        lines.append("\t\t}")
    lines += ["\t}", "}", "# Generated by tests/files/images.py", 'contents = "Text Format Volume Group"', "version = 1"]
    return "\n".join(lines) + "\n"


# -- restore points ------------------------------------------------------------------------


def backup_images(repo: Path, images: list[Path], vm: str = "vm", block_size: int = 256 * 1024) -> str:
    """Store the images as one restore point of ``vm`` (the repository is made if missing); its id."""
    from engine.repo.ingest import BackupSettings, backup
    from engine.repo.repository import Repository

    if not repo.exists():
        Repository.init(repo, block_size)
    with Repository.open(repo) as r:
        return backup(r, BackupSettings(vm=vm), [str(p) for p in images])["id"]


def digest(p: Path) -> str:
    """The SHA-256 of a file, read a MiB at a time."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(MiB):
            h.update(b)
    return h.hexdigest()
