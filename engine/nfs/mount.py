"""MOUNT version 3 (RFC 1813 appendix I): hands out the export's root file handle.

One export (default ``/instantnfs``). MNT also accepts a path below it
(``/instantnfs/<session>[/dir...]``): libnfs (QEMU, nfs-cat) mounts the directory of
the file a URL names. The table declares each procedure's flags and the dispatcher
applies them: MNT is ``NEEDS_AUTH`` and the program's ``refuse_client`` is
MNT3ERR_ACCES, so a client outside the allowed list gets that status (and a warning in
the log); NULL, DUMP, UMNT, UMNTALL and EXPORT are open (TCP connections from such a
client are closed at accept anyway, see engine.nfs.transport). The mount list (DUMP) is
kept in memory, as most servers do; it is advisory.
"""
from __future__ import annotations

import errno
import logging
import stat
from typing import Any

from engine.datastore import Datastore
from engine.errors import DatastoreError
from engine.nfs.mount_types import (
    MNTPATHLEN,
    MOUNT_PROGRAM,
    MOUNT_V3,
    MOUNTPROC3,
    dirpath,
    exportnode,
    exports,
    groupnode,
    mountbody,
    mountlist,
    mountres3_ok,
    mountstat3,
)
from engine.nfs.rpc import NEEDS_AUTH, CallContext, Proc, ProcError, Program
from engine.nfs.rpc_types import auth_flavor
from engine.nfs.xdr import Packer, Unpacker

log = logging.getLogger("instantnfs.mount")


class Mount3:
    def __init__(self, ds: Datastore, export: str, allowed_groups: list[str]) -> None:
        self.ds = ds
        self.export = "/" + export.strip("/")
        self.groups = allowed_groups
        self.mounts: list[tuple[bytes, bytes]] = []

    def _resolve(self, path: bytes) -> bytes:
        p = path.decode("utf-8", "surrogateescape")
        if len(path) > MNTPATHLEN:
            raise ProcError(mountstat3.MNT3ERR_NAMETOOLONG)
        norm = "/" + p.strip("/")
        if norm != self.export and not norm.startswith(self.export + "/"):
            raise ProcError(mountstat3.MNT3ERR_NOENT)
        node = self.ds.root()
        for part in norm[len(self.export) :].split("/"):
            if not part or part == ".":
                continue
            if part == "..":
                raise ProcError(mountstat3.MNT3ERR_ACCES)
            try:
                node = self.ds.lookup(node, part.encode("utf-8", "surrogateescape"))
            except OSError as e:
                if e.errno == errno.ENOTDIR:
                    raise ProcError(mountstat3.MNT3ERR_NOTDIR) from None
                if e.errno == errno.ENAMETOOLONG:
                    raise ProcError(mountstat3.MNT3ERR_NAMETOOLONG) from None
                raise ProcError(mountstat3.MNT3ERR_NOENT) from None
            except DatastoreError:
                raise ProcError(mountstat3.MNT3ERR_NOENT) from None
        if not stat.S_ISDIR(self.ds.getattr(node).mode):
            raise ProcError(mountstat3.MNT3ERR_NOTDIR)
        return self.ds.handle(node)

    def mnt3_null(self, args: None, ctx: CallContext) -> None:
        return None

    def mnt3_mnt(self, path: bytes, ctx: CallContext) -> Any:
        fh = self._resolve(path)
        entry = (ctx.client.encode(), path)
        if entry not in self.mounts:
            self.mounts.append(entry)
        log.info("MNT %s from %s", path.decode(errors="replace"), ctx.client)
        return mountres3_ok(fh, [auth_flavor.AUTH_SYS, auth_flavor.AUTH_NONE])

    def mnt3_dump(self, args: None, ctx: CallContext) -> list:
        return [mountbody(h, d) for h, d in self.mounts]

    def mnt3_umnt(self, path: bytes, ctx: CallContext) -> None:
        self.mounts = [(h, d) for h, d in self.mounts if not (h == ctx.client.encode() and d == path)]

    def mnt3_umntall(self, args: None, ctx: CallContext) -> None:
        self.mounts = [(h, d) for h, d in self.mounts if h != ctx.client.encode()]

    def mnt3_export(self, args: None, ctx: CallContext) -> list:
        return [exportnode(self.export.encode(), [groupnode(g.encode()) for g in self.groups])]

    def program(self) -> Program:
        none = lambda u: None  # noqa: E731
        nothing = lambda p, v: None  # noqa: E731
        fail_void = lambda p, a, c: None  # noqa: E731

        def dec_path(u: Unpacker) -> bytes:
            return dirpath.unpack(u)

        OPEN = 0  # answered to every client, as on other servers (showmount -e works from anywhere)
        procs = {
            MOUNTPROC3.NULL: Proc("NULL", none, self.mnt3_null, nothing, None, OPEN),
            MOUNTPROC3.MNT: Proc("MNT", dec_path, self.mnt3_mnt, mountres3_ok.pack, fail_void, NEEDS_AUTH),
            MOUNTPROC3.DUMP: Proc("DUMP", none, self.mnt3_dump, mountlist.pack, None, OPEN),
            MOUNTPROC3.UMNT: Proc("UMNT", dec_path, self.mnt3_umnt, nothing, None, OPEN),
            MOUNTPROC3.UMNTALL: Proc("UMNTALL", none, self.mnt3_umntall, nothing, None, OPEN),
            MOUNTPROC3.EXPORT: Proc("EXPORT", none, self.mnt3_export, exports.pack, None, OPEN),
        }
        return Program(MOUNT_PROGRAM, "mount", {MOUNT_V3: {int(k): v for k, v in procs.items()}},
                       refuse_client=mountstat3.MNT3ERR_ACCES)


__all__ = ["Mount3", "Packer"]
