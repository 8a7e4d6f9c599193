"""Sessions: publishing a restore point, keeping it across restarts, ending it.

A session is one published restore point: a real directory
``<cache_dir>/sessions/<name>`` (the ``.vmx``, the ``.vmdk`` descriptors, whatever the
client creates), one write cache per disk over the point's backup disk (composed by
``engine.stack``), and a handle table (``engine.datastore.handles``).

Write-cache modes (``Session.mode``):

- ``instant``: the caches live in ``<cache parent>/<session>.<sid>/disk<i>`` and are
  listed in ``state.json``; after a restart the session comes back with its caches
  (everything committed, per ``WriteCache``) and its file handles.
- ``sandbox``: each disk's cache is a ``WriteCache.temporary`` directory under the cache
  parent, removed at unpublish and at daemon stop (``close``); a sandbox a killed daemon
  left behind is removed at the next start. Several sandboxes of one point coexist.

The cache parent is the publish's ``cache_dir`` or ``<cache_dir>/writecache``. Publish
refuses when its volume has less free space than the reserve (unless forced). Every
cache uses the datastore's write verifier, new at each start.

A published point is pinned in the repository (``engine.repo.pins``) under this
daemon's id (derived from the secret, so stable across restarts): the pin is written
before the session becomes visible (a point deleted meanwhile fails the publish with
NotFound) and removed after its caches are gone; at start, restored instant sessions
are pinned again (a point force-deleted meanwhile leaves its session unrestored, with
a log line) and this daemon's pins of sessions it no longer has are removed.

What a publish costs does not depend on the disk's size (the control API's request to
the first READ reply takes the same for 1 GiB and 1 TiB; ``bench --only publish``): the
block map is memory-mapped, not read (``RestorePoint.open_blockmap``), a new write cache
writes only its bitmap's header (the rest is preallocated, reading as zeros), and the
reply's dirty counts are kept by the cache, not counted over its bitmap. What remains is
eleven small fsyncs (state.json twice, the pin, the cache's two files and directory,
the handle table), which keep a published session durable across a crash.

state.json (``engine.datastore.state``) is rewritten only when it changes. If it
cannot be written at start because the volume is full (ENOSPC, EDQUOT), the daemon
starts anyway with a warning and serves every session's acknowledged data; WRITEs that
need new space answer NFS3ERR_NOSPC (``NoSpace`` from the write cache) until space is
freed.

Threads: the registry (``by_name``, ``by_sid``) changes on the event loop thread only,
so it needs no lock. Blocking work runs in a pool of its kind, so that no task waits
for work queued behind itself: write-cache writes, dirty reads and client-file reads
and unstable writes in ``io_pool``; COMMITs and stable writes (fsync) in
``sync_pool``; publish and unpublish work (state.json's fsync, cache creation with its
fallocate, pins, rmtree of session directories and caches) in ``admin_pool``.
``apublish`` builds a session there and makes it visible on the loop once its pin,
caches and files exist; ``aunpublish`` hides it at once, then saves the state and
cleans up there. ``publish``/``unpublish`` do the same blocking, for tests and tools.
A session counts its disk operations in flight (``Session.inflight``, counted by the
disk files), and its caches are closed only when none is left (``aunpublish`` waits for
them; ``last_op_ended`` ends a session whose last operation finished after it was unpublished).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.datastore.handletable import HandleTable
from engine.datastore.nodes import GiB, Session
from engine.datastore.state import StateFile
from engine.datastore.vmware import write_vm_files
from engine.errors import InstantNFSError, NotFound, RepositoryError, SessionError
from engine.fsutil import NO_SPACE_ERRNOS
from engine.repo.pins import Pin, add_pin, list_pins, remove_pin
from engine.repo.repository import RestorePoint
from engine.stack import Stack
from engine.writecache import remove_stale_temporaries

log = logging.getLogger("instantnfs.datastore")

MODES = ("instant", "sandbox")
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ADMIN_THREADS = 2
IO_THREADS = 32
SYNC_THREADS = 4
UNPUBLISH_WAIT = 30  # s an unpublish waits for the disk operations in progress
DEFAULT_RESERVE = 100 * GiB


def _log_failure(what: str) -> Callable[[Any], None]:
    def done(fut: Any) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.error("%s failed: %s", what, fut.exception())
    return done


class Sessions:
    """The published sessions of one datastore: publish, restore at start, unpublish."""

    def __init__(self, stack: Stack, cache_dir: str | os.PathLike, write_dir: str | os.PathLike | None = None,
                 reserve: int = DEFAULT_RESERVE) -> None:
        self.stack = stack
        self.cache_dir = Path(cache_dir)
        self.write_dir = Path(write_dir) if write_dir else self.cache_dir / "writecache"
        self.reserve = reserve  # default free-space reserve of a publish
        self.sessions_dir = self.cache_dir / "sessions"
        self.state = StateFile(self.cache_dir / "state.json")
        # the export root lists the sessions: its mtime and READDIR verifier move with them
        self.root_mtime_ns = time.time_ns()
        self.root_gen = 1
        self.by_name: dict[str, Session] = {}
        self.by_sid: dict[int, Session] = {}
        self.daemon_id = ""  # names this daemon's pins in the repository (from the secret: stable)
        self.fsid = 0
        self.unrestored: list[dict] = []  # state entries of sessions that could not be restored
        # I/O of the sessions unpublished since the start (read_ops, read_bytes, write_ops,
        # write_bytes): with the live sessions' own, the daemon's totals never go back
        self.ended_io = [0, 0, 0, 0]
        self._publishing: set[str] = set()  # names of publishes in progress
        self.write_verf = secrets.token_bytes(8)  # changes every start: clients resend uncommitted writes
        # Work off the loop, by kind, so that no task waits for work queued behind itself:
        # write-cache writes, dirty reads and client-file I/O in one pool; COMMITs and
        # stable writes (fsync) in another, so a burst of slow fsyncs never leaves writes
        # waiting for a thread; publish/unpublish (state fsync, cache creation, pins,
        # rmtree of session directories and caches) in a small one of their own.
        self.io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="wc-io")
        self.sync_pool = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="wc-sync")
        self.admin_pool = ThreadPoolExecutor(max_workers=ADMIN_THREADS, thread_name_prefix="ds-admin")

    def load(self) -> None:
        """Create or read the cache directory's state; bring persisted sessions back.

        state.json is written only if something changed (a new secret, a sandbox a killed
        daemon left); on a full volume the daemon starts anyway, with a warning."""
        try:
            self.sessions_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SessionError(f"cannot create the cache directory {self.cache_dir}: {e.strerror}") from e
        entries, changed = self.state.read()
        secret = self.state.secret
        self.fsid = int.from_bytes(hashlib.blake2b(secret, digest_size=8, person=b"fsid").digest(), "big") >> 1
        self.daemon_id = hashlib.blake2b(secret, digest_size=8, person=b"daemon").hexdigest()
        for s in entries:
            mode = s.get("mode", "instant")
            parent = Path(s.get("cache_parent") or self.default_cache_parent)
            if mode == "sandbox":  # a daemon that was killed left it: throw it away
                shutil.rmtree(self.sessions_dir / s["name"], ignore_errors=True)
                self._handles_path(s["name"]).unlink(missing_ok=True)
                for d in remove_stale_temporaries(parent):
                    log.info("removed the sandbox cache %s left by a stopped daemon", d)
                log.info("sandbox session %s ended with the daemon that ran it", s.get("name"))
                changed = True
                continue
            try:
                try:
                    point = self.stack.repo.point(s["point"])
                except NotFound:
                    raise SessionError(f"its restore point {s['point']} was deleted from the repository") from None
                ses = self._open_session(s["name"], int(s["sid"]), point, int(s["created_ns"]), mode, parent, restore=True,
                                         indexes=s.get("disks"), expires=s.get("expires"))
                try:
                    add_pin(self.stack.repo, self._pin(ses))
                except NotFound:
                    self._end(ses, unpin=False, remove=False)
                    raise SessionError(f"its restore point {point.id} was deleted from the repository") from None
                except BaseException:
                    self._end(ses, unpin=False, remove=False)
                    raise
                self._register(ses)
            except Exception as e:  # noqa: BLE001 - one broken session must not stop the daemon
                # kept in the state: its caches may come back (a volume not mounted yet)
                log.error("session %s (restore point %s) cannot be restored (kept for the next start): %s",
                          s.get("name"), s.get("point"), e)
                self.unrestored.append(s)
                self.state.put(s["name"], s)
        self._drop_foreign_pins()
        if changed:
            try:
                self.state.save()
            except OSError as e:
                if e.errno not in NO_SPACE_ERRNOS:
                    raise SessionError(f"cannot write {self.state.path}: {e.strerror}") from e
                log.warning("the cache volume of %s is full (%s): starting anyway, serving every session's data; "
                            "WRITEs get NFS3ERR_NOSPC until space is freed", self.cache_dir, e.strerror)

    def _drop_foreign_pins(self) -> None:
        """Remove this daemon's pins of sessions it does not have (sandboxes of a killed daemon)."""
        keep = {(e.get("name"), e.get("point")) for e in self.state.entries.values()}
        try:
            for p in list_pins(self.stack.repo):
                if p.daemon == self.daemon_id and (p.session, p.point) not in keep:
                    remove_pin(self.stack.repo, p.point, p.daemon, p.session)
                    log.info("removed the pin of restore point %s held by session %s, which is gone", p.point, p.session)
        except (OSError, RepositoryError) as e:
            log.warning("the pins of this daemon (%s) could not be checked: %s", self.daemon_id, e)

    def _pin(self, s: Session) -> Pin:
        return Pin(s.point.id, s.name, s.sid, self.daemon_id, str(self.cache_dir), socket.gethostname(), os.getpid(),
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.created_ns / 1e9)))

    @property
    def default_cache_parent(self) -> Path:
        return self.write_dir

    def close(self) -> None:
        """Daemon stop: sandboxes end (their caches removed), instant caches are committed."""
        for s in list(self.by_name.values()):
            if s.mode == "sandbox":
                self.unpublish(s.name, force=True)
            else:
                s.close_caches()
                if s.handles is not None:
                    s.handles.close()

    @staticmethod
    def _entry(s: Session) -> dict:
        e: dict[str, Any] = {"name": s.name, "sid": s.sid, "point": s.point.id, "created_ns": s.created_ns,
                             "mode": s.mode, "cache_parent": str(s.cache_parent)}
        if s.indexes is not None:
            e["disks"] = s.indexes
        if s.expires is not None:
            e["expires"] = s.expires
        return e

    def _handles_path(self, name: str) -> Path:
        return self.sessions_dir / f".{name}.handles"  # a session name never starts with '.'

    def _open_session(self, name: str, sid: int, point: RestorePoint, created_ns: int, mode: str, parent: Path,
                      restore: bool = False, indexes: list[int] | None = None, expires: float | None = None) -> Session:
        """Open a session's disks, caches and handle table (blocking; touches no shared
        state). ``restore``: its instant caches must exist (never start an empty cache in
        place of one that is missing). ``indexes``: the point's disks to publish (all if None)."""
        d = self.sessions_dir / name
        s = Session(name, sid, point, created_ns, d, [], mode, parent, indexes=indexes, expires=expires)
        if indexes is not None and (not indexes or any(not 0 <= i < len(point.disks) for i in indexes)):
            raise SessionError(f"restore point {point.id} has no disk {indexes} (it has {len(point.disks)})")
        try:
            for i in s.point_indexes:
                if mode == "sandbox":
                    c = self.stack.write_cache(point, i, "temporary", parent, verifier=self.write_verf, executor=self.io_pool)
                else:
                    c = self.stack.write_cache(point, i, "open" if restore else "create", s.cache_path(i),
                                               verifier=self.write_verf, executor=self.io_pool)
                s.caches.append(c)
                s.disks.append(c.base)  # type: ignore[arg-type]  # the stack's BackupDisk
            s.mtimes = [created_ns] * len(s.disks)
            d.mkdir(exist_ok=True)
            hp = self._handles_path(name)
            s.handles = HandleTable.load(hp, d) if restore else HandleTable.create(hp, d)
            s.root_ino = os.lstat(d).st_ino
        except BaseException:
            s.close_caches()
            raise
        return s

    def _register(self, s: Session) -> None:
        """Make a session visible (loop thread)."""
        self.by_name[s.name] = s
        self.by_sid[s.sid] = s
        self.state.put(s.name, self._entry(s))

    # -- publishing ------------------------------------------------------------------------

    def _claim(self, point: RestorePoint, name: str | None, mode: str) -> tuple[str, int]:
        """Check the name (or make one) and take a session id (loop thread)."""
        if mode not in MODES:
            raise SessionError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        name = session_name(point, name, set(self.by_name) | self._publishing)
        if any(u.get("name") == name for u in self.unrestored):
            raise SessionError(f"session {name!r} could not be restored at start (see the daemon's log); pick another --name")
        sid = self.state.take_sid()
        self._publishing.add(name)
        return name, sid

    def _build(self, point: RestorePoint, name: str, sid: int, mode: str, cache_dir: str | os.PathLike | None,
               reserve: int | None, force: bool, indexes: list[int] | None = None,
               expires: float | None = None) -> Session:
        """Everything a publish does before the session is visible (blocking): the free
        space check, the pin, the caches, the session directory and its files."""
        self.state.save()  # the sid is taken even if the publish fails: ids are never reused
        parent = Path(os.path.abspath(os.path.expanduser(cache_dir))) if cache_dir else self.default_cache_parent
        check_free_space(parent, self.reserve if reserve is None else reserve, force)
        d = self.sessions_dir / name
        if d.exists():
            shutil.rmtree(d)  # left behind by an unpublish that crashed half way
        created_ns = time.time_ns()
        stub = Session(name, sid, point, created_ns, d, [], mode, parent, indexes=indexes, expires=expires)
        add_pin(self.stack.repo, self._pin(stub))  # NotFound: the point is gone or being deleted
        s: Session | None = None
        try:
            s = self._open_session(name, sid, point, created_ns, mode, parent, indexes=indexes, expires=expires)
            write_vm_files(d, point, indexes)
            self.state.put(name, self._entry(s))
            self.state.save()
        except BaseException as e:
            self.state.drop(name)
            self._end(s or stub)
            if isinstance(e, OSError):
                raise SessionError(f"cannot publish {point.id}: {e.strerror} ({e.filename or parent})") from e
            if isinstance(e, InstantNFSError) and not isinstance(e, SessionError):
                raise SessionError(f"cannot publish {point.id}: {e}") from e
            raise
        return s

    def _published(self, s: Session) -> Session:
        self._publishing.discard(s.name)
        self._register(s)
        self._root_changed()
        log.info("published restore point %s (VM %s) as session %s (%s, cache in %s)", s.point.id, s.point.vm, s.name,
                 s.mode, s.cache_parent)
        return s

    def publish(self, point_ident: str, name: str | None = None, *, mode: str = "instant",
                cache_dir: str | os.PathLike | None = None, reserve: int | None = None, force: bool = False,
                disks: list[str] | None = None, ttl: float | None = None) -> Session:
        """Publish a restore point; the write caches go to ``cache_dir`` (default the
        daemon's), whose volume must have ``reserve`` bytes free unless ``force``.
        ``disks``: only these of the point's disks (names or indexes: instant disk
        recovery); ``ttl``: seconds after which the daemon ends the session (``expired``).
        Blocking: for tests and tools; the daemon calls ``apublish``."""
        point = self.stack.repo.point(point_ident)
        indexes, expires = disk_indexes(point, disks), _expiry(ttl)
        name, sid = self._claim(point, name, mode)
        try:
            s = self._build(point, name, sid, mode, cache_dir, reserve, force, indexes, expires)
        except BaseException:
            self._publishing.discard(name)
            raise
        return self._published(s)

    async def apublish(self, point_ident: str, name: str | None = None, *, mode: str = "instant",
                       cache_dir: str | os.PathLike | None = None, reserve: int | None = None, force: bool = False,
                       disks: list[str] | None = None, ttl: float | None = None) -> Session:
        """``publish`` with every blocking step off the loop; the session is visible once
        its pin, caches and files exist."""
        loop = asyncio.get_running_loop()
        point = await loop.run_in_executor(self.admin_pool, self.stack.repo.point, point_ident)
        indexes, expires = disk_indexes(point, disks), _expiry(ttl)
        name, sid = self._claim(point, name, mode)
        try:
            s = await loop.run_in_executor(self.admin_pool, self._build, point, name, sid, mode, cache_dir, reserve,
                                           force, indexes, expires)
        except BaseException:
            self._publishing.discard(name)
            raise
        return self._published(s)

    async def aset_ttl(self, name: str, ttl: float | None) -> Session:
        """Give a session a new time to live from now (None: none); saved for restarts."""
        s = self.by_name.get(name)
        if s is None:
            raise NotFound(f"no published session {name!r}")
        s.expires = _expiry(ttl)
        self.state.put(name, self._entry(s))
        await asyncio.get_running_loop().run_in_executor(self.admin_pool, self.state.save)
        return s

    def expired(self, now: float | None = None) -> list[str]:
        """Names of the sessions whose ``ttl`` has run out (the daemon ends them)."""
        now = time.time() if now is None else now
        return sorted(s.name for s in self.by_name.values() if s.expires is not None and s.expires <= now)

    def _hide(self, name: str, force: bool) -> Session:
        """Take a session out of the namespace at once (loop thread)."""
        s = self.by_name.get(name)
        if s is None:
            raise SessionError(f"no published session {name!r}")
        if s.jobs and not force:
            raise SessionError(f"session {name!r} has an export or commit running; wait for it to finish")
        del self.by_name[name]
        del self.by_sid[s.sid]
        self.state.drop(name)
        self._root_changed()
        s.ended = True  # its disk files' handles, cached or not, are STALE from now on
        e = self.ended_io
        e[0] += s.read_ops
        e[1] += s.read_bytes
        e[2] += s.write_ops
        e[3] += s.write_bytes
        log.info("unpublished session %s", name)
        return s

    def unpublish(self, name: str, force: bool = False) -> None:
        """End a session: its files and its write caches are removed (export or commit
        first). Blocking: for tests, tools and the daemon's stop; the API calls ``aunpublish``."""
        s = self._hide(name, force)
        if s.inflight == 0:  # else the last disk operation in progress ends it
            self.state.save_then(lambda: self._end(s))
        else:
            self.state.save_then(lambda: None)

    async def aunpublish(self, name: str, force: bool = False) -> None:
        """``unpublish``: hidden at once; the state write and the clean-up run off the loop."""
        s = self._hide(name, force)
        loop = asyncio.get_running_loop()
        if s.inflight:  # the operations in progress finish first (they get their replies)
            s.idle = asyncio.Event()
            try:
                await asyncio.wait_for(s.idle.wait(), UNPUBLISH_WAIT)
            except TimeoutError:
                s.idle = None
                log.warning("session %s: disk operations still running after %d s; the last one ends the session",
                            s.name, UNPUBLISH_WAIT)
                await loop.run_in_executor(self.admin_pool, self.state.save_then, lambda: None)
                return
        await loop.run_in_executor(self.admin_pool, self.state.save_then, lambda: self._end(s))

    def _end(self, s: Session, unpin: bool = True, remove: bool = True) -> None:
        """Close an unpublished session's caches (a sandbox's directories go with them),
        then remove its directories and its pin (blocking). Never while a cache call runs
        in a thread: its file descriptors would be closed under it."""
        s.close_caches()
        if s.handles is not None:
            s.handles.close()
        if remove:
            if s.mode == "instant":
                shutil.rmtree(s.cache_root, ignore_errors=True)
            shutil.rmtree(s.dir, ignore_errors=True)
            self._handles_path(s.name).unlink(missing_ok=True)
        if unpin:
            try:
                remove_pin(self.stack.repo, s.point.id, self.daemon_id, s.name)
            except (OSError, RepositoryError) as e:
                log.error("session %s: its pin of restore point %s cannot be removed: %s", s.name, s.point.id, e)

    def _root_changed(self) -> None:
        self.root_mtime_ns = max(time.time_ns(), self.root_mtime_ns + 1)
        self.root_gen += 1

    def last_op_ended(self, s: Session) -> None:
        """The last disk operation of an unpublished session ended (loop thread): its
        caches may close now. Callers count ``s.inflight`` themselves (up before the
        operation waits in a pool, down after) and call this only when it dropped to 0
        on an ended session."""
        if s.idle is not None:  # aunpublish waits for this and ends the session
            s.idle.set()
            return
        fut = asyncio.get_running_loop().run_in_executor(self.admin_pool, self._end, s)
        fut.add_done_callback(_log_failure(f"ending session {s.name}"))

    async def aclose(self, timeout: float = 30.0) -> None:
        """``close`` (off the loop) once the disk operations in progress have finished (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while any(s.inflight for s in self.by_name.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(self.admin_pool, self.close)
        self.io_pool.shutdown(wait=False)
        self.sync_pool.shutdown(wait=False)
        self.admin_pool.shutdown(wait=False)


def session_report(s: Session) -> dict:
    """What the control API shows of a session."""
    stats = [c.stats() for c in s.caches]
    return {
        "name": s.name,
        "sid": s.sid,
        "point": s.point.id,
        "vm": s.point.vm,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.created_ns / 1e9)),
        "mode": s.mode,
        "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.expires)) if s.expires is not None else None,
        "files_dir": str(s.dir),
        "cache_dir": str(s.cache_parent),
        "cache": {
            "allocated_bytes": sum(st.allocated_bytes for st in stats),
            "dirty_bytes": sum(st.dirty_bytes for st in stats),
        },
        "disks": [
            {"name": d.name, "size": d.size, "cache_path": str(c.path), "granule": st.granule,
             "allocated_bytes": st.allocated_bytes, "dirty_bytes": st.dirty_bytes, "commits": st.commits,
             "failed": st.failed}
            for d, c, st in zip(s.disks, s.caches, stats)
        ],
        "io": {"read_ops": s.read_ops, "read_bytes": s.read_bytes, "write_ops": s.write_ops, "write_bytes": s.write_bytes},
    }


def disk_index(names: list[str], ident: str, owner: str) -> int:
    """The index of the disk ``ident`` (a name, or an index) among ``names``; NotFound
    naming ``owner`` ("restore point X", "session 'y'") and its disks otherwise."""
    ident = str(ident)
    if ident in names:
        return names.index(ident)
    if ident.isdigit() and int(ident) < len(names):
        return int(ident)
    raise NotFound(f"{owner} has no disk {ident!r} (its disks: {', '.join(names)})")


def disk_indexes(point: RestorePoint, disks: list[str] | None) -> list[int] | None:
    """The point's disk indexes named by ``disks`` (names or indexes), in that order; None for all."""
    if not disks:
        return None
    names = [d.name for d in point.disks]
    out: list[int] = []
    for d in disks:
        i = disk_index(names, d, f"restore point {point.id}")
        if i in out:
            raise SessionError(f"disk {d!r} is named twice")
        out.append(i)
    return out


def _expiry(ttl: float | None) -> float | None:
    if ttl is None:
        return None
    if not ttl > 0:
        raise SessionError(f"a time to live must be more than 0 seconds, not {ttl}")
    return time.time() + ttl


def check_free_space(parent: Path, reserve: int, force: bool) -> None:
    """A publish's caches go to ``parent``: its volume must have ``reserve`` bytes free
    (unless ``force``); created if missing (blocking)."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        v = os.statvfs(parent)
    except OSError as e:
        raise SessionError(f"cannot use the cache directory {parent}: {e.strerror}") from e
    free = v.f_bavail * v.f_frsize
    if free < reserve and not force:
        raise SessionError(
            f"the cache volume of {parent} has {free / GiB:.1f} GiB free, less than the {reserve / GiB:.1f} GiB reserve: "
            "free space, pick another --cache-dir, lower the reserve, or publish with --force"
        )


def session_name(point: RestorePoint, name: str | None, taken: set[str]) -> str:
    """The name a publish asked for, checked, or ``<vm>-<point id prefix>[-n]`` if none."""
    if name is None:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", point.vm)[:100] or "vm"
        name = f"{base}-{point.id[:8]}"
        n = 2
        while name in taken:
            name = f"{base}-{point.id[:8]}-{n}"
            n += 1
    if not _SESSION_RE.match(name):
        raise SessionError(f"session name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-'")
    if name in taken:
        raise SessionError(f"a session named {name!r} is already published (unpublish it or pick another --name)")
    return name
