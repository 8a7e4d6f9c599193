"""The fast lane's wire codec in use: compiled, or the pure-Python twin.

``INSTANTNFS_PURE=1`` selects ``engine.nfs._wire_py`` (the readable specification);
otherwise the Cython build ``engine.nfs._wire`` is used, and a missing build is an error
that says how to make it, as for the block map.
"""
from __future__ import annotations

from engine import twins

if twins.PURE:
    from engine.nfs import _wire_py as impl
else:
    with twins.required("engine.nfs._wire"):
        from engine.nfs import _wire as impl  # type: ignore[no-redef]

call_head = impl.call_head
fh_arg = impl.fh_arg
read_args = impl.read_args
access_args = impl.access_args
lookup_args = impl.lookup_args
write_args = impl.write_args
ok_head = impl.ok_head
getattr_reply = impl.getattr_reply
read_reply_head = impl.read_reply_head
pad = impl.pad
access_reply = impl.access_reply
lookup_reply = impl.lookup_reply
write_reply = impl.write_reply
commit_reply = impl.commit_reply
IMPLEMENTATION = "pure-python" if impl.__name__.endswith("_py") else "cython"
