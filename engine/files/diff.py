"""Which files changed between two restore points: content and metadata, path by path.

``diff(fs_a, fs_b, blocks)`` compares the same filesystem (the same volume name) in two
restore points of one repository and yields a ``Change`` per path that was added,
deleted or modified, in sorted path order (names compared as bytes).

Metadata: the entries of each path are compared field by field -- type, size, mode,
uid, gid, mtime, ctime, a symlink's target -- because ransomware can keep mtimes. A
directory's size, mtime and ctime follow from its entries, which are compared one by
one, so only its type, mode and owner count. atime, inode numbers and link counts are
not compared (a restore or a rebuilt image renumbers inodes). A rename is a delete and
an add. A path whose type changed is modified (field ``type``); what was under an old
directory is deleted and what is under a new one added.

Content, without reading unchanged data: ``BlockDiff`` compares the two points' block
maps of each disk. A restore point stores a block as a chunk key (pack, record offset);
equal keys are equal bytes, so a block whose keys are equal holds equal bytes in both
points. A regular file whose allocated runs map to the same disk ranges in both points
(``File.volume_runs`` through the volume's extents) is unchanged where its blocks are,
and only the ranges in differing blocks are read and compared (a block is 256 KiB or
so: other files sharing it may be what changed). A file whose runs differ (it was
rewritten, moved, or its filesystem cannot say: inline, compressed, XFS/btrfs) is
compared byte by byte, only over its allocated ranges when both have the same ones
(holes are zeros in both). So a file whose blocks moved but whose bytes are equal is
not reported, and one whose bytes changed with its size and mtime kept is.

Memory: both trees are walked together, one directory level at a time; each level's
names are sorted, so what is held is the directories along the current path (never
the tree). Block maps are memory maps, compared in slices. A directory met twice (a
looping hostile filesystem) is not entered again. A file or directory that cannot be
read (a corrupt chunk) is a ``Change`` with ``error`` set, and the walk goes on.
Single-threaded, like the filesystems it reads.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from engine.disk import BackupDisk
from engine.errors import InstantNFSError, NotFound
from engine.files.fs import READ_PIECE, Entry, File, FileSystem

COMPARE_SLICE = 1 << 20  # block map entries compared at once


@dataclass(frozen=True, slots=True)
class Change:
    """One path that differs: ``change`` is added, deleted, modified or unreadable."""

    path: str
    change: str
    type: str  # the entry's type (the new one, unless deleted)
    content: bool = False  # a regular file's bytes differ
    fields: tuple[str, ...] = ()  # metadata fields that differ
    error: str = ""  # why it could not be compared (unreadable)

    def to_json(self) -> dict:
        out: dict = {"path": self.path, "change": self.change, "type": self.type}
        if self.change == "modified":
            out.update(content=self.content, fields=list(self.fields))
        if self.error:
            out["error"] = self.error
        return out

    def line(self) -> str:
        what = (["content"] if self.content else []) + list(self.fields)
        tail = f" ({', '.join(what)})" if what else ""
        if self.error:
            tail = f": {self.error}"
        return f"{self.change:<10} {self.path}{tail}"


class BlockDiff:
    """Which blocks of each disk hold different chunks in two restore points."""

    def __init__(self, disks_a: Sequence[BackupDisk], disks_b: Sequence[BackupDisk]) -> None:
        self.a = list(disks_a)
        self.b = list(disks_b)
        sizes = {d.block_size for d in self.a + self.b}
        if len(sizes) > 1:
            raise ValueError(f"the points' block sizes differ ({sorted(sizes)}): not one repository")
        self.block_size = sizes.pop() if sizes else 1

    def _differs(self, disk: int, first: int, stop: int) -> np.ndarray:
        """Bool per block in [first, stop): its chunk differs (or one side has no such block)."""
        out = np.ones(max(0, stop - first), dtype=bool)
        if disk >= len(self.a) or disk >= len(self.b):
            return out
        ea, eb = self.a[disk].map.entries, self.b[disk].map.entries
        common = min(stop, len(ea), len(eb))
        if common > first:
            out[: common - first] = ea[first:common] != eb[first:common]
        return out

    def changed(self, disk: int, offset: int, length: int) -> list[tuple[int, int]]:
        """The (offset, length) parts of a disk range that lie in differing blocks."""
        if length <= 0:
            return []
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        idx = np.flatnonzero(self._differs(disk, first, last + 1))
        out: list[tuple[int, int]] = []
        end = offset + length
        for i in idx.tolist():
            lo, hi = max(offset, (first + i) * bs), min(end, (first + i + 1) * bs)
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], hi - out[-1][0])
            else:
                out.append((lo, hi - lo))
        return out

    def count(self) -> list[int]:
        """Differing blocks per disk (the larger point's disks; compared in slices)."""
        out = []
        for disk in range(max(len(self.a), len(self.b))):
            n = 0
            sides = [m for m in (self.a, self.b) if disk < len(m)]
            total = max(len(s[disk].map) for s in sides)
            for lo in range(0, total, COMPARE_SLICE):
                n += int(self._differs(disk, lo, min(total, lo + COMPARE_SLICE)).sum())
            out.append(n)
        return out


def _disk_pieces(fs: FileSystem, f: File) -> list[tuple[int, int, int, int]] | None:
    """(file offset, disk, disk offset, length) of a file's allocated bytes, or None."""
    runs = f.volume_runs()
    vol = getattr(fs.src, "volume", None)
    if runs is None or vol is None or not vol.extents:
        return None
    starts = [e.offset for e in vol.extents]
    out = []
    for foff, voff, length in runs:
        while length > 0:
            e = vol.extents[max(0, bisect.bisect_right(starts, voff) - 1)]
            if not e.offset <= voff < e.offset + e.length:
                return None  # outside the volume: a damaged filesystem; compare bytes
            take = min(length, e.offset + e.length - voff)
            out.append((foff, e.disk, e.disk_offset + voff - e.offset, take))
            foff, voff, length = foff + take, voff + take, length - take
    return out


def _same_bytes(fa: File, fb: File, ranges: Sequence[tuple[int, int]]) -> bool:
    for off, length in ranges:
        end = off + length
        while off < end:
            n = min(READ_PIECE, end - off)
            if fa.read(off, n) != fb.read(off, n):
                return False
            off += n
    return True


def content_differs(fs_a: FileSystem, fs_b: FileSystem, ea: Entry, eb: Entry, blocks: BlockDiff | None) -> bool:
    """Whether two regular files' bytes differ, reading only what the block maps cannot settle."""
    if ea.size != eb.size:
        return True
    if ea.size == 0:
        return False
    fa, fb = fs_a.open_file(ea), fs_b.open_file(eb)
    if blocks is not None:
        pa, pb = _disk_pieces(fs_a, fa), _disk_pieces(fs_b, fb)
        if pa is not None and pa == pb:
            ranges = []
            for foff, disk, doff, length in pa:
                ranges += [(foff + c - doff, n) for c, n in blocks.changed(disk, doff, length)]
            return not _same_bytes(fa, fb, ranges)
    ra, rb = fa.data_runs(), fb.data_runs()
    return not _same_bytes(fa, fb, ra if ra == rb else [(0, ea.size)])


_FILE_FIELDS = ("type", "size", "mode", "uid", "gid", "mtime_ns", "ctime_ns", "link")
_DIR_FIELDS = ("type", "mode", "uid", "gid")


def metadata_differs(ea: Entry, eb: Entry) -> tuple[str, ...]:
    """The fields that differ (names without the ``_ns``)."""
    names = _DIR_FIELDS if ea.type == eb.type == "dir" else _FILE_FIELDS
    return tuple(n.removesuffix("_ns") for n in names if getattr(ea, n) != getattr(eb, n))


class _Side:
    """One filesystem's sorted listing of directories, entered once each."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        self.seen: set[int] = set()

    def children(self, e: Entry | None) -> list[Entry]:
        if e is None or e.type != "dir" or e.inode in self.seen:
            return []
        self.seen.add(e.inode)
        return sorted(self.fs.listdir(e), key=lambda c: c.name)


def _pairs(la: list[Entry], lb: list[Entry]) -> Iterator[tuple[Entry | None, Entry | None]]:
    i = j = 0
    while i < len(la) or j < len(lb):
        if j >= len(lb) or (i < len(la) and la[i].name < lb[j].name):
            yield la[i], None
            i += 1
        elif i >= len(la) or lb[j].name < la[i].name:
            yield None, lb[j]
            j += 1
        else:
            yield la[i], lb[j]
            i, j = i + 1, j + 1


def _stat(fs: FileSystem, path: str) -> Entry | None:
    try:
        return fs.stat(path)
    except NotFound:
        return None


def diff(fs_a: FileSystem, fs_b: FileSystem, blocks: BlockDiff | None = None, path: str = "/") -> Iterator[Change]:
    """The changes from ``fs_a`` to ``fs_b`` under ``path`` (itself included unless it is
    the root), in sorted order. ``blocks``: the points' block maps (None: compare bytes)."""
    ta, tb = _stat(fs_a, path), _stat(fs_b, path)
    if ta is None and tb is None:
        raise NotFound(f"{fs_a.name}: no {path!r} in either restore point")
    sa, sb = _Side(fs_a), _Side(fs_b)
    top = (ta or tb).path  # type: ignore[union-attr]
    stack: list[Iterator[tuple[Entry | None, Entry | None]]] = [iter([(ta, tb)])]
    while stack:
        try:
            ea, eb = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        e = eb or ea
        assert e is not None
        if e.path != "/" or top != "/":
            ch = _compare(fs_a, fs_b, ea, eb, blocks)
            if ch is not None:
                yield ch
        try:
            la, lb = sa.children(ea), sb.children(eb)
        except InstantNFSError as err:
            yield Change(e.path, "unreadable", e.type, error=str(err))
            continue
        if la or lb:
            stack.append(_pairs(la, lb))


def _compare(fs_a: FileSystem, fs_b: FileSystem, ea: Entry | None, eb: Entry | None,
             blocks: BlockDiff | None) -> Change | None:
    if ea is None:
        assert eb is not None
        return Change(eb.path, "added", eb.type)
    if eb is None:
        return Change(ea.path, "deleted", ea.type)
    fields = metadata_differs(ea, eb)
    content = False
    if ea.type == eb.type == "file":
        try:
            content = content_differs(fs_a, fs_b, ea, eb, blocks)
        except InstantNFSError as err:
            return Change(eb.path, "unreadable", eb.type, fields=fields, error=str(err))
    if not content and not fields:
        return None
    return Change(eb.path, "modified", eb.type, content, fields)
