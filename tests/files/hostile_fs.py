"""A hostile guest filesystem in memory, for the walkers (tar, diff): names with '/',
NUL, '..' and empty ones, and a directory that contains its own parent (a loop)."""
from __future__ import annotations

from collections.abc import Iterator

from engine.files.fs import Entry, File, FileSystem

DATA = {3: b"slash", 4: b"nul", 5: b"dots", 7: b"inner"}


def _e(name: bytes, path: str, kind: str, inode: int) -> Entry:
    return Entry(name, path, kind, inode, len(DATA.get(inode, b"")), 0o644, 0, 0, 1, 0, 0, 0)


KIDS = {
    1: [_e(b"a/b", "/a/b", "file", 3), _e(b"x\0y", "/x\0y", "file", 4), _e(b"..", "/..", "file", 5),
        _e(b"", "/", "file", 5), _e(b"d", "/d", "dir", 6)],
    6: [_e(b"inner", "/d/inner", "file", 7), _e(b"loop", "/d/loop", "dir", 1)],
}


class _File(File):
    def read(self, offset: int, length: int) -> bytes:
        return DATA[self.entry.inode][offset : offset + length]

    def data_runs(self) -> list[tuple[int, int]]:
        return [(0, self.size)] if self.size else []


class HostileFs(FileSystem):
    name, kind, block_size, journal_note = "hostile", "fake", 512, None

    def _root(self) -> Entry:
        return _e(b"", "/", "dir", 1)

    def _list(self, inode: int, path: str) -> Iterator[Entry]:
        return iter(KIDS.get(inode, []))

    def open_file(self, entry: Entry) -> File:
        return _File(self, entry)


def hostile_fs() -> HostileFs:
    return HostileFs()
