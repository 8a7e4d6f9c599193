"""The NFS/RPC layer against hostile clients (issue 8, findings 6, 9, 10, 11, 13 and the
duplicate request cache): every error is an NFS status, a client that never reads its
replies or opens thousands of connections cannot grow the daemon's memory without bound,
the portmapper cannot be hijacked by an unprivileged local user, and clients that go away
mid-request leave no traceback in the log."""
from __future__ import annotations

import asyncio
import os
import resource
import select
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from engine.nfs.client import NFSClient, RpcClient, auth_sys, build_call, frame
from engine.nfs.mount_types import MOUNT_PROGRAM, MOUNTPROC3, mountstat3
from engine.nfs.nfs3_types import (
    DONT_CHANGE_TIME,
    NFS_PROGRAM,
    NFSPROC3,
    SATTR3_NONE,
    COMMIT3args,
    CREATE3args,
    LINK3args,
    LOOKUP3args,
    MKDIR3args,
    READ3args,
    READDIR3args,
    READDIRPLUS3args,
    REMOVE3args,
    RENAME3args,
    SETATTR3args,
    SYMLINK3args,
    WRITE3args,
    createmode3,
    nfs_fh3,
    nfsstat3,
    sattr3,
    symlinkdata3,
)
from engine.nfs.portmap_types import PMAP_PROG, PMAPPROC, mapping
from engine.nfs.xdr import Packer, UnionValue, uint32
from tests.conftest import require_tool
from tests.nfs.conftest import run
from tests.nfs.rawrpc import dirop, raw, status_of_reply, workdir

MiB = 1 << 20


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def config_file(tmp_path: Path, **server: Any) -> list[str]:
    f = tmp_path / "hostile.toml"
    f.write_text("[server]\n" + "".join(f"{k} = {v!r}\n" for k, v in server.items()))
    return ["--config", str(f)]


# -- finding 6: any name length is an NFS status --------------------------------------------


@pytest.mark.parametrize("n", [256, 4096, 60000])
def test_long_names_are_nametoolong_not_garbage_args(served, n):
    name = b"n" * n

    async def main() -> None:
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
        try:
            sess = await c.mount("/instantnfs/sess")
            d = await workdir(c, sess, f"long{n}")
            f = (await c.create(d, "f")).body.obj.data
            calls = {
                "LOOKUP": (NFSPROC3.LOOKUP, LOOKUP3args(dirop(d, name))),
                "CREATE": (NFSPROC3.CREATE, CREATE3args(dirop(d, name), UnionValue(createmode3.UNCHECKED, SATTR3_NONE))),
                "MKDIR": (NFSPROC3.MKDIR, MKDIR3args(dirop(d, name), SATTR3_NONE)),
                "REMOVE": (NFSPROC3.REMOVE, REMOVE3args(dirop(d, name))),
                "RMDIR": (NFSPROC3.RMDIR, REMOVE3args(dirop(d, name))),
                "RENAME from": (NFSPROC3.RENAME, RENAME3args(dirop(d, name), dirop(d, b"x"))),
                "RENAME to": (NFSPROC3.RENAME, RENAME3args(dirop(d, b"f"), dirop(d, name))),
                "SYMLINK": (NFSPROC3.SYMLINK, SYMLINK3args(dirop(d, name), symlinkdata3(SATTR3_NONE, b"f"))),
                "SYMLINK target": (NFSPROC3.SYMLINK, SYMLINK3args(dirop(d, b"sl"), symlinkdata3(SATTR3_NONE, name))),
                "LINK": (NFSPROC3.LINK, LINK3args(nfs_fh3(f), dirop(d, name))),
            }
            from engine.nfs.nfs3_types import RES
            for what, (proc, args) in calls.items():
                if what == "SYMLINK target" and n < 4096:
                    continue  # a 256-byte target is a valid symlink
                rep = await raw(c.rpc, NFS_PROGRAM, proc, RES[proc][0].encode(args))
                assert status_of_reply(rep) == nfsstat3.NFS3ERR_NAMETOOLONG, what
            assert (await c.getattr(f)).size == 0  # the session still answers
        finally:
            await c.close()

    run(main())


@pytest.mark.parametrize("n", [1025, 4096, 60000])
def test_mount_long_path_is_mnt3err_nametoolong(served, n):
    p = Packer()
    p.opaque(b"/instantnfs/" + b"p" * n)

    async def main() -> bytes:
        c = await RpcClient.connect(served.addr, served.mount_port)
        try:
            return await raw(c, MOUNT_PROGRAM, MOUNTPROC3.MNT, p.getvalue())
        finally:
            await c.close()

    assert status_of_reply(run(main())) == mountstat3.MNT3ERR_NAMETOOLONG


def test_huge_counts_are_nfs_statuses_or_clamped(served, images):
    d0 = images["disks"][0]

    async def main() -> None:
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
        try:
            sess = await c.mount("/instantnfs/sess")
            img = await c.lookup(sess, f"{d0['name']}.img")
            d = await workdir(c, sess, "counts")
            f = (await c.create(d, "f")).body.obj.data
            for count in (0xFFFFFFFF, 0x80000000):
                r = await c.call(NFSPROC3.READDIR, READDIR3args(nfs_fh3(sess), 0, b"\0" * 8, count))
                assert r.tag == nfsstat3.NFS3_OK and r.body.reply.eof
                r = await c.call(NFSPROC3.READDIRPLUS, READDIRPLUS3args(nfs_fh3(sess), 0, b"\0" * 8, count, count))
                assert r.tag == nfsstat3.NFS3_OK and r.body.reply.eof
                r = await c.call(NFSPROC3.READ, READ3args(nfs_fh3(img), 0, count))
                assert r.tag == nfsstat3.NFS3_OK and 0 < len(r.body.data) <= MiB
            # WRITE: count larger than the data is INVAL; smaller writes count bytes
            r = await c.call(NFSPROC3.WRITE, WRITE3args(nfs_fh3(f), 0, 100, 2, b"a" * 10), check=False)
            assert r.tag == nfsstat3.NFS3ERR_INVAL
            r = await c.call(NFSPROC3.WRITE, WRITE3args(nfs_fh3(f), 0, 5, 2, b"b" * 10))
            assert r.body.count == 5 and (await c.getattr(f)).size == 5
            # data over the 1 MiB wtmax (within the record cap): a status, never GARBAGE_ARGS
            big = b"c" * (MiB + 8192)
            r = await c.call(NFSPROC3.WRITE, WRITE3args(nfs_fh3(f), 0, len(big), 2, big), check=False)
            assert r.tag == nfsstat3.NFS3_OK and 0 < r.body.count <= MiB
        finally:
            await c.close()

    run(main())


# -- finding 13: offsets of 2^63 and more ---------------------------------------------------


def test_read_write_at_offsets_past_2_63(served, images):
    d0 = images["disks"][0]

    async def main() -> None:
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
        try:
            sess = await c.mount("/instantnfs/sess")
            img = await c.lookup(sess, f"{d0['name']}.img")
            d = await workdir(c, sess, "offsets")
            f = (await c.create(d, "f")).body.obj.data
            await c.write(f, 0, b"hello")
            for fh in (img, f):
                for off in (1 << 63, (1 << 64) - 1, (1 << 64) - 4096):
                    r = await c.call(NFSPROC3.READ, READ3args(nfs_fh3(fh), off, 4096))
                    assert r.tag == nfsstat3.NFS3_OK and r.body.data == b"" and r.body.eof
            for off in (1 << 63, (1 << 64) - 1, (1 << 63) - 2):
                r = await c.call(NFSPROC3.WRITE, WRITE3args(nfs_fh3(img), off, 4, 2, b"abcd"), check=False)
                assert r.tag == nfsstat3.NFS3ERR_FBIG
                r = await c.call(NFSPROC3.WRITE, WRITE3args(nfs_fh3(f), off, 4, 2, b"abcd"), check=False)
                assert r.tag in (nfsstat3.NFS3ERR_FBIG, nfsstat3.NFS3ERR_INVAL)
            assert (await c.read(f, 0, 100))[0] == b"hello"
            # SETATTR to a size past what a file can have: FBIG (was an OverflowError and
            # SYSTEM_ERR, found by the fuzz campaign)
            for size in (1 << 63, (1 << 64) - 1):
                sa = sattr3(None, None, None, size, DONT_CHANGE_TIME, DONT_CHANGE_TIME)
                r = await c.call(NFSPROC3.SETATTR, SETATTR3args(nfs_fh3(f), sa, None), check=False)
                assert r.tag == nfsstat3.NFS3ERR_FBIG, size
            assert (await c.read(f, 0, 100))[0] == b"hello"
        finally:
            await c.close()

    run(main())
    assert "Traceback" not in served.log.read_text(errors="replace")


def test_clients_closing_mid_request_leave_no_traceback(daemon_factory, images):
    dmn = daemon_factory()
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "bye"})
    d0 = images["disks"][0]

    async def main() -> None:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            sess = await c.mount("/instantnfs/bye")
            img = await c.lookup(sess, f"{d0['name']}.img")
        finally:
            await c.close()
        for i in range(50):
            w = WRITE3args(nfs_fh3(img), (i % 16) * MiB + 4096, 4096, 0, bytes([i]) * 4096)
            cm = COMMIT3args(nfs_fh3(img), 0, 0)
            recs = [build_call(1000 + i, NFS_PROGRAM, 3, NFSPROC3.WRITE, WRITE3args.encode(w), auth_sys()),
                    build_call(2000 + i, NFS_PROGRAM, 3, NFSPROC3.COMMIT, COMMIT3args.encode(cm), auth_sys())]
            # a FILE_SYNC write past the end fails in the write-cache thread after the client
            # is gone: its error must not be logged as a "Future exception was never retrieved"
            past = WRITE3args(nfs_fh3(img), d0["size"] + 1 + i, 1, 2, b"x")
            recs.append(build_call(3000 + i, NFS_PROGRAM, 3, NFSPROC3.WRITE, WRITE3args.encode(past), auth_sys()))
            if i % 2:
                recs.reverse()
            _r, wr = await asyncio.open_connection(dmn.addr, dmn.nfs_port)
            wr.write(b"".join(frame(x) for x in recs))
            await wr.drain()
            wr.transport.abort()
        await asyncio.sleep(1.0)
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            sess = await c.mount("/instantnfs/bye")
            assert (await c.getattr(sess)).size >= 0
        finally:
            await c.close()

    run(main())
    text = dmn.log.read_text(errors="replace")
    assert "Traceback" not in text and "a bug" not in text and "never retrieved" not in text, text[-3000:]


# -- the duplicate request cache: keyed by address and xid, not by connection --------------


def test_retransmission_on_a_new_connection_gets_the_original_reply(served):
    async def main() -> None:
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
        try:
            sess = await c.mount("/instantnfs/sess")
            d = await workdir(c, sess, "drc")
            await c.create(d, "victim")
            rm = build_call(0x5EED0001, NFS_PROGRAM, 3, NFSPROC3.REMOVE, REMOVE3args.encode(REMOVE3args(dirop(d, b"victim"))), auth_sys())
            ex = build_call(0x5EED0002, NFS_PROGRAM, 3, NFSPROC3.CREATE,
                            CREATE3args.encode(CREATE3args(dirop(d, b"excl"), UnionValue(createmode3.EXCLUSIVE, b"12345678"))), auth_sys())
            first = []
            for rec in (rm, ex):
                one = await RpcClient.connect(served.addr, served.nfs_port)
                first.append(await one.call_raw(rec))
                await one.close()
            assert [status_of_reply(r) for r in first] == [0, 0]
            for rec, orig in zip((rm, ex), first, strict=True):  # ESXi reconnects from a new port and retransmits
                two = await RpcClient.connect(served.addr, served.nfs_port)
                again = await two.call_raw(rec)
                await two.close()
                assert again == orig
        finally:
            await c.close()

    run(main())


# -- finding 9: a client that never reads its replies --------------------------------------


def _read_calls(fh: bytes, n: int, size: int, xid0: int) -> bytes:
    return b"".join(frame(build_call(xid0 + i, NFS_PROGRAM, 3, NFSPROC3.READ,
                                     READ3args.encode(READ3args(nfs_fh3(fh), (i % 16) * size, size)), auth_sys()))
                    for i in range(n))


@pytest.mark.slow
def test_non_reading_client_keeps_memory_bounded(daemon_factory, images, tmp_path):
    queue_mib = 16
    dmn = daemon_factory(extra=config_file(tmp_path, max_reply_queue_mib=queue_mib))
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "nr"})
    pid = dmn.proc.pid
    d0 = images["disks"][0]

    async def handles() -> tuple[bytes, bytes]:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            sess = await c.mount("/instantnfs/nr")
            img = await c.lookup(sess, f"{d0['name']}.img")
            for i in range(16):  # READs of written ranges come from the write cache: fresh buffers
                await c.write(img, i * MiB, bytes([i + 1]) * MiB)
            return sess, img
        finally:
            await c.close()

    sess, img = run(handles())
    before = rss_kib(pid)
    socks = []
    for k in range(3):
        s = socket.create_connection((dmn.addr, dmn.nfs_port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.settimeout(15)
        try:
            s.sendall(_read_calls(img, 1500, MiB, 100000 * (k + 1)))
        except TimeoutError:
            pass  # the daemon stopped reading: what it should do
        socks.append(s)
    peak = 0
    for _ in range(10):
        time.sleep(0.3)
        peak = max(peak, rss_kib(pid))

    async def getattr_elsewhere() -> None:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            await asyncio.wait_for(c.getattr(sess), 5)  # a hang detector, not a timing assertion
        finally:
            await c.close()

    run(getattr_elsewhere())
    grown_mib = (peak - before) / 1024
    assert grown_mib < 3 * (queue_mib + 64) + 64, f"RSS grew {grown_mib:.0f} MiB"
    for s in socks:
        s.close()
    time.sleep(0.5)
    run(getattr_elsewhere())


# -- finding 10: framing and connections ----------------------------------------------------


@pytest.fixture
def limited(daemon_factory, images, tmp_path):
    raise_nofile(8192)
    dmn = daemon_factory(extra=config_file(tmp_path, max_connections_per_client=1000, max_connections=1500,
                                           idle_timeout=3, max_fragments=64))
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "lim"})
    return dmn


def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    r, _, _ = select.select([s], [], [], timeout)
    if not r:
        return False
    try:
        return s.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_empty_fragments_close_the_connection(limited):
    before = rss_kib(limited.proc.pid)
    s = socket.create_connection((limited.addr, limited.nfs_port))
    s.settimeout(10)
    chunk = b"\0\0\0\0" * (256 * 1024)  # 1 MiB of zero-length non-last fragments
    sent = 0
    try:
        while sent < 100 * MiB:
            s.sendall(chunk)
            sent += len(chunk)
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        pass
    assert sent < 100 * MiB or _closed_by_peer(s, 5), "the daemon kept reading empty fragments"
    s.close()
    assert (rss_kib(limited.proc.pid) - before) < 32 * 1024


def test_announced_records_cost_only_what_arrives(limited):
    before = rss_kib(limited.proc.pid)
    socks = []
    for _ in range(300):
        s = socket.create_connection((limited.addr, limited.nfs_port))
        s.sendall(struct.pack(">I", 0x80000000 | MiB) + b"0123456789")
        socks.append(s)
    time.sleep(1.0)
    grown = rss_kib(limited.proc.pid) - before
    for s in socks:
        s.close()
    assert grown < 64 * 1024, f"{grown // 1024} MiB for 300 connections that sent 10 bytes each"


def _open_many(addr: str, port: int, source: str, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect((addr, port))
        out.append(s)
    return out


def _count_closed(socks: list[socket.socket], wait: float) -> int:
    time.sleep(wait)
    p = select.poll()
    for s in socks:
        p.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
    return len(p.poll(0))


@pytest.mark.slow
def test_connection_limits_per_client_and_total(limited):
    pid = limited.proc.pid
    before = rss_kib(pid)
    a = _open_many(limited.addr, limited.nfs_port, "127.3.0.1", 1100)
    try:
        assert _count_closed(a[:1000], 1.0) == 0
        assert _count_closed(a[1000:], 0) == 100  # beyond the per-client limit: closed at once
        b = _open_many(limited.addr, limited.nfs_port, "127.3.0.2", 900)
        try:
            assert _count_closed(b[:500], 1.0) == 0
            assert _count_closed(b[500:], 0) == 400  # beyond the total
            grown = rss_kib(pid) - before
            assert grown < 128 * 1024, f"{grown // 1024} MiB for 1,500 idle connections"
            # an accepted connection is served
            b[0].sendall(frame(build_call(7, NFS_PROGRAM, 3, 0)))
            b[0].settimeout(5)
            assert b[0].recv(100)[4:8] == b"\0\0\0\7"
        finally:
            for s in b:
                s.close()
    finally:
        for s in a:
            s.close()
    time.sleep(0.5)
    again = _open_many(limited.addr, limited.nfs_port, "127.3.0.1", 10)
    assert _count_closed(again, 0.5) == 0  # closing them gave the slots back
    for s in again:
        s.close()


def test_daemon_raises_its_open_file_limit(daemon_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # Debian's default soft limit
    try:
        dmn = daemon_factory()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    line = next(ln for ln in Path(f"/proc/{dmn.proc.pid}/limits").read_text().splitlines() if ln.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard) if hard != resource.RLIM_INFINITY else "unlimited"] * 2, line


def test_idle_connections_are_closed(limited):
    s = socket.create_connection((limited.addr, limited.nfs_port))
    busy = socket.create_connection((limited.addr, limited.nfs_port))
    busy.settimeout(5)
    try:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # keeps talking: stays open
            busy.sendall(frame(build_call(9, NFS_PROGRAM, 3, 0)))
            assert busy.recv(100)[4:8] == b"\0\0\0\x09"
            time.sleep(0.5)
        assert _closed_by_peer(s, 15)
        busy.sendall(frame(build_call(10, NFS_PROGRAM, 3, 0)))
        assert busy.recv(100)[4:8] == b"\0\0\0\x0a"
    finally:
        s.close()
        busy.close()


def test_clients_outside_the_allowed_list_are_closed_at_accept(daemon_factory):
    dmn = daemon_factory(extra=["--allow", "10.9.0.0/16"])
    for port in (dmn.nfs_port, dmn.mount_port):
        s = socket.create_connection((dmn.addr, port))
        try:
            assert _closed_by_peer(s, 5)
        finally:
            s.close()


# -- finding 11: the portmapper against an unprivileged local user -------------------------

_NOBODY = textwrap.dedent("""
    import encodings.idna, os, socket, struct, sys  # noqa: F401 (nobody cannot load it later)
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    host, prog = sys.argv[1], int(sys.argv[2])
    def call(vers, proc, args):
        rec = struct.pack(">10I", 77, 0, 2, 100000, vers, proc, 0, 0, 0, 0) + args
        s = socket.create_connection((host, 111), timeout=10)
        assert s.getsockname()[1] >= 1024
        s.sendall(struct.pack(">I", 0x80000000 | len(rec)) + rec)
        rep = b""
        while len(rep) < 4 + 28:
            more = s.recv(100)
            if not more:
                break
            rep += more
        s.close()
        return struct.unpack(">I", rep[-4:])[0]
    def s255(b):
        return struct.pack(">I", len(b)) + b + b"\\0" * (-len(b) % 4)
    out = [call(2, 2, struct.pack(">4I", prog, 3, 6, 0)),        # UNSET nfs v3
           call(2, 1, struct.pack(">4I", prog, 3, 6, 4444)),     # SET nfs v3 elsewhere
           call(2, 1, struct.pack(">4I", 400777, 1, 6, 4444))]   # SET a new program
    for v in (3, 4):                                              # RPCB_UNSET
        out.append(call(v, 2, struct.pack(">2I", prog, 3) + s255(b"tcp") + s255(b"") + s255(b"superuser")))
        out.append(call(v, 2, struct.pack(">2I", prog, 3) + s255(b"") + s255(b"") + s255(b"instantnfs")))
    print(" ".join(map(str, out)))
""")


def _reserved_socket(host: str) -> socket.socket:
    for port in range(1023, 600, -1):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            s.connect((host, 111))
            return s
        except OSError:
            s.close()
    raise AssertionError("no reserved port free")


def _pmap_on(s: socket.socket, proc: int, m: Any) -> int:
    rec = build_call(55, PMAP_PROG, 2, proc, mapping.encode(m))
    s.sendall(frame(rec))
    s.settimeout(10)
    rep = s.recv(200)
    return uint32.decode(rep[-4:])


def test_portmapper_refuses_unprivileged_set_and_unset(served):
    require_tool("rpcinfo")
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody and to bind a reserved port")
    r = subprocess.run([sys.executable, "-c", _NOBODY, served.addr, str(NFS_PROGRAM)], capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0"] * 7
    out = subprocess.run(["rpcinfo", "-p", served.addr], capture_output=True, text=True, timeout=30).stdout
    rows = [ln.split() for ln in out.splitlines()[1:]]  # program vers proto port service
    assert any(t[0] == str(NFS_PROGRAM) and t[3] == str(served.nfs_port) and t[-1] == "nfs" for t in rows), out
    assert any(t[0] == str(MOUNT_PROGRAM) and t[3] == str(served.mount_port) and t[-1] == "mountd" for t in rows), out
    # root from a reserved port registers a new program, cannot take over an existing one
    s = _reserved_socket(served.addr)
    try:
        assert _pmap_on(s, PMAPPROC.SET, mapping(400888, 1, 6, 4343)) == 1
        assert _pmap_on(s, PMAPPROC.GETPORT, mapping(400888, 1, 6, 0)) == 4343
        assert _pmap_on(s, PMAPPROC.SET, mapping(NFS_PROGRAM, 3, 6, 4343)) == 0
        assert _pmap_on(s, PMAPPROC.GETPORT, mapping(NFS_PROGRAM, 3, 6, 0)) == served.nfs_port
        assert _pmap_on(s, PMAPPROC.UNSET, mapping(400888, 1, 6, 0)) == 1
        assert _pmap_on(s, PMAPPROC.GETPORT, mapping(400888, 1, 6, 0)) == 0
    finally:
        s.close()


def test_limit_keys_have_defaults_and_are_validated(tmp_path):
    from engine import config
    from engine.errors import UsageError

    s = config.validate(config.load())["server"]
    assert (s["max_reply_queue_mib"], s["max_connections_per_client"], s["max_connections"], s["idle_timeout"],
            s["max_fragments"]) == (32, 128, 4096, 600, 256)
    assert s["idle_timeout"] >= 300
    f = tmp_path / "c.toml"
    for text, msg in {
        "max_reply_queue_mib = 1": "max_reply_queue_mib must be at least 2",
        "max_connections_per_client = 0": "max_connections_per_client must be at least 1",
        "max_connections = 10\nmax_connections_per_client = 11": "max_connections must be at least",
        "idle_timeout = 0": "idle_timeout must be a positive",
        "max_fragments = 0": "max_fragments must be at least 1",
    }.items():
        f.write_text("[server]\n" + text + "\n")
        with pytest.raises(UsageError, match=msg):
            config.validate(config.load(f))


_UNIX_CLIENT = textwrap.dedent("""
    import os, socket, struct, sys
    path, drop = sys.argv[1], sys.argv[2] == "drop"
    if drop:
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    def s255(b):
        return struct.pack(">I", len(b)) + b + b"\\0" * (-len(b) % 4)
    def call(vers, proc, args):
        rec = struct.pack(">10I", 78, 0, 2, 100000, vers, proc, 0, 0, 0, 0) + args
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        s.sendall(struct.pack(">I", 0x80000000 | len(rec)) + rec)
        rep = b""
        while len(rep) < 4 + 28:
            more = s.recv(100)
            if not more:
                break
            rep += more
        s.close()
        return struct.unpack(">I", rep[-4:])[0]
    out = []
    for line in sys.stdin.read().split(";"):
        vers, proc, kind, *rest = line.split()
        if kind == "m":
            args = struct.pack(">4I", *map(int, rest))
        else:
            args = struct.pack(">2I", int(rest[0]), int(rest[1])) + s255(rest[2].encode()) + s255(rest[3].encode()) + s255(rest[4].encode())
        out.append(call(int(vers), int(proc), args))
    print(" ".join(map(str, out)))
""")


def test_portmapper_unix_socket_owners(tmp_path):
    """On the AF_UNIX socket the caller's uid is its identity: a non-root user registers and
    removes its own programs only; root (uid 0) may remove anything."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    from engine.nfs.server import free_port
    port = free_port("127.0.0.1")
    sock = f"/tmp/instantnfs-test-pmap-{os.getpid()}.sock"
    pm = subprocess.Popen([sys.executable, "-m", "engine.nfs.portmap", "--bind", "127.0.0.1", "--port", str(port), "--unix", sock],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening" in (pm.stdout.readline() if pm.stdout else "")

        def as_user(drop: bool, script: str) -> list[int]:
            r = subprocess.run([sys.executable, "-c", _UNIX_CLIENT, sock, "drop" if drop else "root"], input=script,
                               capture_output=True, text=True, timeout=60, cwd="/")
            assert r.returncode == 0, r.stderr
            return [int(x) for x in r.stdout.split()]

        # root registers 400901; nobody registers 400902, cannot remove 400901 nor the portmapper
        assert as_user(False, "2 1 m 400901 1 6 5001") == [1]
        assert as_user(True, "2 1 m 400902 1 6 5002; 2 2 m 400901 1 6 0; 4 2 r 400901 1 tcp x superuser; "
                             "2 2 m 100000 2 6 0; 2 1 m 400901 1 6 5003; 4 2 r 400902 1 tcp x 1000; "
                             "4 2 r 400902 1 tcp x 65534") == [1, 0, 0, 0, 0, 0, 1]
        assert as_user(False, "2 2 m 400901 1 6 0; 2 2 m 400901 1 6 0") == [1, 0]
    finally:
        pm.terminate()
        pm.wait(10)
        if os.path.exists(sock):
            os.unlink(sock)


def test_fragmented_pipelined_calls_in_odd_sized_writes(served, images):
    """Calls split into random fragments, sent in random-sized pieces (1 byte to 300 KiB) and
    pipelined without waiting, big READs among them: every reply comes back, bytes exact
    (the growing buffer, compaction and pausing never lose or reorder a record)."""
    import random

    rng = random.Random(8)
    d0, data = images["disks"][0], images["data"][0]

    async def main() -> None:
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
        try:
            sess = await c.mount("/instantnfs/sess")
            img = await c.lookup(sess, f"{d0['name']}.img")
        finally:
            await c.close()
        want: dict[int, tuple[str, int, int]] = {}
        stream = bytearray()
        for i in range(300):
            xid = 0x7000 + i
            kind = rng.choice(["null", "getattr", "read", "read"])
            if kind == "null":
                rec = build_call(xid, NFS_PROGRAM, 3, 0)
            elif kind == "getattr":
                rec = build_call(xid, NFS_PROGRAM, 3, NFSPROC3.GETATTR, nfs_fh3.encode(nfs_fh3(img)), auth_sys())
            else:
                off, n = rng.randrange(0, len(data) - MiB), rng.choice([1, 4096, 65536, MiB])
                rec = build_call(xid, NFS_PROGRAM, 3, NFSPROC3.READ, READ3args.encode(READ3args(nfs_fh3(img), off, n)), auth_sys())
                want[xid] = ("read", off, n)
            want.setdefault(xid, (kind, 0, 0))
            cuts = sorted(rng.sample(range(1, len(rec)), min(len(rec) - 1, rng.randrange(0, 5))))
            parts = [rec[a:b] for a, b in zip([0, *cuts], [*cuts, len(rec)], strict=True)]
            for j, p in enumerate(parts):
                stream += struct.pack(">I", (0x80000000 if j == len(parts) - 1 else 0) | len(p)) + p
        r, w = await asyncio.open_connection(served.addr, served.nfs_port)

        async def send() -> None:
            pos = 0
            while pos < len(stream):
                n = rng.choice([1, 3, 100, 4096, 70000, 300000])
                w.write(bytes(stream[pos : pos + n]))
                pos += n
                if rng.random() < 0.2:
                    await w.drain()
                    await asyncio.sleep(0)
            await w.drain()

        sender = asyncio.create_task(send())
        got: dict[int, bytes] = {}
        try:
            while len(got) < len(want):
                hdr = await asyncio.wait_for(r.readexactly(4), 30)
                rep = await r.readexactly(struct.unpack(">I", hdr)[0] & 0x7FFFFFFF)
                got[struct.unpack_from(">I", rep)[0]] = rep
            await sender
        finally:
            w.close()
        assert set(got) == set(want)
        for xid, (kind, off, n) in want.items():
            rep = got[xid]
            if kind == "null":
                assert rep == struct.pack(">6I", xid, 1, 0, 0, 0, 0)
                continue
            assert status_of_reply(rep) == 0
            if kind == "read":
                # status, post_op_attr (1 + 84 bytes), count, eof, data<>
                body = rep[24 + 4 + 4 + 84:]
                cnt = struct.unpack_from(">I", body)[0]
                assert body[12 : 12 + cnt] == data[off : off + n]

    run(main())
