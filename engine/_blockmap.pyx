# cython: language_level=3
"""Block map and dirty-bitmap range operations, compiled.

Same names, same results, same refusals as ``engine/_blockmap_py.py``, which is the
readable specification (read its docstring for the formats). This module exists
because the read path calls ``translate`` / ``key`` once per NFS READ: the loops here
touch no Python object per block.

The GIL: ``bits_count``, ``bits_set`` and ``bits_clear`` run their loops without it.
``translate`` keeps it, on purpose. ``_walk`` is ``nogil`` and releasing around it
would be safe (``self`` holds the words buffer, which never changes), but
``translate`` runs on the event loop thread (``BackupDisk.aread``) and its walks are
short: about 0.3 us for one block, 3 us for 256 (timeit, issue 9). Releasing the GIL
buys other threads nothing in so short a window and makes the loop thread hand the GIL
over and wait to get it back: with one other thread running Python, a 256-block
``translate`` took 8 us with the GIL kept and 370 to 860 us with ``with nogil`` around
the two walks (a 1-block one 2 us against 4 to 6 us). Release it only if walks ever
become long, and then above a length threshold.

Invariants: the entries array is validated once in ``__init__`` (dtype, length) and
never changes afterwards (block maps of restore points are immutable), so the loops
index it without bounds checks. ``__init__`` copies no contiguous array (a restore
point's entries are a read-only memory map of its file; the words view shares it) and
walks nothing: its cost does not depend on the disk's size. Bit ranges are checked on entry of each
function; ``bits_count`` counts 8 bytes per step (a 1 TiB disk's 32 MiB bitmap).
"""
cimport cython
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy

import numpy as np

cimport numpy as cnp

cnp.import_array()

ZERO_PACK = 0xFFFFFFFF
KEY_SHIFT = 40
cdef enum:
    C_KEY_SHIFT = 40
ENTRY_DTYPE = np.dtype([("pack", "<u4"), ("clen", "<u4"), ("offset", "<u8")])
PACK, REC_OFFSET, CLEN, SKIP, LENGTH = range(5)

cdef extern from *:
    """
    #define INFS_LOW32 0xFFFFFFFFull
    """
    const uint64_t LOW32 "INFS_LOW32"


cdef class BlockMap:
    """Translate disk byte ranges into chunk extents and zero runs."""

    def __init__(self, entries, int64_t block_size, int64_t disk_size):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two")
        if entries.dtype != ENTRY_DTYPE:
            raise ValueError("block map entries have the wrong dtype")
        nblocks = -(-disk_size // block_size)
        if len(entries) != nblocks:
            raise ValueError(f"block map has {len(entries)} entries, a {disk_size}-byte disk needs {nblocks}")
        self.entries = entries
        # each 16-byte entry is two little-endian words: pack | clen << 32, offset
        self._wordarr = np.ascontiguousarray(entries).view(np.uint64)
        self._w = <const uint64_t*>cnp.PyArray_DATA(self._wordarr)
        self.block_size = block_size
        self.disk_size = disk_size
        self.shift = block_size.bit_length() - 1
        self._nblocks = nblocks

    def __len__(self):
        return self._nblocks

    def key(self, int64_t block):
        if block < 0 or block >= self._nblocks:
            raise IndexError(block)
        cdef uint64_t w = self._w[2 * block]
        if (w & LOW32) == LOW32:
            return -1
        return <int64_t>((w & LOW32) << C_KEY_SHIFT | self._w[2 * block + 1])

    def locate(self, int64_t offset, int64_t length):
        """For a range inside one block: its chunk key, or -1 for a zero block. -2 when the
        range is empty, crosses a block boundary or leaves the disk."""
        # written so that nothing overflows: offset + length may pass 2**63 - 1
        if offset < 0 or length <= 0 or offset > self.disk_size or length > self.disk_size - offset:
            return -2
        cdef int64_t block = offset >> self.shift
        if (offset + length - 1) >> self.shift != block:
            return -2
        cdef uint64_t w = self._w[2 * block]
        if (w & LOW32) == LOW32:
            return -1
        return <int64_t>((w & LOW32) << C_KEY_SHIFT | self._w[2 * block + 1])

    def entry(self, int64_t block):
        """(pack, clen, record_offset) of one block."""
        if block < 0 or block >= self._nblocks:
            raise IndexError(block)
        cdef uint64_t w = self._w[2 * block]
        return <int64_t>(w & LOW32), <int64_t>(w >> 32), <int64_t>self._w[2 * block + 1]

    def translate(self, int64_t offset, int64_t length):
        if offset < 0 or length < 0 or offset > self.disk_size or length > self.disk_size - offset:
            raise ValueError(f"range {offset}+{length} is outside the {self.disk_size}-byte disk")
        cdef cnp.npy_intp dims[2]
        dims[0] = _walk(self._w, self.shift, offset, length, NULL)
        dims[1] = 5
        out = cnp.PyArray_EMPTY(2, dims, cnp.NPY_INT64, 0)
        _walk(self._w, self.shift, offset, length, <int64_t*>cnp.PyArray_DATA(out))
        return out


cdef int64_t _walk(const uint64_t* words, int shift, int64_t offset, int64_t length, int64_t* rows) noexcept nogil:
    """Emit the extents of [offset, offset+length) into rows (5 per extent); count only
    when rows is NULL. Returns the number of extents."""
    cdef int64_t n = 0, pos = offset, end = offset + length, block, skip, take
    cdef int64_t bs = (<int64_t>1) << shift
    cdef uint64_t w
    cdef bint prev_zero = False
    while pos < end:
        block = pos >> shift
        skip = pos - (block << shift)
        take = bs - skip
        if take > end - pos:
            take = end - pos
        w = words[2 * block]
        if (w & LOW32) == LOW32:
            if prev_zero:
                if rows != NULL:
                    rows[5 * (n - 1) + 4] += take
            else:
                if rows != NULL:
                    rows[5 * n] = -1
                    rows[5 * n + 1] = 0
                    rows[5 * n + 2] = 0
                    rows[5 * n + 3] = 0
                    rows[5 * n + 4] = take
                n += 1
                prev_zero = True
        else:
            if rows != NULL:
                rows[5 * n] = <int64_t>(w & LOW32)
                rows[5 * n + 1] = <int64_t>words[2 * block + 1]
                rows[5 * n + 2] = <int64_t>(w >> 32)
                rows[5 * n + 3] = skip
                rows[5 * n + 4] = take
            n += 1
            prev_zero = False
        pos += take
    return n


cdef inline int _check(Py_ssize_t nbytes, int64_t start, int64_t count) except -1:
    if start < 0 or count < 0 or start > nbytes * 8 or count > nbytes * 8 - start:
        raise ValueError(f"bit range {start}+{count} is outside a {nbytes * 8}-bit map")
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
def bit_get(const uint8_t[::1] bits, int64_t i):
    if i < 0 or i >= bits.shape[0] * 8:
        raise IndexError(i)
    return bits[i >> 3] >> (i & 7) & 1


@cython.boundscheck(False)
@cython.wraparound(False)
def bits_count(const uint8_t[::1] bits, int64_t start, int64_t count):
    """Number of set bits in [start, start + count)."""
    _check(bits.shape[0], start, count)
    cdef int64_t i = start, end = start + count, total = 0
    cdef uint64_t word
    if count == 0:
        return 0
    cdef const uint8_t* p = &bits[0]
    with nogil:
        while i < end and (i & 7):  # bits up to a byte boundary
            total += p[i >> 3] >> (i & 7) & 1
            i += 1
        while i + 64 <= end:  # 8 bytes at a time: a 1 TiB disk's 32 MiB bitmap in ~10 ms
            memcpy(&word, p + (i >> 3), 8)
            total += __builtin_popcountll(word)
            i += 64
        while i + 8 <= end:
            total += __builtin_popcount(p[i >> 3])
            i += 8
        while i < end:
            total += p[i >> 3] >> (i & 7) & 1
            i += 1
    return total


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _fill(uint8_t[::1] bits, int64_t start, int64_t count, bint value) noexcept nogil:
    cdef int64_t i = start, end = start + count
    while i < end:
        if (i & 7) == 0 and i + 8 <= end:
            bits[i >> 3] = 0xFF if value else 0
            i += 8
        else:
            if value:
                bits[i >> 3] |= <uint8_t>(1 << (i & 7))
            else:
                bits[i >> 3] &= <uint8_t>~(1 << (i & 7))
            i += 1


def bits_set(uint8_t[::1] bits, int64_t start, int64_t count):
    _check(bits.shape[0], start, count)
    with nogil:
        _fill(bits, start, count, True)


def bits_clear(uint8_t[::1] bits, int64_t start, int64_t count):
    _check(bits.shape[0], start, count)
    with nogil:
        _fill(bits, start, count, False)


@cython.boundscheck(False)
@cython.wraparound(False)
def bits_runs(const uint8_t[::1] bits, int64_t start, int64_t count):
    """Maximal runs of equal bits in [start, start + count): int64 rows (start, length, value)."""
    _check(bits.shape[0], start, count)
    cdef int64_t i = start, end = start + count, n = 0, run_start = start, cap = 16
    cdef int v, cur = -1
    cdef uint8_t byte
    out = np.empty((cap, 3), dtype=np.int64)
    cdef int64_t[:, ::1] rows = out
    while i < end:
        if (i & 7) == 0 and i + 8 <= end and cur >= 0:
            byte = bits[i >> 3]
            if (cur == 0 and byte == 0) or (cur == 1 and byte == 0xFF):
                i += 8
                continue
        v = bits[i >> 3] >> (i & 7) & 1
        if v != cur:
            if cur >= 0:
                if n == cap:
                    cap *= 2
                    out = np.resize(out, (cap, 3))
                    rows = out
                rows[n, 0] = run_start
                rows[n, 1] = i - run_start
                rows[n, 2] = cur
                n += 1
            cur = v
            run_start = i
        i += 1
    if cur >= 0:
        if n == cap:
            out = np.resize(out, (cap + 1, 3))
            rows = out
        rows[n, 0] = run_start
        rows[n, 1] = end - run_start
        rows[n, 2] = cur
        n += 1
    return out[:n]


cdef extern from *:
    int __builtin_popcount(unsigned int) nogil
    int __builtin_popcountll(unsigned long long) nogil
