"""Property tests: XDR round trips for every wire type, record marking over arbitrary
TCP splits, and arbitrary bytes into the dispatcher (a reply or nothing, never a crash)."""
from __future__ import annotations

import asyncio
import inspect
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.datastore import Datastore
from engine.nfs import compiled, mount_types, nfs3_types, portmap_types, rpc_types, transport, xdr
from engine.nfs.client import build_call
from engine.nfs.mount import Mount3
from engine.nfs.nfs3 import NFS3
from engine.nfs.nfs3_types import RES
from engine.nfs.rpc import RpcServer
from engine.nfs.transport import RpcStreamProtocol
from engine.nfs.xdr import UnionValue, Unpacker
from engine.stack import Stack

# the transport's source and its compiled build (the same class under INSTANTNFS_PURE=1)
STREAMS = pytest.mark.parametrize("stream_cls", sorted({transport.RpcStreamProtocol, compiled.RpcStreamProtocol},
                                                        key=lambda c: c.__module__))

# -- a strategy for any XDR type, from its declaration ----------------------------------------


def strategy(t: xdr.XType) -> st.SearchStrategy:
    if t is xdr.uint32:
        return st.integers(0, 2**32 - 1)
    if t is xdr.int32:
        return st.integers(-(2**31), 2**31 - 1)
    if t is xdr.uint64:
        return st.integers(0, 2**64 - 1)
    if t is xdr.int64:
        return st.integers(-(2**63), 2**63 - 1)
    if t is xdr.boolean:
        return st.booleans()
    if t is xdr.void:
        return st.none()
    if isinstance(t, xdr.Enum):
        return st.sampled_from(list(t.cls))
    if isinstance(t, xdr.Fixed):
        return st.binary(min_size=t.n, max_size=t.n)
    if isinstance(t, xdr.Opaque):
        return st.binary(max_size=min(t.maxlen, 70))
    if isinstance(t, xdr.Optional):
        return st.none() | strategy(t.t)
    if isinstance(t, xdr.Array):
        return st.lists(strategy(t.t), max_size=min(t.maxlen, 4))
    if isinstance(t, xdr.List):
        return st.lists(strategy(t.t), max_size=4)
    if isinstance(t, xdr.Struct):
        return st.builds(t.cls, *[strategy(ft) for _, ft in t.fields])
    if isinstance(t, xdr.Union):
        arms = [st.builds(UnionValue, st.just(tag), strategy(arm)) for tag, arm in t.arms.items()]
        if t.default is not None and isinstance(t.disc, xdr.Enum):
            others = [v for v in t.disc.cls if int(v) not in t.arms]
            if others:
                arms.append(st.builds(UnionValue, st.sampled_from(others), strategy(t.default)))
        return st.one_of(arms)
    raise TypeError(f"no strategy for {t!r}")


TYPES: dict[str, xdr.XType] = {}
for proc, (argt, rest) in RES.items():
    TYPES[f"{nfs3_types.NFSPROC3(proc).name}-args"] = argt
    TYPES[f"{nfs3_types.NFSPROC3(proc).name}-res"] = rest
for module, names in ((mount_types, ("mountres3", "mountlist", "exports")), (portmap_types, ("mapping", "pmaplist", "rpcb", "rp__list")),
                      (rpc_types, ("authsys_parms", "opaque_auth")), (nfs3_types, ("fattr3", "sattr3"))):
    for name in names:
        TYPES[name] = getattr(module, name)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_xdr_round_trip(name: str) -> None:
    t = TYPES[name]

    @settings(max_examples=40, deadline=None)
    @given(strategy(t))
    def check(v: Any) -> None:
        data = t.encode(v)
        assert len(data) % 4 == 0
        assert t.decode(data) == v
        # every strict prefix is rejected, never misread
        if data:
            with pytest.raises(xdr.XDRError):
                t.decode(data[: len(data) - 4])

    check()


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_xdr_decoders_reject_garbage_cleanly(data: bytes) -> None:
    for t in (nfs3_types.READDIRPLUS3args, nfs3_types.CREATE3args, nfs3_types.SETATTR3args, nfs3_types.MKNOD3args, nfs3_types.fattr3, mount_types.mountres3):
        try:
            t.decode(data)
        except xdr.XDRError:
            pass


# -- record marking --------------------------------------------------------------------------


class _Recorder:
    fast = None  # no fast lane: every record goes to generic

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def handle_start(self, record: Any, client: Any, local: str = "") -> None:
        self.records.append(bytes(record))
        return None

    generic = handle_start


class _Transport:
    def __init__(self) -> None:
        self.aborted = False
        self.paused = False

    def get_extra_info(self, key: str) -> Any:
        return ("127.0.0.1", 1) if key in ("peername", "sockname") else None

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def writelines(self, bufs: list) -> None:
        pass


def feed(proto: RpcStreamProtocol, stream: bytes, cuts: list[int]) -> None:
    pos = 0
    for cut in sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]:
        chunk = stream[pos:cut]
        pos = max(pos, cut)
        while chunk:
            buf = proto.get_buffer(-1)
            assert len(buf) > 0
            n = min(len(buf), len(chunk))
            buf[:n] = chunk[:n]
            proto.buffer_updated(n)
            chunk = chunk[n:]


@st.composite
def framed(draw: Any) -> tuple[list[bytes], bytes]:
    records = draw(st.lists(st.binary(max_size=2000), max_size=6))
    stream = bytearray()
    for rec in records:
        cuts = sorted(set(draw(st.lists(st.integers(0, max(len(rec), 1)), max_size=3))))
        pieces, prev = [], 0
        for c in cuts:
            pieces.append(rec[prev:c])
            prev = max(prev, c)
        pieces.append(rec[prev:])
        for i, piece in enumerate(pieces):
            last = 0x80000000 if i == len(pieces) - 1 else 0
            stream += struct.pack(">I", last | len(piece)) + piece
    return records, bytes(stream)


@STREAMS
@given(framed(), st.lists(st.integers(0, 20000), max_size=12), st.sampled_from([16, 64, 4096]))
@settings(max_examples=300, deadline=None)
def test_record_marking_over_arbitrary_tcp_splits(stream_cls: Any, fr: tuple[list[bytes], bytes], cuts: list[int], bufsize: int) -> None:
    records, stream = fr
    rec = _Recorder()
    proto = stream_cls(rec, bufsize=bufsize)  # type: ignore[arg-type]
    tr = _Transport()
    proto.connection_made(tr)  # type: ignore[arg-type]
    feed(proto, stream, cuts)
    assert rec.records == records
    assert not tr.aborted


@STREAMS
@given(st.integers(101, 5000), st.lists(st.integers(0, 6000), max_size=5))
@settings(max_examples=50, deadline=None)
def test_record_over_the_cap_closes_the_connection(stream_cls: Any, size: int, cuts: list[int]) -> None:
    rec = _Recorder()
    proto = stream_cls(rec, max_record=100, bufsize=64)  # type: ignore[arg-type]
    tr = _Transport()
    proto.connection_made(tr)  # type: ignore[arg-type]
    stream = struct.pack(">I", 10) + b"a" * 10 + struct.pack(">I", 0x80000000 | size) + b"b" * size
    feed(proto, stream, cuts)
    assert tr.aborted and rec.records == []


# -- arbitrary bytes into the dispatcher ----------------------------------------------------------


@pytest.fixture(scope="module")
def dispatcher(images: dict, tmp_path_factory: pytest.TempPathFactory):
    stack = Stack.open(images["repo"])
    ds = Datastore(stack, tmp_path_factory.mktemp("fuzzcache"), reserve=0)
    ds.load()
    ds.publish(images["point"], "fuzz")
    rpc = RpcServer()
    rpc.add(NFS3(ds).program())
    rpc.add(Mount3(ds, "/instantnfs", ["0.0.0.0/0"]).program())
    loop = asyncio.new_event_loop()
    yield rpc, loop
    loop.close()
    stack.close()


def _answer(rpc: RpcServer, loop: asyncio.AbstractEventLoop, data: bytes) -> Any:
    r = rpc.handle_start(data, ("127.0.0.1", 700))
    if inspect.isawaitable(r):
        r = loop.run_until_complete(r)
    return r


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_bytes_get_a_reply_or_nothing(dispatcher: Any, data: bytes) -> None:
    rpc, loop = dispatcher
    r = _answer(rpc, loop, data)
    assert r is None or (isinstance(r, list) and b"".join(bytes(b) for b in r)[:4] == data[:4])


@given(st.sampled_from([(100003, p) for p in range(22)] + [(100005, p) for p in range(6)]), st.binary(max_size=300), st.integers(0, 2**32 - 1))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_arguments_are_garbage_or_a_status(dispatcher: Any, target: tuple[int, int], args: bytes, xid: int) -> None:
    rpc, loop = dispatcher
    prog, proc = target
    r = _answer(rpc, loop, build_call(xid, prog, 3, proc, args, cred=(1, rpc_types.authsys_parms.encode(rpc_types.authsys_parms(0, b"h", 0, 0, [])))))
    assert r is not None
    rep = b"".join(bytes(b) for b in r)
    u = Unpacker(rep)
    assert u.u32() == xid and u.u32() == 1 and u.u32() == 0
    u.u32()
    u.opaque(400)
    stat = u.u32()
    assert stat in (0, 4), f"accept_stat {stat}: SYSTEM_ERR means a handler bug"


@STREAMS
def test_a_connection_yields_the_loop_after_its_turn(stream_cls: Any) -> None:
    """40 records arriving at once: one turn dispatches ``turn_records`` of them, and the
    rest wait for later turns, after the loop has served the others (no record is lost,
    none is reordered)."""
    records = [struct.pack(">I", i) * 3 for i in range(40)]
    stream = b"".join(struct.pack(">I", 0x80000000 | len(r)) + r for r in records)

    async def main() -> list[int]:
        rec = _Recorder()
        proto = stream_cls(rec, bufsize=1 << 16, turn_records=16)  # type: ignore[arg-type]
        proto.connection_made(_Transport())  # type: ignore[arg-type]
        seen = []
        buf = proto.get_buffer(-1)
        buf[: len(stream)] = stream
        proto.buffer_updated(len(stream))
        seen.append(len(rec.records))
        while len(rec.records) < len(records) and len(seen) < 10:
            await asyncio.sleep(0)
            seen.append(len(rec.records))
        assert rec.records == records
        return seen

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == [16, 32, 40]
    finally:
        loop.close()
