"""The hot modules in use: compiled by Cython from their own source, or run as they are.

The fast lane (``engine/nfs/fastlane.py``) and the TCP/UDP transports with their record
marking (``engine/nfs/transport.py``) are plain Python, the readable reference; setup.py
also compiles those same files into ``engine.nfs._fastlane_c`` and
``engine.nfs._transport_c`` (no second copy to keep in step), which run the same code as
C calls. ``INSTANTNFS_PURE=1`` runs the sources themselves (and ``engine.nfs.wire`` its
pure-Python codec); otherwise a missing build, or one older than its source, is an
error that says how to make it.
"""
from __future__ import annotations

import os
from types import ModuleType

PURE = os.environ.get("INSTANTNFS_PURE") == "1"


def _build(name: str, source: str) -> ModuleType:  # pragma: no cover - depends on the build
    import importlib

    try:
        mod = importlib.import_module(f"engine.nfs.{name}")
    except ImportError as e:
        raise ImportError(
            f"engine.nfs.{name} is not built: run 'python setup.py build_ext --inplace' "
            "(or scripts/setup.sh), or set INSTANTNFS_PURE=1 to run the Python sources"
        ) from e
    src = os.path.join(os.path.dirname(__file__), source)
    if os.path.getmtime(src) > os.path.getmtime(mod.__file__ or src):
        # a build older than its source would run yesterday's code
        raise ImportError(f"engine.nfs.{name} is older than {src}: rebuild it with "
                          "'python setup.py build_ext --inplace' (or scripts/setup.sh)")
    return mod


if PURE:
    from engine.nfs import fastlane as _lane
    from engine.nfs import transport as _transport
else:
    _lane = _build("_fastlane_c", "fastlane.py")
    _transport = _build("_transport_c", "transport.py")

FastLane = _lane.FastLane
RpcStreamProtocol = _transport.RpcStreamProtocol
RpcDatagramProtocol = _transport.RpcDatagramProtocol
ConnectionLimits = _transport.ConnectionLimits
IMPLEMENTATION = "pure-python" if PURE else "cython"

__all__ = ["IMPLEMENTATION", "ConnectionLimits", "FastLane", "RpcDatagramProtocol", "RpcStreamProtocol"]
