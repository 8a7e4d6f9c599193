"""The control API's file-level recovery: volumes, directory listings, downloads, tars.

Routes (under ``/api/v1``, behind the API's bearer token like every other):
``GET points/{id}/files`` (the point's volumes and what each holds), ``GET
points/{id}/files/{vol}/ls?path=`` (a directory's entries, or the one file),
``GET points/{id}/files/{vol}/download?path=`` (a file's bytes) and ``GET
points/{id}/files/{vol}/tar?path=`` (a tar of a tree). ``{vol}`` is a volume name as
``instantnfs files ls`` prints it (``disk0``, ``disk0:1``, ``disk0:vg0/root``; its
``/`` may be literal or ``%2F``) or ``-`` for "the point's only filesystem".

Nothing blocks the event loop: every read of a guest filesystem (TSK reads through the
disks, which may wait for a chunk to be decompressed) runs in the API's own executor of
file work (``WORKERS`` threads, apart from the decompression pool, so a file read never
waits behind itself). Each request opens its own ``PointFiles`` (filesystems are not
thread-safe; the decompression cache below is shared) and uses it from one executor
call at a time.

Memory is bounded whatever the sizes: listings are written as they are read (a JSON
document streamed in batches of ``BATCH`` entries), a download is read ``READ_PIECE``
at a time and written with back-pressure (``StreamResponse.write`` waits for the
socket to drain), holes of a sparse file are sent from one zero buffer without being
read, and a tar is produced member by member from the same pieces. A download
announces its ``Content-Length``; a file that turns out unreadable in the middle (a
corrupt chunk) ends the connection early, so the client sees a short body, never bytes
that are not the file's (the error goes to the daemon's log).

Tar members are named the way ``files get`` names files (``engine.files.extract``):
relative names, never absolute, a component ``.``, ``..`` or empty leaves the entry
out, ``/`` and NUL in a name become ``%2F`` / ``%00``; undecodable bytes are kept
(PAX headers with ``hdrcharset=BINARY``). Symlinks are symlink members with their
target as stored; the second and later names of a hard-linked inode are hard-link
members naming the first; devices, FIFOs and sockets are left out; xattrs and ACLs are
not included. The tar of ``/`` holds the root's contents; of ``/etc``, ``etc/...``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from engine.errors import InstantNFSError, NotFound, UsageError
from engine.files.extract import safe_name
from engine.files.fs import READ_PIECE, Entry, File, FileSystem, FilesystemError
from engine.files.point import PointFiles
from engine.stack import Stack

log = logging.getLogger("instantnfs.api.files")

WORKERS = 4
BATCH = 256  # listing entries per executor call
_ZEROS = bytes(READ_PIECE)
T = TypeVar("T")


def _pieces(f: File) -> Iterator[bytes | memoryview]:
    """The file's bytes in pieces: data read, holes as zeros without reading."""
    at = 0
    for off, length in f.data_runs():
        while at < off:
            n = min(READ_PIECE, off - at)
            yield memoryview(_ZEROS)[:n]
            at += n
        yield from f.pieces(off, length)
        at = off + length
    while at < f.size:
        n = min(READ_PIECE, f.size - at)
        yield memoryview(_ZEROS)[:n]
        at += n


def tar_stream(fs: FileSystem, top: Entry) -> Iterator[bytes | memoryview]:
    """A tar (PAX) of ``top`` and what is under it, in pieces, named like extraction."""
    links: dict[int, str] = {}

    def member(e: Entry, name: str) -> Iterator[bytes | memoryview]:
        ti = tarfile.TarInfo(name)
        ti.mode, ti.uid, ti.gid, ti.mtime = e.mode, e.uid, e.gid, e.mtime_ns // 1_000_000_000
        f = None
        if e.type == "dir":
            ti.type = tarfile.DIRTYPE
        elif e.type == "symlink":
            ti.type, ti.linkname = tarfile.SYMTYPE, os.fsdecode(e.link)
        elif e.nlink > 1 and e.inode in links:
            ti.type, ti.linkname = tarfile.LNKTYPE, links[e.inode]
        else:
            f = fs.open_file(e)
            ti.size = e.size
            if e.nlink > 1:
                links[e.inode] = name
        yield ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if f is not None:
            yield from _pieces(f)
            if e.size % tarfile.BLOCKSIZE:
                yield bytes(tarfile.BLOCKSIZE - e.size % tarfile.BLOCKSIZE)

    def kept(e: Entry) -> bool:
        return e.type in ("file", "dir", "symlink")

    if top.path == "/":
        prefixes = {top.inode: ""}
    else:
        name = safe_name(top.name)
        if name is None or not kept(top):
            yield bytes(2 * tarfile.BLOCKSIZE)
            return
        prefixes = {top.inode: os.fsdecode(name)}
        yield from member(top, prefixes[top.inode])
    if top.type == "dir":
        # fs.walk is depth-first, a directory before its contents: the directories kept
        # along the current path are a stack of (guest path, member name)
        along = [(top.path, prefixes[top.inode])]
        for e in fs.walk(top):
            parent = e.path[: len(e.path) - len(os.fsdecode(e.name)) - 1] or "/"
            at = next((i for i in range(len(along) - 1, -1, -1) if along[i][0] == parent), None)
            name = safe_name(e.name)
            if at is None or name is None or not kept(e):
                continue  # under a left-out directory, an unusable name, a special file
            del along[at + 1 :]
            rel = f"{along[-1][1]}/{os.fsdecode(name)}" if along[-1][1] else os.fsdecode(name)
            if e.type == "dir":
                along.append((e.path, rel))
            yield from member(e, rel)
    yield bytes(2 * tarfile.BLOCKSIZE)


class FilesAPI:
    """The handlers; ``routes`` gives them to the control API's application."""

    def __init__(self, stack: Stack, prefix: str) -> None:
        self.stack = stack
        self.prefix = prefix
        self.executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="files")

    def routes(self) -> list[web.RouteDef]:
        base = f"{self.prefix}/points/{{id}}/files"
        return [
            web.get(base, self.h_volumes),
            web.get(base + "/{vol:.+}/ls", self.h_ls),
            web.get(base + "/{vol:.+}/download", self.h_download),
            web.get(base + "/{vol:.+}/tar", self.h_tar),
        ]

    def stop(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @staticmethod
    def _error(status: int, msg: str) -> web.Response:
        return web.json_response({"error": msg}, status=status)

    @staticmethod
    def _status(e: InstantNFSError) -> int:
        if isinstance(e, NotFound):
            return 404
        if isinstance(e, FilesystemError) and not isinstance(e, UsageError):
            return 422  # the volume holds nothing this reads, or it is damaged
        return 400

    def _open(self, req: web.Request, want_path: bool = True) -> tuple[PointFiles, FileSystem, Entry | None]:
        """In the executor: the point, its filesystem ``{vol}`` and the entry at ``?path=``."""
        pf = PointFiles(self.stack, self.stack.repo.point(req.match_info["id"]))
        vol = urllib.parse.unquote(req.match_info["vol"])
        fs = pf.filesystem(None if vol == "-" else vol)
        if not want_path:
            return pf, fs, None
        path = req.query.get("path", "/")
        if not path.startswith("/") or "\0" in path:
            raise UsageError(f"'path' must be absolute in the guest filesystem (start with '/'), not {path!r}")
        return pf, fs, fs.stat(path)

    async def _opened(self, req: web.Request) -> tuple[PointFiles, FileSystem, Entry] | web.Response:
        try:
            pf, fs, e = await self._run(self._open, req)
        except InstantNFSError as err:
            return self._error(self._status(err), str(err))
        assert e is not None
        return pf, fs, e

    async def h_volumes(self, req: web.Request) -> web.Response:
        def found() -> dict:
            pf = PointFiles(self.stack, self.stack.repo.point(req.match_info["id"]))
            return {"point": pf.point.id, "volumes": [f.to_json() for f in pf.found()]}

        try:
            return web.json_response(await self._run(found))
        except InstantNFSError as err:
            return self._error(self._status(err), str(err))

    async def _stream(self, req: web.Request, resp: web.StreamResponse, it: Iterator[Any],
                      encode: Callable[[list[Any]], bytes], batch: int, max_bytes: int = 0) -> None:
        """Write ``it`` as it is produced in the executor: ``batch`` items per call, or
        (``max_bytes``) pieces until they add up to that many bytes."""
        def take() -> list[Any]:
            out, size = [], 0
            for x in it:
                out.append(x)
                size += len(x) if max_bytes else 0
                if len(out) >= batch or (max_bytes and size >= max_bytes):
                    break
            return out

        while items := await self._run(take):
            await resp.write(encode(items))

    async def h_ls(self, req: web.Request) -> web.StreamResponse:
        got = await self._opened(req)
        if isinstance(got, web.Response):
            return got
        pf, fs, top = got
        entries: Iterator[Entry] = await self._run(fs.listdir, top) if top.type == "dir" else iter([top])
        resp = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        await resp.prepare(req)
        head = {"point": pf.point.id, "volume": fs.name, "filesystem": fs.kind, "journal": fs.journal_note,
                "path": top.path}
        await resp.write(json.dumps(head)[:-1].encode() + b', "entries": [')
        first = True

        def encode(batch: list[Entry]) -> bytes:
            nonlocal first
            text = ",".join(json.dumps(e.to_json()) for e in batch)
            out = (text if first else "," + text).encode("utf-8", "surrogateescape")
            first = False
            return out

        try:
            await self._stream(req, resp, entries, encode, BATCH)
        except ConnectionError:
            return resp
        except InstantNFSError as err:  # a damaged directory, part-way: the document stays valid and says so
            log.warning("listing %s of %s: %s", top.path, pf.point.id, err)
            await resp.write(f'], "error": {json.dumps(str(err))}}}'.encode())
            return resp
        await resp.write(b"]}")
        await resp.write_eof()
        return resp

    async def _send(self, req: web.Request, resp: web.StreamResponse, pieces: Iterator[bytes | memoryview],
                    what: str) -> web.StreamResponse:
        await resp.prepare(req)
        try:
            await self._stream(req, resp, pieces, lambda b: b"".join(b), 1 << 30, READ_PIECE)
        except ConnectionError:  # the client went away: nothing more to send
            log.debug("%s: the client closed the connection", what)
            return resp
        except InstantNFSError as err:
            log.warning("%s: %s; the connection is closed early", what, err)
            if req.transport is not None:
                req.transport.close()
            return resp
        await resp.write_eof()
        return resp

    async def h_download(self, req: web.Request) -> web.StreamResponse:
        got = await self._opened(req)
        if isinstance(got, web.Response):
            return got
        pf, fs, e = got
        if e.type != "file":
            return self._error(400, f"{e.path} is a {e.type}, not a file (a tree: use tar)")
        try:
            f = await self._run(fs.open_file, e)
        except InstantNFSError as err:
            return self._error(self._status(err), str(err))
        name = os.fsdecode(safe_name(e.name) or b"file")
        resp = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": "attachment; filename*=UTF-8''" + urllib.parse.quote(name, errors="surrogateescape"),
        })
        resp.content_length = e.size
        return await self._send(req, resp, _pieces(f), f"download of {e.path} from {pf.point.id}")

    async def h_tar(self, req: web.Request) -> web.StreamResponse:
        got = await self._opened(req)
        if isinstance(got, web.Response):
            return got
        pf, fs, e = got
        base = os.fsdecode(safe_name(e.name) or b"root") if e.path != "/" else f"{pf.point.id}"
        resp = web.StreamResponse(headers={
            "Content-Type": "application/x-tar",
            "Content-Disposition": "attachment; filename*=UTF-8''" + urllib.parse.quote(base + ".tar", errors="surrogateescape"),
        })
        return await self._send(req, resp, tar_stream(fs, e), f"tar of {e.path} from {pf.point.id}")
