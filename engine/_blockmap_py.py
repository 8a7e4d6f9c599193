"""Block map and dirty-bitmap range operations: the readable specification.

This module is the pure-Python twin of ``engine/_blockmap.pyx``. Both expose the same
names and the same results; ``engine.blockmap`` picks the compiled one unless the
environment variable ``INSTANTNFS_PURE=1`` is set. Tests run against both.

Block map
    A disk of ``disk_size`` bytes is cut into fixed blocks of ``block_size`` bytes (a
    power of two). Entry ``i`` describes block ``i`` with three fields: ``pack`` (u32),
    ``clen`` (u32) and ``offset`` (u64), the location of the block's record in a pack
    file. ``pack == ZERO_PACK`` means the block is all zeros and stored nowhere.

    Making a ``BlockMap`` costs the same whatever the disk's size: it checks the
    entries' dtype and length, and nothing here ever walks all of them. A restore
    point's map is a read-only memory map of its file (``engine.repo.format.load_map``),
    so a block's entry is read from the file the first time it is touched; publishing
    a 1 TiB disk (16 MiB of entries) reads one page of them for its first READ.

``translate(offset, length)``
    Turns a byte range into an ``int64`` array of shape ``(n, 5)``, one row per
    extent in disk order: ``(pack, record_offset, clen, skip, length)``. A chunk
    extent takes ``length`` bytes starting ``skip`` bytes into the block's
    decompressed data. A zero run has ``pack == -1`` (other fields 0 but ``length``)
    and covers any number of consecutive zero blocks. The lengths add up to
    ``length``. The range must lie inside the disk.

Chunk keys
    ``key(block)`` gives ``pack << 40 | record_offset`` for a stored block and -1 for a
    zero block: one integer that names a chunk, so that a dedup'd chunk is one cache
    entry whichever disk or restore point reads it.

Dirty bitmaps
    A ``uint8`` array, bit ``i`` at ``bits[i >> 3] >> (i & 7) & 1`` (LSB first, the
    order of ``numpy.packbits(..., bitorder="little")``). The range operations take a
    start bit and a count and never touch bits outside it.

Refusals (the same as the compiled kernel's, never fewer)
    A block index (``key``, ``entry``) or bit index (``bit_get``) outside ``[0, len)``
    raises ``IndexError``: a negative one is not counted from the end as numpy would.
    A byte range outside the disk raises ``ValueError`` in ``translate`` and gives -2
    from ``locate``; a bit range outside the map raises ``ValueError``.
"""
from __future__ import annotations

import numpy as np

ZERO_PACK = 0xFFFFFFFF
KEY_SHIFT = 40
ENTRY_DTYPE = np.dtype([("pack", "<u4"), ("clen", "<u4"), ("offset", "<u8")])

PACK, REC_OFFSET, CLEN, SKIP, LENGTH = range(5)


class BlockMap:
    """Translate disk byte ranges into chunk extents and zero runs."""

    def __init__(self, entries: np.ndarray, block_size: int, disk_size: int) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two")
        if entries.dtype != ENTRY_DTYPE:
            raise ValueError("block map entries have the wrong dtype")
        nblocks = -(-disk_size // block_size)
        if len(entries) != nblocks:
            raise ValueError(f"block map has {len(entries)} entries, a {disk_size}-byte disk needs {nblocks}")
        self.entries = entries
        self.block_size = block_size
        self.disk_size = disk_size
        self.shift = block_size.bit_length() - 1

    def __len__(self) -> int:
        return len(self.entries)

    def _block(self, block: int) -> np.void:
        """Entry ``block``; like the kernel, IndexError outside [0, len) (numpy would
        take a negative index from the end)."""
        if block < 0 or block >= len(self.entries):
            raise IndexError(block)
        return self.entries[block]

    def key(self, block: int) -> int:
        e = self._block(block)
        if int(e["pack"]) == ZERO_PACK:
            return -1
        return int(e["pack"]) << KEY_SHIFT | int(e["offset"])

    def locate(self, offset: int, length: int) -> int:
        """For a range inside one block: its chunk key, or -1 for a zero block. -2 when the
        range is empty, crosses a block boundary or leaves the disk."""
        if offset < 0 or length <= 0 or offset + length > self.disk_size:
            return -2
        block = offset // self.block_size
        if (offset + length - 1) // self.block_size != block:
            return -2
        return self.key(block)

    def entry(self, block: int) -> tuple[int, int, int]:
        """(pack, clen, record_offset) of one block."""
        e = self._block(block)
        return int(e["pack"]), int(e["clen"]), int(e["offset"])

    def translate(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or length < 0 or offset + length > self.disk_size:
            raise ValueError(f"range {offset}+{length} is outside the {self.disk_size}-byte disk")
        rows: list[list[int]] = []
        pos, end = offset, offset + length
        while pos < end:
            block = pos // self.block_size
            skip = pos - block * self.block_size
            take = min(self.block_size - skip, end - pos)
            pack, clen, rec = self.entry(block)
            if pack == ZERO_PACK:
                if rows and rows[-1][PACK] == -1:
                    rows[-1][LENGTH] += take
                else:
                    rows.append([-1, 0, 0, 0, take])
            else:
                rows.append([pack, rec, clen, skip, take])
            pos += take
        return np.array(rows, dtype=np.int64).reshape(-1, 5)


def _check(bits: np.ndarray, start: int, count: int) -> None:
    if start < 0 or count < 0 or start + count > len(bits) * 8:
        raise ValueError(f"bit range {start}+{count} is outside a {len(bits) * 8}-bit map")


def bit_get(bits: np.ndarray, i: int) -> int:
    if i < 0 or i >= len(bits) * 8:
        raise IndexError(i)  # as the kernel: a negative i is no bit, not one from the end
    return int(bits[i >> 3]) >> (i & 7) & 1


def _unpack(bits: np.ndarray, start: int, count: int) -> tuple[np.ndarray, int, int]:
    """The bytes holding [start, start + count) as one 0/1 value per bit (bit ``i`` is bit
    ``i & 7`` of byte ``i >> 3``), with the byte range they came from. Whole-array numpy:
    a 1 TiB disk's bitmap has 2**24 bits, too many for a Python loop over bits."""
    first, last = start >> 3, (start + count + 7) >> 3
    return np.unpackbits(bits[first:last], bitorder="little"), first, last


_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def bits_count(bits: np.ndarray, start: int, count: int) -> int:
    """Number of set bits in [start, start + count). The whole bytes inside the range
    are counted by table lookup (one byte of temporary memory per byte, not eight as
    unpacking would take: a 1 TiB disk's bitmap is 32 MiB), the bits at its edges one by one."""
    _check(bits, start, count)
    end = start + count
    lo_byte, hi_byte = -(-start // 8), end // 8  # the whole bytes inside the range
    if lo_byte >= hi_byte:
        return sum(bit_get(bits, i) for i in range(start, end))
    total = int(_POPCOUNT[bits[lo_byte:hi_byte]].sum(dtype=np.int64))
    total += sum(bit_get(bits, i) for i in range(start, lo_byte * 8))
    total += sum(bit_get(bits, i) for i in range(hi_byte * 8, end))
    return total


def _fill(bits: np.ndarray, start: int, count: int, value: int) -> None:
    _check(bits, start, count)
    if count == 0:
        return
    v, first, last = _unpack(bits, start, count)
    lo = start - (first << 3)
    v[lo : lo + count] = value
    bits[first:last] = np.packbits(v, bitorder="little")


def bits_set(bits: np.ndarray, start: int, count: int) -> None:
    _fill(bits, start, count, 1)


def bits_clear(bits: np.ndarray, start: int, count: int) -> None:
    _fill(bits, start, count, 0)


def bits_runs(bits: np.ndarray, start: int, count: int) -> np.ndarray:
    """Maximal runs of equal bits in [start, start + count): int64 rows (start, length, value)."""
    _check(bits, start, count)
    if count == 0:
        return np.empty((0, 3), dtype=np.int64)
    v, first, _ = _unpack(bits, start, count)
    lo = start - (first << 3)
    v = v[lo : lo + count].astype(np.int64)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(v)) + 1))  # where the value changes
    lengths = np.diff(np.concatenate((starts, [count])))
    return np.stack((starts + start, lengths, v[starts]), axis=1)
