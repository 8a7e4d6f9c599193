"""ONC RPC v2 (RFC 5531): the dispatcher, its duplicate request cache and the flags.

The dispatcher (``RpcServer.handle``) is the only code that maps failures to the wire:
a call for a program it does not serve gets PROG_UNAVAIL, an unserved version
PROG_MISMATCH (lowest, highest), an unknown procedure PROC_UNAVAIL, undecodable
arguments GARBAGE_ARGS, an RPC version other than 2 a denied RPC_MISMATCH (2, 2), an
unsupported or malformed credential a denied AUTH_ERROR. A handler raising
``ProcError`` (or an error its program maps to a status) gets the status and the
procedure's mandatory failure body; anything else is a bug: logged with its traceback
and answered SYSTEM_ERR.

Each procedure declares flags and this dispatcher applies them, once, for every program:
``NEEDS_AUTH``: a client outside the allowed list is refused (AUTH_ERROR / AUTH_TOOWEAK
before its arguments are decoded, or, for a program with ``refuse_client``, that status
and the failure body: MOUNT's MNT3ERR_ACCES); ``MAKES_WRITE``: a program with
``refuse_write`` (a read-only NFS export) answers that status without running the
handler; ``CAN_BE_DUP``: the call goes through the duplicate request cache, so a
retransmission (same client address, xid, program, version, procedure and argument
bytes) gets the original reply, or nothing while the original is running; ``MAKES_IO``:
counted in ``io_calls``. Programs only declare; none checks a flag itself.

Statistics are plain integers bumped where the call is handled, by both lanes:
``calls``, ``io_calls``, ``Program.stats`` (calls per procedure name) and ``latency``:
per (prog, vers, proc) a list of ``LAT_SLOTS`` integers, log2 buckets of the time from
a record's dispatch to its reply. The path that counts a call (this dispatcher or the
fast lane) names that list in ``RpcServer.timed``; the transport, which alone sees the
reply leave, times the call into it (``engine.nfs.transport.observe``), so exactly the
calls counted are timed. Slot ``i < LAT_BUCKETS`` counts the calls that took under
2**i microseconds and at least half that, slot ``LAT_BUCKETS`` the slower ones, the
last slot the sum of their nanoseconds. The lists are made when a program is added, one
per procedure it declares, so a client calling made-up procedures adds nothing; the
control API turns them into histograms only when scraped (``engine.control.metrics``).

A program may add a fast lane (``RpcServer.fast``, see ``engine.nfs.fastlane``): it sees
each record first and answers the calls it is sure of exactly as this dispatcher would,
or hands the record back (``NOT_MINE``) before it has had any effect.

What runs where (threads, processes, cores)
-------------------------------------------

One process, one event loop thread (uvloop), and pools:

- the loop thread: accept, record marking, the fast lane and this dispatcher, every
  reply's encoding and its ``writev``; attribute and namespace work; reads of cached or
  zero data (views of the decompression cache go to the socket uncopied); UNSTABLE
  writes of up to 64 KiB that need no copy on write (one ``pwrite`` into the page cache,
  cheaper than a thread hand-off). It never waits for a disk read, an fsync, a
  fallocate or a directory walk: those run in the pools below.
- ``chunk`` pool (``engine.stack``): pack reads, CRC32C and LZ4 decompression with the
  GIL released, readahead hints. One decompression cache for the whole daemon, shared
  by every session of every point (sandboxes of one backup share their chunks).
- ``wc-io`` (write-cache writes with copy on write, dirty reads, client files),
  ``wc-sync`` (COMMIT and FILE_SYNC fsyncs) and ``ds-admin`` (publish, unpublish) in
  ``engine.datastore.sessions``: no task ever waits for work queued behind it in its
  own pool.

Metadata never waits behind bulk data: a connection's turn on the loop ends once it has
produced 1 MiB of replies (``engine.nfs.transport``), so a GETATTR on another
connection waits for at most one turn, and reply bytes queued per connection are capped.

Why not a second loop or worker processes on two cores: the work on the loop thread
is Python (it holds the GIL), so a second loop thread in this process would take turns
with the first rather than run beside it, and the C work that can run beside it
(decompression, CRC, the kernel's share of send and receive) already does, in the
pools. The hypervisor on the same host (as in the benchmark) takes the second core;
with both cores busy, a second process only adds context switches.

How it scales on a 16- or 64-core server: worker processes, each with its own loop and
fast lane, listening on the NFS port with ``SO_REUSEPORT`` so the kernel spreads
connections (each ESXi host mounts over its own connections), and a session's write
cache owned by one worker (calls for a session another worker owns are forwarded over a
local socket, or its hosts are steered with a per-session export port). The
decompression cache moves into shared memory (a memfd arena of block-sized slots, an
index of chunk key to slot with a generation per slot, checked before a slot is reused),
so that it stays one cache for every session of a point, whichever worker serves it.
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.nfs.rpc_types import (
    RPC_VERSION,
    accept_stat,
    auth_flavor,
    auth_stat,
    authsys_parms,
    msg_type,
    reject_stat,
    reply_stat,
)
from engine.nfs.xdr import Packer, Unpacker, XDRError

log = logging.getLogger("instantnfs.rpc")

MAKES_WRITE = 1  # changes state: refused on a read-only object / export
CAN_BE_DUP = 2  # not idempotent: goes through the duplicate request cache
MAKES_IO = 4  # moves file data: counted in the I/O statistics
NEEDS_AUTH = 8  # refused to clients outside the allowed list

LAT_BUCKETS = 26  # finite latency buckets: under 1 us, 2 us, 4 us ... 2**25 us (33.5 s)
LAT_SLOTS = LAT_BUCKETS + 2  # ... then the slower calls, then the sum of nanoseconds

_U32 = struct.Struct(">I")
_ACCEPT_HEAD = struct.Struct(">IIIIII")  # xid, REPLY, MSG_ACCEPTED, verf flavor, verf len, accept_stat
_CALL_HEAD = struct.Struct(">8I")  # xid, CALL, rpcvers, prog, vers, proc, cred flavor, cred length


NOT_MINE = object()  # a fast lane's answer: "not a call I answer; take the generic path"


class ProcError(Exception):
    """A procedure failed with a protocol status (an nfsstat3 / mountstat3 value)."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or str(status))
        self.status = status


class RpcDenied(Exception):
    """The call is rejected as a whole (AUTH_ERROR with this auth_stat)."""

    def __init__(self, why: auth_stat) -> None:
        super().__init__(why.name)
        self.why = why


@dataclass(frozen=True, slots=True)
class Cred:
    flavor: int
    uid: int = 65534
    gid: int = 65534
    gids: tuple[int, ...] = ()
    machinename: bytes = b""


@dataclass(slots=True)
class CallContext:
    """What a handler may know about the call beyond its arguments."""

    xid: int
    prog: int
    vers: int
    proc: int
    cred: Cred
    client: str  # client IP address
    port: int
    allowed: bool  # client address is in the allowed list
    local: str = ""  # the server address the call arrived on


@dataclass(frozen=True, slots=True)
class Proc:
    """One procedure: decode args, the handler, encode success / failure bodies, flags."""

    name: str
    decode: Callable[[Unpacker], Any]
    handler: Callable[[Any, CallContext], Any]
    encode_ok: Callable[[Packer, Any], None]
    encode_fail: Callable[[Packer, Any, CallContext], None] | None = None
    flags: int = 0


@dataclass
class Program:
    """One RPC program: its procedures per version and how the dispatcher applies the flags.

    ``refuse_client``: the status a ``NEEDS_AUTH`` procedure answers a client outside the
    allowed list with (MOUNT: MNT3ERR_ACCES); None (NFS) rejects the call as a whole,
    AUTH_ERROR / AUTH_TOOWEAK. ``refuse_write``: the status a ``MAKES_WRITE`` procedure
    answers when the program serves read-only (NFS3ERR_ROFS); None: it runs."""

    prog: int
    name: str
    versions: dict[int, dict[int, Proc]]
    map_error: Callable[[BaseException], int | None] = lambda e: None
    refuse_client: int | None = None
    refuse_write: int | None = None
    stats: dict[str, int] = field(default_factory=dict)


def client_ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The caller's address as the transport names it, an IPv4-mapped IPv6 address as
    its IPv4 address; None when it is no IP address ("unix": our AF_UNIX socket)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local(addr: str) -> bool:
    """A caller on this host: a loopback address, or a process on our AF_UNIX socket."""
    if addr == "unix":
        return True
    ip = client_ip(addr)
    return ip is not None and ip.is_loopback


class AllowList:
    """Client addresses allowed to mount and use the export (CIDR networks)."""

    def __init__(self, nets: list[str]) -> None:
        self.nets = [ipaddress.ip_network(n, strict=False) for n in nets]
        self._seen: dict[str, bool] = {}

    def __contains__(self, addr: str) -> bool:
        v = self._seen.get(addr)
        if v is None:
            if len(self._seen) > 4096:
                self._seen.clear()
            v = self._seen[addr] = self._check(addr)
        return v

    def _check(self, addr: str) -> bool:
        ip = client_ip(addr)
        return ip is not None and any(ip in n for n in self.nets)


# -- reply encoders (also used by golden tests) ----------------------------------------


def accepted_head(xid: int, stat: accept_stat) -> bytes:
    return _ACCEPT_HEAD.pack(xid, msg_type.REPLY, reply_stat.MSG_ACCEPTED, auth_flavor.AUTH_NONE, 0, stat)


def reply_prog_mismatch(xid: int, low: int, high: int) -> bytes:
    return accepted_head(xid, accept_stat.PROG_MISMATCH) + struct.pack(">II", low, high)


def reply_rpc_mismatch(xid: int) -> bytes:
    return struct.pack(">IIIIII", xid, msg_type.REPLY, reply_stat.MSG_DENIED, reject_stat.RPC_MISMATCH, RPC_VERSION, RPC_VERSION)


def reply_auth_error(xid: int, why: auth_stat) -> bytes:
    return struct.pack(">IIIII", xid, msg_type.REPLY, reply_stat.MSG_DENIED, reject_stat.AUTH_ERROR, why)


def parse_cred(flavor: int, body: bytes) -> Cred:
    if flavor == auth_flavor.AUTH_NONE:
        return Cred(flavor)
    if flavor == auth_flavor.AUTH_SYS:
        try:
            a = authsys_parms.decode(body)
        except XDRError:
            raise RpcDenied(auth_stat.AUTH_BADCRED) from None
        return Cred(flavor, a.uid, a.gid, tuple(a.gids), a.machinename)
    raise RpcDenied(auth_stat.AUTH_BADCRED)


class DuplicateRequestCache:
    """Replies of non-idempotent calls, by (client, xid, prog, vers, proc, args crc)."""

    IN_PROGRESS = object()

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._d: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = 0

    def get(self, key: tuple) -> Any:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
            self.hits += 1
        return v

    def put(self, key: tuple, value: Any) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def drop(self, key: tuple) -> None:
        self._d.pop(key, None)


class RpcServer:
    """The dispatcher shared by all transports of one daemon."""

    def __init__(self, allow: AllowList | None = None) -> None:
        self.programs: dict[int, Program] = {}
        self.drc = DuplicateRequestCache()
        self.allow = allow or AllowList(["0.0.0.0/0", "::/0"])
        self.calls = 0
        self.creds: dict[tuple[int, bytes], Cred] = {}  # credentials parsed and accepted
        self.io_calls = 0  # calls of MAKES_IO procedures (READ, WRITE)
        # (prog, vers, proc) -> log2 latency buckets (see the design note); keys fixed by add()
        self.latency: dict[tuple[int, int, int], list[int]] = {}
        self.timed: list[int] | None = None  # the buckets of the call being dispatched, once counted
        # (record, client, local) -> a reply, an awaitable of one, or NOT_MINE: the calls
        # a program answers without the generic path (engine.nfs.fastlane)
        self.fast: Callable[[Any, tuple[str, int], str], Any] | None = None

    @staticmethod
    def _parse_head(record: Any) -> tuple | None:
        """The call header of a well-formed CALL in a few struct reads; None: take the slow path."""
        n = len(record)
        if n < 40:
            return None
        xid, mtype, rpcvers, prog, vers, procnum, cflavor, clen = _CALL_HEAD.unpack_from(record)
        if mtype != msg_type.CALL or rpcvers != RPC_VERSION or clen > 400:
            return None
        p = 32 + clen + (-clen & 3)
        if p + 8 > n:
            return None
        vlen = _U32.unpack_from(record, p + 4)[0]
        if vlen > 400:
            return None
        q = p + 8 + vlen + (-vlen & 3)
        if q > n:
            return None
        return xid, prog, vers, procnum, cflavor, bytes(record[32 : 32 + clen]), Unpacker(record, q)

    def add(self, program: Program) -> None:
        self.programs[program.prog] = program
        for vers, procs in program.versions.items():
            for procnum in procs:
                self.latency[(program.prog, vers, procnum)] = [0] * LAT_SLOTS

    async def handle(self, record: memoryview | bytes, client: tuple[str, int], local: str = "") -> list[Any] | None:
        """One call record in, the reply as a list of buffers out (None: send nothing)."""
        r = self.handle_start(record, client, local)
        if inspect.isawaitable(r):
            return await r
        return r

    def handle_start(self, record: memoryview | bytes, client: tuple[str, int], local: str = "") -> Any:
        """Decode and dispatch; returns the reply, or an awaitable for it. ``record`` may
        be a view of the transport's buffer, valid only during this call."""
        if self.fast is not None:
            r = self.fast(record, client, local)
            if r is not NOT_MINE:
                return r
        return self.generic(record, client, local)

    def generic(self, record: memoryview | bytes, client: tuple[str, int], local: str = "") -> Any:
        """``handle_start`` without the fast lane: the generic path, for every program."""
        if isinstance(record, memoryview):
            record = bytes(record)  # the generic path's decoders keep views of it
        fast = self._parse_head(record)
        if fast is not None:
            xid, prog, vers, procnum, cflavor, cbody, u = fast
        else:
            u = Unpacker(record)
            try:
                xid = u.u32()
                mtype = u.u32()
            except XDRError:
                return None  # not even an xid: nothing we could answer to
            if mtype != msg_type.CALL:
                return None
            try:
                rpcvers = u.u32()
                if rpcvers != RPC_VERSION:
                    return [reply_rpc_mismatch(xid)]
                prog, vers, procnum = u.u32(), u.u32(), u.u32()
                cflavor = u.u32()
                cbody = u.opaque(400)
                u.u32()  # verifier flavor: we only issue AUTH_NONE verifiers and check none
                u.opaque(400)
            except XDRError:
                return [reply_auth_error(xid, auth_stat.AUTH_BADCRED)] if u.pos > 16 else None
        self.calls += 1
        ckey = (cflavor, cbody)
        cred = self.creds.get(ckey)
        if cred is None:
            try:
                cred = parse_cred(cflavor, cbody)
            except RpcDenied as e:
                return [reply_auth_error(xid, e.why)]
            if len(self.creds) > 1024:
                self.creds.clear()
            self.creds[ckey] = cred
        program = self.programs.get(prog)
        if program is None:
            return [accepted_head(xid, accept_stat.PROG_UNAVAIL)]
        procs = program.versions.get(vers)
        if procs is None:
            vs = sorted(program.versions)
            return [reply_prog_mismatch(xid, vs[0], vs[-1])]
        proc = procs.get(procnum)
        if proc is None:
            return [accepted_head(xid, accept_stat.PROC_UNAVAIL)]
        host, port = client[0], client[1]
        ctx = CallContext(xid, prog, vers, procnum, cred, host, port, host in self.allow, local)
        refused = proc.flags & NEEDS_AUTH and not ctx.allowed
        if refused and program.refuse_client is None:
            return [reply_auth_error(xid, auth_stat.AUTH_TOOWEAK)]
        try:
            args = proc.decode(u)
        except (XDRError, ValueError):
            return [accepted_head(xid, accept_stat.GARBAGE_ARGS)]
        key = None
        if proc.flags & CAN_BE_DUP:
            key = (host, xid, prog, vers, procnum, zlib.crc32(u.data))
            prev = self.drc.get(key)
            if prev is DuplicateRequestCache.IN_PROGRESS:
                return None
            if prev is not None:
                return [prev]
            self.drc.put(key, DuplicateRequestCache.IN_PROGRESS)
        program.stats[proc.name] = program.stats.get(proc.name, 0) + 1
        self.timed = self.latency.get((prog, vers, procnum))
        if proc.flags & MAKES_IO:
            self.io_calls += 1
        if refused and program.refuse_client is not None:  # a program that answers them with a status (MOUNT)
            log.warning("%s %s from %s refused: not an allowed client", program.name, proc.name, host)
            return self.finish_error(program, proc, args, ctx, ProcError(program.refuse_client), key)
        if proc.flags & MAKES_WRITE and program.refuse_write is not None:
            return self.finish_error(program, proc, args, ctx, ProcError(program.refuse_write), key)
        try:
            res = proc.handler(args, ctx)
        except BaseException as e:  # noqa: BLE001 - mapped below, bugs logged
            return self.finish_error(program, proc, args, ctx, e, key)
        if inspect.isawaitable(res):
            return self._finish_async(program, proc, args, ctx, key, res)
        return self._finish_ok(proc, ctx, key, res)

    async def _finish_async(self, program: Program, proc: Proc, args: Any, ctx: CallContext, key: tuple | None, aw: Any) -> list[Any] | None:
        try:
            res = await aw
        except (asyncio.CancelledError, GeneratorExit):
            # the request was cancelled, or its connection closed (the transport closes
            # the coroutine): no reply, and a retransmission runs it again
            if key is not None:
                self.drc.drop(key)
            raise
        except BaseException as e:  # noqa: BLE001
            return self.finish_error(program, proc, args, ctx, e, key)
        return self._finish_ok(proc, ctx, key, res)

    def _finish_ok(self, proc: Proc, ctx: CallContext, key: tuple | None, res: Any) -> list[Any]:
        p = Packer()
        p.buf += accepted_head(ctx.xid, accept_stat.SUCCESS)
        if proc.encode_fail is not None:
            p.u32(0)  # status OK
        proc.encode_ok(p, res)
        return self._done(p, key)

    def finish_error(self, program: Program, proc: Proc, args: Any, ctx: CallContext, e: BaseException, key: tuple | None = None) -> list[Any]:
        status = e.status if isinstance(e, ProcError) else program.map_error(e)
        if status is None or proc.encode_fail is None:
            log.error("%s %s failed (xid %#x): a bug, answered SYSTEM_ERR", program.name, proc.name, ctx.xid, exc_info=e)
            if key is not None:
                self.drc.drop(key)
            return [accepted_head(ctx.xid, accept_stat.SYSTEM_ERR)]
        p = Packer()
        p.buf += accepted_head(ctx.xid, accept_stat.SUCCESS)
        p.u32(int(status))
        try:
            proc.encode_fail(p, args, ctx)
        except Exception:  # noqa: BLE001 - a failure body is best effort, never a second error
            log.exception("%s %s: failure body", program.name, proc.name)
            p = Packer()
            p.buf += accepted_head(ctx.xid, accept_stat.SYSTEM_ERR)
        return self._done(p, key)

    def _done(self, p: Packer, key: tuple | None) -> list[Any]:
        bufs = p.buffers()
        if key is not None:
            self.drc.put(key, b"".join(bytes(b) for b in bufs))
        return bufs
