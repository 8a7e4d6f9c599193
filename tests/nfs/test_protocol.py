"""NFSv3 / MOUNT / portmap procedures through the in-repo RPC client: what real clients
do not reach. Golden, byte-exact replies for every RPC reject path."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
from typing import Any

import pytest

from engine.nfs.client import (
    AUTH_NONE,
    NFSClient,
    RpcClient,
    auth_sys,
    build_call,
    frame,
    parse_reply,
)
from engine.nfs.mount import Mount3
from engine.nfs.mount_types import (
    MOUNT_PROGRAM,
    MOUNTPROC3,
    dirpath,
    exportnode,
    exports,
    groupnode,
    mountbody,
    mountlist,
    mountres3,
    mountres3_ok,
    mountstat3,
)
from engine.nfs.nfs3 import NFS3
from engine.nfs.nfs3_types import (
    ACCESS3_EXECUTE,
    ACCESS3_EXTEND,
    ACCESS3_LOOKUP,
    ACCESS3_MODIFY,
    ACCESS3_READ,
    DONT_CHANGE_TIME,
    NFS_PROGRAM,
    NFSPROC3,
    RES,
    SATTR3_NONE,
    ACCESS3args,
    COMMIT3args,
    CREATE3args,
    FSINFO3args,
    FSSTAT3args,
    GETATTR3args,
    LINK3args,
    LOOKUP3args,
    MKDIR3args,
    MKNOD3args,
    PATHCONF3args,
    READ3args,
    READDIR3args,
    READDIRPLUS3args,
    READLINK3args,
    REMOVE3args,
    RENAME3args,
    SETATTR3args,
    SYMLINK3args,
    WRITE3args,
    createmode3,
    devicedata3,
    ftype3,
    nfs_fh3,
    nfsstat3,
    nfstime3,
    sattr3,
    specdata3,
    stable_how,
    symlinkdata3,
    time_how,
    wcc_data,
)
from engine.nfs.portmap import SUPERUSER, caller_owner
from engine.nfs.portmap_types import (
    PMAP_PROG,
    PMAPPROC,
    RPCBPROC,
    mapping,
    pmaplist,
    rp__list,
    rpcb,
)
from engine.nfs.rpc import NEEDS_AUTH, AllowList, CallContext, Cred, RpcServer, client_ip, is_local
from engine.nfs.xdr import Packer, UnionValue, uint32
from tests.nfs.conftest import run
from tests.nfs.rawrpc import NoHandles, dirop, dispatch, raw_exchange, udp_call, words, workdir

X = 0x11223344


def client_for(served: Any, fn: Any, cred: Any = None) -> Any:
    async def main() -> Any:
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port, cred)
        try:
            sess = await c.mount("/instantnfs/sess")
            return await fn(c, sess)
        finally:
            await c.close()

    return run(main())


def fh3(b: bytes) -> Any:
    return nfs_fh3(b)


async def status(c: NFSClient, proc: int, args: Any) -> nfsstat3:
    return nfsstat3((await c.call(proc, args, check=False)).tag)


# -- golden reject replies --------------------------------------------------------------------


def test_golden_rejects(served):
    nfs = served.nfs_port
    # NULL: accepted, SUCCESS, AUTH_NONE verifier, no results
    assert raw_exchange(served, nfs, build_call(X, NFS_PROGRAM, 3, 0)) == words(X, 1, 0, 0, 0, 0)
    # RPC version 3: denied, RPC_MISMATCH, low 2, high 2
    assert raw_exchange(served, nfs, build_call(X, NFS_PROGRAM, 3, 0, rpcvers=3)) == words(X, 1, 1, 0, 2, 2)
    # unknown program: PROG_UNAVAIL
    assert raw_exchange(served, nfs, build_call(X, 100099, 1, 0)) == words(X, 1, 0, 0, 0, 1)
    # NFS version 4 / 2: PROG_MISMATCH low 3 high 3
    assert raw_exchange(served, nfs, build_call(X, NFS_PROGRAM, 4, 0)) == words(X, 1, 0, 0, 0, 2, 3, 3)
    assert raw_exchange(served, nfs, build_call(X, NFS_PROGRAM, 2, 0)) == words(X, 1, 0, 0, 0, 2, 3, 3)
    # procedure 22: PROC_UNAVAIL
    assert raw_exchange(served, nfs, build_call(X, NFS_PROGRAM, 3, 22, cred=auth_sys())) == words(X, 1, 0, 0, 0, 3)
    # GETATTR with 2 bytes of arguments: GARBAGE_ARGS
    assert raw_exchange(served, nfs, build_call(X, NFS_PROGRAM, 3, 1, b"\0\0", cred=auth_sys())) == words(X, 1, 0, 0, 0, 4)
    # AUTH_DH credential: denied, AUTH_ERROR, AUTH_BADCRED
    assert raw_exchange(served, nfs, build_call(X, NFS_PROGRAM, 3, 1, cred=(3, b"x" * 8))) == words(X, 1, 1, 1, 1)
    # AUTH_SYS with a truncated body: AUTH_BADCRED
    assert raw_exchange(served, nfs, build_call(X, NFS_PROGRAM, 3, 0, cred=(1, b"\0\0\0\1"))) == words(X, 1, 1, 1, 1)
    # MOUNT on the NFS port: PROG_UNAVAIL; MOUNT v1: PROG_MISMATCH 3..3
    assert raw_exchange(served, nfs, build_call(X, MOUNT_PROGRAM, 3, 0)) == words(X, 1, 0, 0, 0, 1)
    assert raw_exchange(served, served.mount_port, build_call(X, MOUNT_PROGRAM, 1, 0)) == words(X, 1, 0, 0, 0, 2, 3, 3)
    # portmap v5: PROG_MISMATCH 2..4; v2 CALLIT (not served): PROC_UNAVAIL
    assert raw_exchange(served, 111, build_call(X, PMAP_PROG, 5, 0)) == words(X, 1, 0, 0, 0, 2, 2, 4)
    assert raw_exchange(served, 111, build_call(X, PMAP_PROG, 2, 5)) == words(X, 1, 0, 0, 0, 3)


def test_golden_status_with_failure_body(served):
    """LOOKUP of a missing name: SUCCESS, NFS3ERR_NOENT, then post_op_attr of the dir."""

    async def fn(c: NFSClient, sess: bytes) -> bytes:
        p = Packer()
        LOOKUP3args.pack(p, LOOKUP3args(dirop(sess, "nope")))
        return await c.rpc.call_raw(build_call(X, NFS_PROGRAM, 3, 3, p.getvalue(), cred=auth_sys()))

    rep = client_for(served, fn)
    assert rep[:28] == words(X, 1, 0, 0, 0, 0, 2)
    assert rep[28:32] == words(1)  # attributes follow
    assert struct.unpack(">I", rep[32:36])[0] == ftype3.NF3DIR
    assert len(rep) == 36 + 80


# -- procedures -------------------------------------------------------------------------------


def test_getattr_lookup_access_and_names(served, images):
    async def fn(c: NFSClient, sess: bytes) -> None:
        root = await c.mount("/instantnfs")
        ra = await c.getattr(root)
        assert ra.type == ftype3.NF3DIR
        # '..' at the export root stays at the root; '.' is the directory itself
        assert await c.lookup(root, "..") == root
        assert await c.lookup(root, ".") == root
        assert await c.lookup(root, "sess") == sess
        assert await c.lookup(sess, "..") == root
        d = images["disks"][0]
        img = await c.lookup(sess, f"{d['name']}.img")
        a = await c.getattr(img)
        assert a.type == ftype3.NF3REG and a.size == d["size"] and a.fsid == ra.fsid
        flat = await c.lookup(sess, f"{d['name']}-flat.vmdk")
        assert (await c.getattr(flat)).fileid != a.fileid
        # names with '/' or NUL are refused; over 255 bytes: NAMETOOLONG
        for bad in (b"a/b", b"a\0b", b"/"):
            assert await status(c, NFSPROC3.LOOKUP, LOOKUP3args(dirop(sess, bad))) == nfsstat3.NFS3ERR_ACCES
        assert await status(c, NFSPROC3.LOOKUP, LOOKUP3args(dirop(sess, "x" * 300))) == nfsstat3.NFS3ERR_NAMETOOLONG
        r = await c.call(NFSPROC3.LOOKUP, LOOKUP3args(dirop(sess, "missing")), check=False)
        assert r.tag == nfsstat3.NFS3ERR_NOENT and r.body is not None and r.body.type == ftype3.NF3DIR
        assert await status(c, NFSPROC3.LOOKUP, LOOKUP3args(dirop(img, "x"))) == nfsstat3.NFS3ERR_NOTDIR
        # ACCESS: the disk is readable and modifiable (write cache), never extended
        acc = (await c.call(NFSPROC3.ACCESS, ACCESS3args(fh3(img), 0x3F))).body.access
        assert acc & ACCESS3_READ and acc & ACCESS3_MODIFY and not acc & ACCESS3_EXTEND
        acc = (await c.call(NFSPROC3.ACCESS, ACCESS3args(fh3(sess), 0x3F))).body.access
        assert acc & ACCESS3_LOOKUP and acc & ACCESS3_MODIFY and not acc & ACCESS3_EXECUTE

    client_for(served, fn)


def test_read_backup_disk(served, images):
    data = images["data"][1]
    d = images["disks"][1]

    async def fn(c: NFSClient, sess: bytes) -> None:
        fh = await c.lookup(sess, f"{d['name']}.img")
        for off, n in ((0, 4096), (1_000_000, 100_000), (len(data) - 10, 100), (3 << 20, 1 << 20)):
            got, eof = await c.read(fh, off, n)
            assert got == data[off : off + n]
            assert eof == (off + n >= len(data))
        got, eof = await c.read(fh, len(data) + 5, 10)
        assert got == b"" and eof
        got, _ = await c.read(fh, 0, 4 << 20)  # more than rtmax: cut to 1 MiB
        assert got == data[: 1 << 20]
        assert await c.read_all(fh) == data

    client_for(served, fn)


def test_disk_files_write_commit_setattr(served, images):
    """WRITE/COMMIT/SETATTR on a disk file of a session of its own: committed levels, the
    server's verifier, newest data on read, the fixed size, names that stay protected."""
    d = images["disks"][0]
    data = images["data"][0]
    served.api("POST", "/sessions", {"point": images["point"], "name": "wproto"})

    async def main() -> None:
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
        try:
            sess = await c.mount("/instantnfs/wproto")
            name = f"{d['name']}-flat.vmdk"
            fh = await c.lookup(sess, name)
            img = await c.lookup(sess, f"{d['name']}.img")
            verfs = set()
            for stable, off, payload in ((0, 100, b"unstable"), (1, 5000, b"datasync" * 700), (2, (1 << 20) - 3, b"filesync")):
                r = await c.call(NFSPROC3.WRITE, _write_args(fh, off, payload, stable))
                assert r.tag == nfsstat3.NFS3_OK and r.body.count == len(payload)
                assert r.body.committed == (0 if stable == 0 else 2)  # a stable write is data + bitmap: FILE_SYNC
                assert r.body.file_wcc.after.size == d["size"]
                verfs.add(r.body.verf)
            cm = (await c.call(NFSPROC3.COMMIT, COMMIT3args(fh3(fh), 0, 0))).body
            verfs.add(cm.verf)
            assert len(verfs) == 1  # one verifier for the daemon's life
            want = bytearray(data[: 2 << 20])
            want[100:108] = b"unstable"
            want[5000 : 5000 + 5600] = b"datasync" * 700
            want[(1 << 20) - 3 : (1 << 20) + 5] = b"filesync"
            # both names of the disk are one disk; a read across dirty and clean granules is merged
            assert (await c.read(img, 0, 1 << 20))[0] == bytes(want[: 1 << 20])
            assert (await c.read(fh, 1 << 20, 1 << 20))[0] == bytes(want[1 << 20 :])
            # the size is fixed: another size is INVAL, a write past the end FBIG; the same size is fine
            for size in (0, d["size"] + 4096):
                sa = sattr3(None, None, None, size, DONT_CHANGE_TIME, DONT_CHANGE_TIME)
                assert await status(c, NFSPROC3.SETATTR, SETATTR3args(fh3(fh), sa, None)) == nfsstat3.NFS3ERR_INVAL
            sa = sattr3(None, None, None, d["size"], DONT_CHANGE_TIME, DONT_CHANGE_TIME)
            assert await status(c, NFSPROC3.SETATTR, SETATTR3args(fh3(fh), sa, None)) == nfsstat3.NFS3_OK
            sa = sattr3(0o600, None, None, None, DONT_CHANGE_TIME, DONT_CHANGE_TIME)
            assert await status(c, NFSPROC3.SETATTR, SETATTR3args(fh3(fh), sa, None)) == nfsstat3.NFS3ERR_PERM
            r = await c.call(NFSPROC3.WRITE, _write_args(fh, d["size"] - 2, b"abcd"), check=False)
            assert r.tag == nfsstat3.NFS3ERR_FBIG and r.body.after is not None
            assert (await c.getattr(fh)).size == d["size"]
            # the disk's names stay: no remove, no rename over, no exclusive create
            assert await status(c, NFSPROC3.REMOVE, REMOVE3args(dirop(sess, name))) == nfsstat3.NFS3ERR_ROFS
            assert (await c.create(sess, name, createmode3.GUARDED, check=False)).tag == nfsstat3.NFS3ERR_EXIST
            await c.create(sess, "victim.txt")
            rn = RENAME3args(dirop(sess, "victim.txt"), dirop(sess, name))
            assert await status(c, NFSPROC3.RENAME, rn) == nfsstat3.NFS3ERR_ROFS
            assert (await c.read(fh, 100, 8))[0] == b"unstable"
        finally:
            await c.close()

    try:
        run(main())
        s = served.api("GET", "/sessions/wproto")
        assert s["mode"] == "instant" and s["disks"][0]["dirty_bytes"] == 5 * 4096  # granules 0, 1-2, 255-256
    finally:
        served.api("DELETE", "/sessions/wproto")
    # the shared session still reads the backup
    assert run(_read_disk(served, "sess", d["name"], 0, 1 << 20)) == data[: 1 << 20]


async def _read_disk(served: Any, session: str, disk: str, off: int, n: int) -> bytes:
    c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
    try:
        s = await c.mount(f"/instantnfs/{session}")
        return (await c.read(await c.lookup(s, f"{disk}.img"), off, n))[0]
    finally:
        await c.close()


def _write_args(fh: bytes, off: int, data: bytes, stable: int = 2) -> Any:

    return WRITE3args(fh3(fh), off, len(data), stable, data)


def test_file_lifecycle(served):
    async def fn(c: NFSClient, sess: bytes) -> None:
        w = await workdir(c, sess, "life")
        r = await c.create(w, "f.log")
        f = r.body.obj.data
        assert r.body.obj_attributes.type == ftype3.NF3REG
        wr = await c.write(f, 0, b"hello world", stable=0)
        assert wr.count == 11 and wr.committed == 0
        cm = (await c.call(NFSPROC3.COMMIT, COMMIT3args(fh3(f), 0, 0))).body
        assert cm.verf == wr.verf
        assert (await c.read(f, 0, 100)) == (b"hello world", True)
        # GUARDED on an existing name: EXIST; UNCHECKED with size 0 truncates
        assert (await c.create(w, "f.log", createmode3.GUARDED, check=False)).tag == nfsstat3.NFS3ERR_EXIST
        # SETATTR: size, mode, mtime; guard with a wrong ctime: NOT_SYNC
        sa = sattr3(0o600, None, None, 5, DONT_CHANGE_TIME, UnionValue(time_how.SET_TO_CLIENT_TIME, nfstime3(1_000_000, 5)))
        res = (await c.call(NFSPROC3.SETATTR, SETATTR3args(fh3(f), sa, None))).body
        a = res.obj_wcc.after
        assert a.size == 5 and a.mode == 0o600 and a.mtime == nfstime3(1_000_000, 5)
        assert (await c.read(f, 0, 100))[0] == b"hello"
        # set-user-ID is dropped (clients act as the daemon, root)
        suid = sattr3(0o4755, None, None, None, DONT_CHANGE_TIME, DONT_CHANGE_TIME)
        assert (await c.call(NFSPROC3.SETATTR, SETATTR3args(fh3(f), suid, None))).body.obj_wcc.after.mode == 0o755
        bad = SETATTR3args(fh3(f), SATTR3_NONE, nfstime3(1, 1))
        assert await status(c, NFSPROC3.SETATTR, bad) == nfsstat3.NFS3ERR_NOT_SYNC
        # the .vswp way: grow by SETATTR size
        sa = sattr3(None, None, None, 64 << 20, DONT_CHANGE_TIME, DONT_CHANGE_TIME)
        await c.call(NFSPROC3.SETATTR, SETATTR3args(fh3(f), sa, None))
        assert (await c.getattr(f)).size == 64 << 20
        # directories
        sub = (await c.call(NFSPROC3.MKDIR, MKDIR3args(dirop(w, "sub"), SATTR3_NONE))).body.obj.data
        assert (await c.getattr(sub)).type == ftype3.NF3DIR
        await c.create(sub, "inner")
        assert await status(c, NFSPROC3.RMDIR, REMOVE3args(dirop(w, "sub"))) == nfsstat3.NFS3ERR_NOTEMPTY
        assert await status(c, NFSPROC3.RMDIR, REMOVE3args(dirop(w, "f.log"))) == nfsstat3.NFS3ERR_NOTDIR
        assert await status(c, NFSPROC3.REMOVE, REMOVE3args(dirop(w, "sub"))) == nfsstat3.NFS3ERR_ISDIR
        assert await status(c, NFSPROC3.MKDIR, MKDIR3args(dirop(w, "sub"), SATTR3_NONE)) == nfsstat3.NFS3ERR_EXIST
        await c.remove(sub, "inner")
        await c.call(NFSPROC3.RMDIR, REMOVE3args(dirop(w, "sub")))
        # symlink: created, read back, never followed
        sl = await c.call(NFSPROC3.SYMLINK, SYMLINK3args(dirop(w, "ln"), symlinkdata3(SATTR3_NONE, b"/etc/passwd")))
        ln = sl.body.obj.data
        assert (await c.getattr(ln)).type == ftype3.NF3LNK
        assert (await c.call(NFSPROC3.READLINK, READLINK3args(fh3(ln)))).body.data == b"/etc/passwd"
        assert await status(c, NFSPROC3.READ, READ3args(fh3(ln), 0, 100)) == nfsstat3.NFS3ERR_INVAL
        assert await status(c, NFSPROC3.READLINK, READLINK3args(fh3(f))) == nfsstat3.NFS3ERR_INVAL
        # hard link, rename, remove
        await c.call(NFSPROC3.LINK, LINK3args(fh3(f), dirop(w, "f2.log")))
        assert (await c.getattr(f)).nlink == 2
        await c.call(NFSPROC3.RENAME, RENAME3args(dirop(w, "f2.log"), dirop(w, "f3.log")))
        assert await c.lookup(w, "f3.log") == f
        assert await status(c, NFSPROC3.LOOKUP, LOOKUP3args(dirop(w, "f2.log"))) == nfsstat3.NFS3ERR_NOENT
        # MKNOD: refused in the datastore (a FIFO could block the daemon); a device is BADTYPE
        fifo = MKNOD3args(dirop(w, "pipe"), UnionValue(ftype3.NF3FIFO, SATTR3_NONE))
        assert await status(c, NFSPROC3.MKNOD, fifo) == nfsstat3.NFS3ERR_NOTSUPP
        dev = MKNOD3args(dirop(w, "dev"), UnionValue(ftype3.NF3CHR, devicedata3(SATTR3_NONE, specdata3(1, 3))))
        assert await status(c, NFSPROC3.MKNOD, dev) == nfsstat3.NFS3ERR_BADTYPE
        for n in ("f.log", "f3.log", "ln"):
            await c.remove(w, n)
        assert await status(c, NFSPROC3.GETATTR, GETATTR3args(fh3(f))) == nfsstat3.NFS3ERR_STALE
        await c.call(NFSPROC3.RMDIR, REMOVE3args(dirop(sess, "life")))

    client_for(served, fn)


def test_export_root_holds_only_sessions(served, images):
    async def fn(c: NFSClient, sess: bytes) -> None:
        root = await c.mount("/instantnfs")
        assert (await c.create(root, "x", check=False)).tag == nfsstat3.NFS3ERR_ACCES
        assert await status(c, NFSPROC3.MKDIR, MKDIR3args(dirop(root, "d"), SATTR3_NONE)) == nfsstat3.NFS3ERR_ACCES
        assert await status(c, NFSPROC3.REMOVE, REMOVE3args(dirop(root, "sess"))) == nfsstat3.NFS3ERR_ACCES
        assert await status(c, NFSPROC3.RMDIR, REMOVE3args(dirop(root, "sess"))) == nfsstat3.NFS3ERR_ACCES
        await c.create(sess, "mover")
        served.api("POST", "/sessions", {"point": images["point"], "name": "other"})
        try:
            other = await c.lookup(root, "other")
            rn = RENAME3args(dirop(sess, "mover"), dirop(other, "mover"))
            assert await status(c, NFSPROC3.RENAME, rn) == nfsstat3.NFS3ERR_XDEV
            rn = RENAME3args(dirop(sess, "mover"), dirop(root, "mover"))
            assert await status(c, NFSPROC3.RENAME, rn) == nfsstat3.NFS3ERR_ACCES
            d = images["disks"][0]
            disk = await c.lookup(other, f"{d['name']}.img")
        finally:
            served.api("DELETE", "/sessions/other")
        # an unpublished session's handles are STALE
        assert await status(c, NFSPROC3.GETATTR, GETATTR3args(fh3(disk))) == nfsstat3.NFS3ERR_STALE
        assert await status(c, NFSPROC3.READ, READ3args(fh3(other), 0, 10)) == nfsstat3.NFS3ERR_STALE
        await c.remove(sess, "mover")

    client_for(served, fn)


def test_fsstat_fsinfo_pathconf(served):
    async def fn(c: NFSClient, sess: bytes) -> None:
        st = (await c.call(NFSPROC3.FSSTAT, FSSTAT3args(fh3(sess)))).body
        v = os.statvfs(served.cache_dir)
        assert st.tbytes == v.f_blocks * v.f_frsize and 0 < st.abytes <= st.fbytes <= st.tbytes
        fi = (await c.call(NFSPROC3.FSINFO, FSINFO3args(fh3(sess)))).body
        assert fi.rtmax == fi.wtmax == 1 << 20 and fi.obj_attributes is not None
        pc = (await c.call(NFSPROC3.PATHCONF, PATHCONF3args(fh3(sess)))).body
        assert pc.name_max == 255 and pc.no_trunc and pc.case_preserving

    client_for(served, fn)


def test_readdir_cookies_over_a_big_directory(served):
    names = {f"file-with-a-longish-name-{i:04d}.log" for i in range(300)}

    async def fn(c: NFSClient, sess: bytes) -> None:
        big = await workdir(c, sess, "big")
        await asyncio.gather(*(c.create(big, n) for n in names))
        entries, calls = await c.readdir_all(big, count=2048)
        got = [e.name.decode() for e in entries]
        assert calls > 3
        assert len(got) == len(set(got)) == len(names) + 2
        assert set(got) == names | {".", ".."}
        plus, pcalls = await c.readdir_all(big, count=4096, plus=True)
        assert pcalls > 3 and {e.name.decode() for e in plus} == names | {".", ".."}
        e = [x for x in plus if x.name.decode() == "file-with-a-longish-name-0007.log"][0]
        assert (await c.getattr(e.name_handle.data)).fileid == e.fileid == e.name_attributes.fileid
        # the verifier: resuming after the directory changed is BAD_COOKIE
        first = (await c.call(NFSPROC3.READDIR, READDIR3args(fh3(big), 0, b"\0" * 8, 1024))).body
        await c.create(big, "newcomer")
        nxt = READDIR3args(fh3(big), first.reply.entries[-1].cookie, first.cookieverf, 1024)
        assert await status(c, NFSPROC3.READDIR, nxt) == nfsstat3.NFS3ERR_BAD_COOKIE
        # a reply too small for one entry: TOOSMALL
        assert await status(c, NFSPROC3.READDIR, READDIR3args(fh3(big), 0, b"\0" * 8, 100)) == nfsstat3.NFS3ERR_TOOSMALL

    client_for(served, fn)


def test_exclusive_create_replay(served):
    async def fn(c: NFSClient, sess: bytes) -> None:
        w = await workdir(c, sess, "excl")
        r1 = await c.create(w, "lock", createmode3.EXCLUSIVE, b"verifier")
        r2 = await c.create(w, "lock", createmode3.EXCLUSIVE, b"verifier")  # a new xid: the server's own check
        assert r1.body.obj.data == r2.body.obj.data
        r3 = await c.create(w, "lock", createmode3.EXCLUSIVE, b"another!", check=False)
        assert r3.tag == nfsstat3.NFS3ERR_EXIST
        # then the client sets the real attributes
        sa = sattr3(0o644, None, None, None, UnionValue(time_how.SET_TO_SERVER_TIME), UnionValue(time_how.SET_TO_SERVER_TIME))
        await c.call(NFSPROC3.SETATTR, SETATTR3args(fh3(r1.body.obj.data), sa, None))
        assert (await c.getattr(r1.body.obj.data)).mode == 0o644

    client_for(served, fn)


def test_duplicate_request_cache_on_retransmitted_remove(served):
    async def fn(c: NFSClient, sess: bytes) -> None:
        w = await workdir(c, sess, "drc")
        await c.create(w, "gone")
        p = Packer()
        REMOVE3args.pack(p, REMOVE3args(dirop(w, "gone")))
        rec = build_call(0x5EED0001, NFS_PROGRAM, 3, NFSPROC3.REMOVE, p.getvalue(), cred=auth_sys())
        first = await c.rpc.call_raw(rec)
        again = await c.rpc.call_raw(rec)  # same xid and bytes: the original reply
        assert first[24:28] == words(0) and again == first
        fresh = build_call(0x5EED0002, NFS_PROGRAM, 3, NFSPROC3.REMOVE, p.getvalue(), cred=auth_sys())
        assert (await c.rpc.call_raw(fresh))[24:28] == words(nfsstat3.NFS3ERR_NOENT)
        # a retransmitted CREATE gets its original reply too (not EXIST)

        p = Packer()
        CREATE3args.pack(p, CREATE3args(dirop(w, "once"), UnionValue(createmode3.GUARDED, SATTR3_NONE)))
        rec = build_call(0x5EED0003, NFS_PROGRAM, 3, NFSPROC3.CREATE, p.getvalue(), cred=auth_sys())
        a, b = await c.rpc.call_raw(rec), await c.rpc.call_raw(rec)
        assert a[24:28] == words(0) and a == b

    client_for(served, fn)


def test_forged_and_altered_handles(served, images):
    async def fn(c: NFSClient, sess: bytes) -> None:
        d = images["disks"][0]
        fh = await c.lookup(sess, f"{d['name']}.img")
        assert len(fh) <= 64
        for i in (0, 5, 12, len(fh) - 1):
            bad = bytearray(fh)
            bad[i] ^= 0x40
            assert await status(c, NFSPROC3.GETATTR, GETATTR3args(fh3(bytes(bad)))) == nfsstat3.NFS3ERR_BADHANDLE
        for bad in (b"", b"x" * 10, fh + b"\0", os.urandom(64)):
            assert await status(c, NFSPROC3.GETATTR, GETATTR3args(fh3(bad))) == nfsstat3.NFS3ERR_BADHANDLE
        r = await c.call(NFSPROC3.READ, READ3args(fh3(fh[:-1] + b"\0"), 0, 10), check=False)
        assert r.tag == nfsstat3.NFS3ERR_BADHANDLE and r.body is None

    client_for(served, fn)


def test_mount_procedures(served):
    async def main() -> None:
        c = await RpcClient.connect(served.addr, served.mount_port)
        try:
            async def mnt(path: bytes) -> Any:
                p = Packer()
                p.opaque(path)
                return mountres3.unpack(await c.call(MOUNT_PROGRAM, 3, MOUNTPROC3.MNT, p.getvalue()))

            ok = await mnt(b"/instantnfs")
            assert ok.tag == mountstat3.MNT3_OK and 1 in ok.body.auth_flavors and len(ok.body.fhandle) <= 64
            assert (await mnt(b"/instantnfs/sess/")).tag == mountstat3.MNT3_OK
            assert (await mnt(b"/elsewhere")).tag == mountstat3.MNT3ERR_NOENT
            assert (await mnt(b"/instantnfs/nosuch")).tag == mountstat3.MNT3ERR_NOENT
            assert (await mnt(b"/instantnfs/../etc")).tag in (mountstat3.MNT3ERR_ACCES, mountstat3.MNT3ERR_NOENT)
            assert (await mnt(b"/instantnfs/sess/testvm.vmx")).tag == mountstat3.MNT3ERR_NOTDIR
            dump = mountlist.unpack(await c.call(MOUNT_PROGRAM, 3, MOUNTPROC3.DUMP))
            assert any(m.ml_directory == b"/instantnfs" for m in dump)
            p = Packer()
            p.opaque(b"/instantnfs")
            await c.call(MOUNT_PROGRAM, 3, MOUNTPROC3.UMNT, p.getvalue())
            dump = mountlist.unpack(await c.call(MOUNT_PROGRAM, 3, MOUNTPROC3.DUMP))
            assert not any(m.ml_directory == b"/instantnfs" for m in dump)
            await c.call(MOUNT_PROGRAM, 3, MOUNTPROC3.UMNTALL)
            assert mountlist.unpack(await c.call(MOUNT_PROGRAM, 3, MOUNTPROC3.DUMP)) == []
            ex = exports.unpack(await c.call(MOUNT_PROGRAM, 3, MOUNTPROC3.EXPORT))
            assert [e.ex_dir for e in ex] == [b"/instantnfs"]
        finally:
            await c.close()

    run(main())
    # MOUNT over UDP
    p = Packer()
    p.opaque(b"/instantnfs")
    rep = udp_call(served.addr, served.mount_port, build_call(77, MOUNT_PROGRAM, 3, MOUNTPROC3.MNT, p.getvalue()))
    assert rep[:24] == words(77, 1, 0, 0, 0, 0) and rep[24:28] == words(0)


def test_portmapper_v2_and_rpcbind(served):
    p = Packer()
    mapping.pack(p, mapping(NFS_PROGRAM, 3, 6, 0))
    rep = udp_call(served.addr, 111, build_call(9, PMAP_PROG, 2, PMAPPROC.GETPORT, p.getvalue()))
    assert rep == words(9, 1, 0, 0, 0, 0, served.nfs_port)

    async def main() -> None:
        c = await RpcClient.connect(served.addr, 111, AUTH_NONE)
        try:
            port = uint32.unpack(await c.call(PMAP_PROG, 2, PMAPPROC.GETPORT, mapping.encode(mapping(MOUNT_PROGRAM, 3, 17, 0))))
            assert port == served.mount_port
            assert uint32.unpack(await c.call(PMAP_PROG, 2, PMAPPROC.GETPORT, mapping.encode(mapping(123456, 1, 6, 0)))) == 0
            dump = [(m.prog, m.vers, m.prot, m.port) for m in
                    pmaplist.unpack(await c.call(PMAP_PROG, 2, PMAPPROC.DUMP))]
            assert (NFS_PROGRAM, 3, 6, served.nfs_port) in dump and (PMAP_PROG, 2, 17, 111) in dump
            for v in (3, 4):
                u = await c.call(PMAP_PROG, v, RPCBPROC.GETADDR, rpcb.encode(rpcb(NFS_PROGRAM, 3, b"tcp", b"", b"")))
                addr = u.opaque(255).decode()
                h, p1, p2 = addr.rsplit(".", 2)
                assert h == served.addr and int(p1) * 256 + int(p2) == served.nfs_port
            rl = rp__list.unpack(await c.call(PMAP_PROG, 4, RPCBPROC.DUMP))
            assert any(r.r_prog == MOUNT_PROGRAM and r.r_netid == b"udp" for r in rl)
            # SET / UNSET: refused from an unreserved port, accepted from root's reserved one
            assert uint32.unpack(await c.call(PMAP_PROG, 2, PMAPPROC.SET, mapping.encode(mapping(400000, 1, 6, 4242)))) == 0
            from engine.nfs.portmap import _open_privileged
            if os.geteuid() == 0:
                r, w = await _open_privileged(served.addr, 111)
                pc = RpcClient(r, w, AUTH_NONE)
                try:
                    assert uint32.unpack(await pc.call(PMAP_PROG, 2, PMAPPROC.SET, mapping.encode(mapping(400000, 1, 6, 4242)))) == 1
                    assert uint32.unpack(await c.call(PMAP_PROG, 2, PMAPPROC.GETPORT, mapping.encode(mapping(400000, 1, 6, 0)))) == 4242
                    assert uint32.unpack(await c.call(PMAP_PROG, 2, PMAPPROC.UNSET, mapping.encode(mapping(400000, 1, 6, 0)))) == 0
                    assert uint32.unpack(await pc.call(PMAP_PROG, 2, PMAPPROC.UNSET, mapping.encode(mapping(400000, 1, 6, 0)))) == 1
                finally:
                    await pc.close()
            assert uint32.unpack(await c.call(PMAP_PROG, 2, PMAPPROC.GETPORT, mapping.encode(mapping(400000, 1, 6, 0)))) == 0
        finally:
            await c.close()

    run(main())


def test_getattr_is_answered_while_reads_wait(daemon_factory, images):
    """A GETATTR sent after cold READs on one connection is answered before them."""
    dmn = daemon_factory()
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "cold"})
    d = images["disks"][0]

    async def main() -> list[int]:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            sess = await c.mount("/instantnfs/cold")
            img = await c.lookup(sess, f"{d['name']}.img")
            order: list[int] = []

            async def one(proc: int, args: Any, tag: int) -> None:
                await c.call(proc, args)
                order.append(tag)

            reads = [one(NFSPROC3.READ, READ3args(fh3(img), i << 20, 1 << 20), i) for i in range(16)]
            await asyncio.gather(*reads, one(NFSPROC3.GETATTR, GETATTR3args(fh3(sess)), -1))
            return order
        finally:
            await c.close()

    order = run(main())
    assert len(order) == 17 and order.index(-1) < 16


def test_pipelined_requests_with_back_pressure(daemon_factory, images, tmp_path):
    """max_inflight 4: 300 pipelined READs on one connection all get their replies."""
    cfg = tmp_path / "small.toml"
    cfg.write_text("[server]\nmax_inflight = 4\n")
    dmn = daemon_factory(extra=["--config", str(cfg)])
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "bp"})
    data = images["data"][0]
    d = images["disks"][0]

    async def main() -> None:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            sess = await c.mount("/instantnfs/bp")
            img = await c.lookup(sess, f"{d['name']}.img")
            offs = [(i * 77_777) % (len(data) - 65536) for i in range(300)]
            res = await asyncio.gather(*(c.read(img, o, 65536) for o in offs))
            for o, (got, _eof) in zip(offs, res, strict=True):
                assert got == data[o : o + 65536]
        finally:
            await c.close()

    run(main())


def test_allowed_clients(daemon_factory, images):
    dmn = daemon_factory(extra=["--allow", "10.9.0.0/16"])
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "s"})
    p = Packer()
    p.opaque(b"/instantnfs")
    # TCP connections from a refused address are closed at accept (tests/nfs/test_hostile.py);
    # MNT over UDP gets MNT3ERR_ACCES
    rep = udp_call(dmn.addr, dmn.mount_port, build_call(X, MOUNT_PROGRAM, 3, MOUNTPROC3.MNT, p.getvalue(), cred=auth_sys()))
    assert rep == words(X, 1, 0, 0, 0, 0, mountstat3.MNT3ERR_ACCES)
    # the dispatcher's answer to NFS from a refused address: AUTH_ERROR / AUTH_TOOWEAK (NULL stays open)
    rpc = RpcServer(AllowList(["10.9.0.0/16"]))
    rpc.add(NFS3(None).program())  # type: ignore[arg-type]

    def dispatch(record: bytes) -> bytes:
        return b"".join(bytes(b) for b in run(rpc.handle(record, ("127.0.0.1", 900))))

    assert dispatch(build_call(X, NFS_PROGRAM, 3, 1, b"\0" * 4, cred=auth_sys())) == words(X, 1, 1, 1, 5)
    assert dispatch(build_call(X, NFS_PROGRAM, 3, 0)) == words(X, 1, 0, 0, 0, 0)


@pytest.mark.parametrize("flavor", ["none", "sys"])
def test_auth_none_and_sys_both_work(served, flavor):
    cred = AUTH_NONE if flavor == "none" else auth_sys(1000, 1000, (4, 24))

    async def fn(c: NFSClient, sess: bytes) -> Any:
        return await c.getattr(sess)

    assert client_for(served, fn, cred).type == ftype3.NF3DIR


def test_read_only_export(daemon_factory, images):
    dmn = daemon_factory(extra=["--read-only"])
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "ro"})

    async def main() -> None:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            sess = await c.mount("/instantnfs/ro")
            assert (await c.create(sess, "x", check=False)).tag == nfsstat3.NFS3ERR_ROFS
            assert await status(c, NFSPROC3.REMOVE, REMOVE3args(dirop(sess, "testvm.vmx"))) == nfsstat3.NFS3ERR_ROFS
            vmx = await c.lookup(sess, "testvm.vmx")
            assert b"numvcpus" in (await c.read(vmx, 0, 4096))[0]
        finally:
            await c.close()

    run(main())


def test_rpc_client_sees_replies_out_of_order_cleanly(served):
    """Two pipelined NULL calls with chosen xids both come back, matched by xid."""

    async def main() -> tuple[bytes, bytes]:
        c = await RpcClient.connect(served.addr, served.nfs_port)
        try:
            a = c.call_raw(build_call(1, NFS_PROGRAM, 3, 0))
            b = c.call_raw(build_call(2, NFS_PROGRAM, 3, 0))
            return await asyncio.gather(a, b)
        finally:
            await c.close()

    a, b = run(main())
    assert a == words(1, 1, 0, 0, 0, 0) and b == words(2, 1, 0, 0, 0, 0)
    assert frame(b"abcd") == b"\x80\x00\x00\x04abcd"


# -- flags: declared by each program, applied by the dispatcher ------------------------------


def test_mount_declares_its_flags_and_the_dispatcher_applies_them():
    """MNT is NEEDS_AUTH: a refused client gets MNT3ERR_ACCES from the dispatcher (the handler
    does not run); NULL, DUMP, UMNT, UMNTALL and EXPORT stay open to every client."""
    prog = Mount3(NoHandles(), "/instantnfs", ["10.9.0.0/16"]).program()  # type: ignore[arg-type]
    procs = prog.versions[3]
    assert procs[MOUNTPROC3.MNT].flags & NEEDS_AUTH
    open_procs = (MOUNTPROC3.NULL, MOUNTPROC3.DUMP, MOUNTPROC3.UMNT, MOUNTPROC3.UMNTALL, MOUNTPROC3.EXPORT)
    assert not any(procs[p].flags & NEEDS_AUTH for p in open_procs)
    rpc = RpcServer(AllowList(["10.9.0.0/16"]))
    rpc.add(prog)
    path = dirpath.encode(b"/instantnfs")
    ok = words(X, 1, 0, 0, 0, 0)

    def call(proc: int, args: bytes = b"", client: str = "127.0.0.1") -> bytes:
        return dispatch(rpc, build_call(X, MOUNT_PROGRAM, 3, proc, args, cred=auth_sys()), client)

    assert call(MOUNTPROC3.MNT, path) == ok[:-4] + words(0, mountstat3.MNT3ERR_ACCES)
    assert call(MOUNTPROC3.DUMP) == ok + mountlist.encode([])  # the refused MNT was not recorded
    assert call(MOUNTPROC3.EXPORT) == ok + exports.encode([exportnode(b"/instantnfs", [groupnode(b"10.9.0.0/16")])])
    assert call(MOUNTPROC3.NULL) == ok and call(MOUNTPROC3.UMNT, path) == ok and call(MOUNTPROC3.UMNTALL) == ok
    # an allowed client gets past the flag to the handler
    assert call(MOUNTPROC3.MNT, path, "10.9.1.2") == ok + words(0) + mountres3_ok.encode(mountres3_ok(b"H" * 16, [1, 0]))
    assert call(MOUNTPROC3.DUMP) == ok + mountlist.encode([mountbody(b"10.9.1.2", b"/instantnfs")])


def test_read_only_is_applied_by_the_dispatcher():
    """The NFS table holds the handlers themselves; a read-only program refuses MAKES_WRITE
    procedures with NFS3ERR_ROFS and the failure body, before the handler runs."""
    remove = REMOVE3args.encode(REMOVE3args(dirop(b"\0" * 32, "x")))
    rec = build_call(X, NFS_PROGRAM, 3, NFSPROC3.REMOVE, remove, cred=auth_sys())
    empty_wcc = wcc_data.encode(wcc_data(None, None))
    for read_only, status in ((True, nfsstat3.NFS3ERR_ROFS), (False, nfsstat3.NFS3ERR_BADHANDLE)):
        nfs = NFS3(NoHandles(), read_only=read_only)  # type: ignore[arg-type]
        assert nfs.procs[NFSPROC3.REMOVE].handler == nfs.nfs3_remove
        rpc = RpcServer()
        rpc.add(nfs.program())
        assert dispatch(rpc, rec) == words(X, 1, 0, 0, 0, 0, status) + empty_wcc


def test_every_failure_body_decodes_with_the_declared_result():
    """nfs3_types.RES, what the client decodes with, matches the failure body the server
    writes for every procedure (an unknown handle: NFS3ERR_BADHANDLE, nothing left over)."""
    fh = nfs_fh3(b"\0" * 32)
    d = dirop(b"\0" * 32, "x")
    verf = b"\0" * 8
    args = {
        NFSPROC3.GETATTR: GETATTR3args(fh),
        NFSPROC3.SETATTR: SETATTR3args(fh, SATTR3_NONE, None),
        NFSPROC3.LOOKUP: LOOKUP3args(d),
        NFSPROC3.ACCESS: ACCESS3args(fh, 0x3F),
        NFSPROC3.READLINK: READLINK3args(fh),
        NFSPROC3.READ: READ3args(fh, 0, 10),
        NFSPROC3.WRITE: WRITE3args(fh, 0, 3, stable_how.FILE_SYNC, b"abc"),
        NFSPROC3.CREATE: CREATE3args(d, UnionValue(createmode3.UNCHECKED, SATTR3_NONE)),
        NFSPROC3.MKDIR: MKDIR3args(d, SATTR3_NONE),
        NFSPROC3.SYMLINK: SYMLINK3args(d, symlinkdata3(SATTR3_NONE, b"t")),
        NFSPROC3.MKNOD: MKNOD3args(d, UnionValue(ftype3.NF3FIFO, SATTR3_NONE)),
        NFSPROC3.REMOVE: REMOVE3args(d),
        NFSPROC3.RMDIR: REMOVE3args(d),
        NFSPROC3.RENAME: RENAME3args(d, d),
        NFSPROC3.LINK: LINK3args(fh, d),
        NFSPROC3.READDIR: READDIR3args(fh, 0, verf, 4096),
        NFSPROC3.READDIRPLUS: READDIRPLUS3args(fh, 0, verf, 4096, 4096),
        NFSPROC3.FSSTAT: FSSTAT3args(fh),
        NFSPROC3.FSINFO: FSINFO3args(fh),
        NFSPROC3.PATHCONF: PATHCONF3args(fh),
        NFSPROC3.COMMIT: COMMIT3args(fh, 0, 0),
    }
    assert set(args) | {NFSPROC3.NULL} == set(RES)
    rpc = RpcServer()
    rpc.add(NFS3(NoHandles()).program())  # type: ignore[arg-type]
    for proc, a in args.items():
        argt, rest = RES[proc]
        u = parse_reply(dispatch(rpc, build_call(X, NFS_PROGRAM, 3, proc, argt.encode(a), cred=auth_sys())))
        res = rest.unpack(u)
        assert (NFSPROC3(proc).name, res.tag, u.remaining()) == (NFSPROC3(proc).name, nfsstat3.NFS3ERR_BADHANDLE, 0)


# -- who is local, who is allowed: one reading of a caller's address ---------------------------


@pytest.mark.parametrize(("addr", "local"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True), ("unix", True),
    ("10.9.1.2", False), ("::ffff:10.9.1.2", False), ("fe80::1", False), ("", False), ("localhost", False),
])
def test_is_local(addr, local):
    assert is_local(addr) is local


def test_allow_list_and_portmap_read_a_caller_alike():
    """The allowed list and the portmapper's SET/UNSET check share client_ip: an IPv4-mapped
    address is its IPv4 address for both; a name or the AF_UNIX marker is no IP address."""
    assert client_ip("::ffff:10.9.1.2") == ipaddress.IPv4Address("10.9.1.2")
    assert client_ip("::1") == ipaddress.IPv6Address("::1")
    assert client_ip("unix") is None and client_ip("localhost") is None
    allow = AllowList(["10.9.0.0/16"])
    assert "10.9.1.2" in allow and "::ffff:10.9.1.2" in allow
    assert "10.8.1.2" not in allow and "::ffff:10.8.1.2" not in allow and "unix" not in allow
    assert "unix" not in AllowList(["0.0.0.0/0", "::/0"])  # the AF_UNIX socket is no allowed network client

    def owner(client: str, port: int) -> bytes | None:
        return caller_owner(CallContext(1, PMAP_PROG, 2, 1, Cred(0), client, port, True))

    assert owner("127.0.0.1", 700) == owner("::ffff:127.0.0.1", 700) == SUPERUSER
    assert owner("127.0.0.1", 2000) is None and owner("10.9.1.2", 700) is None
    assert owner("unix", 0) == SUPERUSER and owner("unix", 1000) == b"1000"
