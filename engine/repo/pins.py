"""Pins: a published restore point is named in the repository by the daemons serving it.

A pin is a small JSON file ``<repo>/pins/<point id>/<daemon>.<session>.json``, written
atomically (temporary file, fsync, rename, fsync of the directory). It names the daemon
(a stable id derived from the daemon's secret), the session, the cache directory, the
host and the PID, so a pin whose daemon is gone can be found and removed by hand.
``add_pin`` refuses a point that does not exist (or is being deleted) with ``NotFound``,
and checks again after writing, so a pin never outlives a point deleted meanwhile. All
three functions are blocking and idempotent; call them off the event loop.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import NotFound, RepositoryError
from engine.fsutil import fsync_dir, write_file_atomic
from engine.repo.repository import Repository

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Pin:
    point: str
    session: str
    sid: int
    daemon: str
    cache_dir: str
    host: str
    pid: int
    created: str


def _pins_dir(repo: Repository) -> Path:
    return repo.path / "pins"


def _pin_path(repo: Repository, point: str, daemon: str, session: str) -> Path:
    for part in (point, daemon, session):
        if not _PART.match(part):
            raise RepositoryError(f"{part!r} cannot name a pin")
    return _pins_dir(repo) / point / f"{daemon}.{session}.json"


def _point_exists(repo: Repository, point: str) -> bool:
    return (repo.points_dir / point / "manifest.json").is_file()


def add_pin(repo: Repository, pin: Pin) -> None:
    """Pin ``pin.point`` for ``pin.session`` of ``pin.daemon``; NotFound if the point is gone."""
    path = _pin_path(repo, pin.point, pin.daemon, pin.session)
    if not _point_exists(repo, pin.point):
        raise NotFound(f"restore point {pin.point} no longer exists in {repo.path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, (json.dumps(asdict(pin), indent=2) + "\n").encode())
    except OSError as e:
        raise RepositoryError(f"cannot write the pin {path}: {e.strerror}") from e
    if not _point_exists(repo, pin.point):  # deleted while the pin was written
        remove_pin(repo, pin.point, pin.daemon, pin.session)
        raise NotFound(f"restore point {pin.point} no longer exists in {repo.path}")


def remove_pin(repo: Repository, point: str, daemon: str, session: str) -> None:
    """Remove one pin (nothing to do if it is not there)."""
    path = _pin_path(repo, point, daemon, session)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise RepositoryError(f"cannot remove the pin {path}: {e.strerror}") from e
    fsync_dir(path.parent)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # other pins of the point remain


def list_pins(repo: Repository, point: str | None = None) -> list[Pin]:
    """Every pin of ``point`` (or of every point), sorted by point, daemon and session."""
    root = _pins_dir(repo)
    dirs = [root / point] if point is not None else (sorted(root.iterdir()) if root.is_dir() else [])
    out: list[Pin] = []
    for d in dirs:
        if not d.is_dir():
            continue
        for f in sorted(d.glob("*.json")):
            try:
                out.append(Pin(**json.loads(f.read_text())))
            except (OSError, ValueError, TypeError) as e:
                raise RepositoryError(f"the pin {f} is unreadable ({e}); remove it if its daemon is gone") from e
    out.sort(key=lambda p: (p.point, p.daemon, p.session))
    return out
