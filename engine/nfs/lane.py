"""The fast lane in use: ``engine.nfs.fastlane`` compiled by Cython, or as it is.

The lane's source, ``engine/nfs/fastlane.py``, is plain Python and the readable
reference; setup.py also compiles that same file into ``engine.nfs._fastlane_c`` (no
second copy to keep in step), which runs its glue as C calls. ``INSTANTNFS_PURE=1``
runs the source itself (and ``engine.nfs.wire`` then its pure-Python codec too);
otherwise a missing build is an error that says how to make it.
"""
from __future__ import annotations

import os

if os.environ.get("INSTANTNFS_PURE") == "1":
    from engine.nfs.fastlane import FastLane
else:
    try:
        from engine.nfs import _fastlane_c
        from engine.nfs._fastlane_c import FastLane  # type: ignore[no-redef]
    except ImportError as e:  # pragma: no cover - depends on the build
        raise ImportError(
            "engine.nfs._fastlane_c is not built: run 'python setup.py build_ext --inplace' "
            "(or scripts/setup.sh), or set INSTANTNFS_PURE=1 for the pure-Python fast lane"
        ) from e
    _source = os.path.join(os.path.dirname(__file__), "fastlane.py")
    if os.path.getmtime(_source) > os.path.getmtime(_fastlane_c.__file__):  # pragma: no cover
        # a build older than its source would run yesterday's lane
        raise ImportError(
            f"engine.nfs._fastlane_c is older than {_source}: rebuild it with "
            "'python setup.py build_ext --inplace' (or scripts/setup.sh)"
        )

IMPLEMENTATION = "pure-python" if FastLane.__module__ == "engine.nfs.fastlane" else "cython"

__all__ = ["FastLane", "IMPLEMENTATION"]
