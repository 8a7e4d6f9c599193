"""A small blocking client of QEMU's monitor protocol (QMP) over its unix socket.

What: ``QMP(path).connect()`` reads the greeting and negotiates (``qmp_capabilities``);
``execute(cmd, args, timeout)`` sends one command and returns its ``return`` value or
raises ``QMPError`` (QEMU said no: ``error_class`` and its description); ``hmp(line)``
runs a human-monitor command (``qemu-io``, ``info ...``); events that arrive meanwhile
are kept (the newest ``MAX_EVENTS``) and ``wait_event`` waits for one with a timeout and
a cancel event. ``close`` ends the connection; ``connect`` again reconnects (QEMU's QMP
socket takes one client at a time and accepts the next once it is gone: how a restarted
daemon gets its VMs back).

Framing: one JSON object per line both ways. Each command carries an ``id``; replies
with another id (left from a command that timed out) are dropped, so a timeout never
desynchronises the stream. A socket path longer than a unix address holds is reached
through ``/proc/self/fd`` of its directory.

Threads: one lock per connection around every exchange; ``wait_event`` reads in slices
of at most ``SLICE_S`` seconds and drops the lock between them, so a thread waiting for
a block job's event does not hold off another thread's ``query-status``. Every wait has a
timeout. A broken connection (QEMU exited, EOF) raises ``VMError`` and marks the client
closed; it never hangs.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import Cancelled, QMPError, VMError, VMTimeout

MAX_EVENTS = 1000
MAX_LINE = 16 << 20  # a reply line longer than this is a broken peer
SLICE_S = 0.2


def _connect(sock: socket.socket, path: str) -> None:
    """``sock.connect(path)``, also for a path longer than a socket address takes (107
    bytes): through ``/proc/self/fd/N/`` of its directory."""
    if len(os.fsencode(path)) <= 107:
        sock.connect(path)
        return
    dfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{dfd}/{os.path.basename(path)}")
    finally:
        os.close(dfd)


class QMP:
    """One QMP connection to the socket at ``path``."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.greeting: dict[str, Any] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, timeout: float = 10.0, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Connect (retrying while the socket is not there yet, for up to ``timeout``
        seconds, or until ``alive()`` says the QEMU process is gone), read the greeting,
        negotiate capabilities. Returns the greeting."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self.close()
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    sock.settimeout(max(0.05, deadline - time.monotonic()))
                    _connect(sock, self.path)
                    break
                except OSError as e:
                    sock.close()
                    if alive is not None and not alive():
                        raise VMError(f"QEMU exited before its monitor {self.path} answered") from e
                    if time.monotonic() >= deadline:
                        raise VMTimeout(f"no QMP monitor at {self.path} after {timeout:.0f} s: {e.strerror or e}") from e
                    time.sleep(0.05)
            self._sock, self._buf = sock, bytearray()
            try:
                greeting = self._read(deadline)
                if "QMP" not in greeting:
                    raise VMError(f"{self.path} is not a QMP monitor: {str(greeting)[:200]}")
                self.greeting = greeting
                self.execute("qmp_capabilities", timeout=max(0.5, deadline - time.monotonic()))
            except BaseException:
                self.close()
                raise
            return greeting

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                finally:
                    self._sock = None

    def execute(self, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run ``command``; its ``return`` value. ``QMPError`` when QEMU refuses it,
        ``VMTimeout`` after ``timeout`` seconds, ``VMError`` when the connection is gone."""
        with self._lock:
            if self._sock is None:
                raise VMError(f"QMP {self.path} is not connected")
            cid = next(self._ids)
            msg: dict[str, Any] = {"execute": command, "id": cid}
            if args:
                msg["arguments"] = args
            try:
                self._sock.settimeout(timeout)
                self._sock.sendall(json.dumps(msg).encode() + b"\n")
            except OSError as e:
                self.close()
                raise VMError(f"QMP {self.path}: {command}: {e.strerror or e}") from e
            deadline = time.monotonic() + timeout
            while True:
                reply = self._read(deadline, what=command)
                if reply.get("id") != cid:
                    continue  # an old command's late reply
                if "error" in reply:
                    err = reply["error"]
                    raise QMPError(f"QEMU refused {command}: {err.get('desc', err)}", str(err.get("class", "")))
                return reply.get("return")

    def hmp(self, command_line: str, timeout: float = 30.0) -> str:
        """A human-monitor command (e.g. ``qemu-io disk0 "write -P 0x5a 0 4k"``); its output."""
        return str(self.execute("human-monitor-command", {"command-line": command_line}, timeout) or "")

    def take_events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Remove and return the buffered events (those called ``name``, or all)."""
        with self._lock:
            got = [e for e in self.events if name is None or e.get("event") == name]
            keep = [e for e in self.events if not (name is None or e.get("event") == name)]
            self.events.clear()
            self.events.extend(keep)
            return got

    def wait_event(self, names: str | tuple[str, ...], timeout: float,
                   match: Callable[[dict[str, Any]], bool] | None = None,
                   cancel: threading.Event | None = None) -> dict[str, Any]:
        """The first event called one of ``names`` (and for which ``match`` holds), taken
        out of the buffer; waits for it up to ``timeout`` seconds (``VMTimeout``) or until
        ``cancel`` is set (``Cancelled``)."""
        wanted = (names,) if isinstance(names, str) else names
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for e in list(self.events):
                    if e.get("event") in wanted and (match is None or match(e)):
                        self.events.remove(e)
                        return e
                if self._sock is None:
                    raise VMError(f"QMP {self.path} is not connected")
                now = time.monotonic()
                if now >= deadline:
                    raise VMTimeout(f"no {'/'.join(wanted)} event from QEMU within {timeout:.0f} s")
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                try:
                    self._read(min(deadline, now + SLICE_S), what="events", events_only=True)
                except VMTimeout:
                    pass

    def _read(self, deadline: float, what: str = "greeting", events_only: bool = False) -> dict[str, Any]:
        """The next non-event message (events are buffered), or, with ``events_only``,
        return ``{}`` after reading whatever events came before ``deadline``."""
        assert self._sock is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError as e:
                    self.close()
                    raise VMError(f"QMP {self.path}: not JSON: {line[:200]!r}") from e
                if "event" in msg:
                    self.events.append(msg)
                    if events_only:
                        return {}
                    continue
                if events_only:
                    continue  # a late reply nobody waits for
                return dict(msg)
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMTimeout(f"QEMU did not answer {what} in time ({self.path})")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                self.close()
                raise VMError(f"QMP {self.path}: {e.strerror or e}") from e
            if not data:
                self.close()
                raise VMError(f"QMP {self.path}: QEMU closed the monitor (exited?)")
            self._buf += data
            if len(self._buf) > MAX_LINE:
                self.close()
                raise VMError(f"QMP {self.path}: a message longer than {MAX_LINE} bytes")
