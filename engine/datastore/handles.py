"""File handles: what a client holds to name a file, and how one is checked and resolved.

Every handle carries a 16-byte keyed BLAKE2b MAC under the daemon's secret (persisted in
``<cache_dir>/state.json``). The root, the disk files and the session directories have
32-byte handles (version 1: kind, session id, disk file index or the session
directory's inode), as before generations existed, so they survive an upgrade. A
client file's handle is 40 bytes (version 2: session id, inode, generation; ESXi
refuses handles over 56): its generation comes from the session's ``HandleTable``
(``engine.datastore.handletable``), so a
handle of a removed file whose inode the filesystem reused is STALE, and resolving a
handle never walks a directory. The same file has the same handle after a restart; a
forged or altered handle is ``BadHandle``; a handle of an unpublished session or a
deleted file is ``StaleHandle``. Session ids are never reused, so a republished name
gets new handles.

``Handles`` encodes and resolves; it finds sessions by id in the mapping it is given
(the datastore's), and keeps verified handles of disk files (immutable while their
session is published) so the hot path of a READ skips the MAC; a cached handle of a
session that ended is resolved afresh, and is STALE. Everything here runs on the event loop thread.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Mapping

from engine.datastore.nodes import REAL, ROOT, VDISK, Node, Session
from engine.errors import BadHandle, StaleHandle

log = logging.getLogger("instantnfs.datastore")

HANDLE_VERSION = 1  # the root and disk files: version, kind, 0, session id, disk file index
_HEAD = struct.Struct(">BBHIQ")
REAL_HANDLE_VERSION = 2  # client files: version, kind, 0, session id, inode, generation
_REAL_HEAD = struct.Struct(">BBHIQQ")
MAC_SIZE = 16
HANDLE_SIZE = _HEAD.size + MAC_SIZE  # 32
REAL_HANDLE_SIZE = _REAL_HEAD.size + MAC_SIZE  # 40: ESXi refuses handles over 56 bytes
FH_CACHE_MAX = 65536


class Handles:
    """Encode and resolve the handles of one datastore (loop thread)."""

    def __init__(self, by_sid: Mapping[int, Session]) -> None:
        self.by_sid = by_sid
        self.secret = b""  # set by the datastore once its state is read
        self._fh_cache: dict[bytes, Node] = {}  # verified handles of disk files

    def _mac(self, head: bytes) -> bytes:
        return hashlib.blake2b(head, key=self.secret, digest_size=MAC_SIZE).digest()

    def encode(self, node: Node) -> bytes:
        sid = node.session.sid if node.session else 0
        if node.kind == REAL and not (node.session is not None and node.ino == node.session.root_ino):
            head = _REAL_HEAD.pack(REAL_HANDLE_VERSION, REAL, 0, sid, node.ino, node.gen)
        else:
            head = _HEAD.pack(HANDLE_VERSION, node.kind, 0, sid, node.ino)
        return head + self._mac(head)

    def resolve(self, fh: bytes) -> Node:
        """The node a handle names; BadHandle if forged, StaleHandle if its file is gone.
        Never walks a directory: a client file is found through its session's table."""
        node = self._fh_cache.get(fh)
        if node is not None and node.session is not None and not node.session.ended:
            return node  # (an ended session's handles resolve below: STALE)
        if len(fh) == HANDLE_SIZE:
            head, mac = fh[: _HEAD.size], fh[_HEAD.size :]
        elif len(fh) == REAL_HANDLE_SIZE:
            head, mac = fh[: _REAL_HEAD.size], fh[_REAL_HEAD.size :]
        else:
            raise BadHandle()
        if not hmac.compare_digest(self._mac(head), mac):
            raise BadHandle()
        if len(fh) == REAL_HANDLE_SIZE:
            ver, kind, _pad, sid, ino, gen = _REAL_HEAD.unpack(head)
            if ver != REAL_HANDLE_VERSION or kind != REAL:
                raise BadHandle()
            s = self.by_sid.get(sid)
            if s is None or s.handles is None:
                raise StaleHandle()
            path = s.handles.resolve(ino, gen)
            if path is None:
                raise StaleHandle()
            return Node(REAL, s, ino, path, gen)
        ver, kind, _pad, sid, ino = _HEAD.unpack(head)
        if ver != HANDLE_VERSION:
            raise BadHandle()
        if kind == ROOT:
            return Node(ROOT)
        s = self.by_sid.get(sid)
        if kind == REAL:  # a session directory (the same handle as before generations)
            if s is None or ino != s.root_ino or s.handles is None:
                raise StaleHandle()  # or a client file's handle of an older daemon: LOOKUP it again
            return Node(REAL, s, ino, str(s.dir), s.handles.entries[ino].gen)
        if kind != VDISK:
            raise BadHandle()
        if s is None:
            raise StaleHandle()
        if ino >= 2 * len(s.disks):
            raise BadHandle()
        node = Node(VDISK, s, ino)
        if len(self._fh_cache) > FH_CACHE_MAX:
            self._fh_cache.clear()
        self._fh_cache[bytes(fh)] = node  # immutable while the session is published
        return node
