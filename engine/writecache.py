"""The copy-on-write write cache: a writable layer over a read-only disk.

A ``WriteCache`` lives in one directory and holds three files: ``data``, a sparse file as
large as the disk in which every *dirty* granule's newest bytes sit at the granule's own
offset (clean granules are holes, or stale bytes left by a write that never became
dirty, and are never read), ``bitmap``, a header page and then one bit per granule, and
``journal``, the stable writes since the last commit, each a record of its granules'
whole content.
Their layout, the header's checks, the one-process lock, the stale temporaries, the
bitmap in memory (``DirtyMap``) and the granule reads and writes of ``data``
(``DataFile``) are ``engine.writecache_format``; this module decides when they happen:
under which locks, in which order, and what a failure means. A ``WriteGate`` holds
writes back while an export or commit job needs them paused.

Invariants

- A granule's bit is set in memory only after its whole granule is in ``data`` (the
  first write to a clean granule writes all of it: the new bytes plus the base's bytes
  around them, copy on write). So a dirty granule's ``data`` bytes are its content, and a
  clean granule's content is the base's.
- Bits are never cleared, so persisted bits only go 0 -> 1: ``commit`` fdatasyncs
  ``data`` first, then writes the changed bitmap pages in place and fdatasyncs
  ``bitmap``, then (if the journal holds records) starts a new journal epoch and
  fdatasyncs ``journal``. A persisted dirty bit always has its data on disk, and a torn
  bitmap page holds only bits whose data is already durable. After a crash, ``open``
  restores every committed write; an uncommitted write to a clean granule is forgotten
  (its bit was not persisted), an uncommitted write to a committed-dirty granule may or
  may not survive, per byte, which is what NFSv3 allows for UNSTABLE writes (the
  verifier changes).
- A stable write (FILE_SYNC) is one durable step (RFC 1813 asks it to make itself
  durable, not the unstable writes before it): its bytes go into ``data`` (page cache)
  and, under the same granule locks, the granules' whole newest content is read back
  and given the next journal sequence number; the record is written to the journal and
  the journal fdatasynced (over zeros laid ahead, so the sync carries no allocation).
  ``open`` replays the current epoch's whole records in sequence order over ``data``
  and sets their bits (then syncs, persists the bitmap, starts a new epoch): a granule
  gets the content of its last whole record, which holds every write to it before that
  one; a torn record was never acknowledged. A commit voids the records (new epoch), so
  a replay never lays an old record over a write the commit made durable. A stable
  write larger than ``JOURNAL_MAX_WRITE``, or one that finds the journal full or has
  no room on the volume for its record, commits instead.
- A failing write (ENOSPC, EDQUOT) raises ``NoSpace``; it writes newly allocated
  granules before it touches any already-dirty one, and it sets no bit unless all of it
  was written, so everything written before it reads back unchanged.
- The base is never written: the layer only calls ``base.read``/``readv``/``aread``.

Concurrency

Granules are grouped in lock regions of ``LOCK_SPAN`` granules, mapped onto
``STRIPES`` locks. A write holds the locks of every region it touches (taken in stripe
order, so two writers never deadlock) from the copy-on-write read of the base until its
bits are set; a read that touches a dirty granule holds them while it reads. So
overlapping reads and writes see each region either before or after a write, and two
partial writes to one clean granule never both copy it from the base. Bits, export
trackers and the set of bitmap pages to persist change together under one short
``DirtyMap.meta`` lock. Commits are serialised, and a commit whose writes an earlier commit
already covered returns at once (group commit). A commit holds the journal exclusively
(``Journal.exclusive``: no new record reserved, every reserved one written) while it
syncs and starts a new epoch; stable writes in threads sync the journal concurrently
(the kernel shares one flush among them). ``awrite_inline`` is the loop's stable write
for writes that read nothing from the base: its pwrites run on the loop and it waits
for the journal's group sync (``_group_sync``: one thread syncs for every stable write
waiting, batch after batch, started one loop iteration after the first waiter so that
the writes of one receive batch share an fdatasync: at QD16 that took 4 KiB FILE_SYNC
writes from ~6k to ~8k IOPS, most batches having held a single write), since a thread
hand-off per request, and each worker thread taking the GIL back after its syscalls,
cost more than the pwrites; whatever would block the loop (a pause, a commit holding
the journal, a full journal, zeros to lay ahead) goes to a thread instead. The async
variants run the blocking work (pwrite, fsync, copy on write) in an executor; a read of
clean granules only goes straight to ``base.aread`` (and ``peekv``, the fast lane's, to
``base.peekv``), and a read with dirty granules runs on the loop when their bytes are in the page cache
(``preadv`` with ``RWF_NOWAIT``, the granule locks taken without waiting), else in the
executor.

What it assumes of the base: ``base.size`` is fixed, and ``base.read`` returns the same
bytes for the same range every time (a restore point is immutable), is thread-safe, and
``aread``/``readv`` return buffers that stay valid after the call. It must be the same
base on every ``open``: the caller's ``base_tag`` (e.g. a hash of restore point id and
disk name) is checked against the one stored at creation.

A failed ``fdatasync`` is final: Linux may drop the dirty pages it could not write and
report success to a retried fsync, so the cache no longer knows what is durable. The
cache is then *failed*: the commit raises ``WriteCacheError`` (NFS3ERR_IO), and so does
every later write and commit, with one log line naming the cache; reads go on (the page
cache still holds what the client wrote, so the disk can be exported) and ``stats()``
says ``failed: "fdatasync: EIO"``. It stays so until the cache is closed (the session
unpublished). ``_fdatasync`` is the one place the cache syncs: tests replace it.

Pools (no task ever waits for work queued behind itself in its own pool): the async
variants run writes and dirty reads in the caller's write-cache I/O ``executor``; those
tasks wait only for chunk loads in the repository's decompression pool. A write that
arrives through ``awrite`` while writes are paused waits on the event loop (an asyncio
future woken when the pause ends), not in a pool thread: an export or commit of one
session never holds the threads every session's writes need. Only the synchronous
``write`` (called in a thread) waits on the pause in its thread, and so does an
``awrite`` already handed to its thread when the pause began (for that pause only).

Temporary caches (sandboxes, verification) live in a fresh directory that ``close``
removes; they are not durable (``commit`` only counts), since nothing survives their
session anyway.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from engine.disk import Disk
from engine.errors import FileTooLarge, WriteCacheError
from engine.fsutil import pwrite_all
from engine.writecache_format import (
    DEFAULT_GRANULE,
    FRAGMENTED_RUNS,
    HEADER_SIZE,
    JOURNAL_BYTES,
    PAGE,
    CacheFiles,
    DataFile,
    DirtyMap,
    DirtyTracker,
    create_files,
    holds_cache,
    make_temporary_dir,
    open_files,
    pread_exact,
    remove_stale_temporaries,
    volume_error,
)

# the names other modules import from here (the format's names stay importable from here)
__all__ = [
    "DEFAULT_GRANULE", "HEADER_SIZE", "PAGE", "DirtyMap", "DirtyTracker", "WriteCache",
    "WriteCacheStats", "WriteGate", "remove_stale_temporaries",
]

LOCK_SPAN = 64  # granules per lock region
JOURNAL_MAX_WRITE = min(1 << 20, JOURNAL_BYTES // 8)  # larger stable writes commit instead of journalling
STRIPES = 64

log = logging.getLogger("instantnfs.writecache")
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def _fdatasync(fd: int) -> None:
    """Every sync of the write cache goes through here (tests replace it to fail)."""
    os.fdatasync(fd)


def _settle(futs: list[asyncio.Future], exc: BaseException | None) -> None:
    for fut in futs:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(frozen=True, slots=True)
class WriteCacheStats:
    size: int
    granule: int
    dirty_granules: int
    dirty_bytes: int
    allocated_bytes: int
    writes: int
    bytes_written: int
    commits: int
    failed: str | None = None  # why the cache can no longer be written, e.g. "fdatasync: EIO"


class WriteGate:
    """Writes in progress, and pauses that hold new ones back (``WriteCache.writes_paused``).

    A thread waits on the condition; a coroutine waits on an asyncio future that the end
    of the pause wakes through its loop, so it holds no executor thread while it waits.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writers = 0
        self._frozen = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def enter(self) -> None:
        """Wait in this thread for any pause to end, then count a write in progress."""
        with self._cond:
            while self._frozen:
                self._cond.wait()
            self._writers += 1

    def leave(self) -> None:
        with self._cond:
            self._writers -= 1
            self._cond.notify_all()

    async def unpaused(self) -> None:
        """Return once no pause is on, waiting on the running loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if not self._frozen:
                    return
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    def try_enter(self) -> bool:
        """Count a write in progress unless a pause is on (then False: nothing counted)."""
        with self._cond:
            if self._frozen:
                return False
            self._writers += 1
            return True

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold new writes back and wait for the ones in progress (in a thread)."""
        with self._cond:
            self._frozen += 1
            while self._writers:
                self._cond.wait()
        try:
            yield
        finally:
            waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
            with self._cond:
                self._frozen -= 1
                self._cond.notify_all()
                if not self._frozen:
                    waiters, self._waiters = self._waiters, []
            for loop, fut in waiters:
                try:
                    loop.call_soon_threadsafe(_wake, fut)
                except RuntimeError:
                    pass  # that loop is closed: nobody waits there any more


class WriteCache:
    """A writable disk: ``base`` plus the granules written since the cache was created."""

    def __init__(
        self,
        base: Disk,
        path: Path,
        files: CacheFiles,
        *,
        temporary: bool,
        verifier: bytes | None,
        executor: Executor | None,
    ) -> None:
        self.base = base
        self.path = path
        self.size = base.size
        self.granule = files.granule
        self.durable = not temporary
        self.is_temporary = temporary
        self.verifier = verifier if verifier is not None else os.urandom(8)
        if len(self.verifier) != 8:
            raise ValueError("a write verifier is 8 bytes")
        self._shift = self.granule.bit_length() - 1
        self._data_fd = files.data_fd
        self._bitmap_fd = files.bitmap_fd
        self._journal = files.journal
        self._file = DataFile(files.data_fd, base, self.granule)
        self._dirty = DirtyMap(files.bits, self.granule, self.size, files.dirty)
        self._locks = [threading.Lock() for _ in range(STRIPES)]
        self._gate = WriteGate()
        self._executor = executor
        self._commit_lock = threading.Lock()
        self._sync_mu = threading.Lock()  # the stable writes waiting for the journal's group sync
        self._sync_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._syncing = False
        self._durable_gen = 0
        self._closed = False
        self.failed: str | None = None
        self.writes = 0
        self.bytes_written = 0
        self.commits = 0

    # -- creating and opening ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        base: Disk,
        *,
        granule: int = DEFAULT_GRANULE,
        base_tag: bytes = b"",
        verifier: bytes | None = None,
        executor: Executor | None = None,
        _temporary: bool = False,
    ) -> WriteCache:
        """A new, empty cache in directory ``path`` (created; it must not hold a cache)."""
        p = Path(path)
        files = create_files(p, base.size, granule, base_tag)
        return cls(base, p, files, temporary=_temporary, verifier=verifier, executor=executor)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        base: Disk,
        *,
        base_tag: bytes | None = None,
        verifier: bytes | None = None,
        executor: Executor | None = None,
    ) -> WriteCache:
        """The cache in ``path`` as last committed (a new verifier unless one is given)."""
        p = Path(path)
        files = open_files(p, base.size, base_tag)
        return cls(base, p, files, temporary=False, verifier=verifier, executor=executor)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, base: Disk, **kw) -> WriteCache:
        """Instant recovery: reopen the session's cache after a restart, or start one."""
        if holds_cache(path):
            granule = kw.pop("granule", None)
            cache = cls.open(path, base, **kw)
            if granule is not None and granule != cache.granule:
                cache.close()
                raise WriteCacheError(f"{path} uses {cache.granule}-byte granules, not {granule}")
            return cache
        return cls.create(path, base, **kw)

    @classmethod
    def temporary(cls, base: Disk, parent: str | os.PathLike | None = None, **kw) -> WriteCache:
        """Sandbox / verification: a cache in a new directory under ``parent``, removed on close."""
        d = make_temporary_dir(parent)
        try:
            return cls.create(d, base, _temporary=True, **kw)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise

    def close(self) -> None:
        """Commit (durable caches) and close; a temporary cache's directory is removed."""
        if self._closed:
            return
        try:
            if self.durable and self.failed is None:
                self.commit()
        finally:
            self._closed = True
            os.close(self._data_fd)
            os.close(self._bitmap_fd)
            os.close(self._journal.fd)
            if self.is_temporary:
                shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> WriteCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def _clip(self, offset: int, length: int) -> int:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        return max(0, min(length, self.size - offset))

    def _stripes(self, g0: int, g1: int) -> list[threading.Lock]:
        """The locks of the regions [g0, g1] touches, in the one order every caller takes them."""
        r0, r1 = g0 // LOCK_SPAN, g1 // LOCK_SPAN
        if r1 - r0 + 1 >= STRIPES:
            return self._locks
        return [self._locks[i] for i in sorted({r % STRIPES for r in range(r0, r1 + 1)})]

    def is_dirty(self, offset: int, length: int) -> bool:
        """Whether any granule in the range was written."""
        length = self._clip(offset, length)
        if length == 0:
            return False
        g0 = offset >> self._shift
        return self._dirty.count(g0, (offset + length - 1) >> self._shift) > 0

    def needs_no_copy(self, offset: int, n: int) -> bool:
        """Whether a write covers whole granules, or dirty ones at its unaligned edges
        (dirty bits never clear, so the answer cannot go stale)."""
        g = self.granule
        end = offset + n
        if offset % g and not self.is_dirty(offset, 1):
            return False
        return not (end % g and end < self.size and not self.is_dirty(end - 1, 1))

    def read(self, offset: int, length: int) -> bytes:
        """The disk's newest bytes in [offset, offset + length), cut at the end of the disk."""
        parts = self.readv(offset, length)
        if len(parts) == 1:
            return parts[0].tobytes()
        return b"".join(parts)

    def readv(self, offset: int, length: int) -> list[memoryview]:
        """The same bytes as ``read``, as a list of buffers (cache file + base)."""
        self._check_open()
        length = self._clip(offset, length)
        if length == 0:
            return []
        g0 = offset >> self._shift
        g1 = (offset + length - 1) >> self._shift
        if self._dirty.count(g0, g1) == 0:
            return self.base.readv(offset, length)
        locks = self._stripes(g0, g1)
        for lk in locks:
            lk.acquire()
        try:
            return self._file.read(offset, length, self._dirty.runs(g0, g1), self._dirty)
        finally:
            for lk in reversed(locks):
                lk.release()

    def peekv(self, offset: int, length: int) -> list | None:
        """The fast lane's read, on the loop with no hand-off: for a range no write has
        touched, the base's ``peekv`` (its buffers when every block is cached or zero,
        else None); None when a granule of the range is dirty or the base cannot peek
        (the caller then takes ``aread``). A write racing it is seen or not, as with
        any read; the base's buffers are immutable, so they stay valid while sent."""
        self._check_open()
        clipped = self._clip(offset, length)
        if clipped and self._dirty.count(offset >> self._shift, (offset + clipped - 1) >> self._shift):
            return None
        peek = getattr(self.base, "peekv", None)
        if peek is None:
            return None
        return peek(offset, length)

    async def aread(self, offset: int, length: int) -> list[memoryview]:
        """``readv`` for the event loop: clean ranges straight from the base; a range with
        dirty granules on the loop when their bytes are in the page cache (``_read_nowait``),
        else in the executor."""
        self._check_open()
        if not self.is_dirty(offset, length):
            return await self.base.aread(offset, length)
        parts = self._read_nowait(offset, self._clip(offset, length))
        if parts is None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self.readv, offset, length)
        out: list[memoryview] = []
        for part in parts:
            if isinstance(part, tuple):
                out.extend(await self.base.aread(*part))
            else:
                out.append(part)
        return out

    def _read_nowait(self, offset: int, length: int) -> list[memoryview | tuple[int, int]] | None:
        """The dirty runs of the range read from ``data`` without waiting (``RWF_NOWAIT``:
        only what the page cache holds) under the granule locks, taken without waiting,
        and the clean runs as ``(offset, length)`` for the base (clean when the locks
        were held: the answer is the disk as of then). None when something would wait:
        a lock, a page not cached, or many small runs (the executor merges those)."""
        if not _RWF_NOWAIT:
            return None
        g0, g1 = offset >> self._shift, (offset + length - 1) >> self._shift
        locks = self._stripes(g0, g1)
        taken: list[threading.Lock] = []
        try:
            for lk in locks:
                if not lk.acquire(blocking=False):
                    return None
                taken.append(lk)
            runs = self._dirty.runs(g0, g1)
            if len(runs) > FRAGMENTED_RUNS:
                return None
            sh, end = self._shift, offset + length
            out: list[memoryview | tuple[int, int]] = []
            for start, count, is_dirty in runs:
                lo, hi = max(offset, start << sh), min(end, (start + count) << sh)
                if not is_dirty:
                    out.append((lo, hi - lo))
                    continue
                buf = bytearray(hi - lo)
                try:
                    n = os.preadv(self._data_fd, [buf], lo, _RWF_NOWAIT)
                except (BlockingIOError, OSError):
                    return None
                if n != hi - lo:
                    return None
                out.append(memoryview(buf))
            return out
        finally:
            for lk in reversed(taken):
                lk.release()

    # -- writing -------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview, stable: bool = False) -> None:
        """Write ``data`` at ``offset``; ``stable`` returns only once it is durable (FILE_SYNC)."""
        self._check_writable()
        view = memoryview(data).cast("B")
        n = len(view)
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if offset + n > self.size:
            raise FileTooLarge(f"a write of {n} bytes at {offset} goes past the end of the {self.size}-byte disk")
        record = None
        if n:
            self._gate.enter()
            try:
                record = self._write(offset, view, stable and self.durable and n <= JOURNAL_MAX_WRITE)
            finally:
                self._gate.leave()
        if not stable:
            return
        if record is None or not self._append(*record):
            self.commit()

    def _write(self, offset: int, view: memoryview, journal: bool, wait: bool = True) -> tuple | None:
        """Write under the locks of the granules; with ``journal``, also take the write's
        place in the journal and return what ``_append`` writes there (None if the
        journal is full: the caller commits instead)."""
        g0, g1 = offset >> self._shift, (offset + len(view) - 1) >> self._shift
        locks = self._stripes(g0, g1)
        for lk in locks:
            lk.acquire()
        try:
            runs = self._dirty.runs(g0, g1)
            try:
                self._file.write(offset, view, runs)
            except OSError as e:
                volume_error(e, f"a write of {len(view)} bytes at {offset}")
            # all of it is in the data file (no bit is set for a write that failed)
            with self._dirty.meta:
                self._dirty.mark([(s, c) for s, c, v in runs if not v], g0, g1)
                self.writes += 1
                self.bytes_written += len(view)
            if not journal:
                return None
            # the record holds the granules' whole newest content, read under their locks
            a, b = g0 << self._shift, min((g1 + 1) << self._shift, self.size)
            content = view if (a == offset and b == offset + len(view)) else memoryview(pread_exact(self._data_fd, b - a, a))
            ticket = self._journal.reserve(b - a, wait)
            return None if ticket is None else (ticket, g0, g1 - g0 + 1, content)
        finally:
            for lk in reversed(locks):
                lk.release()

    def _append(self, ticket: tuple[int, int, bytes], granule: int, count: int, content: memoryview) -> bool:
        """Make a stable write durable in one step: its record, then one fdatasync of the
        journal. False if the volume had no room for the record (the caller commits)."""
        try:
            self._journal.append(ticket, granule, count, content)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            volume_error(e, "a write to the write cache's journal")
        try:
            _fdatasync(self._journal.fd)
        except OSError as e:
            self._fail("fdatasync", e)
        return True

    async def awrite_inline(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """A stable write from the event loop, for a write that reads nothing from the
        base (``needs_no_copy``): its pwrites (data, journal record) go into the page
        cache here, and it waits for the journal's group sync, one fdatasync in a thread
        for every stable write waiting then (a thread hand-off per request costs more
        than the pwrites, and each worker thread takes the GIL back after its syscalls).
        Whatever would block the loop goes to a thread instead: a pause, a commit holding
        the journal, zeros to lay ahead, a full journal."""
        self._check_writable()
        view = memoryview(data).cast("B")
        n = len(view)
        if not (self.durable and 0 < n <= JOURNAL_MAX_WRITE and 0 <= offset and offset + n <= self.size) \
                or not self._gate.try_enter():
            return await self.awrite(offset, data, True)
        try:
            record = self._write(offset, view, True, wait=False)
        finally:
            self._gate.leave()
        loop = asyncio.get_running_loop()
        if record is None:
            return await loop.run_in_executor(self._executor, self.commit)
        ticket, granule, count, content = record
        if not self._journal.filled(ticket, len(content)):
            if not await loop.run_in_executor(self._executor, self._append, ticket, granule, count, content):
                await loop.run_in_executor(self._executor, self.commit)
            return
        try:
            self._journal.append(ticket, granule, count, content)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                volume_error(e, "a write to the write cache's journal")
            return await loop.run_in_executor(self._executor, self.commit)
        fut = loop.create_future()
        with self._sync_mu:
            self._sync_waiters.append((loop, fut))
            start, self._syncing = not self._syncing, True
        if start:
            # one loop iteration later, so that every stable write decoded from the same
            # receive batch has its record written and shares this fdatasync
            loop.call_soon(self._start_group_sync, loop)
        await fut

    def _start_group_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self._executor is None:
                loop.run_in_executor(None, self._group_sync)
            else:  # nothing awaits it (the waiters are settled from the thread): no asyncio future
                self._executor.submit(self._group_sync)
        except BaseException as e:  # the executor is shut down: nobody will sync, so fail the waiters
            with self._sync_mu:
                batch, self._sync_waiters, self._syncing = self._sync_waiters, [], False
            _settle([f for _, f in batch], WriteCacheError(f"{self.path}: the journal sync could not start: {e}"))

    def _group_sync(self) -> None:
        """Sync the journal for every stable write waiting, batch after batch, until none
        waits; each waiter registered after its record's pwrite, so the sync that
        follows covers it."""
        while True:
            with self._sync_mu:
                batch, self._sync_waiters = self._sync_waiters, []
                if not batch:
                    self._syncing = False
                    return
            exc: BaseException | None = None
            try:
                self._check_writable()
                try:
                    _fdatasync(self._journal.fd)
                except OSError as e:
                    self._fail("fdatasync", e)
            except WriteCacheError as e:
                exc = e
            except Exception as e:  # a bug must fail these writes, never leave them waiting
                log.exception("the journal's group sync failed")
                exc = WriteCacheError(f"{self.path}: the journal sync failed: {e!r}")
            loops: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
            for lp, fut in batch:
                loops.setdefault(lp, []).append(fut)
            for lp, futs in loops.items():
                try:
                    lp.call_soon_threadsafe(_settle, futs, exc)
                except RuntimeError:
                    pass  # that loop is closed: nobody waits there any more

    async def awrite(self, offset: int, data: bytes | bytearray | memoryview, stable: bool = False) -> None:
        """``write`` in the executor (copy on write and fsync never block the loop); while
        writes are paused it waits here, on the loop, holding no executor thread."""
        self._check_writable()
        await self._gate.unpaused()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.write, offset, data, stable)

    # -- durability ----------------------------------------------------------------------

    def commit(self) -> None:
        """Make every write that returned before this call durable: data, then bitmap,
        then a new journal epoch (its records are all in the data file now)."""
        self._check_writable()
        with self._dirty.meta:
            target = self._dirty.gen
        with self._commit_lock:
            self._check_writable()  # an earlier commit may have failed while this one waited
            if self._durable_gen >= target:
                return
            if not self.durable:
                gen, _pages, _snap = self._dirty.take_pages()
                self._durable_gen = gen
                self.commits += 1
                return
            with self._journal.exclusive():
                gen, pages, snap = self._dirty.take_pages()
                try:
                    _fdatasync(self._data_fd)
                except OSError as e:
                    self._fail("fdatasync", e)
                try:
                    for p, raw in snap:
                        pwrite_all(self._bitmap_fd, raw, HEADER_SIZE + p * PAGE)
                except OSError as e:
                    self._dirty.return_pages(pages)
                    volume_error(e, "committing the write cache")
                if snap:
                    try:
                        _fdatasync(self._bitmap_fd)
                    except OSError as e:
                        self._fail("fdatasync", e)
                if self._journal.used:
                    # the records' granules are durable in data and bitmap: void them, or a
                    # replay would lay them over the newer writes this commit covered
                    try:
                        self._journal.new_epoch()
                    except OSError as e:
                        volume_error(e, "starting a new journal epoch")
                    try:
                        _fdatasync(self._journal.fd)
                    except OSError as e:
                        self._fail("fdatasync", e)
            self._durable_gen = gen
            self.commits += 1

    async def acommit(self) -> None:
        """``commit`` in the executor."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.commit)

    # -- export support ------------------------------------------------------------------

    def track(self) -> DirtyTracker:
        """Start recording which granules are written (see ``DirtyTracker``)."""
        return self._dirty.track()

    def writes_paused(self) -> AbstractContextManager[None]:
        """Hold new writes back and wait for the ones in progress; reads go on. Call it
        in a thread, never on the event loop (``awrite`` callers wait on the loop)."""
        return self._gate.paused()

    def dirty_bitmap(self) -> np.ndarray:
        """A copy of the dirty bitmap (one bit per granule, LSB first)."""
        return self._dirty.copy()

    # -- figures -------------------------------------------------------------------------

    def stats(self) -> WriteCacheStats:
        ngran = self._dirty.granules
        dirty = self._dirty.dirty  # kept by DirtyMap.mark: no walk of a whole disk's bitmap
        dirty_bytes = dirty * self.granule
        if dirty and self._dirty.count(ngran - 1, ngran - 1):
            dirty_bytes -= ngran * self.granule - self.size
        allocated = 0 if self._closed else os.fstat(self._data_fd).st_blocks * 512
        return WriteCacheStats(
            size=self.size,
            granule=self.granule,
            dirty_granules=dirty,
            dirty_bytes=dirty_bytes,
            allocated_bytes=allocated,
            writes=self.writes,
            bytes_written=self.bytes_written,
            commits=self.commits,
            failed=self.failed,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the write cache in {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.failed is not None:
            raise WriteCacheError(
                f"the write cache in {self.path} failed ({self.failed}) and may have lost acknowledged writes: "
                "it takes no more writes; export the disk, then unpublish the session"
            )

    def _fail(self, what: str, e: OSError) -> NoReturn:
        """A sync failed: from now on the cache refuses writes and commits (see the design note)."""
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        self.failed = f"{what}: {name}"
        log.error("write cache %s failed: %s (%s); its writes and commits fail from now on", self.path, self.failed, e.strerror)
        raise WriteCacheError(f"the write cache in {self.path} failed: {self.failed}; the data written since the last commit may be lost") from e
