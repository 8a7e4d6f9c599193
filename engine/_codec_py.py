"""Chunk decompression into a caller's buffer: the readable specification.

The pure-Python twin of ``engine/_codec.pyx``; ``engine.codec`` picks the compiled one
unless ``INSTANTNFS_PURE=1``. ``lz4_decompress_into(src, out)`` decompresses one LZ4
block (no size prefix, as ``lz4.block.compress(store_size=False)`` writes it) into the
writable buffer ``out`` and returns how many bytes it wrote (what follows them in ``out``
is unspecified: liblz4 may scribble there, within ``len(out)``), or -1 when ``src`` is corrupt or decompresses to more than ``len(out)``
bytes (what ``out`` holds after a refusal is unspecified: the compiled one may have
written part of it). An empty ``src`` is corrupt. ``new_block(size)`` makes a buffer to be
written in full (the compiled one: not zeroed, its pages faulted in at once). The twin goes through a temporary ``bytes``
(python-lz4 has no output-buffer API); the compiled one writes ``out`` directly.
"""
from __future__ import annotations

import lz4.block

IMPLEMENTATION = "pure-python"
LZ4_VERSION = 0  # the twin goes through python-lz4 (its bundled liblz4)


def new_block(size: int) -> bytearray:
    """A bytearray of ``size`` bytes for a block to be written in full (the compiled one
    leaves it uninitialised and faults its pages in at once; here: zeroed)."""
    return bytearray(size)


def lz4_decompress_into(src: bytes | bytearray | memoryview, out: bytearray | memoryview) -> int:
    """Decompress the LZ4 block ``src`` into ``out``: bytes written, or -1 if corrupt."""
    if len(src) == 0:
        return -1
    try:
        data = lz4.block.decompress(src, uncompressed_size=len(out))
    except lz4.block.LZ4BlockError:
        return -1
    memoryview(out)[: len(data)] = data
    return len(data)
