"""File handles: what a client holds to name a file, and how one is checked and resolved.

Every handle carries a 16-byte keyed BLAKE2b MAC under the daemon's secret (persisted in
``<cache_dir>/state.json``). The root, the disk files and the session directories have
32-byte handles (version 1: kind, session id, disk file index or the session
directory's inode), as before generations existed, so they survive an upgrade. A
client file's handle is 40 bytes (version 2: session id, inode, generation; ESXi
refuses handles over 56): its generation comes from the session's ``HandleTable``, so a
handle of a removed file whose inode the filesystem reused is STALE, and resolving a
handle never walks a directory. The same file has the same handle after a restart; a
forged or altered handle is ``BadHandle``; a handle of an unpublished session or a
deleted file is ``StaleHandle``. Session ids are never reused, so a republished name
gets new handles.

``Handles`` encodes and resolves; it finds sessions by id in the mapping it is given
(the datastore's), and keeps verified handles of disk files (immutable while their
session is published) so the hot path of a READ skips the MAC; ``forget`` drops them
when a session goes. Everything here runs on the event loop thread, except
``HandleTable.load`` (a compaction, fsynced) which runs where a session is opened.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.datastore.nodes import REAL, ROOT, VDISK, Node
from engine.errors import BadHandle, StaleHandle
from engine.fsutil import NO_SPACE_ERRNOS, write_file_atomic

if TYPE_CHECKING:
    from engine.datastore.sessions import Session

log = logging.getLogger("instantnfs.datastore")

HANDLE_VERSION = 1  # the root and disk files: version, kind, 0, session id, disk file index
_HEAD = struct.Struct(">BBHIQ")
REAL_HANDLE_VERSION = 2  # client files: version, kind, 0, session id, inode, generation
_REAL_HEAD = struct.Struct(">BBHIQQ")
MAC_SIZE = 16
HANDLE_SIZE = _HEAD.size + MAC_SIZE  # 32
REAL_HANDLE_SIZE = _REAL_HEAD.size + MAC_SIZE  # 40: ESXi refuses handles over 56 bytes
GEN_EPOCH = 1 << 32  # each start of a session's table hands out generations from a new epoch
MAX_DEPTH = 4096  # of a client-made directory tree (a handle table never walks further)
FH_CACHE_MAX = 65536


@dataclass(slots=True)
class _Entry:
    gen: int
    parent: int  # inode of the directory holding ``name``; 0 for the session directory
    name: str


class HandleTable:
    """The generations of one session's client files: inode -> (generation, parent, name).

    A client file's handle names (inode, generation); it resolves only while the table
    gives that inode that generation and the file found at the entry's path (followed
    through the parents' entries, never by walking a directory) has that inode. A file
    gets its generation when the server creates it or first sees it (LOOKUP, READDIR);
    REMOVE of its last link, RMDIR and a RENAME over it drop its entry, so an inode the
    filesystem reuses gets a new generation: the old handles are STALE. A file met under
    a name other than its entry's whose entry's name no longer reaches it (renamed or
    replaced behind the daemon's back) is treated as new, too.

    The table is persisted as an append-only log of JSON lines beside the session
    directory, ``sessions/.<name>.handles`` (not in it: clients never see it), so
    handles survive a restart: ``[ino, gen, parent, name]`` sets an entry, ``[ino, gen]``
    drops one, ``["gen", n]`` says generations below ``n`` may be in use. Lines are
    appended on the loop thread (a short write, no fsync); the log is compacted, fsynced,
    at each start, which also starts a new epoch of ``GEN_EPOCH`` generations: a
    generation handed out before a power loss that lost its line is never handed out
    again. User xattrs would keep the generation with the inode, but tmpfs has them only
    since Linux 6.6, symbolic links never: one mechanism for every filesystem.
    """

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self.root = root
        self.entries: dict[int, _Entry] = {}
        self.next_gen = 1
        self._fd = -1
        self._warned = False

    @classmethod
    def create(cls, path: Path, root: Path) -> HandleTable:
        """A new table for a new session directory ``root`` (blocking: fsyncs)."""
        t = cls(path, root)
        t.entries[os.lstat(root).st_ino] = _Entry(t._take(), 0, "")
        t._rewrite(t.next_gen)
        return t

    @classmethod
    def load(cls, path: Path, root: Path) -> HandleTable:
        """The table as persisted; entries that no longer reach their file are dropped;
        compacted into a new log (blocking: fsyncs). On a full volume the old log stays."""
        t = cls(path, root)
        top = 0
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        for line in raw.splitlines():
            try:
                rec = json.loads(line)
                if rec[0] == "gen":
                    top = max(top, int(rec[1]))
                elif len(rec) == 4:
                    t.entries[int(rec[0])] = _Entry(int(rec[1]), int(rec[2]), str(rec[3]))
                    top = max(top, int(rec[1]))
                else:
                    t.entries.pop(int(rec[0]), None)
                    top = max(top, int(rec[1]))
            except (ValueError, TypeError, IndexError, KeyError):
                continue  # a line torn by a crash
        root_ino = os.lstat(root).st_ino
        for ino in list(t.entries):
            p = t.path_of(ino)
            try:
                if p is None or os.lstat(p).st_ino != ino:
                    del t.entries[ino]
            except OSError:
                del t.entries[ino]
        t.next_gen = (top // GEN_EPOCH + 1) * GEN_EPOCH
        if root_ino not in t.entries:
            t.entries[root_ino] = _Entry(t._take(), 0, "")
        try:
            t._rewrite(t.next_gen)
        except OSError as e:
            if e.errno not in NO_SPACE_ERRNOS:
                raise
            t._fallback_epoch(e)
        return t

    def _fallback_epoch(self, e: OSError) -> None:
        """The new epoch cannot be made durable (a full volume): append it to the old log;
        failing that, take a random epoch far above any counted one."""
        try:
            self._open()
            self._append(["gen", self.next_gen])
            os.fsync(self._fd)
        except OSError:
            self.next_gen = (1 << 62) + secrets.randbelow(1 << 29) * GEN_EPOCH
            log.warning("%s cannot be written (%s): client-file handles will not survive the next restart", self.path, e.strerror)

    def _take(self) -> int:
        g = self.next_gen
        self.next_gen += 1
        return g

    def _rewrite(self, start: int) -> None:
        lines = [json.dumps(["gen", start])] + [json.dumps([ino, e.gen, e.parent, e.name]) for ino, e in self.entries.items()]
        self.close()
        write_file_atomic(self.path, ("\n".join(lines) + "\n").encode())
        self._open()

    def _open(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _append(self, rec: list) -> None:
        try:
            self._open()
            os.write(self._fd, (json.dumps(rec) + "\n").encode())
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("%s cannot be written (%s): handles of files created now are STALE after a restart",
                            self.path, e.strerror)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def path_of(self, ino: int) -> str | None:
        """Where the entry of ``ino`` says the file is (through its parents' entries)."""
        parts: list[str] = []
        cur = ino
        for _ in range(MAX_DEPTH):
            e = self.entries.get(cur)
            if e is None:
                return None
            if e.parent == 0:
                return os.path.join(self.root, *reversed(parts)) if parts else str(self.root)
            parts.append(e.name)
            cur = e.parent
        return None

    def resolve(self, ino: int, gen: int) -> str | None:
        """The path of the file (ino, gen) names, or None: that file is gone."""
        e = self.entries.get(ino)
        if e is None or e.gen != gen:
            return None
        p = self.path_of(ino)
        if p is None:
            return None
        try:
            return p if os.lstat(p).st_ino == ino else None
        except OSError:
            return None

    def seen(self, ino: int, parent: int, name: str) -> int:
        """The generation of the file ``ino`` found as ``name`` in directory ``parent``."""
        e = self.entries.get(ino)
        if e is not None:
            if e.parent == parent and e.name == name:
                return e.gen
            if e.parent != 0 and self.resolve(ino, e.gen) is not None:
                return e.gen  # another hard link of the same file
        gen = self._take()
        self.entries[ino] = _Entry(gen, parent, name)
        self._append([ino, gen, parent, name])
        return gen

    def renamed(self, ino: int, parent: int, name: str, new_parent: int, new_name: str) -> None:
        e = self.entries.get(ino)
        if e is not None and e.parent == parent and e.name == name:
            e.parent, e.name = new_parent, new_name
            self._append([ino, e.gen, new_parent, new_name])

    def dropped(self, ino: int) -> None:
        e = self.entries.pop(ino, None)
        if e is not None:
            self._append([ino, e.gen])


class Handles:
    """Encode and resolve the handles of one datastore (loop thread)."""

    def __init__(self, by_sid: Mapping[int, Session]) -> None:
        self.by_sid = by_sid
        self.secret = b""  # set by the datastore once its state is read
        self._fh_cache: dict[bytes, Node] = {}  # verified handles of disk files

    def forget(self) -> None:
        """A session went: its disk files' handles must not resolve from the cache."""
        self._fh_cache.clear()

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
        if node is not None:
            return node
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
