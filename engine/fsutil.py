"""Small file helpers shared by the rooms: durable files (the repository, the write cache,
export) and which paths are mount points (file-level mounts, the benchmark's peers)."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import NoReturn

from engine.errors import NoSpace

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def no_space(e: OSError, what: str) -> NoReturn:
    """Raise ``NoSpace("no space left " + what)`` from ``e`` when it is ENOSPC or EDQUOT,
    else re-raise ``e``. Call it in an ``except OSError as e:`` block; ``what`` finishes
    the sentence, e.g. ``f"writing {path}"``."""
    if e.errno in NO_SPACE_ERRNOS:
        raise NoSpace(f"no space left {what}") from e
    raise e


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a create, rename or unlink in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: memoryview | bytes | bytearray, offset: int) -> None:
    """``pwrite`` until every byte is written (a short write is not an error)."""
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, rename, fsync the
    directory. On failure (a full volume) the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def mount_points() -> set[str]:
    """Every mount point in this mount namespace, from ``/proc/self/mountinfo`` (no stat
    of any of them): its octal escapes (``\\040`` for a space, and tab, newline,
    backslash) undone, the bytes decoded as ``os.fsdecode`` does."""
    out = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4:
                out.add(os.fsdecode(_unescape_mountinfo(fields[4])))
    return out


def is_mounted(path: str | os.PathLike) -> bool:
    """Whether ``path`` (as given: resolve it first if it may hold symlinks) is a mount point."""
    return os.fspath(path) in mount_points()


def _unescape_mountinfo(field: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(field):
        if field[i] == 0x5C and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)
