"""XFS and btrfs, read through dissect.xfs / dissect.btrfs: an optional extra.

The Sleuth Kit reads neither, so ``engine.files.fs.FileSystem.open`` comes here when a
volume's magic says XFS or btrfs and these packages are installed (``pip install
'instantnfs[xfs-btrfs]'``; they are AGPL-3.0 licensed, which is why they are optional).
They read a file object: ``_VolumeFile`` is one over the volume's ``read`` (so the
restore point's cache serves them), keeping the last failed read for messages like TSK's.

Entries carry an ``inode`` id this module can reopen: XFS's absolute inode number; for
btrfs ``subvolume id << 48 | inode number`` (inode numbers restart in each subvolume;
subvolumes are entered like directories). XFS files know their extents (holes stay
holes); a btrfs file is one run (its bytes are still exact, but a hole is written as
zeros). Journals (the XFS log) are not replayed, as with TSK; btrfs has none to replay
(copy-on-write: the last committed tree is read). Whatever a hostile structure makes
the parsers raise becomes a ``FilesystemError`` naming the path.
"""
from __future__ import annotations

import io
import os
import stat as st
from collections.abc import Iterator
from typing import Any

from engine.errors import InstantNFSError
from engine.files.fs import Entry, File, FileSystem, FilesystemError, Source, join

SUBVOL_SHIFT = 48
_KINDS = {st.S_IFREG: "file", st.S_IFDIR: "dir", st.S_IFLNK: "symlink", st.S_IFCHR: "chardev",
          st.S_IFBLK: "blockdev", st.S_IFIFO: "fifo", st.S_IFSOCK: "socket"}


class _VolumeFile(io.RawIOBase):
    """A read-only, seekable file over a volume's ``read``."""

    def __init__(self, src: Source) -> None:
        self._src = src
        self._pos = 0
        self.failure: tuple[int, int, BaseException] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._src.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._src.size - self._pos)
        try:
            data = self._src.read(self._pos, size)
        except InstantNFSError as e:
            self.failure = (self._pos, size, e)
            raise
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def open_fs(src: Source, name: str, what: str) -> FileSystem:
    fh = _VolumeFile(src)
    try:
        if what == "XFS":
            from dissect.xfs import XFS

            return _Xfs(src, name, fh, XFS(fh))
        from dissect.btrfs import Btrfs

        return _Btrfs(src, name, fh, Btrfs(fh))
    except InstantNFSError as e:
        raise FilesystemError(f"{name}: cannot read the filesystem: {e}") from None
    except Exception as e:  # a hostile superblock: whatever the parser raises
        raise FilesystemError(f"{name}: cannot read the {what} filesystem: {e!r}") from None


class _Dissect(FileSystem):
    def __init__(self, src: Source, name: str, fh: _VolumeFile) -> None:
        self.src = src
        self.name = name
        self._rec = fh

    def _node(self, inode: int) -> Any:
        raise NotImplementedError

    def _make(self, name: bytes, path: str, ident: int, node: Any) -> Entry:
        raise NotImplementedError

    def _children(self, node: Any) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def _id(self, node: Any) -> int:
        raise NotImplementedError

    def _list(self, inode: int, path: str) -> Iterator[Entry]:
        try:
            it = self._children(self._node(inode))
            while True:
                try:
                    fname, child = next(it)
                except StopIteration:
                    return
                if fname in (".", ".."):
                    continue
                name = os.fsencode(fname)
                yield self._make(name, join(path, name), self._id(child), child)
        except (FilesystemError, NotImplementedError):
            raise
        except Exception as e:
            raise self._failed(path, e) from None

    def _root(self) -> Entry:
        try:
            return self._make(b"", "/", self._root_id(), self._node(self._root_id()))
        except Exception as e:
            raise self._failed("/", e) from None

    def _root_id(self) -> int:
        raise NotImplementedError

    def open_file(self, entry: Entry) -> File:
        try:
            return _DissectFile(self, entry, self._node(entry.inode))
        except Exception as e:
            raise self._failed(entry.path, e) from None

    def runs(self, node: Any, size: int) -> list[tuple[int, int]]:
        return [(0, size)] if size else []


def _entry(name: bytes, path: str, ident: int, mode: int, size: int, uid: int, gid: int, nlink: int,
           mtime: int, atime: int, ctime: int, link: bytes) -> Entry:
    return Entry(name, path, _KINDS.get(st.S_IFMT(mode), "other"), ident, size, mode & 0o7777, uid, gid, nlink,
                 mtime, atime, ctime, link)


class _Xfs(_Dissect):
    def __init__(self, src: Source, name: str, fh: _VolumeFile, xfs: Any) -> None:
        super().__init__(src, name, fh)
        self._x = xfs
        self.kind = "xfs"
        self.block_size = int(xfs.block_size)
        self.journal_note = "log not replayed: changes of the last seconds before the backup may be missing"

    def _root_id(self) -> int:
        return int(self._x.root.inum)

    def _node(self, inode: int) -> Any:
        return self._x.get_inode(inode)

    def _id(self, node: Any) -> int:
        return int(node.inum)

    def _children(self, node: Any) -> Iterator[tuple[str, Any]]:
        for child in node.iterdir():
            yield child.filename, child

    def _make(self, name: bytes, path: str, ident: int, node: Any) -> Entry:
        d = node.inode
        mode = int(d.di_mode)
        link = os.fsencode(node.link) if st.S_ISLNK(mode) else b""
        return _entry(name, path, ident, mode, int(node.size), int(d.di_uid), int(d.di_gid), int(d.di_nlink),
                      int(node.mtime_ns), int(node.atime_ns), int(node.ctime_ns), link)

    def runs(self, node: Any, size: int) -> list[tuple[int, int]]:
        if not size:
            return []
        bs = self.block_size
        out: list[tuple[int, int]] = []
        pos = 0
        try:
            runs = node.dataruns()
        except Exception:  # an inline (local-format) file: one run
            return [(0, size)]
        for block, count in runs:
            start, end = pos * bs, min(size, (pos + count) * bs)
            pos += count
            if block is None or end <= start:
                continue
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((start, end - start))
        return out


class _Btrfs(_Dissect):
    def __init__(self, src: Source, name: str, fh: _VolumeFile, btrfs: Any) -> None:
        super().__init__(src, name, fh)
        self._b = btrfs
        self._subvols: dict[int, Any] = {}
        self.kind = "btrfs"
        self.block_size = int(btrfs.sector_size)
        self.journal_note = None  # copy-on-write: the last committed tree is what is read

    def _root_id(self) -> int:
        return self._id(self._b.root)

    def _id(self, node: Any) -> int:
        sv = node.subvolume
        self._subvols.setdefault(int(sv.objectid), sv)
        return int(sv.objectid) << SUBVOL_SHIFT | int(node.inum)

    def _node(self, inode: int) -> Any:
        obj, inum = inode >> SUBVOL_SHIFT, inode & ((1 << SUBVOL_SHIFT) - 1)
        sv = self._subvols.get(obj)
        if sv is None:
            sv = self._subvols[obj] = self._b.open_subvolume(obj)
        return sv.inode(inum)

    def _children(self, node: Any) -> Iterator[tuple[str, Any]]:
        yield from node.iterdir()

    def _make(self, name: bytes, path: str, ident: int, node: Any) -> Entry:
        mode = int(node.mode)
        link = os.fsencode(node.link) if st.S_ISLNK(mode) else b""
        return _entry(name, path, ident, mode, int(node.size), int(node.uid), int(node.gid), int(node.inode.nlink),
                      int(node.mtime_ns), int(node.atime_ns), int(node.ctime_ns), link)


class _DissectFile(File):
    def __init__(self, fs: _Dissect, entry: Entry, node: Any) -> None:
        super().__init__(fs, entry)
        self._dfs = fs
        self._node = node
        self._stream: Any = None

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        try:
            if self._stream is None:
                self._stream = self._node.open()
            self._stream.seek(offset)
            data = self._stream.read(length)
        except Exception as e:
            raise self.fs._failed(self.entry.path, e, offset, length) from None
        if len(data) != length:
            raise self.fs._failed(self.entry.path, OSError("short read"), offset, length)
        return bytes(data)

    def data_runs(self) -> list[tuple[int, int]]:
        return self._dfs.runs(self._node, self.size)
