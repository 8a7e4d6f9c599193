"""The block map implementation in use: compiled, or the pure-Python twin.

``INSTANTNFS_PURE=1`` selects ``engine._blockmap_py`` (the readable specification);
otherwise the Cython build ``engine._blockmap`` is used, and a missing build is an
error that says how to make it, not a silent fallback to the slow path.
"""
from __future__ import annotations

from engine import twins

if twins.PURE:
    from engine import _blockmap_py as impl
else:
    with twins.required("engine._blockmap"):
        from engine import _blockmap as impl  # type: ignore[no-redef]

BlockMap = impl.BlockMap
ENTRY_DTYPE = impl.ENTRY_DTYPE
ZERO_PACK = impl.ZERO_PACK
KEY_SHIFT = impl.KEY_SHIFT
bit_get = impl.bit_get
bits_count = impl.bits_count
bits_set = impl.bits_set
bits_clear = impl.bits_clear
bits_runs = impl.bits_runs
IMPLEMENTATION = "pure-python" if impl.__name__.endswith("_py") else "cython"
