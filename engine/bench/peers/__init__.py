"""The peers of the benchmark suite: what users run today, set up side by side with ours.

- ``ganesha``: NFS-Ganesha serving the uncompressed raw image (VFS FSAL, NFSv3/TCP), in
  a private network namespace only, on 127.0.0.1;
- ``borg`` and ``borg-fixed``: ``borg mount`` of a borg repository of the image, made
  with borg's default chunker and with fixed 1 MiB chunks (two peers, so every row shows
  both: the default is what users have, fixed 1 MiB is borg's best case on a disk);
- ``restic``: ``restic mount`` of a restic repository of the image;
- ``local``: the image file itself.

Each is a ``Peer`` (see ``base``): ``status()`` says whether it is installed and with
which command it installs; ``install()`` installs the named ones as root with their
services held (see ``installer``). ``python -m engine.bench.peers status|install NAME...``
does the same from a shell.
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.bench.peers.base import (
    Peer,
    PeerError,
    PeerFailed,
    PeerNotInstalled,
    Workspace,
    in_private_namespace,
)
from engine.bench.peers.fuse import Borg, BorgFixed, Restic
from engine.bench.peers.ganesha import Ganesha, ganesha_config
from engine.bench.peers.installer import install
from engine.bench.peers.local import LocalFile

PEERS: dict[str, type[Peer]] = {
    cls.name: cls for cls in (Ganesha, Borg, BorgFixed, Restic, LocalFile)
}


def find_peers(names: Sequence[str]) -> dict[str, Peer]:
    """A fresh instance of each named peer, in report order; an unknown name is a ValueError."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {', '.join(map(repr, unknown))}; the peers are: {', '.join(PEERS)}")
    return {n: cls() for n, cls in PEERS.items() if n in names}


__all__ = [
    "PEERS", "Borg", "BorgFixed", "Ganesha", "LocalFile", "Peer", "PeerError", "PeerFailed", "PeerNotInstalled",
    "Restic", "Workspace", "find_peers", "ganesha_config", "in_private_namespace", "install",
]
