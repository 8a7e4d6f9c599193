"""Filesystems of a volume, read through The Sleuth Kit (pytsk3), without a kernel mount.

``FileSystem.open(reader, name)`` opens the filesystem on a volume (``engine.files.
volumes.VolumeReader``, or anything with ``size`` and ``read``): TSK reads through
``_VolumeImage``, an ``Img_Info`` whose reads go to the volume, so the restore point's
decompression cache and readahead serve them. TSK recognises ext2/3/4, NTFS,
FAT12/16/32, exFAT, HFS+, ISO 9660, UFS (probed one by one: TSK's detect-all also
probes YAFFS2, which reads 25 MiB of any volume). XFS and btrfs are read by the optional
``engine.files.fs_dissect`` (dissect.xfs / dissect.btrfs, AGPL) when installed. Anything
else raises ``UnrecognisedFilesystem`` naming what it is when its magic is known (XFS
or btrfs without the extra, swap, LUKS, BitLocker, an LVM PV, all zeros) -- never a
traceback. ``FileSystem`` holds what every reader shares (lookups, walks, messages);
``TskFileSystem`` is the TSK reader.

Entries are ``Entry`` values: names and symlink targets as the filesystem stores them
(bytes; ``Entry.path`` is text with undecodable bytes as surrogates, the
``surrogateescape`` convention of ``os.fsdecode``, so ``os.fsencode`` gives the bytes
back). Directories are walked by inode, never by re-parsing names, so any name works.
``walk`` iterates (a stack of open directories, one per level; a directory met twice is
skipped, so a looping hostile filesystem ends); nothing holds a whole tree. Deleted
names, TSK's virtual files ($OrphanFiles, FAT's $MBR...) and NTFS's metadata files at
the root are left out.

``File.data_runs()`` gives the allocated byte ranges of a file (holes of a sparse file
are absent); ``File.read`` reads any range. A failed read of the volume (a corrupt
chunk) raises ``FileReadError`` naming the file, the byte range, the disk offset and the
filesystem block.

Journals are not replayed: TSK reads the last checkpointed metadata. ``journal_note``
says so per filesystem (ext3/4 with a journal, and whether it needed recovery; NTFS's
$LogFile; journaled HFS+), for ``ls`` and JSON output. Not thread-safe: one
``FileSystem`` per thread.
"""
from __future__ import annotations

import os
import stat as st
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import pytsk3

from engine.errors import InstantNFSError, NotFound

READ_PIECE = 1 << 20


class FilesystemError(InstantNFSError):
    """The filesystem cannot be read."""


class UnrecognisedFilesystem(FilesystemError):
    """No filesystem this tool reads is on the volume."""


class FileReadError(FilesystemError):
    """A file's bytes cannot be read."""

    exit_code = 3


class Source(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...


def _fs_names() -> dict[int, str]:
    out = {}
    for attr in dir(pytsk3):
        if attr.startswith("TSK_FS_TYPE_") and not attr.endswith(("_DETECT", "_ENUM", "_UNSUPP")):
            out[int(getattr(pytsk3, attr))] = attr[len("TSK_FS_TYPE_"):].lower()
    return out


FS_NAMES = _fs_names()
_T = pytsk3
TYPES = {
    int(_T.TSK_FS_META_TYPE_REG): "file", int(_T.TSK_FS_META_TYPE_DIR): "dir", int(_T.TSK_FS_META_TYPE_LNK): "symlink",
    int(_T.TSK_FS_META_TYPE_CHR): "chardev", int(_T.TSK_FS_META_TYPE_BLK): "blockdev",
    int(_T.TSK_FS_META_TYPE_FIFO): "fifo", int(_T.TSK_FS_META_TYPE_SOCK): "socket",
}
S_IFMT = {"file": st.S_IFREG, "dir": st.S_IFDIR, "symlink": st.S_IFLNK, "chardev": st.S_IFCHR,
          "blockdev": st.S_IFBLK, "fifo": st.S_IFIFO, "socket": st.S_IFSOCK}
_VIRTUAL = {int(_T.TSK_FS_META_TYPE_VIRT), int(_T.TSK_FS_META_TYPE_VIRT_DIR)}
_DATA_ATTRS = {int(_T.TSK_FS_ATTR_TYPE_DEFAULT), int(_T.TSK_FS_ATTR_TYPE_NTFS_DATA), int(_T.TSK_FS_ATTR_TYPE_HFS_DATA)}
_HOLE = int(_T.TSK_FS_ATTR_RUN_FLAG_FILLER) | int(_T.TSK_FS_ATTR_RUN_FLAG_SPARSE)
_NONRES = int(_T.TSK_FS_ATTR_NONRES)
_PACKED = int(_T.TSK_FS_ATTR_COMP) | int(_T.TSK_FS_ATTR_ENC)
# the filesystems a VM disk holds, tried in this order (each probe reads a few sectors)
_PROBES = [getattr(_T, f"TSK_FS_TYPE_{n}_DETECT") for n in ("EXT", "NTFS", "FAT", "EXFAT", "HFS", "ISO9660", "FFS", "APFS")
           if hasattr(_T, f"TSK_FS_TYPE_{n}_DETECT")]


def identify(src: Source) -> str | None:
    """What a volume TSK cannot open holds, by its magic, or None."""
    head = src.read(0, min(src.size, 4096))
    if head[:4] == b"XFSB":
        return "XFS"
    if head[:6] == b"LUKS\xba\xbe":
        return "LUKS encrypted volume"
    if head[3:11] == b"-FVE-FS-":
        return "BitLocker encrypted volume"
    if any(head[i * 512 : i * 512 + 8] == b"LABELONE" for i in range(4)):
        return "LVM2 physical volume"
    if src.size > 0x10048 and src.read(0x10040, 8) == b"_BHRfS_M":
        return "btrfs"
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "Linux swap"
    if not any(src.read(0, min(src.size, 1 << 17))):
        return "empty"
    return None


class _Recorder(Protocol):
    """Where a reader's reads of the volume go: it keeps the last failure for messages."""

    failure: tuple[int, int, BaseException] | None  # (first bad offset, read length, error)


class _VolumeImage(pytsk3.Img_Info):
    """TSK's view of a volume: every read goes to the volume's ``read``."""

    def __init__(self, src: Source) -> None:
        self._src = src
        self.failure: tuple[int, int, BaseException] | None = None  # (offset, length, error)
        super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self._src.read(offset, length)
        except InstantNFSError as e:
            self.failure = (self._first_bad(offset, length), length, e)
            raise

    def _first_bad(self, offset: int, length: int, step: int = 4096) -> int:
        """Where in a failed read the first unreadable piece is (for the message)."""
        for off in range(offset, offset + length, step):
            try:
                self._src.read(off, min(step, offset + length - off))
            except InstantNFSError:
                return off
        return offset

    def get_size(self) -> int:
        return self._src.size

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a directory, with the metadata of its inode."""

    name: bytes
    path: str  # from the filesystem's root, '/'-separated, surrogateescape'd
    type: str  # file, dir, symlink, chardev, blockdev, fifo, socket, other
    inode: int
    size: int
    mode: int  # permission bits (with setuid/setgid/sticky)
    uid: int
    gid: int
    nlink: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    link: bytes = b""  # a symlink's target

    @property
    def st_mode(self) -> int:
        return S_IFMT.get(self.type, 0) | self.mode

    def to_json(self) -> dict:
        return {
            "name": os.fsdecode(self.name), "path": self.path, "type": self.type, "inode": self.inode,
            "size": self.size, "mode": f"{self.mode:04o}", "uid": self.uid, "gid": self.gid, "nlink": self.nlink,
            "mtime": self.mtime_ns / 1e9, "atime": self.atime_ns / 1e9, "ctime": self.ctime_ns / 1e9,
            **({"link": os.fsdecode(self.link)} if self.type == "symlink" else {}),
        }


def _ns(sec: int, nsec: int) -> int:
    return int(sec) * 1_000_000_000 + int(nsec or 0)


def join(parent: str, name: bytes) -> str:
    n = os.fsdecode(name)
    return ("" if parent == "/" else parent) + "/" + n


class FileSystem:
    """One filesystem on a volume, read-only. ``open`` picks the reader (TSK, else the
    optional dissect readers of XFS and btrfs); lookups and walks are shared."""

    name: str  # the volume's name, for messages
    kind: str  # ext4, ntfs, fat32, xfs...
    block_size: int
    journal_note: str | None
    case_insensitive: bool = False  # names are looked up as the filesystem itself would
    src: Source
    _rec: _Recorder

    @classmethod
    def open(cls, src: Source, name: str) -> FileSystem:
        """The filesystem on ``src``, or ``UnrecognisedFilesystem`` naming what it holds."""
        fs = TskFileSystem.probe(src, name)
        if fs is not None:
            return fs
        what = identify(src)
        if what in ("XFS", "btrfs"):
            try:
                from engine.files import fs_dissect
            except ImportError:
                raise UnrecognisedFilesystem(
                    f"{name}: holds {what}, which needs the optional dissect.{what.lower()} "
                    "(pip install 'instantnfs[xfs-btrfs]', AGPL-licensed)") from None
            return fs_dissect.open_fs(src, name, what)
        if what == "empty":
            raise UnrecognisedFilesystem(f"{name}: empty (its first 128 KiB are zeros): no filesystem")
        if what:
            raise UnrecognisedFilesystem(f"{name}: holds {what}, which this tool does not read")
        raise UnrecognisedFilesystem(f"{name}: unrecognised filesystem")

    # what a reader provides

    def _root(self) -> Entry:
        raise NotImplementedError

    def _list(self, inode: int, path: str) -> Iterator[Entry]:
        """The entries of directory ``inode`` (at ``path``), without '.' and '..'."""
        raise NotImplementedError

    def _quick_stat(self, parts: list[str]) -> Entry | None:
        return None

    def open_file(self, entry: Entry) -> File:
        raise NotImplementedError

    # shared: lookups, walks, failures

    def stat(self, path: str) -> Entry:
        """The entry at ``path`` (absolute, '/'-separated; surrogates for undecodable bytes)."""
        parts = [p for p in path.split("/") if p and p != "."]
        if not parts:
            return self._root()
        if ".." in parts:
            raise NotFound(f"{self.name}: '..' is not allowed in a path ({path})")
        quick = self._quick_stat(parts)
        if quick is not None:
            return quick
        cur = "/"
        inode = self._root().inode
        found: Entry | None = None
        for i, part in enumerate(parts):
            want = os.fsencode(part)
            fold = part.casefold() if self.case_insensitive else None
            found = None
            for e in self._list(inode, cur):
                if e.name == want:
                    found = e
                    break
                if fold is not None and found is None and os.fsdecode(e.name).casefold() == fold:
                    found = e  # unless an exact match comes later
            if found is None:
                raise NotFound(f"{self.name}: no {path!r} (no {part!r} in {cur})")
            if i < len(parts) - 1 and found.type != "dir":
                raise NotFound(f"{self.name}: {found.path} is not a directory")
            cur, inode = found.path, found.inode
        assert found is not None
        return found

    def listdir(self, path: str | Entry) -> Iterator[Entry]:
        """The entries of a directory, as they come (not sorted; nothing held but the one)."""
        e = path if isinstance(path, Entry) else self.stat(path)
        if e.type != "dir":
            raise NotFound(f"{self.name}: {e.path} is not a directory")
        return self._list(e.inode, e.path)

    def walk(self, top: str | Entry = "/") -> Iterator[Entry]:
        """Every entry under ``top`` (not ``top`` itself), depth-first, a directory before
        its contents. A directory whose inode was walked already is yielded but not entered."""
        e = top if isinstance(top, Entry) else self.stat(top)
        seen = {e.inode}
        stack = [self.listdir(e)]
        while stack:
            try:
                child = next(stack[-1])
            except StopIteration:
                stack.pop()
                continue
            yield child
            if child.type == "dir" and child.inode not in seen:
                seen.add(child.inode)
                stack.append(self._list(child.inode, child.path))

    # -- contents -----------------------------------------------------------------------

    def _failed(self, path: str, err: Exception, offset: int | None = None, length: int = 0) -> FilesystemError:
        fail = self._rec.failure
        self._rec.failure = None
        if fail is None:
            where = f" bytes {offset}..{offset + length}" if offset is not None else ""
            return FileReadError(f"{self.name}: {path}: cannot read{where}: {err}")
        voff, _vlen, cause = fail
        disk = ""
        locate = getattr(self.src, "disk_offset", None)
        if locate is not None:
            d, doff = locate(voff)
            disk = f", disk{d} offset {doff}"
        where = f" bytes {offset}..{offset + length}" if offset is not None else ""
        return FileReadError(f"{self.name}: {path}:{where} unreadable (filesystem block {voff // self.block_size}{disk}): {cause}")


class TskFileSystem(FileSystem):
    """A filesystem read through The Sleuth Kit."""

    def __init__(self, src: Source, name: str, img: _VolumeImage, info: pytsk3.FS_Info) -> None:
        self.src = src
        self.name = name
        self._rec = img
        self._img = img
        self._fs = info
        self.kind = FS_NAMES.get(int(info.info.ftype), f"type {int(info.info.ftype)}")
        self.block_size = int(info.info.block_size)
        self.root_inode = int(info.info.root_inum)
        self.journal_note = self._journal_note()
        # FAT, exFAT, NTFS and HFS+ ignore case
        self.case_insensitive = self.kind.startswith(("fat", "exfat", "ntfs", "hfs"))

    @classmethod
    def probe(cls, src: Source, name: str) -> TskFileSystem | None:
        """The filesystem TSK finds on ``src``, None if none; a read failure raises."""
        img = _VolumeImage(src)
        for kind in _PROBES:  # not TSK's detect-all: its YAFFS2 probe reads 25 MiB of any volume
            try:
                return cls(src, name, img, pytsk3.FS_Info(img, type=kind))
            except (OSError, RuntimeError):
                if img.failure is not None:
                    raise FilesystemError(f"{name}: cannot read the filesystem: {img.failure[2]}") from None
        return None

    def _journal_note(self) -> str | None:
        k = self.kind
        if k.startswith("ext") and self.src.size >= 2048:
            sb = self.src.read(1024, 1024)
            compat = int.from_bytes(sb[0x5C:0x60], "little")
            incompat = int.from_bytes(sb[0x60:0x64], "little")
            if not compat & 0x4:
                return None
            if incompat & 0x4:
                return "journal not replayed, and it holds changes not yet written (the VM was running): the newest changes may be missing"
            return "journal not replayed (it was clean when backed up)"
        if k == "ntfs":
            return "$LogFile not replayed: changes of the last seconds before the backup may be missing"
        if k.startswith("hfs"):
            return "journal (if any) not replayed"
        return None

    # -- lookups ------------------------------------------------------------------------

    def _root(self) -> Entry:
        try:
            return self._entry(b"", "/", self._fs.open_meta(inode=self.root_inode))
        except (OSError, RuntimeError) as e:
            raise self._failed("/", e) from None

    def _entry(self, name: bytes, path: str, f: pytsk3.File) -> Entry:
        m = f.info.meta
        kind = TYPES.get(int(m.type), "other")
        link = b""
        if kind == "symlink":
            link = m.link if isinstance(m.link, bytes) and m.link else self._read_link(f, m)
        return Entry(name, path, kind, int(m.addr), int(m.size), int(m.mode) & 0o7777, int(m.uid), int(m.gid),
                     int(m.nlink), _ns(m.mtime, m.mtime_nano), _ns(m.atime, m.atime_nano), _ns(m.ctime, m.ctime_nano), link)

    def _read_link(self, f: pytsk3.File, m: pytsk3.TSK_FS_META) -> bytes:
        if 0 < m.size <= 65536:
            try:
                return bytes(f.read_random(0, int(m.size)))
            except (OSError, RuntimeError):
                return b""
        return b""

    def _quick_stat(self, parts: list[str]) -> Entry | None:
        """TSK's own path lookup (in C), for a path of UTF-8 names; None: look it up by
        listing each directory (any bytes, and the names TSK leaves out stay out)."""
        if self.case_insensitive:  # the slow way gives the names as stored, not as typed
            return None
        try:
            text = "/" + "/".join(parts)
            f = self._fs.open(text)
        except (OSError, RuntimeError, UnicodeEncodeError):
            return None
        n = f.info.name
        m = f.info.meta
        if (m is None or n is None or int(m.type) in _VIRTUAL or bytes(n.name) != parts[-1].encode()
                or int(n.flags) & int(pytsk3.TSK_FS_NAME_FLAG_UNALLOC)):
            return None  # a case-folded match, a virtual file: the slow way decides
        return self._entry(bytes(n.name), text, f)

    def _list(self, inode: int, path: str) -> Iterator[Entry]:
        try:
            d = self._fs.open_dir(inode=inode)
        except (OSError, RuntimeError) as e:
            raise self._failed(path, e) from None
        at_root = inode == self.root_inode
        it = iter(d)
        while True:
            try:  # TSK reads entries as it goes: a damaged block fails here, named
                f = next(it)
            except StopIteration:
                return
            except (OSError, RuntimeError) as e:
                raise self._failed(path, e) from None
            n = f.info.name
            name = bytes(n.name)
            if name in (b".", b"..") or not name or int(n.flags) & int(pytsk3.TSK_FS_NAME_FLAG_UNALLOC):
                continue
            m = f.info.meta
            if m is None or int(m.type) in _VIRTUAL:
                continue
            if at_root and self.kind == "ntfs" and name.startswith(b"$") and int(m.addr) < 27:
                continue
            yield self._entry(name, join(path, name), f)

    def open_file(self, entry: Entry) -> File:
        try:
            return TskFile(self, entry, self._fs.open_meta(inode=entry.inode))
        except (OSError, RuntimeError) as e:
            raise self._failed(entry.path, e) from None


class File:
    """An open file: ``read`` any range, ``data_runs`` its allocated ranges."""

    def __init__(self, fs: FileSystem, entry: Entry) -> None:
        self.fs = fs
        self.entry = entry
        self.size = entry.size

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def data_runs(self) -> list[tuple[int, int]]:
        """(offset, length) of the file's allocated bytes, merged and in order; what is
        not in them reads as zeros (holes)."""
        raise NotImplementedError

    def volume_runs(self) -> list[tuple[int, int, int]] | None:
        """(file offset, volume offset, length) of each allocated run, in file order; None
        when the bytes are not plain runs of the volume (resident, inline, compressed, or a
        reader that does not say)."""
        return None

    def pieces(self, offset: int = 0, length: int | None = None, piece: int = READ_PIECE) -> Iterator[bytes]:
        end = self.size if length is None else min(self.size, offset + length)
        while offset < end:
            n = min(piece, end - offset)
            yield self.read(offset, n)
            offset += n


class TskFile(File):
    def __init__(self, fs: TskFileSystem, entry: Entry, f: pytsk3.File) -> None:
        super().__init__(fs, entry)
        self._fs = fs
        self._f = f

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        try:
            data = self._f.read_random(offset, length)
        except (OSError, RuntimeError) as e:
            raise self.fs._failed(self.entry.path, e, offset, length) from None
        if self._fs._img.failure is not None or len(data) != length:
            raise self.fs._failed(self.entry.path, OSError("short read"), offset, length)
        return bytes(data)

    def data_runs(self) -> list[tuple[int, int]]:
        """A file TSK gives no runs for (resident, inline or compressed data) is one run."""
        bs = self.fs.block_size
        runs: list[tuple[int, int]] = []
        attr = None
        for a in self._f:  # the unnamed data attribute (not an NTFS stream, not a resource fork)
            if int(a.info.type) in _DATA_ATTRS and a.info.name in (None, b"", b"$Data", b"DATA"):
                attr = a
                break
        if attr is None or not int(attr.info.flags) & _NONRES:
            return [(0, self.size)] if self.size else []
        for r in attr:
            if int(r.flags) & _HOLE:
                continue
            start = int(r.offset) * bs
            end = min(self.size, start + int(r.len) * bs)
            if end <= start:
                continue
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end - runs[-1][0])
            else:
                runs.append((start, end - start))
        return runs

    def volume_runs(self) -> list[tuple[int, int, int]] | None:
        bs = self.fs.block_size
        attr = None
        for a in self._f:
            if int(a.info.type) in _DATA_ATTRS and a.info.name in (None, b"", b"$Data", b"DATA"):
                attr = a
                break
        if attr is None:
            return [] if not self.size else None
        if not int(attr.info.flags) & _NONRES or int(attr.info.flags) & _PACKED:
            return None
        out = []
        for r in attr:
            if int(r.flags) & _HOLE:
                continue
            start = int(r.offset) * bs
            length = min(self.size, start + int(r.len) * bs) - start
            if length > 0:
                out.append((start, int(r.addr) * bs, length))
        return out
