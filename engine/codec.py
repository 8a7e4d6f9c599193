"""The chunk decompressor in use: compiled (liblz4 from Cython), or the pure-Python twin.

``INSTANTNFS_PURE=1`` selects ``engine._codec_py`` (the readable specification);
otherwise the Cython build ``engine._codec`` is used, and a missing build is an error
that says how to make it, as for the block map (``engine.blockmap``).
"""
from __future__ import annotations

from engine import twins

if twins.PURE:
    from engine import _codec_py as impl
else:
    with twins.required("engine._codec"):
        from engine import _codec as impl  # type: ignore[no-redef]

lz4_decompress_into = impl.lz4_decompress_into
new_block = impl.new_block
IMPLEMENTATION = impl.IMPLEMENTATION
