"""The local file: the physical reference every other system is read beside.

Reads go to the image itself through the kernel's page cache; writes go to a separate
sparse copy made fresh at each setup, so the write scenarios never touch the image the
other peers serve. "Cold" drops both files' pages (``posix_fadvise(DONTNEED)``).
"""
from __future__ import annotations

from pathlib import Path

from engine.bench.core import FileTarget, Target
from engine.bench.peers.base import Peer, Workspace, copy_sparse


class LocalFile(Peer):
    name = "local"
    product = "local file"
    detail = "page cache"

    @property
    def install_command(self) -> str:
        return ""  # nothing to install

    def installed(self) -> bool:
        return True

    def copy_path(self, ws: Workspace) -> Path:
        return self.state_dir(ws) / "disk-rw.img"

    def _setup(self, ws: Workspace) -> None:
        copy_sparse(ws.image, self.copy_path(ws))

    def read_target(self) -> Target:
        ws = self._ws()
        return FileTarget(str(ws.image), ws.size)

    def write_target(self) -> Target | None:
        ws = self._ws()
        return FileTarget(str(self.copy_path(ws)), ws.size)

    def cache_files(self) -> list[Path]:
        ws = self._ws()
        return [ws.image, self.copy_path(ws)]
