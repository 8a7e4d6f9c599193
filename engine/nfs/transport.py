"""ONC RPC transports: TCP with record marking (RFC 5531 section 11) and UDP.

Transport invariants (``RpcStreamProtocol``, one per TCP connection): ``get_buffer``
never raises and hands out the free tail of one buffer that starts small (16 KiB) and
doubles only when full, so an announced record length is never allocated before its
bytes arrive; nothing raises out of ``buffer_updated``: a framing error (a record over
``max_record`` bytes, or in more than ``max_fragments`` fragments) closes that
connection only. At accept a connection is closed at once when its client is outside the
allowed list (``check_allowed``: MOUNT and NFS) or over the ``ConnectionLimits`` (per
client address and in total, shared by every listener of the daemon); one silent for
``idle_timeout`` seconds with nothing in flight is closed. Each request's coroutine is
stepped at once (one that completes without waiting, e.g. a READ of cached data, costs
no Task); one that waits resumes from its futures' callbacks, so replies go out in
completion order and a slow READ never holds up a GETATTR behind it. A connection's turn on the loop ends after ``turn_records`` records or once its replies
reach ``turn_bytes``: the rest of its buffer is parsed in a later turn, after the loop has
served the other connections, so a small call on one connection (a GETATTR heartbeat)
never waits behind another's whole backlog. Replies produced
in one loop iteration go out in one writev, written with ``writelines`` as the list of
buffers the encoder produced (READ data is not copied on the way). Back-pressure: the
connection pauses when ``max_inflight`` requests are running, when the transport holds
more than ``max_queued`` reply bytes, or when the replies produced in this iteration
(synchronous ones included) reach ``max_queued``; while paused it neither reads nor
dispatches the records already in its buffer, and resumes (parsing those first) at
half the in-flight limit / on drain. A connection so holds at most about ``max_queued``
plus ``max_inflight`` replies. A request whose connection closed is ended by closing its
coroutine (GeneratorExit, handled like cancellation: no reply, no log line).

The transports hand each complete record to the dispatcher (engine.nfs.rpc): TCP to its
fast lane first (``RpcServer.fast``) and, when that hands it back, to ``RpcServer.generic``
(what ``RpcServer.handle_start`` does, one call shorter); UDP to ``handle_start``. They
write what it returns; they know nothing of programs or procedures, except that they
time each call: the dispatcher names the latency buckets of the procedure it counted
(``RpcServer.timed``; None for a call it did not count, which is then not timed), and
``observe`` adds the time from dispatch to reply there: two clock reads and two
integer increments.

Concurrency: everything runs on the one event loop thread; handlers may await work done
in an executor.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any

from engine.nfs.rpc import LAT_BUCKETS, NOT_MINE, RpcServer

log = logging.getLogger("instantnfs.rpc")

DEFAULT_MAX_RECORD = (1 << 20) + 64 * 1024
DEFAULT_MAX_QUEUED = 32 << 20  # reply bytes queued per connection before reading pauses
DEFAULT_MAX_FRAGMENTS = 256  # fragments of one record (clients send one)
DEFAULT_TURN_BYTES = 1 << 20  # reply bytes one connection produces before the loop serves the others
DEFAULT_TURN_RECORDS = 16  # records one connection dispatches before the loop serves the others
_LAST = 0x80000000
_U32 = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_now = time.perf_counter_ns


def observe(lat: list[int] | None, t0: int) -> None:
    """Count one call that started at ``t0`` (``perf_counter_ns``) into its latency
    buckets (see ``engine.nfs.rpc``): the bucket of its bit length in microseconds."""
    if lat is not None:
        ns = _now() - t0
        b = (ns // 1000).bit_length()
        lat[b if b < LAT_BUCKETS else LAT_BUCKETS] += 1
        lat[LAT_BUCKETS + 1] += ns


class ConnectionLimits:
    """TCP connections of one daemon, per client address and in total (all listeners)."""

    def __init__(self, per_client: int = 128, total: int = 4096) -> None:
        self.per_client = per_client
        self.total = total
        self.count = 0
        self.by_client: dict[str, int] = {}
        self.refused = 0
        self._logged_at = -1e9

    def admit(self, host: str) -> bool:
        n = self.by_client.get(host, 0)
        if n >= self.per_client or self.count >= self.total:
            self.refused += 1
            now = time.monotonic()
            if now - self._logged_at > 60:  # one line a minute, however many are refused
                self._logged_at = now
                log.warning("refused a connection from %s: %d connection(s) from it, %d in all "
                            "(limits: server.max_connections_per_client %d, server.max_connections %d)",
                            host, n, self.count, self.per_client, self.total)
            return False
        self.by_client[host] = n + 1
        self.count += 1
        return True

    def release(self, host: str) -> None:
        n = self.by_client.get(host, 0) - 1
        if n > 0:
            self.by_client[host] = n
        else:
            self.by_client.pop(host, None)
        self.count -= 1


class RpcStreamProtocol(asyncio.BufferedProtocol):
    """ONC RPC over TCP with record marking (RFC 5531 section 11)."""

    def __init__(self, server: RpcServer, max_record: int = DEFAULT_MAX_RECORD, max_inflight: int = 64,
                 bufsize: int = 16 << 10, max_queued: int = DEFAULT_MAX_QUEUED, max_fragments: int = DEFAULT_MAX_FRAGMENTS,
                 idle_timeout: float | None = None, limits: ConnectionLimits | None = None,
                 check_allowed: bool = False, turn_bytes: int = DEFAULT_TURN_BYTES,
                 turn_records: int = DEFAULT_TURN_RECORDS) -> None:
        self.server = server
        self.turn_bytes = turn_bytes
        self.turn_records = turn_records
        self._turn = 0  # records dispatched in this turn
        self.max_record = max_record
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.max_fragments = max_fragments
        self.idle_timeout = idle_timeout
        self.limits = limits
        self.check_allowed = check_allowed
        self._buf = bytearray(max(bufsize, 8))
        self._mv = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received data
        self._frags: list[bytes] = []
        self._fraglen = 0
        self.transport: asyncio.Transport | None = None
        self._loop: Any = None  # the running loop, kept at connection_made
        self.peer: tuple[str, int] = ("?", 0)
        self.local = ""
        self.inflight = 0
        self._paused_inflight = False
        self._paused_write = False
        self._paused_queue = False  # replies of this iteration over max_queued
        self._reading_paused = False
        self._resume_scheduled = False
        self._out: list[Any] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._admitted = False
        self._last = 0.0  # loop time of the last bytes received or reply sent
        self._idle: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # kept: asyncio.get_running_loop() costs a getpid() system call at every use
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by hand, outside a loop (tests of the framing)
            self._loop = None
        peer = transport.get_extra_info("peername")
        sock_obj = transport.get_extra_info("socket")
        if sock_obj is not None and sock_obj.family == socket.AF_UNIX:
            # a local process on an AF_UNIX socket: the port field carries its uid
            uid = -1
            try:
                uid = _PEERCRED.unpack(sock_obj.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[1]
            except (OSError, AttributeError, struct.error):
                pass
            self.peer = ("unix", uid)
        else:
            self.peer = (peer[0], peer[1]) if peer else ("?", 0)
        sock = transport.get_extra_info("sockname")
        self.local = sock[0] if isinstance(sock, tuple) else ""
        if self.check_allowed and self.peer[0] != "unix" and self.peer[0] not in self.server.allow:
            log.debug("RPC connection from %s closed at accept: not an allowed client", self.peer[0])
            self._abort()
            return
        if self.limits is not None:
            if not self.limits.admit(self.peer[0]):
                self._abort()
                return
            self._admitted = True
        transport.set_write_buffer_limits(high=self.max_queued, low=self.max_queued // 4)  # type: ignore[attr-defined]
        if self.idle_timeout:
            loop = self._loop
            self._last = loop.time()
            self._idle = loop.call_later(self.idle_timeout, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # requests still waiting are closed when they wake up
        if self.inflight:
            log.debug("RPC connection from %s closed with %d request(s) in flight", self.peer[0], self.inflight)
        if self._admitted and self.limits is not None:
            self._admitted = False
            self.limits.release(self.peer[0])
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._buf = bytearray(0)
        self._mv = memoryview(self._buf)
        self._start = self._end = 0
        self._frags, self._out = [], []

    def _idle_check(self) -> None:
        self._idle = None
        if self.closed or not self.idle_timeout:
            return
        loop = self._loop
        quiet = loop.time() - self._last
        if self.inflight == 0 and quiet >= self.idle_timeout:
            log.debug("RPC connection from %s idle for %.0f s: closing it", self.peer[0], quiet)
            self._abort()
            return
        wait = self.idle_timeout - quiet if self.inflight == 0 else self.idle_timeout
        self._idle = loop.call_later(max(wait, 0.1), self._idle_check)

    def get_buffer(self, sizehint: int) -> memoryview:
        # The buffer starts small and doubles only when full: an announced record length is
        # never allocated before its bytes arrive (_parse bounds it by max_record).
        if self._end == len(self._buf):
            if self._start:
                self._compact()
            else:
                self._grow(max(len(self._buf) * 2, 64))
        return self._mv[self._end :]

    def _grow(self, size: int) -> None:
        new = bytearray(size)
        n = self._end - self._start
        new[:n] = self._mv[self._start : self._end]
        self._buf, self._mv = new, memoryview(new)
        self._start, self._end = 0, n

    def _compact(self) -> None:
        if self._start:
            n = self._end - self._start
            self._buf[:n] = self._mv[self._start : self._end]
            self._start, self._end = 0, n

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if not self._resume_scheduled:
            self._turn = 0  # a new turn, unless this connection's next one is already queued
        if self.idle_timeout:
            self._last = self._loop.time()
        try:
            self._parse()
        except Exception:  # noqa: BLE001 - nothing raises out of buffer_updated
            log.exception("RPC connection from %s: internal error, closing it", self.peer[0])
            self._abort()
            return
        if self._out:
            # the replies this batch of records produced at once (cached READs, GETATTRs)
            # go out now, in one writev, not one loop pass later: a client waiting on
            # each reply (QD1) gets it sooner
            self._flush()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _blocked(self) -> bool:
        return self._paused_inflight or self._paused_write or self._paused_queue

    def _parse(self) -> None:
        while not self.closed:
            if self._blocked():
                # Records already received wait in the buffer: nothing is dispatched while
                # the connection is paused (a client that does not read its replies).
                self._update_reading()
                break
            if self._out_bytes >= self.turn_bytes or self._turn >= self.turn_records:
                # this connection's turn is over: the loop sends these replies and serves
                # the other connections before it parses on, so a GETATTR on another
                # connection never waits behind more than one turn of bulk data
                if not self._resume_scheduled:
                    self._resume_scheduled = True
                    self._loop.call_soon(self._resume_parse)
                break
            mv = self._mv
            avail = self._end - self._start
            if avail < 4:
                break
            hdr = _U32.unpack_from(mv, self._start)[0]
            flen = hdr & 0x7FFFFFFF
            if self._fraglen + flen > self.max_record:
                log.warning("RPC connection from %s: record of more than %d bytes, closing it", self.peer[0], self.max_record)
                self._abort()
                return
            if avail < 4 + flen:
                if self._start + 4 + flen > len(self._buf):
                    self._compact()  # get_buffer grows it as the bytes arrive
                break
            a = self._start + 4
            self._start = a + flen
            if hdr & _LAST and not self._frags:
                # a view, not a copy: the dispatcher copies what it keeps past the call
                record: bytes | memoryview = mv[a : a + flen]
            else:
                if len(self._frags) >= self.max_fragments:
                    log.warning("RPC connection from %s: record in more than %d fragments, closing it", self.peer[0], self.max_fragments)
                    self._abort()
                    return
                self._frags.append(bytes(mv[a : a + flen]))
                self._fraglen += flen
                if not hdr & _LAST:
                    continue
                record = b"".join(self._frags)
                self._frags, self._fraglen = [], 0
            self._turn += 1
            self._dispatch(record)
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start > len(self._buf) // 2:
            self._compact()

    def _dispatch(self, record: bytes | memoryview) -> None:
        server = self.server
        server.timed = None
        t0 = _now()
        try:
            # the dispatcher's handle_start, one call shorter: its fast lane, then the rest
            r = NOT_MINE if server.fast is None else server.fast(record, self.peer, self.local)
            if r is NOT_MINE:
                r = server.generic(record, self.peer, self.local)
        except Exception:  # noqa: BLE001
            log.exception("RPC from %s: dispatcher error", self.peer[0])
            return
        lat = server.timed
        if r is None:
            return
        if isinstance(r, list):
            self._send(r)
            if lat is not None:  # observe(), inlined: the path of every cached READ
                ns = _now() - t0
                b = (ns // 1000).bit_length()
                lat[b if b < LAT_BUCKETS else LAT_BUCKETS] += 1
                lat[LAT_BUCKETS + 1] += ns
            return
        # Step the request's coroutine right here: a READ of cached data finishes
        # without ever waiting, and then costs no Task and no extra loop iteration.
        # One that waits is driven by its futures' callbacks (a minimal Task).
        self._step(r, None, True, lat, t0)

    def _step(self, coro: Any, _fut: Any, first: bool = False, lat: list[int] | None = None, t0: int = 0) -> None:
        if self.closed:
            if _fut is not None and _fut.done() and not _fut.cancelled():
                _fut.exception()  # the error the request would have answered: retrieved, not logged as lost
            coro.close()  # GeneratorExit inside: the dispatcher ends it without a reply
            if not first:
                self._request_done()
            return
        try:
            fut = coro.send(None)
        except StopIteration as e:
            if not first:
                self._request_done()
            if e.value is not None:
                self._send(e.value)
                observe(lat, t0)
            return
        except BaseException as e:  # noqa: BLE001 - the dispatcher already mapped expected errors
            if not first:
                self._request_done()
            log.error("RPC from %s: request failed", self.peer[0], exc_info=e)
            return
        if first:
            self.inflight += 1
            if self.inflight >= self.max_inflight and not self._paused_inflight:
                self._paused_inflight = True
                self._update_reading()
        if fut is None:  # a bare yield (asyncio.sleep(0))
            self._loop.call_soon(self._step, coro, None, False, lat, t0)
        else:
            fut._asyncio_future_blocking = False
            fut.add_done_callback(lambda f: self._step(coro, f, False, lat, t0))

    def _request_done(self) -> None:
        self.inflight -= 1
        if self._paused_inflight and self.inflight <= self.max_inflight // 2:
            self._paused_inflight = False
            self._update_reading()

    def _send(self, bufs: list[Any]) -> None:
        """Queue one reply; replies queued in one loop iteration go out in one writev."""
        if self.closed or self.transport is None:
            return
        n = 0
        for b in bufs:
            n += len(b) if not isinstance(b, memoryview) else b.nbytes
        self._out.append(_U32.pack(_LAST | n))
        self._out.extend(bufs)
        self._out_bytes += n + 4
        if self._out_bytes >= self.max_queued and not self._paused_queue:
            self._paused_queue = True  # replies produced at once (cached READs) count too
        if self.idle_timeout:
            self._last = self._loop.time()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        self._out_bytes = 0
        if out and not self.closed and self.transport is not None:
            self.transport.writelines(out)  # over max_queued in the transport: pause_writing()
        if self._paused_queue:
            self._paused_queue = False
            self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        if self._blocked():
            if not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
        else:
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resume_reading()
            if self._end > self._start and not self._resume_scheduled:
                # records that arrived before the pause: parse them (not from inside _parse)
                self._resume_scheduled = True
                self._loop.call_soon(self._resume_parse)

    def _resume_parse(self) -> None:
        self._resume_scheduled = False
        self._turn = 0
        if not self.closed and not self._blocked():
            try:
                self._parse()
            except Exception:  # noqa: BLE001 - as in buffer_updated
                log.exception("RPC connection from %s: internal error, closing it", self.peer[0])
                self._abort()

    def pause_writing(self) -> None:
        self._paused_write = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_write = False
        if self.idle_timeout:  # a client draining its replies is not idle
            self._last = self._loop.time()
        self._update_reading()


class RpcDatagramProtocol(asyncio.DatagramProtocol):
    """ONC RPC over UDP: one call per datagram, no record marking."""

    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()
        self.local = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("sockname")
        self.local = sock[0] if sock else ""

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.server.timed = None
        t0 = _now()
        try:
            r = self.server.handle_start(data, (addr[0], addr[1]), self.local)
        except Exception:  # noqa: BLE001
            log.exception("RPC/UDP from %s: dispatcher error", addr[0])
            return
        lat = self.server.timed
        if r is None:
            return
        if isinstance(r, list):
            self._send(r, addr)
            observe(lat, t0)
            return
        task = asyncio.get_running_loop().create_task(r)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, addr, lat, t0))

    def _done(self, task: asyncio.Task, addr: tuple, lat: list[int] | None = None, t0: int = 0) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            return
        r = task.result()
        if r is not None:
            self._send(r, addr)
            observe(lat, t0)

    def _send(self, bufs: list[Any], addr: tuple) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(b"".join(bytes(b) for b in bufs), addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("RPC/UDP error: %s", exc)
