"""NFS version 3 (RFC 1813): one handler per procedure over the datastore, one table.

Each ``nfs3_<proc>`` receives decoded arguments and the call context and returns the
procedure's ``<PROC>3resok`` value, or raises: ``ProcError(status)``, a datastore error
or an ``OSError``. ``nfs3_convert.status_of`` is the one place that maps those to
``nfsstat3`` (``nfs3_convert`` also turns datastore attributes into ``fattr3``); the RPC
dispatcher then writes the status and the procedure's mandatory failure body
(computed from the arguments: post_op_attr or wcc_data, see ``procedures``).

The table ``NFS3.procs`` (built by ``procedures``) holds, per procedure, the decoder, the
handler, the success and failure encoders and the flags, which the dispatcher applies:
``MAKES_WRITE`` (refused with NFS3ERR_ROFS on a read-only export, before the handler
runs), ``CAN_BE_DUP`` (duplicate request cache), ``MAKES_IO`` (statistics),
``NEEDS_AUTH`` (clients outside the allowed list get AUTH_ERROR). Only NULL is open to
everyone.

Nothing here knows how a file's bytes are stored: READ gets a list of buffers from the
datastore and puts them into the reply uncopied.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from engine.datastore import MAX_FILE_SIZE, VDISK, Attr, Datastore, Node
from engine.errors import TooSmall
from engine.nfs.nfs3_convert import nfstime, status_of, to_fattr3, to_setattr
from engine.nfs.nfs3_types import (
    ACCESS3_DELETE,
    ACCESS3_EXECUTE,
    ACCESS3_EXTEND,
    ACCESS3_LOOKUP,
    ACCESS3_MODIFY,
    ACCESS3_READ,
    FSF3_CANSETTIME,
    FSF3_HOMOGENEOUS,
    FSF3_LINK,
    FSF3_SYMLINK,
    NFS_PROGRAM,
    NFS_V3,
    NFSPROC3,
    ACCESS3args,
    ACCESS3resok,
    COMMIT3args,
    COMMIT3resok,
    CREATE3args,
    CREATE3resok,
    FSINFO3args,
    FSINFO3resok,
    FSSTAT3args,
    FSSTAT3resok,
    GETATTR3args,
    GETATTR3resok,
    LINK3args,
    LINK3resok,
    LOOKUP3args,
    LOOKUP3resok,
    MKDIR3args,
    MKNOD3args,
    PATHCONF3args,
    PATHCONF3resok,
    READ3args,
    READDIR3args,
    READDIR3resok,
    READDIRPLUS3args,
    READDIRPLUS3resok,
    READLINK3args,
    READLINK3resok,
    REMOVE3args,
    REMOVE3resok,
    RENAME3args,
    RENAME3resok,
    SETATTR3args,
    SETATTR3resok,
    SYMLINK3args,
    WRITE3resok,
    createmode3,
    dirlist3,
    dirlistplus3,
    entry3,
    entryplus3,
    ftype3,
    nfs_fh3,
    nfsstat3,
    nfstime3,
    post_op_attr,
    stable_how,
    wcc_attr,
    wcc_data,
)
from engine.nfs.rpc import (
    CAN_BE_DUP,
    MAKES_IO,
    MAKES_WRITE,
    NEEDS_AUTH,
    CallContext,
    Proc,
    ProcError,
    Program,
)
from engine.nfs.xdr import Enum, Packer, Unpacker

ATTR_MEMO = 4096  # wire forms of attributes kept (per Attr object, see NFS3.attrs)
MAX_IO = 1 << 20
MAX_OFFSET = MAX_FILE_SIZE  # FSINFO maxfilesize: offset3 is a uint64, files end before 2^63
_STABLE = Enum(stable_how)


def _decode_read(u: Unpacker) -> Any:
    """READ3args without the generic struct walk (the hot path)."""
    fh = u.opaque(64)
    return READ3args(nfs_fh3(fh), u.u64(), u.u32())


def _decode_getattr(u: Unpacker) -> Any:
    return GETATTR3args(nfs_fh3(u.opaque(64)))


def _decode_write(u: Unpacker) -> tuple[Any, int, int, stable_how, memoryview]:
    fh = nfs_fh3.unpack(u)
    offset, count = u.u64(), u.u32()
    stable = _STABLE.unpack(u)
    data = u.opaque_view(0xFFFFFFFF)  # bounded by the record cap; more than wtmax is clamped
    return fh, offset, count, stable, data


def attr_memo(table: dict[int, tuple[Attr, Any]], a: Attr, build: Callable[..., Any], *args: Any) -> Any:
    """``build(a, *args)``, kept per ``Attr`` object (``NFS3.attrs``); the table holds the
    ``Attr``, so its id is not reused while the entry lives."""
    hit = table.get(id(a))
    if hit is not None and hit[0] is a:
        return hit[1]
    if len(table) > ATTR_MEMO:
        table.clear()
    v = build(a, *args)
    table[id(a)] = (a, v)
    return v


def wcc_attr_of(a: Attr) -> Any:
    return wcc_attr(a.size, nfstime(a.mtime_ns), nfstime(a.ctime_ns))


class NFS3:
    """The NFSv3 program over one datastore."""

    def __init__(self, ds: Datastore, read_only: bool = False) -> None:
        self.ds = ds
        self.read_only = read_only
        # wire forms of attributes, per Attr object: the datastore hands out one Attr per
        # version of a disk file, so a burst of READs and WRITEs builds one fattr3 and one
        # wcc_attr (a real file's Attr is new at every call and simply misses)
        self._fattr: dict[int, tuple[Attr, Any]] = {}
        self._wcc: dict[int, tuple[Attr, Any]] = {}
        self.procs = procedures(self)

    # -- helpers -------------------------------------------------------------------------------

    def node(self, fh: Any) -> Node:
        return self.ds.resolve(fh.data)

    def fh(self, node: Node) -> Any:
        return nfs_fh3(self.ds.handle(node))

    def attrs(self, node: Node) -> Any:
        return attr_memo(self._fattr, self.ds.getattr(node), to_fattr3, self.ds.fsid)

    def post_op(self, node: Node | None) -> Any:
        if node is None:
            return None
        try:
            return self.attrs(node)
        except OSError:
            return None

    def post_op_fh(self, fh: Any) -> Any:
        try:
            return self.attrs(self.node(fh))
        except Exception:  # noqa: BLE001 - attributes are optional in a failure body
            return None

    def pre_op(self, node: Node) -> Any:
        try:
            a = self.ds.getattr(node)
        except OSError:
            return None
        return attr_memo(self._wcc, a, wcc_attr_of)

    def wcc(self, before: Any, node: Node | None) -> Any:
        return wcc_data(before, self.post_op(node))

    def wcc_fh(self, fh: Any) -> Any:
        return wcc_data(None, self.post_op_fh(fh))

    # -- procedures ----------------------------------------------------------------------------

    def nfs3_null(self, args: None, ctx: CallContext) -> None:
        return None

    def nfs3_getattr(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.object)
        return GETATTR3resok(self.attrs(node))

    def nfs3_setattr(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.object)
        before = self.pre_op(node)
        if args.guard is not None:
            a = self.ds.getattr(node)
            if nfstime(a.ctime_ns) != args.guard:
                raise ProcError(nfsstat3.NFS3ERR_NOT_SYNC)
        self.ds.setattr(node, to_setattr(args.new_attributes))
        return SETATTR3resok(self.wcc(before, node))

    def nfs3_lookup(self, args: Any, ctx: CallContext) -> Any:
        d = self.node(args.what.dir)
        node = self.ds.lookup(d, args.what.name)
        return LOOKUP3resok(self.fh(node), self.post_op(node), self.post_op(d))

    def nfs3_access(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.object)
        return ACCESS3resok(self.post_op(node), args.access & self.granted(node))

    def granted(self, node: Node) -> int:
        """The ACCESS3 bits an allowed client has on ``node``."""
        readable, writable, lookup = self.ds.access(node)
        is_dir = node.kind != VDISK and stat.S_ISDIR(self.ds.getattr(node).mode)
        granted = 0
        if readable:
            granted |= ACCESS3_READ
        if lookup:
            granted |= ACCESS3_LOOKUP if is_dir else ACCESS3_EXECUTE
        if writable:  # a disk file's size is fixed: modify, never extend
            granted |= ACCESS3_MODIFY | (ACCESS3_EXTEND if node.kind != VDISK else 0) | (ACCESS3_DELETE if is_dir else 0)
        return granted

    def nfs3_readlink(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.symlink)
        return READLINK3resok(self.post_op(node), self.ds.readlink(node))

    async def nfs3_read(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.file)
        if args.offset > MAX_OFFSET:  # past the end of any file
            return self.post_op(node), 0, True, []
        bufs, n, eof = await self.ds.read(node, args.offset, min(args.count, MAX_IO))
        return self.post_op(node), n, eof, bufs

    async def nfs3_write(self, args: Any, ctx: CallContext) -> Any:
        fh, offset, count, stable, data = args
        node = self.node(fh)
        if count > len(data):
            raise ProcError(nfsstat3.NFS3ERR_INVAL)
        count = min(count, MAX_IO)  # over wtmax: write what fits, the client sends the rest
        if offset + count > MAX_OFFSET:
            raise ProcError(nfsstat3.NFS3ERR_FBIG)
        before = self.pre_op(node)
        n, committed = await self.ds.write(node, offset, data[:count], int(stable))
        return WRITE3resok(self.wcc(before, node), n, stable_how(committed), self.ds.write_verf)

    def _created(self, d: Node, before: Any, node: Node) -> Any:
        return CREATE3resok(self.fh(node), self.post_op(node), self.wcc(before, d))

    def nfs3_create(self, args: Any, ctx: CallContext) -> Any:
        d = self.node(args.where.dir)
        before = self.pre_op(d)
        how = args.how
        if how.tag == createmode3.EXCLUSIVE:
            node = self.ds.create(d, args.where.name, "exclusive", verf=how.body)
        else:
            mode = "guarded" if how.tag == createmode3.GUARDED else "unchecked"
            node = self.ds.create(d, args.where.name, mode, to_setattr(how.body))
        return self._created(d, before, node)

    def nfs3_mkdir(self, args: Any, ctx: CallContext) -> Any:
        d = self.node(args.where.dir)
        before = self.pre_op(d)
        return self._created(d, before, self.ds.mkdir(d, args.where.name, to_setattr(args.attributes)))

    def nfs3_symlink(self, args: Any, ctx: CallContext) -> Any:
        d = self.node(args.where.dir)
        before = self.pre_op(d)
        sl = args.symlink
        return self._created(d, before, self.ds.symlink(d, args.where.name, sl.symlink_data, to_setattr(sl.symlink_attributes)))

    def nfs3_mknod(self, args: Any, ctx: CallContext) -> Any:
        d = self.node(args.where.dir)
        before = self.pre_op(d)
        what = args.what
        kinds = {ftype3.NF3FIFO: "fifo", ftype3.NF3SOCK: "socket", ftype3.NF3CHR: "character device", ftype3.NF3BLK: "block device"}
        if what.tag not in kinds:
            raise ProcError(nfsstat3.NFS3ERR_BADTYPE)
        sa = what.body if what.tag in (ftype3.NF3FIFO, ftype3.NF3SOCK) else what.body.dev_attributes
        return self._created(d, before, self.ds.mknod(d, args.where.name, kinds[what.tag], to_setattr(sa)))

    def nfs3_remove(self, args: Any, ctx: CallContext) -> Any:
        d = self.node(args.object.dir)
        before = self.pre_op(d)
        self.ds.remove(d, args.object.name)
        return REMOVE3resok(self.wcc(before, d))

    def nfs3_rmdir(self, args: Any, ctx: CallContext) -> Any:
        d = self.node(args.object.dir)
        before = self.pre_op(d)
        self.ds.rmdir(d, args.object.name)
        return REMOVE3resok(self.wcc(before, d))

    def nfs3_rename(self, args: Any, ctx: CallContext) -> Any:
        fd, td = self.node(args.from_.dir), self.node(args.to.dir)
        fb, tb = self.pre_op(fd), self.pre_op(td)
        self.ds.rename(fd, args.from_.name, td, args.to.name)
        return RENAME3resok(self.wcc(fb, fd), self.wcc(tb, td))

    def nfs3_link(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.file)
        d = self.node(args.link.dir)
        before = self.pre_op(d)
        self.ds.link(node, d, args.link.name)
        return LINK3resok(self.post_op(node), self.wcc(before, d))

    def _listing(self, fh: Any, cookie: int, verf: bytes) -> tuple[Node, list, bytes]:
        d = self.node(fh)
        entries, current = self.ds.listdir(d)
        self.ds.check_cookie(cookie, verf, current, len(entries))
        return d, entries, current

    def nfs3_readdir(self, args: Any, ctx: CallContext) -> Any:
        d, entries, verf = self._listing(args.dir, args.cookie, args.cookieverf)
        budget = min(args.count, MAX_IO) - (24 + 4 + 88 + 8 + 8)  # a larger count is clamped
        out: list[Any] = []
        i = args.cookie
        while i < len(entries):
            name, _node, fileid = entries[i]
            raw = os.fsencode(name)
            size = 4 + 8 + 4 + len(raw) + (-len(raw) & 3) + 8
            if size > budget:
                break
            budget -= size
            i += 1
            out.append(entry3(fileid, raw, i))
        if not out and i < len(entries):
            raise TooSmall()
        return READDIR3resok(self.post_op(d), verf, dirlist3(out, i >= len(entries)))

    def nfs3_readdirplus(self, args: Any, ctx: CallContext) -> Any:
        d, entries, verf = self._listing(args.dir, args.cookie, args.cookieverf)
        budget = min(args.maxcount, MAX_IO) - (24 + 4 + 88 + 8 + 8)  # larger counts are clamped
        dbudget = min(args.dircount, MAX_IO)
        out: list[Any] = []
        i = args.cookie
        while i < len(entries):
            name, node, fileid = entries[i]
            raw = os.fsencode(name)
            dsize = 8 + 4 + len(raw) + (-len(raw) & 3) + 8
            attrs = self.post_op(node) if node is not None else None
            size = 4 + dsize + (4 + 84 if attrs is not None else 4) + 4 + 4 + 32
            if size > budget or (out and dsize > dbudget):
                break
            budget -= size
            dbudget -= dsize
            i += 1
            out.append(entryplus3(fileid, raw, i, attrs, self.fh(node) if node is not None else None))
        if not out and i < len(entries):
            raise TooSmall()
        return READDIRPLUS3resok(self.post_op(d), verf, dirlistplus3(out, i >= len(entries)))

    def nfs3_fsstat(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.fsroot)
        v = self.ds.fsstat(node)
        return FSSTAT3resok(
            self.post_op(node), v.f_blocks * v.f_frsize, v.f_bfree * v.f_frsize, v.f_bavail * v.f_frsize,
            v.f_files, v.f_ffree, v.f_favail, 0,
        )

    def nfs3_fsinfo(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.fsroot)
        return FSINFO3resok(
            self.post_op(node), MAX_IO, MAX_IO, 4096, MAX_IO, MAX_IO, 4096, 65536, MAX_OFFSET, nfstime3(0, 1),
            FSF3_LINK | FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME,
        )

    def nfs3_pathconf(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.object)
        return PATHCONF3resok(self.post_op(node), 32000, 255, True, True, False, True)

    async def nfs3_commit(self, args: Any, ctx: CallContext) -> Any:
        node = self.node(args.file)
        before = self.pre_op(node)
        await self.ds.commit(node)
        return COMMIT3resok(self.wcc(before, node), self.ds.write_verf)

    def program(self) -> Program:
        return Program(NFS_PROGRAM, "nfs", {NFS_V3: self.procs}, map_error=status_of,
                       refuse_write=nfsstat3.NFS3ERR_ROFS if self.read_only else None)


# -- the table -------------------------------------------------------------------------------


def _enc_read(p: Packer, res: Any) -> None:
    attrs, n, eof, bufs = res
    post_op_attr.pack(p, attrs)
    p.u32(n)
    p.bool(eof)
    p.append_buffers(bufs, n)


def _fail_void(p: Packer, args: Any, ctx: CallContext) -> None:
    return None


def procedures(nfs: NFS3) -> dict[int, Proc]:
    """``NFS3.procs``: per procedure the decoder, the handler, the success and failure
    encoders and the flags. A failure body (the mandatory part after a non-OK status) is
    computed from the arguments: the post_op_attr / wcc_data of the objects they name."""

    def attr_of(field: str) -> Any:
        def enc(p: Packer, args: Any, ctx: CallContext) -> None:
            post_op_attr.pack(p, nfs.post_op_fh(getattr(args, field)))
        return enc

    def wcc_of(get: Any) -> Any:
        def enc(p: Packer, args: Any, ctx: CallContext) -> None:
            wcc_data.pack(p, nfs.wcc_fh(get(args)))
        return enc

    def fail_dirattr(p: Packer, args: Any, ctx: CallContext) -> None:
        post_op_attr.pack(p, nfs.post_op_fh(args.what.dir))

    def fail_rename(p: Packer, args: Any, ctx: CallContext) -> None:
        wcc_data.pack(p, nfs.wcc_fh(args.from_.dir))
        wcc_data.pack(p, nfs.wcc_fh(args.to.dir))

    def fail_link(p: Packer, args: Any, ctx: CallContext) -> None:
        post_op_attr.pack(p, nfs.post_op_fh(args.file))
        wcc_data.pack(p, nfs.wcc_fh(args.link.dir))

    A = NEEDS_AUTH
    W = MAKES_WRITE | NEEDS_AUTH
    D = CAN_BE_DUP
    t = {
        NFSPROC3.NULL: Proc("NULL", lambda u: None, nfs.nfs3_null, lambda p, v: None, None, 0),
        NFSPROC3.GETATTR: Proc("GETATTR", _decode_getattr, nfs.nfs3_getattr, GETATTR3resok.pack, _fail_void, A),
        NFSPROC3.SETATTR: Proc("SETATTR", SETATTR3args.unpack, nfs.nfs3_setattr, SETATTR3resok.pack, wcc_of(lambda a: a.object), W),
        NFSPROC3.LOOKUP: Proc("LOOKUP", LOOKUP3args.unpack, nfs.nfs3_lookup, LOOKUP3resok.pack, fail_dirattr, A),
        NFSPROC3.ACCESS: Proc("ACCESS", ACCESS3args.unpack, nfs.nfs3_access, ACCESS3resok.pack, attr_of("object"), A),
        NFSPROC3.READLINK: Proc("READLINK", READLINK3args.unpack, nfs.nfs3_readlink, READLINK3resok.pack, attr_of("symlink"), A),
        NFSPROC3.READ: Proc("READ", _decode_read, nfs.nfs3_read, _enc_read, attr_of("file"), A | MAKES_IO),
        NFSPROC3.WRITE: Proc("WRITE", _decode_write, nfs.nfs3_write, WRITE3resok.pack, wcc_of(lambda a: a[0]), W | MAKES_IO),
        NFSPROC3.CREATE: Proc("CREATE", CREATE3args.unpack, nfs.nfs3_create, CREATE3resok.pack, wcc_of(lambda a: a.where.dir), W | D),
        NFSPROC3.MKDIR: Proc("MKDIR", MKDIR3args.unpack, nfs.nfs3_mkdir, CREATE3resok.pack, wcc_of(lambda a: a.where.dir), W | D),
        NFSPROC3.SYMLINK: Proc("SYMLINK", SYMLINK3args.unpack, nfs.nfs3_symlink, CREATE3resok.pack, wcc_of(lambda a: a.where.dir), W | D),
        NFSPROC3.MKNOD: Proc("MKNOD", MKNOD3args.unpack, nfs.nfs3_mknod, CREATE3resok.pack, wcc_of(lambda a: a.where.dir), W | D),
        NFSPROC3.REMOVE: Proc("REMOVE", REMOVE3args.unpack, nfs.nfs3_remove, REMOVE3resok.pack, wcc_of(lambda a: a.object.dir), W | D),
        NFSPROC3.RMDIR: Proc("RMDIR", REMOVE3args.unpack, nfs.nfs3_rmdir, REMOVE3resok.pack, wcc_of(lambda a: a.object.dir), W | D),
        NFSPROC3.RENAME: Proc("RENAME", RENAME3args.unpack, nfs.nfs3_rename, RENAME3resok.pack, fail_rename, W | D),
        NFSPROC3.LINK: Proc("LINK", LINK3args.unpack, nfs.nfs3_link, LINK3resok.pack, fail_link, W | D),
        NFSPROC3.READDIR: Proc("READDIR", READDIR3args.unpack, nfs.nfs3_readdir, READDIR3resok.pack, attr_of("dir"), A),
        NFSPROC3.READDIRPLUS: Proc("READDIRPLUS", READDIRPLUS3args.unpack, nfs.nfs3_readdirplus, READDIRPLUS3resok.pack, attr_of("dir"), A),
        NFSPROC3.FSSTAT: Proc("FSSTAT", FSSTAT3args.unpack, nfs.nfs3_fsstat, FSSTAT3resok.pack, attr_of("fsroot"), A),
        NFSPROC3.FSINFO: Proc("FSINFO", FSINFO3args.unpack, nfs.nfs3_fsinfo, FSINFO3resok.pack, attr_of("fsroot"), A),
        NFSPROC3.PATHCONF: Proc("PATHCONF", PATHCONF3args.unpack, nfs.nfs3_pathconf, PATHCONF3resok.pack, attr_of("object"), A),
        NFSPROC3.COMMIT: Proc("COMMIT", COMMIT3args.unpack, nfs.nfs3_commit, COMMIT3resok.pack, wcc_of(lambda a: a.file), W),
    }
    return {int(k): v for k, v in t.items()}


__all__ = ["NFS3", "attr_memo", "procedures", "wcc_attr_of"]
