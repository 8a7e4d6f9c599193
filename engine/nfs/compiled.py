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

from engine import twins

_HERE = os.path.dirname(__file__)

if twins.PURE:
    from engine.nfs import fastlane as _lane
    from engine.nfs import transport as _transport
else:
    with twins.required("engine.nfs._fastlane_c"):
        from engine.nfs import _fastlane_c as _lane  # type: ignore[no-redef]
    with twins.required("engine.nfs._transport_c"):
        from engine.nfs import _transport_c as _transport  # type: ignore[no-redef]
    twins.not_older(_lane, os.path.join(_HERE, "fastlane.py"))
    twins.not_older(_transport, os.path.join(_HERE, "transport.py"))

FastLane = _lane.FastLane
RpcStreamProtocol = _transport.RpcStreamProtocol
RpcDatagramProtocol = _transport.RpcDatagramProtocol
ConnectionLimits = _transport.ConnectionLimits
IMPLEMENTATION = "pure-python" if twins.PURE else "cython"

__all__ = ["IMPLEMENTATION", "ConnectionLimits", "FastLane", "RpcDatagramProtocol", "RpcStreamProtocol"]
