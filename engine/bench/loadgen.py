"""The random-I/O load generator: READ/WRITE(/COMMIT) load over raw ONC RPC, spread over
processes, that measures its own CPU and says when it, not the server, was the limit.

What it is for: the scenarios "random 4 KiB and 64 KiB reads at QD 1/16/64 over 1 and 8
connections", "random 4 KiB writes FILE_SYNC and UNSTABLE+COMMIT" and "many sessions
read at once" (several targets). ``run_load(targets, spec)`` returns one ``Measure``:
value = operations per second in the measured window; ``extra`` holds what the run saw
(ops, payload bytes from the replies, errors, latency percentiles, client CPU).

How: the caller (this module) resolves each ``NfsTarget`` once, with the in-repo codec
(``engine.nfs.client.build_call``/``parse_reply``, ``nfs3_types``, ``mount_types``): MOUNT
of the export, LOOKUP of each component of the path, GETATTR (a regular file, large
enough for the span). It then prebuilds each connection's call record (AUTH_SYS uid 0,
which Ganesha requires and ours accepts) and forks ``processes`` workers
(``engine.bench._loadgen_worker``, fork context; default min(connections, CPUs)); the
connections are dealt to the workers round-robin, and to the targets round-robin (many
sessions = many targets). Each worker runs a plain poll loop that patches xid and offset
into the template and reads four fields of each reply; no dataclass on the hot path. Every
worker connects first and says ready; the caller then sends one start instant to all,
so warmups and windows line up across processes (CLOCK_MONOTONIC is system-wide).
``FileTarget`` runs the same plan with ``os.preadv``/``os.pwrite`` in ``depth`` threads per
descriptor (``os.fsync`` after each write for file_sync, once per descriptor at the end
for unstable).

What it counts: a request counts when its reply arrives in the window (warmup excluded);
``bytes`` is the sum of the replies' ``count`` (READ: bytes returned, WRITE: bytes
written). After the window the requests in flight are drained, so ``calls`` (every READ or
WRITE sent, warmup and drain included) is exactly what the server received. UNSTABLE
writes end with one COMMIT per connection inside the window (the window ends at the last
COMMIT reply). Any RPC reject or non-OK ``nfsstat3`` (an ``OSError`` for files) is an
error: counted in ``errors``, named in ``error_statuses``, and described in ``note``.
Latency is per request, reply arrival minus send, in microseconds. Client CPU is each
worker's user + system time over its window; ``client_cpu_share`` = CPU seconds /
(seconds x workers), and ``client_bound`` is set when any worker used >= 90 % of a core:
the figure then measures the generator as much as the server.

Writes carry a fixed pattern seeded by ``spec.seed`` (``write_pattern``), with the
request's offset stamped in its first 8 bytes (big-endian), so a read-back can check both
the bytes and where they landed.

Failures never hang the caller: an unreachable, unmountable or missing target raises
``RuntimeError`` before any worker starts (5 s connect timeout); every wait on a worker
has a deadline, and on any error or timeout all workers are killed and ``RuntimeError``
says which worker failed and why.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import random
import socket
import struct
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from engine.bench._loadgen_worker import FileConn, NfsConn, WorkerPlan, worker_main
from engine.bench.core import FileTarget, Measure, NfsTarget, Target
from engine.nfs.client import RpcError, auth_sys, build_call, frame, parse_reply
from engine.nfs.mount_types import MOUNT_PROGRAM, MOUNTPROC3, mountres3, mountstat3
from engine.nfs.nfs3_types import (
    NFS_PROGRAM,
    NFSPROC3,
    RES,
    COMMIT3args,
    GETATTR3args,
    LOOKUP3args,
    READ3args,
    WRITE3args,
    diropargs3,
    ftype3,
    nfs_fh3,
    nfsstat3,
    stable_how,
)
from engine.nfs.xdr import Packer, Unpacker, XDRError

CONNECT_TIMEOUT = 5.0  # seconds to reach a target's MOUNT/NFS port and get each answer
READY_TIMEOUT = 30.0  # seconds for every worker to connect and say ready
DRAIN_ALLOWANCE = 60.0  # seconds past the window for the drain, the COMMITs and the report
CLIENT_BOUND = 0.9  # a worker at this share of one core or more: the run is client-bound
CRED = auth_sys(0, 0, (), b"instantnfs-loadgen")
_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class LoadSpec:
    """One run's load: what each request is, how many in flight, for how long."""

    op: str = "read"  # "read" | "write"
    size: int = 4096  # bytes per request
    depth: int = 16  # requests in flight per connection
    connections: int = 1
    seconds: float = 5.0  # measured window (after warmup)
    warmup: float = 0.5
    stable: str = "unstable"  # writes: "file_sync" | "unstable" (then one COMMIT per connection, in the window)
    seed: int = 1
    align: int = 0  # 0 = size-aligned offsets
    span: tuple[int, int] | None = None  # (offset, length) of the file to use; None = whole file
    processes: int | None = None  # None = min(connections, cpu count)


def percentiles(values: Sequence[float], ps: Sequence[float] = (50, 99, 99.9)) -> dict[str, float]:
    """The ``ps`` percentiles of ``values``, keyed ``"p50"``, ``"p99"``, ``"p999"`` (the
    digits of p without the dot); linear interpolation between the two nearest ranks (as
    ``numpy.percentile``'s default). An empty list gives NaN for each."""
    keys = {f"p{p:g}".replace(".", ""): float(p) for p in ps}
    if not values:
        return {k: math.nan for k in keys}
    v = sorted(values)
    out = {}
    for k, p in keys.items():
        if not 0 <= p <= 100:
            raise ValueError(f"percentile {p} is not between 0 and 100")
        x = (len(v) - 1) * p / 100
        lo = int(x)
        hi = min(lo + 1, len(v) - 1)
        out[k] = v[lo] + (v[hi] - v[lo]) * (x - lo)
    return out


def write_pattern(seed: int, size: int, offset: int | None = None) -> bytes:
    """The payload a write of ``size`` bytes carries in a run with ``seed``: seeded bytes,
    with ``offset`` (big-endian u64) in the first 8 when given: what a read-back of a
    written request position must find."""
    data = bytearray(random.Random(f"loadgen-{seed}").randbytes(size))
    if offset is not None and size >= 8:
        struct.pack_into(">Q", data, 0, offset)
    return bytes(data)


# -- synchronous RPC for the set-up and the GETATTR probe ---------------------------------------------


class _Rpc:
    """One blocking TCP connection, one call at a time (set-up and GETATTR probes only)."""

    def __init__(self, host: str, port: int, what: str, timeout: float = CONNECT_TIMEOUT) -> None:
        self.where = f"{what} service at {host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise RuntimeError(f"cannot reach the {self.where}: {e} (is the NFS server running, and is that its port?)") from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.xid = int.from_bytes(os.urandom(4), "big")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> _Rpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise RuntimeError(f"the {self.where} closed the connection")
            out += got
        return bytes(out)

    def exchange(self, record: bytes) -> bytes:
        """Send one framed call record; the reply record (fragments joined)."""
        try:
            self.sock.sendall(record)
            parts = []
            while True:
                mark = _U32.unpack(self._recv(4))[0]
                parts.append(self._recv(mark & 0x7FFFFFFF))
                if mark & 0x80000000:
                    return b"".join(parts)
        except TimeoutError as e:
            raise RuntimeError(f"no answer from the {self.where} within {self.sock.gettimeout()} s") from e
        except OSError as e:
            raise RuntimeError(f"the {self.where} failed: {e}") from e

    def call(self, prog: int, proc: int, args: bytes) -> Unpacker:
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        rep = self.exchange(frame(build_call(self.xid, prog, 3, proc, args, CRED)))
        if len(rep) < 4 or _U32.unpack_from(rep)[0] != self.xid:
            raise RuntimeError(f"the {self.where} answered another call than the one sent")
        try:
            return parse_reply(rep)
        except RpcError as e:
            raise RuntimeError(f"the {self.where} did not accept the call: {e}") from e


def _nfs(rpc: _Rpc, proc: int, args: Any, what: str) -> Any:
    argt, rest = RES[proc]
    try:
        res = rest.unpack(rpc.call(NFS_PROGRAM, proc, argt.encode(args)))
    except XDRError as e:
        raise RuntimeError(f"{what}: the {rpc.where} sent a reply that does not decode: {e}") from e
    if res.tag != nfsstat3.NFS3_OK:
        raise RuntimeError(f"{what} failed on the {rpc.where}: {nfsstat3(res.tag).name}")
    return res.body


@dataclass(frozen=True)
class Resolved:
    """A served file as a client knows it after MOUNT and LOOKUP."""

    fh: bytes
    size: int


def resolve(target: NfsTarget, timeout: float = CONNECT_TIMEOUT) -> Resolved:
    """MOUNT the target's export, LOOKUP each component of its path: the file's handle and
    size; ``RuntimeError`` saying which step failed and what to check."""
    with _Rpc(target.host, target.mount_port, "MOUNT", timeout) as m:
        p = Packer()
        p.opaque(target.export.encode())
        try:
            res = mountres3.unpack(m.call(MOUNT_PROGRAM, MOUNTPROC3.MNT, p.getvalue()))
        except XDRError as e:
            raise RuntimeError(f"the {m.where} sent a MNT reply that does not decode: {e}") from e
        if res.tag != mountstat3.MNT3_OK:
            raise RuntimeError(f"MOUNT of {target.export!r} refused by the {m.where}: {mountstat3(res.tag).name} "
                               "(is the export path right?)")
        fh = res.body.fhandle
    with _Rpc(target.host, target.nfs_port, "NFS", timeout) as n:
        seen = target.export.rstrip("/")
        for part in target.path.strip("/").split("/"):
            if not part:
                continue
            seen += "/" + part
            fh = _nfs(n, NFSPROC3.LOOKUP, LOOKUP3args(diropargs3(nfs_fh3(fh), part.encode())), f"LOOKUP of {seen}").object.data
        attr = _nfs(n, NFSPROC3.GETATTR, GETATTR3args(nfs_fh3(fh)), f"GETATTR of {seen}").obj_attributes
    if attr.type != ftype3.NF3REG:
        raise RuntimeError(f"{target.url} is a {ftype3(attr.type).name}, not a regular file")
    return Resolved(fh, attr.size)


# -- planning ---------------------------------------------------------------------------------------


def _span(spec: LoadSpec, size: int, name: str) -> tuple[int, int, int]:
    """(first byte, number of request positions, distance between positions)."""
    base, length = spec.span if spec.span is not None else (0, size)
    if base < 0 or length <= 0 or base + length > size:
        raise ValueError(f"span {spec.span} does not fit {name} ({size} bytes)")
    align = spec.align or spec.size
    if length < spec.size:
        raise ValueError(f"the span of {name} ({length} bytes) is shorter than one {spec.size}-byte request")
    return base, (length - spec.size) // align + 1, align


def _check(spec: LoadSpec, targets: list[Target]) -> None:
    if spec.op not in ("read", "write"):
        raise ValueError(f"op must be 'read' or 'write', not {spec.op!r}")
    if spec.stable not in ("file_sync", "unstable"):
        raise ValueError(f"stable must be 'file_sync' or 'unstable', not {spec.stable!r}")
    if spec.size < 1 or spec.depth < 1 or spec.connections < 1:
        raise ValueError("size, depth and connections must be at least 1")
    if spec.op == "write" and spec.size < 8:
        raise ValueError("writes must be at least 8 bytes (the offset is stamped in the first 8)")
    if spec.seconds <= 0 or spec.warmup < 0:
        raise ValueError("seconds must be positive and warmup not negative")
    if spec.align < 0 or (spec.processes is not None and spec.processes < 1):
        raise ValueError("align must be 0 or more, processes at least 1")
    if not targets:
        raise ValueError("no target given")
    if spec.connections < len(targets):
        raise ValueError(f"{len(targets)} targets need at least as many connections, not {spec.connections}: "
                         "connections are dealt to the targets round-robin")
    kinds = {type(t) for t in targets}
    if len(kinds) > 1 or not kinds <= {NfsTarget, FileTarget}:
        raise ValueError("the targets of one run are all NfsTarget or all FileTarget")


def _nfs_conns(spec: LoadSpec, targets: list[NfsTarget]) -> list[NfsConn]:
    resolved = [resolve(t) for t in targets]
    stable = stable_how.FILE_SYNC if spec.stable == "file_sync" else stable_how.UNSTABLE
    pattern = write_pattern(spec.seed, spec.size)
    xid_base = int.from_bytes(os.urandom(4), "big")
    out = []
    for i in range(spec.connections):
        t, r = targets[i % len(targets)], resolved[i % len(targets)]
        base, slots, align = _span(spec, min(t.size, r.size), t.url)
        fh = nfs_fh3(r.fh)
        if spec.op == "read":
            args = READ3args.encode(READ3args(fh, 0, spec.size))
        else:
            args = WRITE3args.encode(WRITE3args(fh, 0, spec.size, stable, pattern))
        call = frame(build_call(0, NFS_PROGRAM, 3, NFSPROC3.READ if spec.op == "read" else NFSPROC3.WRITE, args, CRED))
        at_args = len(call) - len(args)
        off_pos = at_args + 4 + len(r.fh) + (-len(r.fh) & 3)  # past nfs_fh3 (opaque: length, bytes, padding)
        stamp_pos = off_pos + 8 + 4 + 4 + 4 if spec.op == "write" else 0  # past offset, count, stable, data length
        commit = frame(build_call(0, NFS_PROGRAM, 3, NFSPROC3.COMMIT, COMMIT3args.encode(COMMIT3args(fh, 0, 0)), CRED))
        out.append(NfsConn(i, t.host, t.nfs_port, call, off_pos, stamp_pos, commit, base, slots, align,
                           spec.seed * 1_000_003 + i, (xid_base + (i << 24)) & 0xFFFFFFFF))
    return out


def _file_conns(spec: LoadSpec, targets: list[FileTarget]) -> list[FileConn]:
    pattern = write_pattern(spec.seed, spec.size) if spec.op == "write" else b""
    out = []
    for i in range(spec.connections):
        t = targets[i % len(targets)]
        try:
            size = os.stat(t.path).st_size
        except OSError as e:
            raise RuntimeError(f"cannot use {t.path}: {e.strerror}") from e
        base, slots, align = _span(spec, min(t.size, size) if spec.op == "read" else t.size, t.path)
        out.append(FileConn(i, t.path, pattern, base, slots, align, spec.seed * 1_000_003 + i))
    return out


# -- the run ----------------------------------------------------------------------------------------


class _Workers:
    """The forked workers and their pipes; ``kill`` ends all of them, whatever their state."""

    def __init__(self, plans: list[WorkerPlan]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []
        for i, plan in enumerate(plans):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(theirs, plan), name=f"loadgen-{i}", daemon=True)
            p.start()
            theirs.close()
            self.procs.append(p)
            self.pipes.append(mine)

    def collect(self, kind: str, deadline: float) -> list[Any]:
        """Each worker's next message, which must be ``kind``; RuntimeError on an error
        message, a worker's death or the deadline."""
        got: dict[int, Any] = {}
        index = {id(c): i for i, c in enumerate(self.pipes)}
        sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
        while len(got) < len(self.pipes):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [f"loadgen-{i}" for i in range(len(self.pipes)) if i not in got]
                raise RuntimeError(f"load generator workers {', '.join(missing)} did not report '{kind}' in time")
            waiting = [c for i, c in enumerate(self.pipes) if i not in got]
            ready = wait(waiting + [p.sentinel for i, p in enumerate(self.procs) if i not in got], timeout=left)
            for obj in ready:
                if isinstance(obj, int):
                    i = sentinels[obj]
                    if i in got or self.pipes[i].poll():
                        continue  # its message is waiting in the pipe
                    raise RuntimeError(f"load generator worker loadgen-{i} died (exit code {self.procs[i].exitcode}) "
                                       "before reporting")
                i = index[id(obj)]
                try:
                    msg = self.pipes[i].recv()
                except EOFError:
                    raise RuntimeError(f"load generator worker loadgen-{i} exited before reporting") from None
                if msg[0] == "error":
                    raise RuntimeError(f"load generator worker loadgen-{i}: {msg[1]}")
                if msg[0] != kind:
                    raise RuntimeError(f"load generator worker loadgen-{i} sent {msg[0]!r}, expected {kind!r}")
                got[i] = msg[1]
        return [got[i] for i in range(len(self.pipes))]

    def go(self, t_go: int) -> None:
        for c in self.pipes:
            c.send(("go", t_go))

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
        for c in self.pipes:
            c.close()


def run_load(targets: Target | Sequence[Target], spec: LoadSpec) -> Measure:
    """Run ``spec`` against ``targets`` (connections dealt round-robin): operations per
    second, and what the run saw (see the module's note for what each figure means)."""
    tl: list[Any] = [targets] if isinstance(targets, (NfsTarget, FileTarget)) else list(targets)
    _check(spec, tl)
    conns: list[Any] = _nfs_conns(spec, tl) if isinstance(tl[0], NfsTarget) else _file_conns(spec, tl)
    nproc = min(spec.processes or min(spec.connections, os.cpu_count() or 1), spec.connections)
    warmup_ns, window_ns = int(spec.warmup * 1e9), int(spec.seconds * 1e9)
    plans = [WorkerPlan(spec.op, spec.size, spec.depth, spec.stable, warmup_ns, window_ns, tuple(conns[w::nproc]))
             for w in range(nproc)]
    workers = _Workers(plans)
    try:
        workers.collect("ready", time.monotonic() + READY_TIMEOUT)
        t_go = time.monotonic_ns() + 20_000_000  # every worker gets the message before the start
        workers.go(t_go)
        results = workers.collect("done", time.monotonic() + 0.02 + spec.warmup + spec.seconds + DRAIN_ALLOWANCE)
    finally:
        workers.kill()
    return _measure(spec, tl, results, t_go + warmup_ns)


def _measure(spec: LoadSpec, targets: list[Any], results: list[dict[str, Any]], t_w: int) -> Measure:
    ops = sum(r["ops"] for r in results)
    nbytes = sum(r["bytes"] for r in results)
    errors = sum(r["errors"] for r in results)
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    if spec.op == "write" and spec.stable == "unstable":  # the window ends at the last COMMIT (fsync) answered
        seconds = max(spec.seconds, (max(r["end_ns"] for r in results) - t_w) / 1e9)
    else:  # requests count when their reply arrives in [t_w, t_w + seconds): the window is exact
        seconds = spec.seconds
    lat = array("q")
    for r in results:
        lat.extend(r["lat_ns"])
    pct = percentiles(lat)
    cpu = sum(r["cpu_seconds"] for r in results)
    shares = [r["cpu_seconds"] / r["cpu_wall"] if r["cpu_wall"] > 0 else 0.0 for r in results]
    bound = any(s >= CLIENT_BOUND for s in shares)
    extra: dict[str, Any] = {
        "ops": ops,
        "bytes": nbytes,
        "seconds": round(seconds, 6),
        "MBps": round(nbytes / seconds / 1e6, 3),
        "errors": errors,
        "error_statuses": statuses,
        "lat_us": {k: round(v / 1e3, 1) if not math.isnan(v) else None for k, v in pct.items()},
        "client_cpu_seconds": round(cpu, 6),
        "client_cpu_share": round(cpu / (seconds * len(results)), 6),
        "client_bound": bound,
        "worker_cpu_share": [round(s, 3) for s in shares],
        "processes": len(results),
        "connections": spec.connections,
        "depth": spec.depth,
        "size": spec.size,
        "op": spec.op if spec.op == "read" else f"write {spec.stable}",
        "targets": len(targets),
        "calls": sum(r["calls"] for r in results),
        "warmup_ops": sum(r["warmup_ops"] for r in results),
        "client": ("loadgen: raw ONC RPC (AUTH_SYS) over TCP, poll loop per process" if isinstance(targets[0], NfsTarget)
                   else "loadgen: os.preadv/os.pwrite, a thread per request in flight, per process"),
    }
    notes = []
    if errors:
        notes.append(f"{errors} requests failed: " + ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())))
    if bound:
        notes.append(f"client-bound: a load generator worker used {max(shares):.0%} of a core")
    if notes:
        extra["note"] = "; ".join(notes)
    return Measure(ops / seconds, extra)


# -- GETATTR latency ----------------------------------------------------------------------------------


def getattr_latency(target: NfsTarget, seconds: float, interval: float = 0.01) -> list[float]:
    """GETATTR of the target file, one at a time on a connection of its own, ``interval``
    seconds apart, for ``seconds``: each call's latency in seconds. Any failed call raises
    ``RuntimeError`` (a probe that skips failures would report only the fast answers)."""
    fh = resolve(target).fh
    args = GETATTR3args.encode(GETATTR3args(nfs_fh3(fh)))
    tmpl = bytearray(frame(build_call(0, NFS_PROGRAM, 3, NFSPROC3.GETATTR, args, CRED)))
    out: list[float] = []
    with _Rpc(target.host, target.nfs_port, "NFS", timeout=10.0) as rpc:
        xid = rpc.xid
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            xid = (xid + 1) & 0xFFFFFFFF
            _U32.pack_into(tmpl, 4, xid)
            t0 = time.perf_counter()
            rep = rpc.exchange(bytes(tmpl))
            dt = time.perf_counter() - t0
            if _U32.unpack_from(rep)[0] != xid:
                raise RuntimeError(f"the {rpc.where} answered another GETATTR than the one sent")
            try:
                u = parse_reply(rep)
            except RpcError as e:
                raise RuntimeError(f"GETATTR of {target.url}: {e}") from e
            st = u.u32()
            if st != nfsstat3.NFS3_OK:
                raise RuntimeError(f"GETATTR of {target.url} failed: {nfsstat3(st).name}")
            out.append(dt)
            if interval > 0:
                time.sleep(interval)
    return out
