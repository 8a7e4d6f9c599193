"""The one place that composes a disk: what a published disk is made of, bottom to top.

::

    WriteCache      engine.writecache   a session's writes over the disk below (optional)
    BackupDisk      engine.disk         one disk of a restore point: its block map, read
                                        through a chunk source it is given
    Readahead       engine.cache        that disk's sequential-read detector (its own)
    ChunkCache      engine.cache        decompressed chunks, shared by every disk
    PackReader      engine.repo.packs   verified records out of the pack files

A ``Stack`` holds the parts shared by every disk of one repository: the decompression
cache and the pool that decompresses into it. It subscribes the cache to the pack
reader's closes (a pack gc removed, or another pack behind a known id), so the cache
never serves bytes of a pack that is gone. The layers never build each other: the
repository knows nothing of disks or caches, a ``BackupDisk`` nothing of packs, a write
cache nothing of what it is over. Everything that opens a disk for reading (the
datastore, export, restore tools, tests) asks a stack.

A write cache is tied to the restore point disk it was made over by a tag (BLAKE2b of
``<point id>/<disk name>``, checked when the cache is opened again), made here too.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from engine.cache import ChunkCache, Readahead
from engine.disk import BackupDisk
from engine.repo.repository import Repository, RestorePoint
from engine.writecache import WriteCache

DEFAULT_CACHE_BYTES = 1 << 30
CACHE_MODES = ("create", "open", "temporary")


class Stack:
    """The disks of one repository, over one shared decompression cache."""

    def __init__(self, repo: Repository, cache_bytes: int = DEFAULT_CACHE_BYTES, workers: int | None = None,
                 *, owns_repo: bool = False) -> None:
        self.repo = repo
        self._owns_repo = owns_repo
        # decompression: chunk loads and readahead hints; its tasks never wait on each other
        self.executor = ThreadPoolExecutor(max_workers=workers or max(2, os.cpu_count() or 2), thread_name_prefix="chunk")
        self.cache = ChunkCache(repo.reader, cache_bytes, self.executor)
        repo.reader.on_close.append(self.cache.drop_pack)

    @classmethod
    def open(cls, path: str | os.PathLike, cache_bytes: int = DEFAULT_CACHE_BYTES, workers: int | None = None) -> Stack:
        """Open the repository at ``path`` and a stack over it; ``close`` closes both."""
        return cls(Repository.open(path), cache_bytes, workers, owns_repo=True)

    def backup_disk(self, point: RestorePoint, which: str | int) -> BackupDisk:
        """Disk ``which`` (index or name) of a restore point, read-only, with its own readahead."""
        info = point.disk_info(which)
        blockmap = point.open_blockmap(which)
        return BackupDisk(info.name, blockmap, self.cache, Readahead(blockmap, self.cache))

    @staticmethod
    def base_tag(point: RestorePoint, disk_name: str) -> bytes:
        return hashlib.blake2b(f"{point.id}/{disk_name}".encode(), digest_size=32).digest()

    def write_cache(self, point: RestorePoint, which: str | int, how: str, where: str | os.PathLike, *,
                    verifier: bytes | None = None, executor: Executor | None = None) -> WriteCache:
        """A writable disk: a write cache over disk ``which`` of ``point``.

        ``how``: ``create`` a new cache directory ``where``; ``open`` the one there (it
        must exist and be of this disk); ``temporary``: a new one under the directory
        ``where``, removed when closed."""
        if how not in CACHE_MODES:
            raise ValueError(f"how must be one of {', '.join(CACHE_MODES)}, not {how!r}")
        disk = self.backup_disk(point, which)
        tag = self.base_tag(point, disk.name)
        if how == "temporary":
            return WriteCache.temporary(disk, Path(where), base_tag=tag, verifier=verifier, executor=executor)
        make = WriteCache.create if how == "create" else WriteCache.open
        return make(Path(where), disk, base_tag=tag, verifier=verifier, executor=executor)

    def close(self) -> None:
        if self.cache.drop_pack in self.repo.reader.on_close:
            self.repo.reader.on_close.remove(self.cache.drop_pack)
        self.executor.shutdown(wait=True)
        if self._owns_repo:
            self.repo.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
