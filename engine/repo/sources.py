"""Backup sources: raw images, block devices, and qcow2 / VMDK / VHDX through qemu-img.

A source is opened into a ``Source``: a file descriptor positioned over the raw bytes of
the virtual disk, its size, and the byte ranges that may hold data (the rest is known
to read as zeros: holes of a sparse file). Formats other than raw are converted by
``qemu-img convert`` into a sparse temporary raw file first, because qemu-img cannot
stream raw output into a pipe; the temporary file is removed when the source closes.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ChangedExtentsError, SourceError

SECTOR = 512
MAGICS = [
    (b"QFI\xfb", "qcow2"),
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
]


@dataclass
class Source:
    path: str
    format: str
    size: int
    fd: int
    data_ranges: list[tuple[int, int]]
    temp: Path | None = None
    extents: list[tuple[int, int]] | None = field(default=None)

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)
            self.temp = None


class DiskSource(Source):
    """A ``Disk`` object (e.g. a published disk with its write cache) as a backup source."""

    def __init__(self, name: str, disk) -> None:
        super().__init__(name, "instantnfs-disk", disk.size, -1, [(0, disk.size)])
        self.disk = disk

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.disk.read(offset, length))


def sniff_format(head: bytes) -> str:
    for magic, fmt in MAGICS:
        if head.startswith(magic):
            return fmt
    return "raw"


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of a file that hold data, from SEEK_DATA / SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    except OSError:
        return [(0, size)]
    return out


def _qemu_img() -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise SourceError("reading qcow2, VMDK or VHDX images needs qemu-img: apt-get install qemu-utils")
    return exe


def open_source(path: str, tmp_dir: Path) -> Source:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"source {path}: no such file") from None
    except OSError as e:
        raise SourceError(f"source {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(f"source {path} is a directory, not a disk image")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SourceError(f"source {path} is neither a regular file nor a block device")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SourceError(f"source {path}: cannot open: {e.strerror}") from None
    try:
        if stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
            return Source(path, "raw", size, fd, [(0, size)])
        head = os.pread(fd, 64, 0)
        fmt = sniff_format(head)
        if fmt == "raw":
            size = st.st_size
            if size == 0:
                raise SourceError(f"source {path} is empty, not a disk image")
            if size % SECTOR:
                raise SourceError(
                    f"source {path} is not a disk image: its size {size} is not a multiple of {SECTOR} bytes"
                )
            return Source(path, "raw", size, fd, data_ranges(fd, size))
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return _convert(path, fmt, tmp_dir)


def _convert(path: str, fmt: str, tmp_dir: Path) -> Source:
    exe = _qemu_img()
    info = subprocess.run([exe, "info", "--output=json", "-f", fmt, path], capture_output=True, text=True)
    if info.returncode != 0:
        msg = (info.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise SourceError(f"source {path} looks like {fmt} but qemu-img cannot read it: {msg}")
    size = int(json.loads(info.stdout)["virtual-size"])
    tmp_dir.mkdir(parents=True, exist_ok=True)
    temp = tmp_dir / f"source-{os.getpid()}-{Path(path).name}.raw"
    conv = subprocess.run([exe, "convert", "-f", fmt, "-O", "raw", path, str(temp)], capture_output=True, text=True)
    if conv.returncode != 0:
        temp.unlink(missing_ok=True)
        msg = (conv.stderr.strip().splitlines() or ["unknown error"])[-1]
        if "No space left" in msg:
            raise SourceError(f"no space left in {tmp_dir} to convert {path} to raw")
        raise SourceError(f"qemu-img could not convert {path} ({fmt}): {msg}")
    fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
    return Source(path, fmt, size, fd, data_ranges(fd, size), temp=temp)


def parse_changed_extents(path: str, disk_size: int) -> list[tuple[int, int]]:
    """Read a changed-extents file: one 'offset length' per line, sorted, disjoint, in range.

    Blank lines and lines starting with '#' are ignored. Returns (offset, length) pairs.
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ChangedExtentsError(f"changed-extents file {path}: {e.strerror}") from None
    out: list[tuple[int, int]] = []
    prev_end = -1
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path} line {lineno}"
        parts = line.split()
        if len(parts) != 2:
            raise ChangedExtentsError(f"{where}: expected 'offset length', got {line!r}")
        try:
            off, length = int(parts[0], 0), int(parts[1], 0)
        except ValueError:
            raise ChangedExtentsError(f"{where}: offset and length must be integers, got {line!r}") from None
        if off < 0 or length <= 0:
            raise ChangedExtentsError(f"{where}: offset must be >= 0 and length > 0")
        if off + length > disk_size:
            raise ChangedExtentsError(
                f"{where}: extent {off}+{length} ends past the end of the {disk_size}-byte disk"
            )
        if off < prev_end:
            what = "overlaps the previous extent" if off >= out[-1][0] else "is not sorted by offset"
            raise ChangedExtentsError(f"{where}: extent at {off} {what}")
        out.append((off, length))
        prev_end = off + length
    return out
