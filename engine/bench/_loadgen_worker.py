"""The load generator's worker process: the hot loops, and nothing that builds a call.

``engine.bench.loadgen`` plans a run and forks one process per share of the connections;
each process runs ``worker_main``. A worker gets its connections' prebuilt call records
(framed ONC RPC calls with AUTH_SYS, made with ``engine.nfs.client.build_call``) and the
byte positions of the fields it patches: the xid, the offset, and for writes the stamp
at the head of the payload. It knows the reply layouts by offset only (RFC 5531 reply
header, RFC 1813 ``READ3res``/``WRITE3res``/``COMMIT3res``) and reads four fields: the
xid, the accept status, the ``nfsstat3`` and the ``count``. No dataclass, no XDR decoder,
no asyncio: a ``select.poll`` loop over non-blocking sockets, one ``recv_into`` of a
preallocated buffer per readable socket, requests appended to one send buffer per
connection. Each reply answered sends the next request, so ``depth`` calls stay in flight
on each connection (the server may answer out of order: calls are matched by xid).

The clock is ``time.monotonic_ns`` (CLOCK_MONOTONIC, the same in every process): the
caller sends one start instant ``t_go``; warmup runs to ``t_w = t_go + warmup``, the
window to ``t_end = t_w + window``. A request counts in the window when its reply
arrives inside it; its latency is reply arrival minus the instant its batch was sent.
After ``t_end`` no new request is sent and those in flight are drained (read by the
loop, not counted), so the server has seen exactly ``calls`` requests when the run ends.
UNSTABLE writes instead count until the end: the drained writes are part of what the
final COMMIT (one per connection) makes durable, and the window ends at the last COMMIT
reply. File targets do the same with ``depth`` threads per file descriptor (the GIL is
released in ``os.preadv``/``os.pwrite``/``os.fsync``).

CPU time is the process's ``getrusage`` (user + system, every thread) between the window's
ends. Anything unexpected (a closed connection, a reply for no call, a malformed reply, no
reply for ``STALL`` seconds) ends the worker with an error message to the caller, which
kills the others: the caller never waits on a worker without a timeout.
"""
from __future__ import annotations

import os
import random
import resource
import select
import socket
import struct
import threading
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from engine.nfs.nfs3_types import nfsstat3
from engine.nfs.rpc_types import accept_stat

STALL = 30.0  # seconds without any reply while calls are in flight: the server is stuck
READY_WAIT = 60.0  # seconds a ready worker waits for the start instant before giving up

_MARK = struct.Struct(">I")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HDR = struct.Struct(">III")  # xid, msg_type (1 = REPLY), reply_stat (0 = MSG_ACCEPTED)
_LAST = 0x80000000

# RFC 1813 sizes the reply parser skips: fattr3 (post_op_attr's body), wcc_attr (pre_op_attr's)
FATTR3 = 84
WCC_ATTR = 24

# reply kinds (how to find the count after the status)
K_READ, K_WRITE = 0, 1

POLLIN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


@dataclass(frozen=True)
class NfsConn:
    """One TCP connection's share of the run: where, and the prebuilt calls."""

    index: int  # the connection's number in the run (0 .. connections-1)
    host: str
    port: int
    call: bytes  # framed READ or WRITE call record, xid and offset to patch
    off_pos: int  # where the u64 offset is in ``call``
    stamp_pos: int  # writes: where the payload starts (the offset is stamped there); 0 = none
    commit: bytes  # framed COMMIT call record (UNSTABLE writes), xid to patch
    base: int  # first byte of the span
    slots: int  # number of request positions in the span
    align: int  # distance between positions
    seed: int
    xid0: int  # the first xid: connections of a run draw from disjoint ranges (the server's
    # duplicate request cache keys on the client's address and xid, not its port)


@dataclass(frozen=True)
class FileConn:
    """One file descriptor's share of the run (a local file, or a FUSE mount)."""

    index: int
    path: str
    payload: bytes  # writes: the pattern written (the offset is stamped at its head)
    base: int
    slots: int
    align: int
    seed: int


@dataclass(frozen=True)
class WorkerPlan:
    op: str  # "read" | "write"
    size: int
    depth: int
    stable: str  # "file_sync" | "unstable"
    warmup_ns: int
    window_ns: int
    conns: tuple[Any, ...]  # NfsConn | FileConn, all of one kind


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sleep_until(t_ns: int) -> None:
    while True:
        left = t_ns - time.monotonic_ns()
        if left <= 0:
            return
        time.sleep(left / 1e9)


class _Result:
    """What a worker counts; sent back to the caller as a plain dict."""

    def __init__(self) -> None:
        self.ops = 0
        self.bytes = 0
        self.errors = 0
        self.statuses: dict[str, int] = {}
        self.calls = 0
        self.warmup_ops = 0
        self.lat = array("q")
        self.start_ns = 0
        self.end_ns = 0
        self.cpu = 0.0
        self.cpu_wall = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        self.statuses[what] = self.statuses.get(what, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": self.ops, "bytes": self.bytes, "errors": self.errors, "statuses": self.statuses,
            "calls": self.calls, "warmup_ops": self.warmup_ops, "lat_ns": self.lat,
            "start_ns": self.start_ns, "end_ns": self.end_ns, "cpu_seconds": self.cpu, "cpu_wall": self.cpu_wall,
        }


# -- NFS over raw ONC RPC ---------------------------------------------------------------------------


class _Sock:
    """One connection's state: its socket, the call template, calls in flight, buffers."""

    __slots__ = ("plan", "sock", "fd", "tmpl", "xid", "inflight", "buf", "view", "end", "out", "polling_out",
                 "rand", "commit_xid")

    def __init__(self, plan: NfsConn, size: int) -> None:
        self.plan = plan
        try:
            self.sock = socket.create_connection((plan.host, plan.port), timeout=10)
        except OSError as e:
            raise RuntimeError(f"connection {plan.index}: cannot connect to {plan.host}:{plan.port}: {e}") from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.tmpl = bytearray(plan.call)
        self.xid = plan.xid0
        self.inflight: dict[int, int] = {}
        self.buf = bytearray(max(1 << 20, 4 * (size + 4096)))
        self.view = memoryview(self.buf)
        self.end = 0
        self.out = bytearray()
        self.polling_out = False
        self.rand = random.Random(plan.seed).random
        self.commit_xid = -1

    def grow(self, need: int) -> None:
        self.view.release()
        self.buf.extend(bytes(need - len(self.buf)))
        self.view = memoryview(self.buf)


def _nfs_run(plan: WorkerPlan, socks: list[_Sock], t_go: int, res: _Result) -> None:
    reading = plan.op == "read"
    unstable = plan.op == "write" and plan.stable == "unstable"
    kind = K_READ if reading else K_WRITE
    t_w = t_go + plan.warmup_ns
    t_end = t_w + plan.window_ns
    count_until = 1 << 62 if unstable else t_end
    depth = plan.depth
    byfd = {s.fd: s for s in socks}
    poller = select.poll()
    for s in socks:
        poller.register(s.fd, POLLIN)
    lat_append = res.lat.append
    u32_from, u32_into, u64_into = _U32.unpack_from, _U32.pack_into, _U64.pack_into
    hdr_from = _HDR.unpack_from
    ops = nbytes = warm = 0

    def flush(s: _Sock) -> None:
        out = s.out
        try:
            n = s.sock.send(out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            raise RuntimeError(f"connection {s.plan.index} to {s.plan.host}:{s.plan.port}: send failed: {e}") from e
        if n:
            del out[:n]
        if out and not s.polling_out:
            poller.modify(s.fd, POLLIN | select.POLLOUT)
            s.polling_out = True
        elif not out and s.polling_out:
            poller.modify(s.fd, POLLIN)
            s.polling_out = False

    def issue(s: _Sock, k: int, now: int) -> None:
        p = s.plan
        tmpl, out, inflight, rand = s.tmpl, s.out, s.inflight, s.rand
        base, slots, align, off_pos, stamp_pos = p.base, p.slots, p.align, p.off_pos, p.stamp_pos
        x = s.xid
        for _ in range(k):
            x = (x + 1) & 0xFFFFFFFF
            off = base + int(rand() * slots) * align
            u32_into(tmpl, 4, x)
            u64_into(tmpl, off_pos, off)
            if stamp_pos:
                u64_into(tmpl, stamp_pos, off)
            out += tmpl
            inflight[x] = now
        s.xid = x
        res.calls += k
        flush(s)

    def send_commit(s: _Sock, now: int) -> None:
        x = (s.xid + 1) & 0xFFFFFFFF
        s.xid = x
        rec = bytearray(s.plan.commit)
        u32_into(rec, 4, x)
        s.out += rec
        s.inflight[x] = now
        s.commit_xid = x
        flush(s)

    _sleep_until(t_go)
    now = time.monotonic_ns()
    for s in socks:
        issue(s, depth, now)
    measuring, issuing = False, True
    cpu0 = 0.0
    last_reply = now
    while True:
        now = time.monotonic_ns()
        if not measuring and now >= t_w:
            measuring = True
            cpu0 = _cpu()
            res.start_ns = now
        if issuing and now >= t_end:
            issuing = False
            if not unstable:
                res.cpu, res.cpu_wall, res.end_ns = _cpu() - cpu0, (now - res.start_ns) / 1e9, now
            if unstable:
                for s in socks:
                    if not s.inflight and s.commit_xid < 0:
                        send_commit(s, now)
        pending = 0
        for s in socks:
            pending += len(s.inflight)
        if not issuing and not pending:
            break
        if not measuring:
            timeout = (t_w - now) // 1_000_000 + 1
        elif issuing:
            timeout = (t_end - now) // 1_000_000 + 1
        else:
            timeout = 1000
        events = poller.poll(min(timeout, 1000))
        now = time.monotonic_ns()
        if not events:
            if now - last_reply > STALL * 1e9:
                s0 = socks[0].plan
                raise RuntimeError(f"no reply from {s0.host}:{s0.port} for {STALL:.0f} s with {pending} calls in flight")
            continue
        for fd, ev in events:
            s = byfd[fd]
            if ev & select.POLLOUT:
                flush(s)
            if not ev & POLLIN:
                continue
            try:
                n = s.sock.recv_into(s.view[s.end:])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                raise RuntimeError(f"connection {s.plan.index} to {s.plan.host}:{s.plan.port}: {e}") from e
            if n == 0:
                raise RuntimeError(f"connection {s.plan.index}: {s.plan.host}:{s.plan.port} closed the connection "
                                   f"with {len(s.inflight)} calls in flight")
            last_reply = now
            buf, inflight = s.buf, s.inflight
            end = s.end + n
            pos = 0
            done = 0
            in_window = t_w <= now < count_until
            while end - pos >= 4:
                mark = u32_from(buf, pos)[0]
                flen = mark & 0x7FFFFFFF
                nxt = pos + 4 + flen
                if nxt > end:
                    if 4 + flen > len(buf):
                        s.end = end
                        s.grow(max(2 * len(buf), 4 + flen + (end - pos)))
                        buf = s.buf
                    break
                data: bytes | bytearray
                if mark & _LAST:
                    data, r, rend = buf, pos + 4, nxt
                else:
                    got = _gather(buf, pos, end)
                    if got is None:
                        break
                    data, nxt = got
                    r, rend = 0, len(data)
                pos = nxt
                if rend - r < 24:
                    raise RuntimeError(f"connection {s.plan.index}: a {rend - r}-byte reply is too short for an RPC reply")
                xid, mtype, rstat = hdr_from(data, r)
                t0 = inflight.pop(xid, None)
                if t0 is None or mtype != 1:
                    raise RuntimeError(f"connection {s.plan.index}: a reply (type {mtype}) for xid {xid:#x}, "
                                       "which is no call in flight")
                if xid == s.commit_xid:
                    if rstat != 0:
                        res.error("COMMIT: call denied")
                    else:
                        q = r + 24 + ((u32_from(data, r + 16)[0] + 3) & ~3)
                        astat = u32_from(data, q - 4)[0] if q <= rend else -1
                        st = u32_from(data, q)[0] if q + 4 <= rend else -1
                        if astat != 0:
                            res.error(f"COMMIT: {_accept_name(astat)}")
                        elif st != 0:
                            res.error(f"COMMIT: {_status_name(st)}")
                    res.cpu, res.cpu_wall, res.end_ns = _cpu() - cpu0, (now - res.start_ns) / 1e9, now
                    continue
                done += 1
                if rstat != 0:
                    res.error("call denied")
                    continue
                q = r + 24 + ((u32_from(data, r + 16)[0] + 3) & ~3)  # past the verifier, at the nfsstat3
                if q > rend:
                    raise RuntimeError(f"connection {s.plan.index}: a malformed reply (verifier past its end)")
                astat = u32_from(data, q - 4)[0]
                if astat != 0:
                    res.error(_accept_name(astat))
                    continue
                if q + 4 > rend:
                    raise RuntimeError(f"connection {s.plan.index}: a malformed reply (no nfsstat3)")
                st = u32_from(data, q)[0]
                if st != 0:
                    res.error(_status_name(st))
                    continue
                if kind == K_READ:
                    q += 4 + (FATTR3 if u32_from(data, q + 4)[0] else 0) + 4
                else:
                    q += 4 + (WCC_ATTR if u32_from(data, q + 4)[0] else 0) + 4
                    q += FATTR3 if u32_from(data, q)[0] else 0
                    q += 4
                if q + 4 > rend:
                    raise RuntimeError(f"connection {s.plan.index}: a malformed reply (count past its end)")
                if in_window:
                    ops += 1
                    nbytes += u32_from(data, q)[0]
                    lat_append(now - t0)
                elif now < t_w:
                    warm += 1
            rest = end - pos
            if pos and rest:
                buf[:rest] = buf[pos:end]
            s.end = rest
            if rest == len(buf):  # a record of many fragments fills the buffer: make room
                s.grow(2 * len(buf))
            if issuing and done:
                issue(s, done, now)
            elif unstable and not issuing and not inflight and s.commit_xid < 0:
                send_commit(s, now)
    res.ops, res.bytes, res.warmup_ops = ops, nbytes, warm


def _status_name(st: int) -> str:
    try:
        return nfsstat3(st).name
    except ValueError:
        return f"nfsstat3 {st}"


def _accept_name(astat: int) -> str:
    try:
        return f"RPC {accept_stat(astat).name}"
    except ValueError:
        return f"RPC accept_stat {astat}"


def _gather(buf: bytearray, pos: int, end: int) -> tuple[bytes, int] | None:
    """A record of several fragments starting at ``pos``: (record, position after it), or
    None when its last fragment is not all in ``buf[:end]`` yet."""
    parts = []
    while end - pos >= 4:
        mark = _MARK.unpack_from(buf, pos)[0]
        nxt = pos + 4 + (mark & 0x7FFFFFFF)
        if nxt > end:
            return None
        parts.append(bytes(buf[pos + 4:nxt]))
        pos = nxt
        if mark & _LAST:
            return b"".join(parts), pos
    return None


def _nfs_worker(pipe: Connection, plan: WorkerPlan) -> None:
    socks: list[_Sock] = []
    try:
        for c in plan.conns:
            socks.append(_Sock(c, plan.size))
    except RuntimeError as e:
        pipe.send(("error", str(e)))
        return
    t_go = _wait_go(pipe)
    if t_go is None:
        return
    res = _Result()
    try:
        _nfs_run(plan, socks, t_go, res)
    finally:
        for s in socks:
            s.sock.close()
    pipe.send(("done", res.to_dict()))


# -- local files ------------------------------------------------------------------------------------


def _file_thread(plan: WorkerPlan, c: FileConn, fd: int, seed: int, t_go: int, res: _Result) -> None:
    reading = plan.op == "read"
    sync = plan.op == "write" and plan.stable == "file_sync"
    t_w = t_go + plan.warmup_ns
    t_end = t_w + plan.window_ns
    count_until = t_end if reading or sync else 1 << 62
    rand = random.Random(seed).random
    base, slots, align = c.base, c.slots, c.align
    buf = bytearray(plan.size) if reading else bytearray(c.payload)
    bufs = [buf]
    lat_append = res.lat.append
    ops = nbytes = warm = calls = 0
    _sleep_until(t_go)
    while True:
        t0 = time.monotonic_ns()
        if t0 >= t_end:
            break
        off = base + int(rand() * slots) * align
        calls += 1
        try:
            if reading:
                n = os.preadv(fd, bufs, off)
            else:
                _U64.pack_into(buf, 0, off)
                n = os.pwrite(fd, buf, off)
                if sync:
                    os.fsync(fd)
        except OSError as e:
            res.error(e.strerror or str(e))
            continue
        t1 = time.monotonic_ns()
        if t_w <= t1 < count_until:
            ops += 1
            nbytes += n
            lat_append(t1 - t0)
        elif t1 < t_w:
            warm += 1
    res.ops, res.bytes, res.warmup_ops, res.calls = ops, nbytes, warm, calls


def _file_worker(pipe: Connection, plan: WorkerPlan) -> None:
    fds: list[tuple[FileConn, int]] = []
    flags = os.O_RDONLY if plan.op == "read" else os.O_RDWR
    try:
        for c in plan.conns:
            fds.append((c, os.open(c.path, flags)))
    except OSError as e:
        pipe.send(("error", f"cannot open {e.filename} for {plan.op}: {e.strerror}"))
        return
    t_go = _wait_go(pipe)
    if t_go is None:
        return
    t_w = t_go + plan.warmup_ns
    t_end = t_w + plan.window_ns
    parts: list[_Result] = []
    threads = []
    for c, fd in fds:
        for j in range(plan.depth):
            r = _Result()
            parts.append(r)
            th = threading.Thread(target=_file_thread, args=(plan, c, fd, c.seed * 1009 + j, t_go, r), daemon=True)
            threads.append(th)
            th.start()
    res = _Result()
    _sleep_until(t_w)
    cpu0, res.start_ns = _cpu(), time.monotonic_ns()
    _sleep_until(t_end)
    unstable = plan.op == "write" and plan.stable == "unstable"
    if not unstable:
        now = time.monotonic_ns()
        res.cpu, res.cpu_wall, res.end_ns = _cpu() - cpu0, (now - res.start_ns) / 1e9, now
    deadline = time.monotonic() + STALL
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
        if th.is_alive():
            pipe.send(("error", f"a {plan.op} of {plan.size} bytes on {fds[0][0].path} did not return within {STALL:.0f} s"))
            return
    if unstable:
        for _c, fd in fds:
            try:
                os.fsync(fd)
            except OSError as e:
                res.error(f"fsync: {e.strerror}")
        now = time.monotonic_ns()
        res.cpu, res.cpu_wall, res.end_ns = _cpu() - cpu0, (now - res.start_ns) / 1e9, now
    for _c, fd in fds:
        os.close(fd)
    for r in parts:
        res.ops += r.ops
        res.bytes += r.bytes
        res.calls += r.calls
        res.warmup_ops += r.warmup_ops
        res.errors += r.errors
        res.lat.extend(r.lat)
        for k, v in r.statuses.items():
            res.statuses[k] = res.statuses.get(k, 0) + v
    pipe.send(("done", res.to_dict()))


# -- the process ---------------------------------------------------------------------------------


def _wait_go(pipe: Connection) -> int | None:
    """Say ready; the start instant the caller sends back, or None (stop, or no answer)."""
    pipe.send(("ready", None))
    if not pipe.poll(READY_WAIT):
        return None
    msg = pipe.recv()
    return int(msg[1]) if msg[0] == "go" else None


def worker_main(pipe: Connection, plan: WorkerPlan) -> None:
    """A worker process's entry point: connect, say ready, run from the start instant, report."""
    try:
        if isinstance(plan.conns[0], NfsConn):
            _nfs_worker(pipe, plan)
        else:
            _file_worker(pipe, plan)
    except Exception as e:  # noqa: BLE001 - any failure goes back to the caller as a message
        try:
            pipe.send(("error", f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)))
        except OSError:
            pass
    finally:
        pipe.close()
