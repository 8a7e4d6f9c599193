"""Pins: a published restore point is recorded in the repository, so it cannot be deleted.

A daemon publishing a point writes a pin naming the point, the session, the daemon and
its cache directory; unpublishing removes it. Pins live in the repository, so they hold
whether or not the daemon runs: ``points delete`` of a pinned point is refused (naming
the sessions), and ``gc`` keeps every chunk a pinned point uses.

Layout: one small JSON file per pin, ``pins/<point>.<daemon>.<session>.pin`` (written
atomically), holding the ``Pin`` fields. The name alone says which point is pinned, so
an unreadable pin file still protects its point.

Locking: ``pins.lock`` is ``flock``ed around every change, for milliseconds, never the
writer lock: a nightly backup holds that for an hour and publishing must still work.
``add_pin`` checks under it that the point still exists; ``Repository.delete_point``
checks under it that no pin names the point and moves the point away before releasing
it. So a pin never names a deleted point and a pinned point is never deleted.

Stale pins: a pin whose daemon is gone (its cache directory's ``state.json`` is missing
or lists no session of that name and sid) protects nothing that is served; ``repo check``
lists them and ``repo unpin`` removes them. Only pins written on this host are judged.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from engine.errors import NotFound, RepositoryError, RepositoryLocked, UsageError
from engine.fsutil import NO_SPACE_ERRNOS, fsync_dir, no_space, write_file_atomic


class Repository(Protocol):
    """What pins need of a repository (``engine.repo.repository.Repository``): where it is.
    A protocol, so the repository can call pins and pins never import it back."""

    path: Path
    points_dir: Path


PINS_DIR = "pins"
PINS_LOCK = "pins.lock"
LOCK_TIMEOUT = 10.0  # seconds: the lock is held for milliseconds, this is a hang detector

_POINT_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_DAEMON_RE = re.compile(r"^[0-9a-f]{1,64}$")
_SESSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Pin:
    point: str  # restore point id
    session: str  # session name
    sid: int  # session id in that daemon
    daemon: str  # daemon id (stable across restarts of one cache dir; hex string)
    cache_dir: str  # that daemon's cache directory (its state.json lives there)
    host: str  # socket.gethostname() of the daemon
    pid: int  # PID of the daemon that wrote the pin (informational)
    created: str  # ISO time

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        where = f"{self.host}:{self.cache_dir}" if self.host else "unknown place"
        return f"session {self.session!r} of daemon {self.daemon} ({where})"


def _file_name(point: str, daemon: str, session: str) -> str:
    if not _POINT_RE.match(point):
        raise UsageError(f"{point!r} is not a restore point id")
    if not _DAEMON_RE.match(daemon):
        raise UsageError(f"{daemon!r} is not a daemon id (lower-case hex)")
    if not _SESSION_RE.match(session):
        raise UsageError(f"{session!r} is not a session name")
    return f"{point}.{daemon}.{session}.pin"


@contextmanager
def pins_locked(repo: Repository) -> Iterator[None]:
    """Hold ``pins.lock`` (blocking, a few milliseconds at most; RepositoryLocked after
    ``LOCK_TIMEOUT`` seconds)."""
    path = repo.path / PINS_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RepositoryError(f"cannot open {path}: {e.strerror}") from e
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if time.monotonic() > deadline:
                raise RepositoryLocked(f"{path} has been locked for {LOCK_TIMEOUT:.0f} s; is a process hanging on it?")
            time.sleep(0.002)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _parse(path: Path) -> Pin:
    """A pin file's pin; an unreadable one still names its point, daemon and session."""
    try:
        d = json.loads(path.read_text())
        return Pin(str(d["point"]), str(d["session"]), int(d["sid"]), str(d["daemon"]), str(d["cache_dir"]),
                   str(d["host"]), int(d["pid"]), str(d["created"]))
    except (OSError, ValueError, KeyError, TypeError):
        point, daemon, session = path.name[: -len(".pin")].split(".", 2)
        return Pin(point, session, -1, daemon, "", "", 0, "")


def add_pin(repo: Repository, pin: Pin) -> None:
    """Pin pin.point (blocking: call it in a thread). Raises NotFound if the point does not
    exist (or is being deleted). Idempotent for the same (point, daemon, session)."""
    name = _file_name(pin.point, pin.daemon, pin.session)
    d = repo.path / PINS_DIR
    with pins_locked(repo):
        if not (repo.points_dir / pin.point / "manifest.json").is_file():
            raise NotFound(f"no restore point {pin.point!r} in {repo.path} (deleted meanwhile?)")
        try:
            if not d.is_dir():
                d.mkdir(exist_ok=True)
                fsync_dir(repo.path)
            write_file_atomic(d / name, (json.dumps(pin.to_json(), indent=2) + "\n").encode())
        except OSError as e:
            if e.errno in NO_SPACE_ERRNOS:
                no_space(e, f"to pin restore point {pin.point} in {repo.path}")
            raise RepositoryError(f"cannot pin restore point {pin.point} in {repo.path}: {e.strerror}") from e


def remove_pin(repo: Repository, point: str, daemon: str, session: str) -> None:
    """Remove a pin; no error if there is none (blocking: call it in a thread)."""
    name = _file_name(point, daemon, session)
    d = repo.path / PINS_DIR
    with pins_locked(repo):
        try:
            (d / name).unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise RepositoryError(f"cannot remove the pin {d / name}: {e.strerror}") from e
        fsync_dir(d)


def list_pins(repo: Repository, point: str | None = None) -> list[Pin]:
    """Every pin (of ``point`` only, if given), sorted by point, daemon and session."""
    d = repo.path / PINS_DIR
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".pin") and not n.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RepositoryError(f"cannot list the pins in {d}: {e.strerror}") from e
    if point is not None:
        names = [n for n in names if n.startswith(point + ".")]
    return [_parse(d / n) for n in names]


def point_pins(repo: Repository, point: str) -> list[Pin]:
    return list_pins(repo, point)


def describe_pins(pins: list[Pin]) -> str:
    return "; ".join(p.describe() for p in pins)


def pin_is_stale(pin: Pin, host: str | None = None) -> bool:
    """Whether ``pin``'s daemon is gone (False when it cannot be judged from this host)."""
    if not pin.host or pin.host != (host or socket.gethostname()) or pin.sid < 0 or not pin.cache_dir:
        return False
    state_path = Path(pin.cache_dir) / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False  # unreadable: cannot judge, keep the pin
    if not isinstance(state, dict):
        return False
    sessions = state.get("sessions")
    if not isinstance(sessions, list):
        return False
    return not any(isinstance(s, dict) and s.get("name") == pin.session and s.get("sid") == pin.sid for s in sessions)


def stale_pins(repo: Repository) -> list[Pin]:
    """Pins whose daemon is gone: its cache_dir/state.json is missing or does not list a
    session with that name and sid (only judged for pins of this host)."""
    host = socket.gethostname()
    return [p for p in list_pins(repo) if pin_is_stale(p, host)]
