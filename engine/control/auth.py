"""Who may drive the daemon: the control API's bearer token and where the CLI finds it.

Every API request (except the OpenAPI document) carries ``Authorization: Bearer
<token>``, from loopback too: the daemon runs as root and its API can publish, export
to files and delete sessions, so "any local process" is not a safe audience.

The token is ``control.token`` when the configuration sets one, else a random one made
at each start. The daemon writes it, mode 0600 and never through a symbolic link, to

- ``control.token_file`` (default ``<cache.dir>/control.token``), and
- a per-user index, ``$XDG_STATE_HOME/instantnfs/tokens/<host>_<port>`` (default
  ``~/.local/state/...``), named after the control address, so that the CLI of the same
  user finds the token of any daemon it is pointed at with ``--server URL``.

Only the daemon's user (and root) can read either file: that is the authentication of
local users. The index entry is removed when the daemon stops cleanly; a stale one is
overwritten at the next start on that address.

The CLI looks, in order: ``--token-file``, ``$INSTANTNFS_TOKEN``,
``$INSTANTNFS_TOKEN_FILE``, the configuration's ``control.token``, the index entry for
the server's address, the configuration's ``control.token_file``.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
import urllib.parse
from pathlib import Path

from engine.errors import UsageError

TOKEN_BYTES = 32


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "instantnfs" / "tokens"


def index_path(host: str, port: int) -> Path:
    """The per-user index entry of the daemon whose control API is at host:port."""
    safe = host.strip("[]").replace(":", "-").replace("/", "-")
    return state_dir() / f"{safe}_{port}"


def default_token_file(cfg: dict) -> Path:
    return Path(os.path.expanduser(cfg["control"]["token_file"] or os.path.join(cfg["cache"]["dir"], "control.token")))


def write_token(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` with mode 0600, atomically, never through a symlink
    (a symlink or other non-regular file at ``path`` is refused)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} exists and is not a regular file: remove it (the control token is written there)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_token(path: Path, token: str) -> None:
    """Remove ``path`` if it still holds ``token`` (another daemon may have taken the address)."""
    try:
        if read_token(path) == token:
            os.unlink(path)
    except OSError:
        pass


def read_token(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise UsageError(f"cannot read the control token {path}: permission denied "
                             "(run as the daemon's user, or set $INSTANTNFS_TOKEN)") from None
        raise UsageError(f"cannot read the control token {path}: {e.strerror}") from None
    try:
        return os.read(fd, 4096).decode(errors="replace").strip() or None
    finally:
        os.close(fd)


def find_token(url: str, cfg: dict, token_file: str | None = None) -> str | None:
    """The token the CLI sends to the daemon at ``url`` (None: none found)."""
    if token_file:
        t = read_token(Path(token_file))
        if t is None:
            raise UsageError(f"no control token in {token_file}")
        return t
    env = os.environ.get("INSTANTNFS_TOKEN")
    if env:
        return env.strip()
    env_file = os.environ.get("INSTANTNFS_TOKEN_FILE")
    if env_file:
        t = read_token(Path(env_file))
        if t is None:
            raise UsageError(f"no control token in $INSTANTNFS_TOKEN_FILE ({env_file})")
        return t
    if cfg["control"]["token"]:
        return str(cfg["control"]["token"])
    u = urllib.parse.urlsplit(url)
    if u.hostname:
        t = read_token(index_path(u.hostname, u.port or 80))
        if t:
            return t
    return read_token(default_token_file(cfg))
