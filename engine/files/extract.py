"""Extraction of files and trees out of a guest filesystem into a local directory.

The guest filesystem is hostile and this may run as root, so nothing is ever written
outside the target directory:

* Every file is created relative to an open descriptor of its parent directory
  (``dir_fd``), one name at a time, with ``O_CREAT|O_EXCL|O_NOFOLLOW``: an existing name
  is never overwritten and a symlink is never followed, whoever made it. Directories
  that exist already are entered only when they are real directories (``O_NOFOLLOW|
  O_DIRECTORY``).
* A name is written as the bytes the filesystem holds (undecodable UTF-8 stays as it
  is, like ``os.fsencode`` of a surrogateescape'd name). A name holding ``/`` or NUL is
  renamed (each such byte becomes ``%2F`` / ``%00``) and the rename is reported; names
  ``.``, ``..`` and empty ones are refused.
* Symlinks are recreated as symlinks with their target as stored (pointing anywhere):
  they are never followed while extracting.
* Hard links: TSK shows each name of an inode as its own entry; the first name of an
  inode with several links is extracted, the next names are hard-linked to it inside
  the target (or copied when linking fails).
* Devices, FIFOs and sockets are skipped and reported (no device node is ever made).
* xattrs and ACLs are not extracted (TSK does not offer them for every filesystem).

Sparse files stay sparse: only the file's allocated runs are read, pieces of zeros
are not written, and the file is then cut to its size (``ftruncate``), so holes are
holes (an allocated run of zeros becomes a hole too: the bytes are the same). ``preserve`` sets modes
and times (atime, mtime; directories after their contents) and, as root, ownership.
A file that cannot be read (a corrupt chunk) is removed, its error (naming the file,
its byte range, the filesystem block and the disk offset) is recorded, and extraction
goes on; ``Result.failed`` lists them. Single-threaded.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.errors import InstantNFSError
from engine.files.fs import READ_PIECE, Entry, FileSystem

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ZERO = bytes(READ_PIECE)


@dataclass
class Result:
    """What an extraction did; ``failed`` and ``skipped`` are (path, why)."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"files": self.files, "dirs": self.dirs, "symlinks": self.symlinks, "hardlinks": self.hardlinks,
                "bytes": self.bytes, "failed": [{"path": p, "error": e} for p, e in self.failed],
                "skipped": [{"path": p, "why": w} for p, w in self.skipped],
                "renamed": [{"path": p, "as": n} for p, n in self.renamed]}


def safe_name(name: bytes) -> bytes | None:
    """The name to create for a guest name: as is, with ``/`` and NUL escaped, or None."""
    if name in (b"", b".", b".."):
        return None
    return name.replace(b"/", b"%2F").replace(b"\0", b"%00")


class Extractor:
    """Writes entries of one filesystem under one target directory."""

    def __init__(self, fs: FileSystem, target: str | os.PathLike, *, preserve: bool = False,
                 progress: Callable[[int], None] | None = None) -> None:
        self.fs = fs
        self.preserve = preserve
        self.progress = progress or (lambda n: None)
        self.result = Result()
        self.as_root = os.geteuid() == 0
        os.makedirs(target, exist_ok=True)
        self.root_fd = os.open(target, DIR_FLAGS)
        self._links: dict[int, bytes] = {}  # inode -> path (relative to the target) of its first name

    def close(self) -> None:
        os.close(self.root_fd)

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extract(self, entry: Entry) -> None:
        """``entry`` (a file, link or whole tree) into the target, under its own name."""
        if entry.type == "dir" and entry.path == "/":  # the root: its contents into the target
            for child in self.fs.listdir(entry):
                self.extract(child)
        elif entry.type == "dir":
            self._tree(entry, self.root_fd, b"")
        else:
            self._one(entry, self.root_fd, b"")

    def _name(self, entry: Entry) -> bytes | None:
        name = safe_name(entry.name)
        if name is None:
            self.result.skipped.append((entry.path, "a name that cannot be created (., .. or empty)"))
        elif name != entry.name and entry.name:
            self.result.renamed.append((entry.path, os.fsdecode(name)))
        return name

    def _tree(self, top: Entry, parent_fd: int, rel: bytes) -> None:
        name = self._name(top)
        if name is None:
            return
        fd = self._mkdir(parent_fd, name, top.path)
        if fd is None:
            return
        # a stack of (fd, entry, relative path, iterator): one level per open directory
        stack = [(fd, top, rel + name, self.fs.listdir(top))]
        seen = {top.inode}
        while stack:
            dfd, dentry, drel, it = stack[-1]
            try:
                child = next(it)
            except StopIteration:
                stack.pop()
                self._finish_dir(dfd, dentry)
                os.close(dfd)
                continue
            except InstantNFSError as e:  # an unreadable directory: the rest of it is lost
                self.result.failed.append((dentry.path, str(e)))
                stack.pop()
                os.close(dfd)
                continue
            if child.type != "dir":
                self._one(child, dfd, drel + b"/")
                continue
            if child.inode in seen:
                self.result.skipped.append((child.path, "a directory met twice (a loop in the filesystem)"))
                continue
            seen.add(child.inode)
            cname = self._name(child)
            if cname is None:
                continue
            cfd = self._mkdir(dfd, cname, child.path)
            if cfd is not None:
                stack.append((cfd, child, drel + b"/" + cname, self.fs.listdir(child)))

    def _mkdir(self, parent_fd: int, name: bytes, path: str) -> int | None:
        try:
            os.mkdir(name, 0o777, dir_fd=parent_fd)  # less the umask; --preserve sets it when done
            self.result.dirs += 1
        except FileExistsError:
            pass
        except OSError as e:
            self.result.failed.append((path, f"cannot create the directory: {e.strerror}"))
            return None
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            why = "a symlink or file of that name is in the way" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
            self.result.failed.append((path, f"cannot enter the directory: {why}"))
            return None

    def _finish_dir(self, fd: int, entry: Entry) -> None:
        if self.preserve:
            self._meta(fd, entry)

    def _one(self, entry: Entry, dfd: int, drel: bytes) -> None:
        name = self._name(entry)
        if name is None:
            return
        try:
            if entry.type == "symlink":
                os.symlink(entry.link, name, dir_fd=dfd)
                self.result.symlinks += 1
                if self.preserve:
                    os.utime(name, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=dfd, follow_symlinks=False)
                    if self.as_root:
                        os.chown(name, entry.uid, entry.gid, dir_fd=dfd, follow_symlinks=False)
                return
            if entry.type != "file":
                self.result.skipped.append((entry.path, f"a {entry.type} (special files are not extracted)"))
                return
            if entry.nlink > 1 and entry.inode in self._links:
                try:
                    os.link(self._links[entry.inode], name, src_dir_fd=self.root_fd, dst_dir_fd=dfd,
                            follow_symlinks=False)
                    self.result.hardlinks += 1
                    return
                except OSError:
                    pass  # copy it instead
            self._file(entry, dfd, name)
            if entry.nlink > 1:
                self._links.setdefault(entry.inode, drel + name)
        except FileExistsError:
            self.result.failed.append((entry.path, "already exists in the target (never overwritten)"))
        except OSError as e:
            self.result.failed.append((entry.path, f"cannot write: {e.strerror}"))

    def _file(self, entry: Entry, dfd: int, name: bytes) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        ok = False
        try:
            f = self.fs.open_file(entry)
            done = 0
            for off, length in f.data_runs():
                for piece in f.pieces(off, length):
                    if piece != _ZERO[: len(piece)]:  # a zero piece stays a hole
                        os.pwrite(fd, piece, off)
                    off += len(piece)
                    done += len(piece)
                    self.progress(len(piece))
            os.ftruncate(fd, entry.size)
            self.progress(entry.size - done)  # the holes, so the bar's total (the sizes) is reached
            self.result.bytes += done
            if self.preserve:
                self._meta(fd, entry)
            else:
                os.fchmod(fd, (0o777 if entry.mode & 0o111 else 0o666) & ~_umask())
            ok = True
            self.result.files += 1
        except InstantNFSError as e:
            self.result.failed.append((entry.path, str(e)))
        finally:
            os.close(fd)
            if not ok:
                os.unlink(name, dir_fd=dfd)

    def _meta(self, fd: int, entry: Entry) -> None:
        if self.as_root:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode & (0o7777 if self.as_root else 0o1777))
        os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))


_UMASK: int | None = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o22)
        os.umask(_UMASK)
    return _UMASK


def total_bytes(fs: FileSystem, entries: Iterable[Entry]) -> int:
    """The bytes of regular files under these entries (for a progress bar's total)."""
    n = 0
    for e in entries:
        if e.type == "file":
            n += e.size
        elif e.type == "dir":
            n += sum(c.size for c in fs.walk(e) if c.type == "file")
    return n


def extract(fs: FileSystem, entries: Iterable[Entry], target: str | os.PathLike, *, preserve: bool = False,
            progress: Callable[[int], None] | None = None) -> Result:
    """Extract each entry (a file, a symlink or a whole directory) into ``target``."""
    with Extractor(fs, target, preserve=preserve, progress=progress) as x:
        for e in entries:
            x.extract(e)
        return x.result
