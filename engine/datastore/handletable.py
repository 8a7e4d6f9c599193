"""A session's handle table: the generations of its client files, kept across restarts.

A client file's handle names (inode, generation) (``engine.datastore.handles``); this
table says which generation each inode has now and where the file is, so a handle
resolves without walking a directory, and an inode the filesystem reused after a
remove gets a new generation (the old handles are STALE). The table is persisted
beside the session directory as an append-only log, compacted at each start.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from engine.fsutil import NO_SPACE_ERRNOS, write_file_atomic

log = logging.getLogger("instantnfs.datastore")

GEN_EPOCH = 1 << 32  # each start of a session's table hands out generations from a new epoch
MAX_DEPTH = 4096  # of a client-made directory tree (a handle table never walks further)


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
