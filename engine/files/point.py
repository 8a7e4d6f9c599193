"""The filesystems of one restore point: its disks, their volumes, what is on each.

``PointFiles(stack, point)`` opens every disk of the point through the stack (so reads
share its decompression cache and each disk has its readahead), finds the volumes
(``engine.files.volumes``) and probes each for a filesystem, lazily and once. It is
what the CLI (and later the API, diff, mount) asks for "the filesystem the user
means": ``filesystem(None)`` picks the only one, or says which ones there are.
Single-threaded: one ``PointFiles`` per thread.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.disk import BackupDisk
from engine.errors import UsageError
from engine.files.fs import FileSystem, FilesystemError
from engine.files.volumes import Layout, Volume, VolumeReader, find_volumes
from engine.repo.repository import RestorePoint
from engine.stack import Stack


@dataclass(frozen=True, slots=True)
class Found:
    """A volume and what it holds: a filesystem's kind, or why there is none."""

    volume: Volume
    disk_name: str  # the restore point's name of its disk
    filesystem: str | None  # ext4, ntfs, fat32...
    note: str  # why no filesystem / the journal note

    def to_json(self) -> dict:
        return {**self.volume.to_json(), "disk": self.disk_name, "filesystem": self.filesystem, "note": self.note or None}


class PointFiles:
    def __init__(self, stack: Stack, point: RestorePoint) -> None:
        self.point = point
        self.disks: list[BackupDisk] = [stack.backup_disk(point, i) for i in range(len(point.disks))]
        self._layout: Layout | None = None
        self._open: dict[str, FileSystem | FilesystemError] = {}

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = find_volumes(self.disks)
        return self._layout

    def _try(self, v: Volume) -> FileSystem | FilesystemError:
        if v.name not in self._open:
            try:
                self._open[v.name] = FileSystem.open(VolumeReader(v, self.disks), v.name)
            except FilesystemError as e:
                self._open[v.name] = e
        return self._open[v.name]

    def found(self) -> list[Found]:
        """Every volume with what is on it."""
        out = []
        for v in self.layout.volumes:
            disk = self.point.disks[v.disk].name
            if v.contains:
                out.append(Found(v, disk, None, f"holds {v.contains}"))
            elif not v.readable:
                out.append(Found(v, disk, None, f"not readable: {v.why}"))
            else:
                fs = self._try(v)
                if isinstance(fs, FileSystem):
                    out.append(Found(v, disk, fs.kind, fs.journal_note or ""))
                else:
                    out.append(Found(v, disk, None, str(fs).removeprefix(f"{v.name}: ")))
        return out

    def filesystem(self, ident: str | None) -> FileSystem:
        """The filesystem on volume ``ident`` (``disk0``, ``disk0:1``, ``vg0/root``, or a
        disk's name in the restore point instead of ``diskN``); None: the only one."""
        if ident is None:
            every = self.found()
            found = [f for f in every if f.filesystem]
            if len(found) == 1:
                return self._try(found[0].volume)  # type: ignore[return-value]
            if not found:
                why = "; ".join(f"{f.volume.name}: {f.note}" for f in every if not f.volume.contains)
                raise FilesystemError(f"restore point {self.point.id} has no filesystem this tool reads ({why})")
            names = ", ".join(f"{f.volume.name} ({f.filesystem})" for f in found) or "none"
            raise UsageError(f"restore point {self.point.id} has {len(found)} filesystems: name one of them "
                             f"(DISK:PART): {names}; 'instantnfs files ls {self.point.id}' lists its volumes")
        disk, sep, part = ident.rpartition(":") if ":" in ident else (ident, "", "")
        for i, d in enumerate(self.point.disks):  # a disk's own name works as well as diskN
            if disk == d.name and disk != f"disk{i}":
                ident = f"disk{i}" + (f":{part}" if sep else "")
        v = self.layout.find(ident)
        if v.contains:
            raise UsageError(f"{v.name} holds {v.contains}, not a filesystem: name one of its volumes "
                             f"('instantnfs files ls {self.point.id}' lists them)")
        fs = self._try(v) if v.readable else FilesystemError(f"{v.name} cannot be read: {v.why}")
        if isinstance(fs, FilesystemError):
            raise fs
        return fs
