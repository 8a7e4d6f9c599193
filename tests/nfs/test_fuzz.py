"""The fuzz campaign: mutated and random RPC records against a live daemon.

Two sessions of the test point are published: ``zzfuzz`` takes the records, ``checked``
is never named by one (its handles carry its own session id under the handle MAC, and no
record names it), so its disk must still read as the backup at the end.

Records are valid calls of every program, version and procedure the daemon serves
(portmap 100000 v2/v3/v4, MOUNT 100005 v3, NFS 100003 v3), built with the XDR
declarations of ``engine.nfs.*_types``, then mutated: bytes and bits flipped, truncated,
extended, a 32-bit word set to an edge value (lengths: 0, 2^31, 2^32-1, ...), the
program/version/procedure replaced, or random bytes altogether. The record marking is
abused too: records split into odd fragments, zero-length fragments, huge announced
lengths and records that never end (the connection is then dropped). Worker processes
pre-build batches and write them with ``sendall`` on several connections each, reading
replies on a thread per connection; a connection the server closes is opened again
(closing is allowed).

Throughout, a GETATTR of the checked disk on a separate connection every second must
answer within 5 s (a hang detector, not a timing assertion), and the daemon must stay
up. At the end: the checked disk reads as the backup, the portmapper still maps MOUNT
and NFS to the daemon's ports, and the daemon's log has no traceback.

Environment: ``FUZZ_SEED`` repeats a slow campaign (its seed is printed);
``FUZZ_SKIP_NFS_PROCS=11,...`` leaves NFS procedures out of the valid calls, to look
past a known finding while it is open (never set in CI).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from engine.nfs.client import NFSClient, auth_sys, build_call, frame, parse_reply
from engine.nfs.mount_types import MOUNT_PROGRAM
from engine.nfs.nfs3_types import (
    DONT_CHANGE_TIME,
    NFS_PROGRAM,
    ACCESS3args,
    COMMIT3args,
    FSINFO3args,
    FSSTAT3args,
    GETATTR3args,
    MKDIR3args,
    PATHCONF3args,
    READ3args,
    READDIR3args,
    READDIRPLUS3args,
    READLINK3args,
    SETATTR3args,
    WRITE3args,
    createhow3,
    createmode3,
    devicedata3,
    diropargs3,
    ftype3,
    mknoddata3,
    nfs_fh3,
    nfsstat3,
    nfstime3,
    sattr3,
    specdata3,
    time_how,
)
from engine.nfs.portmap_types import IPPROTO_TCP, IPPROTO_UDP, PMAP_PROG, mapping, rpcb
from engine.nfs.rpc_types import auth_flavor
from engine.nfs.xdr import Packer, UnionValue
from tests.nfs.conftest import run

FUZZ_SESSION = "zzfuzz"
CHECK_SESSION = "checked-session-0001"
HANG_BOUND = 5.0  # a GETATTR on the monitor connection slower than this is a hang
SEND_STALL = 60.0  # a connection that takes no bytes for this long is hung
_U32 = struct.Struct(">I")


@dataclass
class Corpus:
    """What the workers build records from (picklable: it goes to spawned processes)."""

    host: str
    ports: dict[str, int]  # portmap, mount, nfs
    handles: list[bytes]  # of the fuzzed session, its root and the export root
    dirs: list[bytes]
    names: list[bytes] = field(default_factory=list)
    skip_procs: tuple[int, ...] = ()  # NFS procedures not sent as valid calls (FUZZ_SKIP_NFS_PROCS)


# -- valid calls ---------------------------------------------------------------------------


def _sattr(rng: random.Random) -> Any:
    def opt(v: int) -> Any:
        return v if rng.random() < 0.3 else None

    def tm() -> Any:
        r = rng.random()
        if r < 0.6:
            return DONT_CHANGE_TIME
        if r < 0.8:
            return UnionValue(time_how.SET_TO_SERVER_TIME)
        return UnionValue(time_how.SET_TO_CLIENT_TIME, nfstime3(rng.getrandbits(32), rng.randrange(10**9)))

    return sattr3(opt(rng.choice([0o644, 0o755, 0o4777, 0o177777])), opt(rng.choice([0, 1000, 2**32 - 1])),
                  opt(rng.choice([0, 1000])), opt(rng.choice([0, 1, 4096, 1 << 20, 2**63, 2**64 - 1])), tm(), tm())


def _offset(rng: random.Random) -> int:
    return rng.choice([0, 1, 4095, rng.randrange(1 << 26), rng.randrange(1 << 40), 2**63 - 1, 2**63, 2**64 - 1])


def _opaque(data: bytes) -> bytes:
    p = Packer()
    p.opaque(data)
    return p.getvalue()


def nfs_args(rng: random.Random, c: Corpus, proc: int) -> bytes:
    """Valid arguments of NFSv3 procedure ``proc``. Directory operations are encoded by
    hand (handle, then name) so that names longer than any bound the decoder has can be
    sent too."""
    fh = nfs_fh3(rng.choice(c.handles))
    d = nfs_fh3(rng.choice(c.dirs))

    def where() -> bytes:
        return _opaque(rng.choice(c.dirs)) + _opaque(rng.choice(c.names))

    if proc == 0:
        return b""
    if proc == 1:
        return GETATTR3args.encode(GETATTR3args(fh))
    if proc == 2:
        guard = nfstime3(rng.getrandbits(32), 0) if rng.random() < 0.2 else None
        return SETATTR3args.encode(SETATTR3args(fh, _sattr(rng), guard))
    if proc == 3:
        return where()
    if proc == 4:
        return ACCESS3args.encode(ACCESS3args(fh, rng.getrandbits(6)))
    if proc == 5:
        return READLINK3args.encode(READLINK3args(fh))
    if proc == 6:
        count = rng.choice([0, 1, 512, 4096, 65536, rng.randrange(1 << 17), 1 << 20, 2**32 - 1])
        return READ3args.encode(READ3args(fh, _offset(rng), count))
    if proc == 7:
        data = rng.randbytes(rng.choice([0, 1, 100, 4096, 8192]))
        return WRITE3args.encode(WRITE3args(fh, _offset(rng), len(data), rng.choice([0, 1, 2]), data))
    if proc == 8:
        mode = rng.choice([createmode3.UNCHECKED, createmode3.GUARDED, createmode3.EXCLUSIVE])
        how = UnionValue(mode, rng.randbytes(8) if mode == createmode3.EXCLUSIVE else _sattr(rng))
        return where() + createhow3.encode(how)
    if proc == 9:
        return where() + sattr3.encode(_sattr(rng))
    if proc == 10:
        target = rng.choice([b"/etc/passwd", b"../../..", b"x", b"a" * 1024, rng.choice(c.names)])
        return where() + sattr3.encode(_sattr(rng)) + _opaque(target)
    if proc == 11:
        t = rng.choice(list(ftype3))
        if t in (ftype3.NF3CHR, ftype3.NF3BLK):
            body: Any = devicedata3(_sattr(rng), specdata3(rng.getrandbits(8), rng.getrandbits(8)))
        elif t in (ftype3.NF3SOCK, ftype3.NF3FIFO):
            body = _sattr(rng)
        else:
            body = None
        return where() + mknoddata3.encode(UnionValue(t, body))
    if proc in (12, 13):
        return where()
    if proc == 14:
        return where() + where()
    if proc == 15:
        return nfs_fh3.encode(fh) + where()
    if proc == 16:
        return READDIR3args.encode(READDIR3args(d, rng.choice([0, 1, 3, 2**64 - 1]), rng.randbytes(8) if rng.random() < 0.3 else bytes(8),
                                                rng.choice([0, 100, 4096, 65536, 2**32 - 1])))
    if proc == 17:
        return READDIRPLUS3args.encode(READDIRPLUS3args(d, rng.choice([0, 1, 3, 2**64 - 1]), bytes(8),
                                                        rng.choice([0, 100, 4096]), rng.choice([0, 100, 8192, 2**32 - 1])))
    if proc == 18:
        return FSSTAT3args.encode(FSSTAT3args(fh))
    if proc == 19:
        return FSINFO3args.encode(FSINFO3args(fh))
    if proc == 20:
        return PATHCONF3args.encode(PATHCONF3args(fh))
    return COMMIT3args.encode(COMMIT3args(fh, _offset(rng), rng.choice([0, 4096, 2**32 - 1])))


def mount_args(rng: random.Random, proc: int) -> bytes:
    if proc in (1, 3):  # MNT, UMNT
        return _opaque(rng.choice([f"/instantnfs/{FUZZ_SESSION}".encode(), b"/instantnfs", b"/", b"/instantnfs/../etc",
                                   b"/instantnfs/nosuch", b"x" * 1024, b"y" * 1025, rng.randbytes(20)]))
    return b""


def portmap_args(rng: random.Random, c: Corpus, vers: int, proc: int) -> bytes:
    prog = rng.choice([NFS_PROGRAM, MOUNT_PROGRAM, PMAP_PROG, 100024, 400000 + rng.randrange(1000), rng.getrandbits(32)])
    pvers = rng.choice([1, 2, 3, 4, rng.getrandbits(32)])
    port = rng.choice([0, 1, 2049, c.ports["nfs"], 65535, rng.getrandbits(32)])
    if vers == 2:
        if proc in (1, 2, 3):  # SET, UNSET, GETPORT
            return mapping.encode(mapping(prog, pvers, rng.choice([IPPROTO_TCP, IPPROTO_UDP, 0, 255]), port))
        if proc == 5:  # CALLIT
            p = Packer()
            for v in (prog, pvers, rng.randrange(30)):
                p.u32(v)
            p.opaque(rng.randbytes(rng.randrange(64)))
            return p.getvalue()
        return b""
    if proc in (1, 2, 3, 9, 11):  # SET, UNSET, GETADDR, GETVERSADDR, GETADDRLIST
        netid = rng.choice([b"tcp", b"udp", b"tcp6", b"", b"x" * 255])
        addr = rng.choice([b"", f"{c.host}.8.1".encode(), b"0.0.0.0.0.111", b"1.2.3", b"::1.2.1"])
        owner = rng.choice([b"", b"instantnfs", b"superuser", b"0"])
        return rpcb.encode(rpcb(prog, pvers, netid, addr, owner))
    if proc in (5, 10):  # CALLIT / BCAST, INDIRECT
        p = Packer()
        for v in (prog, pvers, rng.randrange(30)):
            p.u32(v)
        p.opaque(rng.randbytes(rng.randrange(64)))
        return p.getvalue()
    if proc == 7:  # UADDR2TADDR
        return _opaque(rng.choice([b"127.0.0.1.8.1", b"", b"1.2", b"a" * 255]))
    if proc == 8:  # TADDR2UADDR: netbuf
        p = Packer()
        p.u32(rng.choice([0, 16, 2**32 - 1]))
        p.opaque(rng.randbytes(rng.choice([0, 4, 16, 128])))
        return p.getvalue()
    return b""


def valid_call(rng: random.Random, c: Corpus) -> tuple[bytes, str]:
    """One valid call record (no record mark) and the port it goes to."""
    xid = rng.getrandbits(32)
    cred = auth_sys(rng.choice([0, 1000, 65534]), rng.choice([0, 100]), tuple(rng.randrange(1000) for _ in range(rng.randrange(4))))
    if rng.random() < 0.1:
        cred = (auth_flavor.AUTH_NONE, b"")
    r = rng.random()
    if r < 0.72:
        proc = rng.choice([p for p in range(22) if p not in c.skip_procs] or [0])
        return build_call(xid, NFS_PROGRAM, 3, proc, nfs_args(rng, c, proc), cred), "nfs"
    if r < 0.84:
        proc = rng.randrange(6)
        return build_call(xid, MOUNT_PROGRAM, 3, proc, mount_args(rng, proc), cred), "mount"
    vers = rng.choice([2, 3, 4])
    proc = rng.randrange(6 if vers == 2 else (9 if vers == 3 else 13))
    return build_call(xid, PMAP_PROG, vers, proc, portmap_args(rng, c, vers, proc), cred), "portmap"


# -- mutations and framing ----------------------------------------------------------------

_EDGE = [0, 1, 2, 3, 4, 0x7F, 0xFF, 0x100, 0x3FF, 0x400, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE,
         0xFFFFFFFF]


def mutate(rng: random.Random, rec: bytes) -> bytes:
    r = rng.random()
    if r < 0.22:
        return rec  # valid
    b = bytearray(rec)
    if r < 0.40:  # flip bits / bytes
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        return bytes(b)
    if r < 0.52:  # a 32-bit word to an edge value (lengths, counts, enums, flavors)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(max(1, len(b) // 4)) * 4
            b[i : i + 4] = _U32.pack(rng.choice(_EDGE))
        return bytes(b[: len(rec)]) if len(b) > len(rec) else bytes(b)
    if r < 0.62:  # truncated
        return bytes(b[: rng.randrange(len(b))])
    if r < 0.68:  # extended
        return bytes(b) + rng.randbytes(rng.choice([1, 3, 4, 100, 4000]))
    if r < 0.78:  # wrong rpcvers / prog / vers / proc / message type
        field_at = rng.choice([4, 8, 12, 16, 20])
        b[field_at : field_at + 4] = _U32.pack(rng.choice(_EDGE + [100000, 100003, 100005, 100021, 100227, rng.getrandbits(32)]))
        return bytes(b)
    if r < 0.86:  # a credential or verifier of another flavor / length
        b[24:28] = _U32.pack(rng.choice([0, 1, 2, 3, 6, 390003, 0xFFFFFFFF]))
        if rng.random() < 0.5:
            b[28:32] = _U32.pack(rng.choice([0, 4, 400, 401, 0xFFFFFFFF]))
        return bytes(b)
    if r < 0.93:  # the header of a call, then random bytes
        return bytes(b[:24]) + rng.randbytes(rng.randrange(200))
    return rng.randbytes(rng.randrange(0, 512))  # noise


def framed(rng: random.Random, rec: bytes) -> tuple[bytes, bool]:
    """Record marking for one record; True when the connection must be dropped after it
    (a record that never ends: what follows would be swallowed into it)."""
    r = rng.random()
    if r < 0.85 or not rec:
        return frame(rec), False
    if r < 0.93:  # odd fragments, sometimes empty ones between them
        out, pos = [], 0
        while pos < len(rec):
            n = rng.choice([0, 1, 3, 7, rng.randrange(1, len(rec) + 1)])
            piece = rec[pos : pos + n]
            pos += len(piece)
            last = pos >= len(rec)
            out.append(_U32.pack((0x80000000 if last else 0) | len(piece)) + piece)
        return b"".join(out), False
    if r < 0.96:  # many empty non-last fragments first
        return _U32.pack(0) * rng.randrange(1, 2000) + frame(rec), False
    if r < 0.985:  # a huge announced length, not sent
        return _U32.pack(rng.choice([0x7FFFFFFF, 0xFFFFFFFF, 0x80000000 | (64 << 20), 0x80000000 | (1 << 20) + 1])) + rec, True
    return _U32.pack(len(rec)) + rec, True  # a non-last fragment and nothing after it


# -- workers ------------------------------------------------------------------------------


class Conn:
    """One connection: ``sendall`` from the worker, replies drained by a thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.reader: threading.Thread | None = None
        self.replies = 0
        self.reconnects = -1
        self.open()

    def open(self) -> None:
        self.close()
        s = socket.create_connection((self.host, self.port), timeout=SEND_STALL)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.reconnects += 1
        self.reader = threading.Thread(target=self._drain, args=(s,), daemon=True)
        self.reader.start()

    def _drain(self, s: socket.socket) -> None:
        buf = bytearray(1 << 20)
        try:
            while True:
                n = s.recv_into(buf)
                if n <= 0:
                    return
                self.replies += 1  # reads, not replies exactly: only for the report
        except OSError:
            return

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader (close alone does not)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        if self.reader is not None:
            self.reader.join(5)
            self.reader = None


def worker(seed: int, corpus: Corpus, records: int, nconn: int, stop: Any, out: Any) -> None:
    """Send ``records`` mutated records over ``nconn`` connections per service; put a
    summary dict on ``out`` (an error of the worker itself is one too)."""
    try:
        _work(seed, corpus, records, nconn, stop, out)
    except BaseException as e:  # noqa: BLE001 - reported to the test, never lost in a child
        import traceback

        out.put({"seed": seed, "sent": 0, "bytes": 0, "reconnects": 0, "stalls": 0, "seconds": 0,
                 "errors": [f"the fuzz worker failed: {traceback.format_exc()}"]})
        raise SystemExit(1) from e


def _work(seed: int, corpus: Corpus, records: int, nconn: int, stop: Any, out: Any) -> None:
    rng = random.Random(seed)
    templates: dict[str, list[bytes]] = {"nfs": [], "mount": [], "portmap": []}
    for _ in range(3000):
        rec, svc = valid_call(rng, corpus)
        templates[svc].append(rec)
    conns = {svc: [Conn(corpus.host, corpus.ports[svc]) for _ in range(nconn if svc == "nfs" else 1)] for svc in templates}
    weights = [("nfs", 0.75), ("mount", 0.12), ("portmap", 0.13)]
    sent = nbytes = stalls = refused = 0
    errors: list[str] = []
    started = time.monotonic()
    batch = 200
    try:
        while sent < records and not stop.is_set():
            r = rng.random()
            svc = "nfs" if r < weights[0][1] else "mount" if r < weights[0][1] + weights[1][1] else "portmap"
            conn = rng.choice(conns[svc])
            parts: list[bytes] = []
            drop = False
            n = min(batch, records - sent)
            for _ in range(n):
                data, drop = framed(rng, mutate(rng, rng.choice(templates[svc])))
                parts.append(data)
                if drop:
                    break
            payload = b"".join(parts)
            try:
                assert conn.sock is not None
                conn.sock.sendall(payload)
            except TimeoutError:
                stalls += 1
                errors.append(f"{svc} connection took no bytes for {SEND_STALL} s")
                stop.set()
                break
            except OSError:
                pass  # the server closed it (allowed): open it again
            else:
                nbytes += len(payload)
            sent += len(parts)
            if drop or conn.sock is None or not conn.reader or not conn.reader.is_alive():
                try:
                    conn.open()
                except OSError as e:
                    refused += 1
                    if refused > 50:
                        errors.append(f"cannot connect to {svc}: {e}")
                        stop.set()
                        break
                    time.sleep(0.1)
    finally:
        reconnects = sum(c.reconnects for cs in conns.values() for c in cs)
        for cs in conns.values():
            for c in cs:
                c.close()
        out.put({"seed": seed, "sent": sent, "bytes": nbytes, "reconnects": reconnects, "stalls": stalls,
                 "seconds": time.monotonic() - started, "errors": errors})


# -- the hang detector ----------------------------------------------------------------------


class Monitor(threading.Thread):
    """A GETATTR of the checked disk every second on a connection of its own."""

    def __init__(self, host: str, port: int, fh: bytes, proc: Any) -> None:
        super().__init__(daemon=True, name="getattr-monitor")
        self.host, self.port, self.fh, self.proc = host, port, fh, proc
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.samples = 0
        self.worst = 0.0
        self.sock: socket.socket | None = None

    def _call(self) -> None:
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=HANG_BOUND)
        xid = random.getrandbits(32)
        self.sock.sendall(frame(build_call(xid, NFS_PROGRAM, 3, 1, GETATTR3args.encode(GETATTR3args(nfs_fh3(self.fh))), auth_sys())))
        while True:
            parts = []
            while True:
                hdr = _U32.unpack(_recv_exact(self.sock, 4))[0]
                parts.append(_recv_exact(self.sock, hdr & 0x7FFFFFFF))
                if hdr & 0x80000000:
                    break
            rep = b"".join(parts)
            if _U32.unpack_from(rep)[0] == xid:
                break
        st = parse_reply(rep).u32()
        if st != nfsstat3.NFS3_OK:
            raise RuntimeError(f"GETATTR answered {nfsstat3(st).name}")

    def run(self) -> None:
        while not self.stop.wait(1.0):
            if self.proc.poll() is not None:
                self.failures.append(f"the daemon exited with {self.proc.returncode}")
                return
            t0 = time.monotonic()
            try:
                self._call()
            except TimeoutError:
                self.failures.append(f"GETATTR on a separate connection got no answer within {HANG_BOUND} s "
                                     f"({_loop_thread_state(self.proc.pid)})")
                return
            except (OSError, RuntimeError, ConnectionError) as e:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
                self.failures.append(f"GETATTR on a separate connection failed: {e}")
                return
            self.worst = max(self.worst, time.monotonic() - t0)
            self.samples += 1
        if self.sock is not None:
            self.sock.close()


def _loop_thread_state(pid: int) -> str:
    """Where the daemon's main (event loop) thread waits, from /proc: e.g. ``wchan
    pipe_wait`` / ``fifo_open`` for an open of a FIFO that blocks the loop."""
    base = f"/proc/{pid}/task/{pid}"
    out = []
    for name in ("wchan", "syscall"):
        try:
            with open(f"{base}/{name}") as f:
                out.append(f"{name} {f.read().strip()[:60]}")
        except OSError as e:
            out.append(f"{name} unreadable ({e.strerror})")
    return "the daemon's loop thread: " + ", ".join(out)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the server closed the monitor connection")
        buf += chunk
    return bytes(buf)


# -- the campaign ----------------------------------------------------------------------------


def _getport(host: str, port: int, prog: int) -> int:
    with socket.create_connection((host, port), timeout=10) as s:
        xid = random.getrandbits(32)
        s.sendall(frame(build_call(xid, PMAP_PROG, 2, 3, mapping.encode(mapping(prog, 3, IPPROTO_TCP, 0)))))
        hdr = _U32.unpack(_recv_exact(s, 4))[0]
        return parse_reply(_recv_exact(s, hdr & 0x7FFFFFFF)).u32()


def _setup(dmn: Any, images: dict[str, Any]) -> tuple[Corpus, bytes]:
    dmn.api("POST", "/sessions", {"point": images["point"], "name": FUZZ_SESSION})
    dmn.api("POST", "/sessions", {"point": images["point"], "name": CHECK_SESSION})
    disk0 = images["disks"][0]["name"]

    async def main() -> tuple[Corpus, bytes]:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            root = await c.mount(f"/instantnfs/{FUZZ_SESSION}")
            export_root = await c.mount("/instantnfs")
            handles = [root, export_root]
            for d in images["disks"]:
                for suffix in (".img", "-flat.vmdk", ".vmdk"):
                    handles.append(await c.lookup(root, f"{d['name']}{suffix}"))
            handles.append(await c.lookup(root, f"{images['vm']}.vmx"))
            res = await c.create(root, "seed-file")
            handles.append(res.body.obj.data)
            from engine.nfs.nfs3_types import NFSPROC3, SATTR3_NONE

            mk = await c.call(NFSPROC3.MKDIR, MKDIR3args(diropargs3(nfs_fh3(root), b"seed-dir"), SATTR3_NONE))
            sub = mk.body.obj.data
            handles.append(sub)
            bad = bytearray(root)
            bad[-1] ^= 1
            handles += [bytes(bad), b"", b"\0" * 64, os.urandom(32)]
            check_root = await c.mount(f"/instantnfs/{CHECK_SESSION}")
            check_fh = await c.lookup(check_root, f"{disk0}.img")
            assert check_fh not in handles
            names = [b"a", b"b", b"seed-file", b"seed-dir", b".lck-0001", b"x.vswp", b".", b"..", b"", b"a/b",
                     b"\0", f"{disk0}.img".encode(), f"{disk0}-flat.vmdk".encode(), f"{images['vm']}.vmx".encode(),
                     b"n" * 255, b"n" * 256, b"n" * 1024, b"n" * 4096, b"\xff\xfe"]
            ports = {"portmap": dmn.status["ports"]["portmap"], "mount": dmn.mount_port, "nfs": dmn.nfs_port}
            skip = tuple(int(x) for x in os.environ.get("FUZZ_SKIP_NFS_PROCS", "").split(",") if x.strip())
            return Corpus(dmn.addr, ports, handles, [root, sub, export_root, handles[2]], names, skip), check_fh
        finally:
            await c.close()

    return run(main())


def campaign(dmn: Any, images: dict[str, Any], records: int, seed: int, procs: int = 2, nconn: int = 3) -> dict[str, Any]:
    corpus, check_fh = _setup(dmn, images)
    log_start = dmn.log.stat().st_size
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    per = records // procs
    workers = [ctx.Process(target=worker, args=(seed * 1000 + i, corpus, per + (records % procs if i == 0 else 0), nconn, stop, out),
                           daemon=True) for i in range(procs)]
    mon = Monitor(dmn.addr, dmn.nfs_port, check_fh, dmn.proc)
    started = time.monotonic()
    for w in workers:
        w.start()
    mon.start()
    results: list[dict[str, Any]] = []
    budget = 60 + records / 500  # far beyond what a working daemon needs
    try:
        while len(results) < procs:
            if mon.failures:
                stop.set()
                break
            if time.monotonic() - started > budget:
                stop.set()
                pytest.fail(f"the campaign did not end within {budget:.0f} s:\n{dmn.log.read_text(errors='replace')[-3000:]}")
            try:
                results.append(out.get(timeout=1.0))
            except queue.Empty:
                pass
    finally:
        stopped = time.monotonic()
        stop.set()
        mon.stop.set()
        mon.join(HANG_BOUND + 5)
        drain_until = time.monotonic() + SEND_STALL + 10
        while len(results) < procs and time.monotonic() < drain_until and any(w.is_alive() for w in workers):
            try:
                results.append(out.get(timeout=1.0))
            except queue.Empty:
                pass
        for w in workers:
            w.join(SEND_STALL + 10)
            if w.is_alive() and w.pid is not None:
                os.kill(w.pid, 9)
                w.join(5)
    seconds = stopped - started
    sent = sum(r["sent"] for r in results)
    stats = {"seed": seed, "records": sent, "seconds": round(seconds, 1), "records_per_s": round(sent / max(seconds, 1e-9)),
             "getattr_worst_s": round(mon.worst, 3), "getattr_samples": mon.samples,
             "reconnects": sum(r["reconnects"] for r in results)}
    print(f"fuzz: {stats}")
    tail = dmn.log.read_bytes()[log_start:].decode(errors="replace")
    assert not mon.failures, f"seed {seed}: {mon.failures[0]} after {seconds:.0f} s, {sent} records:\n{tail[-3000:]}"
    errors = [e for r in results for e in r["errors"]]
    assert not errors, f"{errors}\n{tail[-3000:]}"
    assert dmn.proc is not None and dmn.proc.poll() is None, "the daemon exited"
    assert sent >= records, f"only {sent} of {records} records were sent"
    problems: list[str] = []
    d0 = images["disks"][0]

    async def read_back() -> bytes:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            root = await c.mount(f"/instantnfs/{CHECK_SESSION}")
            return await c.read_all(await c.lookup(root, f"{d0['name']}.img"))
        finally:
            await c.close()

    if run(read_back()) != images["data"][0]:
        problems.append("the checked session's disk reads other bytes than its backup")
    # the portmapper still sends clients to the daemon (no caller may redirect or remove it)
    pm = corpus.ports["portmap"]
    got = (_getport(dmn.addr, pm, NFS_PROGRAM), _getport(dmn.addr, pm, MOUNT_PROGRAM))
    if got != (dmn.nfs_port, dmn.mount_port):
        problems.append(f"the portmapper maps NFS and MOUNT v3 to ports {got}, not the daemon's "
                        f"{(dmn.nfs_port, dmn.mount_port)}: a fuzzed SET/UNSET changed its registrations")
    tracebacks = [ln for ln in tail.splitlines() if "Traceback" in ln or "a bug" in ln]
    if tracebacks:
        problems.append(f"{len(tracebacks)} traceback lines in the daemon's log; the distinct ones:\n" + _distinct_tracebacks(tail))
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
    return stats


def _distinct_tracebacks(text: str) -> str:
    """Each distinct traceback of the log once (keyed by its last line), with its count."""
    lines = text.splitlines()
    seen: dict[str, tuple[int, str]] = {}
    i = 0
    while i < len(lines):
        if "Traceback" in lines[i]:
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j][:4].isdigit()):
                j += 1
            block = lines[max(0, i - 1) : j]
            key = block[-1] if block else lines[i]
            n, first = seen.get(key, (0, "\n".join(block)))
            seen[key] = (n + 1, first)
            i = j
        else:
            i += 1
    return "\n\n".join(f"[{n}x]\n{b}" for n, b in seen.values())[:6000]


def own_daemon(daemon_factory: Any) -> Any:
    """A daemon running its own portmapper: when another process took port 111 of the
    address in between, the daemon registers with that one instead, and the campaign must
    never send records to a server that is not the test's."""
    for _ in range(5):
        dmn = daemon_factory()
        if dmn.status["ports"]["portmap"]:
            return dmn
        dmn.stop()
    pytest.fail("no test daemon got port 111 of its address for its own portmapper (5 tries)")


def test_fuzz_fast(daemon_factory, images):
    """A fixed-seed short campaign: ~20,000 records (fast group)."""
    campaign(own_daemon(daemon_factory), images, 20_000, seed=8)


@pytest.mark.slow
def test_fuzz_slow(daemon_factory, images):
    """At least 10^6 mutated and random records over several connections."""
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(1 << 20))
    print(f"fuzz seed {seed} (FUZZ_SEED={seed} repeats this campaign)")
    campaign(own_daemon(daemon_factory), images, 1_000_000, seed=seed)


# -- minimal examples of what the campaign found on main ---------------------------------------


def test_read_at_offset_2_63_minus_1_keeps_the_daemon_up(daemon_factory, images):
    """Found by the campaign on main: READ of 1 byte at offset 2^63-1 of a published disk
    overflowed ``offset + length`` in the block map's range check and the daemon died of
    SIGSEGV. A READ past the end is 0 bytes with eof."""
    dmn = own_daemon(daemon_factory)
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "s"})

    async def main() -> list[Any]:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            root = await c.mount("/instantnfs/s")
            fh = await c.lookup(root, images["disks"][0]["name"] + ".img")
            out = []
            for off, n in ((2**63 - 1, 1), (2**63 - 4096, 4096), (2**63 - 1, 4096)):
                try:
                    out.append(await c.read(fh, off, n))
                except (ConnectionError, TimeoutError) as e:
                    out.append(f"READ of {n} at {off}: {type(e).__name__} {e}")
                    break  # the connection is gone
            return out
        finally:
            await c.close()

    got = run(main())
    assert dmn.proc is not None and dmn.proc.poll() is None, f"the daemon died ({dmn.proc and dmn.proc.returncode}): {got}"
    assert got == [(b"", True)] * 3


def test_rpcbind_dump_after_a_set_of_an_unknown_protocol(daemon_factory):
    """Found by the campaign on main: a portmap v2 SET with protocol 255 (or 0) was
    stored, and every rpcbind v3/v4 DUMP after it failed with SYSTEM_ERR and a traceback.
    Whatever SET accepts or refuses, DUMP must keep answering."""
    from tests.nfs.test_hostile import _reserved_socket

    dmn = own_daemon(daemon_factory)
    assert dmn.status["ports"]["portmap"] == 111
    # from a reserved port, as root: the caller the portmapper lets SET at all
    with _reserved_socket(dmn.addr) as s:
        s.settimeout(10)

        def call(vers: int, proc: int, args: bytes) -> bytes:
            xid = random.getrandbits(32)
            s.sendall(frame(build_call(xid, PMAP_PROG, vers, proc, args, auth_sys())))
            hdr = _U32.unpack(_recv_exact(s, 4))[0]
            return _recv_exact(s, hdr & 0x7FFFFFFF)

        for prog, prot in ((400123, 255), (400124, 0)):  # SET: refused (FALSE), rpcbind knows no such netid
            assert parse_reply(call(2, 1, mapping.encode(mapping(prog, 1, prot, 4000)))).u32() == 0
        assert parse_reply(call(2, 1, mapping.encode(mapping(400125, 1, 6, 4002)))).u32() == 1  # TCP: taken
        for vers in (3, 4):
            parse_reply(call(vers, 4, b""))  # DUMP: raises RpcError on SYSTEM_ERR
    assert "Traceback" not in dmn.log.read_text(errors="replace")
