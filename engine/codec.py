"""The chunk decompressor in use: compiled (liblz4 from Cython), or the pure-Python twin.

``INSTANTNFS_PURE=1`` selects ``engine._codec_py`` (the readable specification);
otherwise the Cython build ``engine._codec`` is used, and a missing build is an error
that says how to make it, as for the block map (``engine.blockmap``).
"""
from __future__ import annotations

import os

if os.environ.get("INSTANTNFS_PURE") == "1":
    from engine import _codec_py as impl
else:
    try:
        from engine import _codec as impl  # type: ignore[no-redef]
    except ImportError as e:  # pragma: no cover - depends on the build
        raise ImportError(
            "engine._codec is not built: run 'python setup.py build_ext --inplace' "
            "(or scripts/setup.sh), or set INSTANTNFS_PURE=1 for the pure-Python decompressor"
        ) from e

lz4_decompress_into = impl.lz4_decompress_into
new_block = impl.new_block
IMPLEMENTATION = impl.IMPLEMENTATION
