"""state.json: what a daemon's cache directory remembers across restarts.

::

    {"format": 1, "secret": "<hex>", "next_sid": 7,
     "sessions": [{"name", "sid", "point", "created_ns", "mode", "cache_parent"}, ...]}

The secret keys the file handles' MAC (and names this daemon's pins); ``next_sid`` is
never handed out twice, even by a publish that failed; ``sessions`` are the instant
sessions (and sandboxes, so that a killed daemon's are cleaned up) to bring back at the
next start. The file is rewritten (atomically, fsynced) only when it changes, never
merely because the daemon starts.

It is changed on the event loop thread and written by any thread: ``save`` snapshots it
under ``_lock`` and writes one snapshot at a time (``_save_lock``), so the newest state
wins. ``save_then`` is the ordering an unpublish needs on a full volume.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import SessionError
from engine.fsutil import NO_SPACE_ERRNOS, write_file_atomic

log = logging.getLogger("instantnfs.datastore")

STATE_FORMAT = 1


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.secret = b""
        self.next_sid = 1
        self.entries: dict[str, dict] = {}  # name -> entry: the sessions state.json lists
        self._lock = threading.Lock()  # guards entries and next_sid for a snapshot
        self._save_lock = threading.Lock()  # one write at a time, each of the newest state

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """Read the file (if any): the session entries it lists, and whether the state
        changed in reading (a new secret), so it must be saved."""
        state: dict[str, Any] = {}
        if self.path.exists():
            try:
                state = json.loads(self.path.read_text())
                if state.get("format") != STATE_FORMAT:
                    raise ValueError(f"unknown format {state.get('format')!r}")
                self.secret = bytes.fromhex(state["secret"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SessionError(f"{self.path} is unreadable ({e}); move it away to start afresh") from e
        changed = False
        if not self.secret:
            self.secret = secrets.token_bytes(32)
            changed = True
        self.next_sid = int(state.get("next_sid", 1))
        return list(state.get("sessions", [])), changed

    def take_sid(self) -> int:
        with self._lock:
            sid = self.next_sid
            self.next_sid += 1
        return sid

    def put(self, name: str, entry: dict) -> None:
        with self._lock:
            self.entries[name] = entry

    def drop(self, name: str) -> None:
        with self._lock:
            self.entries.pop(name, None)

    def save(self) -> None:
        """Write the file (blocking: fsync), from any thread: the newest state wins."""
        with self._save_lock:
            with self._lock:
                state = {
                    "format": STATE_FORMAT,
                    "secret": self.secret.hex(),
                    "next_sid": self.next_sid,
                    "sessions": sorted(self.entries.values(), key=lambda e: int(e.get("sid", 0))),
                }
                data = (json.dumps(state, indent=2) + "\n").encode()
            write_file_atomic(self.path, data)

    def save_then(self, end: Callable[[], None]) -> None:
        """Save, then ``end`` (blocking). On a full volume, ``end`` first (it frees the
        session's space) and the save again: a session is never left listed in
        state.json because the volume was full."""
        try:
            self.save()
        except OSError as e:
            if e.errno not in NO_SPACE_ERRNOS:
                end()
                raise
            end()
            try:
                self.save()
            except OSError as e2:
                log.error("%s cannot be written (%s): an unpublished session may be listed at the next start",
                          self.path, e2.strerror)
            return
        end()
