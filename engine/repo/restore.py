"""Write one disk of a restore point back out as a raw image.

To a regular file the output is sparse: the file is sized first and zero blocks are
never written. To a block device every block is written, zeros included, because the
device may hold old data. The caller gives the disk to read (``engine.stack`` composes
it over the chunk cache, whose readahead decompresses ahead on the other core while
this thread writes); this module only needs its block map and ``readv``, so storage
stays below the read path.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Protocol

from engine.blockmap import ZERO_PACK, BlockMap
from engine.errors import UsageError
from engine.fsutil import no_space, pwrite_all
from engine.repo.repository import RestorePoint


class PointDisk(Protocol):
    """One disk of a restore point, readable (``engine.disk.BackupDisk``)."""

    name: str
    size: int
    block_size: int
    map: BlockMap

    def readv(self, offset: int, length: int) -> list[memoryview]: ...


def restore_disk(
    point: RestorePoint,
    disk: PointDisk,
    out_path: str,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    entries = disk.map.entries
    bs = disk.block_size
    try:
        st = os.stat(out_path)
        is_dev = stat.S_ISBLK(st.st_mode)
        if not is_dev and not force:
            raise UsageError(f"{out_path} exists; pass --force to overwrite it")
    except FileNotFoundError:
        is_dev = False
    flags = os.O_WRONLY | os.O_CLOEXEC | (0 if is_dev else os.O_CREAT | os.O_TRUNC)
    try:
        fd = os.open(out_path, flags, 0o644)
    except OSError as e:
        raise UsageError(f"cannot open {out_path} for writing: {e.strerror}") from None
    written = 0
    try:
        if is_dev:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < disk.size:
                raise UsageError(f"{out_path} holds {dev_size} bytes, the disk needs {disk.size}")
        else:
            os.ftruncate(fd, disk.size)
        zero = bytes(bs)
        for block, pack in enumerate(entries["pack"].tolist()):
            off = block * bs
            length = min(bs, disk.size - off)
            if pack == ZERO_PACK:
                if is_dev:
                    pwrite_all(fd, zero[:length], off)
            else:
                for buf in disk.readv(off, length):
                    pwrite_all(fd, buf, off)  # a short write goes on, never leaves a gap
                    off += len(buf)
                written += length
            if progress:
                progress(length)
        os.fsync(fd)
    except OSError as e:
        no_space(e, f"writing {out_path}")
    finally:
        os.close(fd)
    return {"point": point.id, "disk": disk.name, "size": disk.size, "data_bytes": written, "output": out_path}
