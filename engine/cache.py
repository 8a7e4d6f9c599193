"""The decompression cache: decompressed chunks, bounded in bytes, shared, single-flight;
and each disk's readahead.

``ChunkCache`` is what a ``BackupDisk`` reads through (the chunk source ``engine.stack``
gives it): it loads a chunk with the pack reader it was built over (``read_chunk``) and
keeps the result. ``Readahead`` is one disk's sequential-stream detector: it belongs to the
disk (``engine.stack`` makes one per disk), so two VMs reading the same chunks never
confuse each other's streams; it prefetches through the shared cache.

Readahead. A disk tracks up to ``MAX_STREAMS`` streams by the byte offset their next read
is expected at. A read continues a stream only when it starts exactly where an earlier
read ended: then the stream is sequential and the blocks after it are decompressed
ahead (``depth`` blocks) and the kernel is told about twice as many beyond (fadvise
WILLNEED, only for chunks not cached yet). Any other read starts a new stream (the
least recently used one is forgotten) and prefetches nothing, so a strided reader
(4 KiB reads, each in a new block) or a random one costs no prefetch and no hint. The
depth starts at ``MIN_DEPTH`` blocks and doubles, up to ``MAX_DEPTH`` (and a fraction of
the cache), each time the reader enters a block whose prefetch has not finished: the
reader consumes faster than the depth covers, so the window grows until decompression
stays ahead of it. The window is refilled when half of it was consumed, not on every
read. Prefetch loads and hints go to the executor, after the loads of the read that
triggered them (``engine.disk`` calls ``after`` once its own misses are queued).

Keys are chunk keys (``pack << 40 | record offset``, see ``engine.blockmap``), so a chunk
that dedup made common to several disks or restore points is one entry. Values are
``bytearray`` of exactly one block, evicted (least recently used first) when the total
passes ``capacity`` bytes. Nobody writes into a cached value: readers get it (``peek``,
``get``) or views of it, and the disk above hands out read-only copies or views.

Buffer reuse. A load decompresses into a block-sized ``bytearray`` taken from a small
pool (``POOL_BUFFERS``), not into fresh memory: on this project's VMs faulting in a
fresh MiB (256 page faults) costs as much as decompressing it. A new buffer, while the
cache grows, comes from ``engine.codec.new_block``: not zeroed, its pages faulted in by
one ``madvise``. An evicted value goes back to the pool only when nothing else references it
(``sys.getrefcount`` under the GIL, once it is out of the LRU so nobody can obtain it
again): a memoryview slice of it may still be queued for sending in a transport, or
another thread may hold it between ``peek`` and its slicing; such a buffer is simply
dropped, and freed by Python when the last view goes. A buffer is therefore never
written while anything can still read it. Buffers of failed loads are dropped too (the
traceback may hold them).

Why a location is a content address here (design note). The issue asks for a cache
keyed by what the bytes are (the fingerprint); but a block map entry holds (pack,
clen, offset) and no fingerprint, so a lookup cannot know the fingerprint before it has
read the record: a fingerprint key would need a per-pack offset-to-fingerprint table on
the hot path of every cached read. Instead the location is made to name one content
forever: (1) pack ids are never reused (the repository's persisted counter), (2) packs
are immutable: records are only appended before the pack is sealed, and gc only
deletes whole packs or punches out dead records (which nothing references, and a hole
fails the record CRC), never writes a record at an old offset, and (3) the reader
checks, when it opens a pack, that the file is the pack its id names (pack id,
repository id, the uid its index records). So (pack, offset) means one record, whose
bytes the reader verifies (CRC32C and, with ``VERIFY_FINGERPRINT``, BLAKE3 of the
decompressed block against the record's fingerprint) before they enter the cache. As
a second line, ``drop_pack`` removes a pack's entries when the reader closes it because
gc deleted it, or finds a different pack (another uid) behind an id it knew.

Concurrency: one lock guards the LRU and the table of loads in flight. A miss registers
a ``concurrent.futures.Future`` for its key before loading, so concurrent misses on one
chunk wait for that one load ("single flight"). Loads run either in the calling thread
(``get``) or in the executor (``get_future``, ``prefetch``); the work they do (pread,
CRC32C, LZ4) releases the GIL, so both cores decompress. A failed load is not cached:
the next reader tries again and gets the same error if the data is still bad.
"""
from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from typing import Protocol

from engine.blockmap import KEY_SHIFT, BlockMap
from engine.codec import new_block

POOL_BUFFERS = 32  # evicted block buffers kept for reuse (at most this many, unreferenced)
MAX_STREAMS = 8  # sequential streams tracked per disk
MIN_DEPTH = 4  # blocks decompressed ahead of a stream that just became sequential
MAX_DEPTH = 64  # the most a stream's window grows to (also capped by the cache size)
HINT_FACTOR = 2  # blocks beyond the window hinted to the kernel, per block of depth


def _refs(obj: object) -> int:
    return sys.getrefcount(obj)


def _unshared_refs() -> int:
    """What ``_refs`` says of an object only a local variable holds, measured the way
    ``ChunkCache._load`` measures an evicted buffer (so it holds on any CPython version)."""
    old = bytearray(1)
    return _refs(old)


_UNSHARED = _unshared_refs()


class ChunkReader(Protocol):
    """What the cache loads from (``engine.repo.packs.PackReader``)."""

    block_size: int

    def read_chunk(self, pack: int, offset: int, clen: int, out: bytearray | None = None) -> bytearray: ...

    def submit_hints(self, executor: Executor, records: Sequence[tuple[int, int, int]]) -> None: ...


class ChunkCache:
    def __init__(self, reader: ChunkReader, capacity: int, executor: Executor, max_prefetch: int = 16) -> None:
        if capacity <= 0:
            raise ValueError("cache capacity must be positive")
        self.reader = reader
        self.capacity = capacity
        self.executor = executor
        self.max_prefetch = max_prefetch
        self.block_size = reader.block_size
        self._lru: OrderedDict[int, bytearray] = OrderedDict()
        self._loading: dict[int, Future[bytearray]] = {}
        self._pool: list[bytearray] = []
        self._lock = threading.Lock()
        self.size = 0
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.loaded_bytes = 0  # bytes decompressed (or read, for stored chunks) by the loads
        self.prefetches = 0
        self.reused = 0  # loads that decompressed into a pooled buffer
        self.kept = 0  # evicted buffers dropped because something still referenced them

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: int) -> bool:
        """Whether the chunk is cached (lock-free, like ``peek``; no use is counted)."""
        return key in self._lru

    def loading(self, key: int) -> bool:
        """Whether the chunk is being loaded now (lock-free; a hint)."""
        return key in self._loading

    def peek(self, key: int) -> bytearray | None:
        """The cached chunk, or None; a hit counts as a use.

        Lock-free on purpose (it is the hot path of every cached read): ``get`` and
        ``move_to_end`` are single C calls under the GIL; an entry evicted between the
        two is simply a miss. The hit counter may lose an increment under races. The
        reference returned keeps the buffer out of the pool (see the design note).
        """
        data = self._lru.get(key)
        if data is not None:
            try:
                self._lru.move_to_end(key)
            except KeyError:
                return None
            self.hits += 1
        return data

    def _claim(self, key: int) -> tuple[bytearray | None, Future[bytearray], bool]:
        """Under the lock: (cached data, future to wait for, whether we must load)."""
        data = self._lru.get(key)
        if data is not None:
            self._lru.move_to_end(key)
            self.hits += 1
            return data, None, False  # type: ignore[return-value]
        fut = self._loading.get(key)
        if fut is not None:
            self.hits += 1
            return None, fut, False
        self.misses += 1
        fut = Future()
        fut.set_running_or_notify_cancel()
        self._loading[key] = fut
        return None, fut, True

    def _load(self, key: int, fut: Future[bytearray], pack: int, rec: int, clen: int) -> bytearray:
        with self._lock:
            buf = self._pool.pop() if self._pool else None
        if buf is None:
            buf = new_block(self.block_size)  # written in full by the load: not zeroed
        else:
            self.reused += 1
        try:
            data = self.reader.read_chunk(pack, rec, clen, buf)
        except BaseException as e:
            del buf  # dropped, not pooled: the traceback may still reference it
            with self._lock:
                del self._loading[key]
            fut.set_exception(e)
            raise
        with self._lock:
            del self._loading[key]
            self.loads += 1
            self.loaded_bytes += len(data)
            if len(data) <= self.capacity:
                self._lru[key] = data
                self.size += len(data)
                while self.size > self.capacity:
                    _, old = self._lru.popitem(last=False)
                    self.size -= len(old)
                    # pooled only if unshared: no view, no other thread holds it (the GIL
                    # is held, and it is out of the LRU: nobody can take a new reference)
                    if _refs(old) <= _UNSHARED and len(old) == self.block_size and len(self._pool) < POOL_BUFFERS:
                        self._pool.append(old)
                    else:
                        self.kept += 1
                    del old
        fut.set_result(data)
        return data

    def get(self, pack: int, rec: int, clen: int) -> bytearray:
        """The chunk stored at (pack, rec), loading it in this thread on a miss (blocking)."""
        key = pack << KEY_SHIFT | rec
        with self._lock:
            data, fut, mine = self._claim(key)
        if data is not None:
            return data
        if mine:
            return self._load(key, fut, pack, rec, clen)
        return fut.result()

    def get_future(self, pack: int, rec: int, clen: int) -> Future[bytearray]:
        """A future of the chunk; a miss is loaded in the executor."""
        key = pack << KEY_SHIFT | rec
        with self._lock:
            data, fut, mine = self._claim(key)
        if data is not None:
            done: Future[bytearray] = Future()
            done.set_result(data)
            return done
        if mine:
            self.executor.submit(self._load_quietly, key, fut, pack, rec, clen)
        return fut

    def _load_quietly(self, key: int, fut: Future[bytearray], pack: int, rec: int, clen: int) -> None:
        try:
            self._load(key, fut, pack, rec, clen)
        except Exception:
            pass  # delivered through the future to whoever waits for it

    def prefetch(self, pack: int, rec: int, clen: int) -> bool:
        """Start loading a chunk that will probably be read soon; never blocks. False when
        refused (``max_prefetch`` loads already in flight): the caller may retry later."""
        key = pack << KEY_SHIFT | rec
        with self._lock:
            if key in self._lru or key in self._loading:
                return True
            if len(self._loading) >= self.max_prefetch:
                return False
            self.prefetches += 1
            fut: Future[bytearray] = Future()
            fut.set_running_or_notify_cancel()
            self._loading[key] = fut
        self.executor.submit(self._load_quietly, key, fut, pack, rec, clen)
        return True

    def hint(self, records: Sequence[tuple[int, int, int]]) -> None:
        """Ask the kernel, from the executor, to read (pack, rec, clen) records ahead."""
        self.reader.submit_hints(self.executor, records)

    def drop_pack(self, pack: int) -> int:
        """Forget every cached chunk of ``pack`` (it was deleted or replaced); returns how
        many. O(entries): it runs when a pack goes away, not per read."""
        with self._lock:
            keys = [k for k in self._lru if k >> KEY_SHIFT == pack]
            for k in keys:
                self.size -= len(self._lru.pop(k))
        return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._pool.clear()
            self.size = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "capacity": self.capacity,
                "size": self.size,
                "entries": len(self._lru),
                "hits": self.hits,
                "misses": self.misses,
                "loads": self.loads,
                "loaded_bytes": self.loaded_bytes,
                "prefetches": self.prefetches,
                "reused": self.reused,
                "pooled": len(self._pool),
            }


class _Stream:
    """One sequential stream of a disk: where its next read is expected, how far ahead
    its blocks are queued (``ahead``: the first block not prefetched) and hinted."""

    __slots__ = ("next", "ahead", "hinted", "depth", "block", "refill")

    def __init__(self, nxt: int, block: int, depth: int) -> None:
        self.next = nxt  # byte offset the next read of this stream starts at
        self.block = block  # the block the stream's last read ended in
        self.ahead = block + 1
        self.hinted = block + 1
        self.depth = depth
        self.refill = nxt  # refill the window once a read ends past this byte offset


class Readahead:
    """One disk's sequential-stream detector and prefetcher (see the design note).

    Called by the disk after every read (``after(offset, length)``). Not locked: the
    disk's callers (the event loop, an export thread) may race on it; the stream list is
    replaced, never changed in place, so a race can lose a stream or duplicate a
    prefetch request (which the cache's single flight absorbs), never raise."""

    def __init__(self, blockmap: BlockMap, cache: ChunkCache, depth: int = MIN_DEPTH, max_depth: int = MAX_DEPTH,
                 streams: int = MAX_STREAMS) -> None:
        self.map = blockmap
        self.cache = cache
        self.shift = blockmap.shift
        self.min_depth = max(1, depth)
        # 8 streams at full depth must not push each other's windows out of the cache
        self.max_depth = max(self.min_depth, min(max_depth, cache.capacity // (blockmap.block_size * 4 * streams)))
        self.max_streams = max(1, streams)
        self.streams: list[_Stream] = []  # least recently used first
        self.sequential = 0  # reads that continued a stream
        self.prefetched = 0  # prefetches queued
        self.hinted = 0  # records hinted
        self.grown = 0  # times a window grew

    def after(self, offset: int, length: int) -> None:
        """A read of [offset, offset + length) was just served or queued."""
        if length <= 0:
            return
        end = offset + length
        streams = self.streams  # replaced, never changed in place: racing callers see a whole list
        s = streams[-1] if streams else None
        if s is None or s.next != offset:
            for s in streams:
                if s.next == offset:
                    self.streams = [x for x in streams if x is not s] + [s]
                    break
            else:  # not a continuation: a new stream, no prefetch
                self.streams = streams[max(0, len(streams) + 1 - self.max_streams) :] + [
                    _Stream(end, (end - 1) >> self.shift, self.min_depth)]
                return
        s.next = end
        self.sequential += 1
        last = (end - 1) >> self.shift
        if last != s.block:  # entered a new block
            first = offset >> self.shift
            s.block = last
            if first < s.ahead and s.depth < self.max_depth and self._behind(first, last):
                s.depth = min(2 * s.depth, self.max_depth)  # the reader caught up: grow
                s.refill = offset  # refill now
                self.grown += 1
        if end > s.refill:
            self._fill(s, last)

    def _behind(self, first: int, last: int) -> bool:
        """Whether a block just read is not cached yet (its load still running)."""
        bm, cache = self.map, self.cache
        for block in range(first, last + 1):
            key = bm.key(block)
            if key >= 0 and key not in cache:
                return True
        return False

    def _fill(self, s: _Stream, last: int) -> None:
        bm, cache = self.map, self.cache
        nblocks = len(bm)
        if s.ahead <= last:
            s.ahead = last + 1
        stop = min(last + 1 + s.depth, nblocks)
        block = s.ahead
        while block < stop:
            pack, clen, rec = bm.entry(block)
            if clen:
                if not cache.prefetch(pack, rec, clen):
                    break  # loads in flight at the cache's limit: retry on the next read
                self.prefetched += 1
            block += 1
        s.ahead = block
        # refill when half the window is consumed (or at once after a refusal)
        s.refill = (max(last + 1, block - s.depth // 2) << self.shift) if block >= stop else s.next
        # further out, only ask the kernel to fetch the records: the decompressing threads
        # then find them in the page cache instead of waiting on the device. Chunks
        # already decompressed need no hint (a warm disk sends none).
        lo = max(s.hinted, block)
        hi = min(last + 1 + (1 + HINT_FACTOR) * s.depth, nblocks)
        if lo >= hi:
            return
        far = []
        for b in range(lo, hi):
            pack, clen, rec = bm.entry(b)
            if clen and (pack << KEY_SHIFT | rec) not in cache:
                far.append((pack, rec, clen))
        s.hinted = hi
        if far:
            self.hinted += len(far)
            cache.hint(far)
