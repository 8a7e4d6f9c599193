"""Dropping files from the kernel's page cache: how a "cold" row makes the disk count.

``posix_fadvise(DONTNEED)`` asks the kernel to forget a file's clean pages; the next read
goes to the disk (or, for a FUSE file, to the FUSE server). Nothing else is touched: the
rest of the machine's cache stays as it was, so no root-only ``drop_caches`` is needed.
The same walk of a repository's files gives its size on disk (``tree_bytes``).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def drop_file_pages(paths: Iterable[Path]) -> int:
    """Drop the kernel's cached pages of these files (``posix_fadvise(DONTNEED)``).

    Dirty pages cannot be dropped, so each file is fsync'ed first (a file opened read-only
    can be fsync'ed). Returns the number of files. On a FUSE file this drops the pages the
    kernel keeps for it (borg mounts with keep_cache), not the FUSE server's own memory.
    """
    n = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass  # a read-only FUSE file system may refuse fsync
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def files_under(root: Path) -> list[Path]:
    out: list[Path] = []
    for d, _dirs, files in os.walk(root):
        out.extend(Path(d, f) for f in files)
    return out


def tree_bytes(root: Path) -> int:
    """Apparent size of every file under root: what a copy of that repository costs."""
    return sum(os.lstat(p).st_size for p in files_under(root))
