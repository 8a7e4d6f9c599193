"""The fast lane (engine.nfs.fastlane, engine.nfs.wire) answers exactly as the generic path.

One datastore is served by two dispatchers, one with the fast lane and one without.
Every call (well-formed or not, from an allowed client or not, with good, forged and
short handles) goes to both, one after the other, and the replies must be the same
bytes, the counters the same numbers. The compiled codec and its pure-Python twin are also
compared function by function. Whichever codec ``engine.nfs.wire`` selected runs the
world test (the suite runs once with each).
"""
from __future__ import annotations

import asyncio
import inspect
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.datastore import Datastore
from engine.nfs import _wire_py, compiled, wire
from engine.nfs.client import AUTH_NONE, auth_sys, build_call
from engine.nfs.compiled import FastLane
from engine.nfs.nfs3 import NFS3
from engine.nfs.nfs3_types import NFSPROC3
from engine.nfs.rpc import NOT_MINE, AllowList, RpcServer
from engine.stack import Stack

NFS = 100003
ALLOWED = ("127.0.0.1", 800)
OUTSIDER = ("10.9.8.7", 800)
FAST = [NFSPROC3.GETATTR, NFSPROC3.ACCESS, NFSPROC3.LOOKUP, NFSPROC3.READ, NFSPROC3.WRITE, NFSPROC3.COMMIT]
CLOCK = 1_700_000_000_123_456_789


class World:
    """One datastore, answered by two dispatchers: ``fast`` with the fast lane, ``slow``
    without. With the clock frozen (before the session's creation time, so no write moves
    a disk's mtime), every call in the tests may be applied twice with the same result:
    reads and attributes do not change, and a WRITE of the same bytes, a COMMIT, again."""

    def __init__(self, images: dict, cache: Any, read_only: bool = False) -> None:
        self.stack = Stack.open(images["repo"], cache_bytes=64 << 20)
        self.ds = Datastore(self.stack, cache, reserve=0)
        self.ds.load()
        self.ds.publish(images["point"], "lane")
        self.nfs = NFS3(self.ds, read_only=read_only)
        self.fast, self.slow = RpcServer(AllowList(["127.0.0.0/8"])), RpcServer(AllowList(["127.0.0.0/8"]))
        self.slow.add(self.nfs.program())
        program = self.nfs.program()
        self.fast.add(program)
        self.lane = FastLane(self.nfs, self.fast, program)
        self.fast.fast = self.lane

    def close(self) -> None:
        self.ds.close()
        self.stack.close()


def _answer(loop: asyncio.AbstractEventLoop, rpc: RpcServer, record: bytes, client: tuple[str, int]) -> bytes | None:
    # the transport hands over a view of its receive buffer: do the same
    r = rpc.handle_start(memoryview(bytearray(record)), client)
    if inspect.isawaitable(r):
        r = loop.run_until_complete(r)
    return None if r is None else b"".join(bytes(b) for b in r)


@pytest.fixture(scope="module")
def world(images: dict, tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("engine.datastore.diskfile.time.time_ns", lambda: CLOCK)
        w = World(images, tmp_path_factory.mktemp("lane"))
        loop = asyncio.new_event_loop()
        ds = w.ds
        sdir = ds.lookup(ds.root(), b"lane")
        names = [f"{d['name']}.img".encode() for d in images["disks"]]
        disks = [ds.lookup(sdir, n) for n in names]
        handles = {
            "root": ds.handle(ds.root()),
            "session": ds.handle(sdir),
            "disk0": ds.handle(disks[0]),
            "disk1": ds.handle(disks[1]),
        }
        handles["forged"] = handles["disk0"][:-1] + bytes([handles["disk0"][-1] ^ 1])
        handles["short"] = handles["disk0"][:7]
        handles["empty"] = b""
        yield w, loop, handles, [d["size"] for d in images["disks"]], names
        loop.close()
        w.close()


def _fh(h: bytes) -> bytes:
    return struct.pack(">I", len(h)) + h + b"\0" * (-len(h) & 3)


@st.composite
def calls(draw: Any, handles: dict[str, bytes], sizes: list[int], names: list[bytes]) -> tuple[bytes, tuple[str, int]]:
    proc = draw(st.sampled_from(FAST + [NFSPROC3.NULL, NFSPROC3.FSINFO, NFSPROC3.SETATTR, 99]))
    usual = "session" if proc == NFSPROC3.LOOKUP else draw(st.sampled_from(["disk0", "disk1"]))
    fh = _fh(handles[usual if draw(st.integers(0, 3)) else draw(st.sampled_from(sorted(handles)))])
    size = draw(st.sampled_from(sizes))
    offset = draw(st.one_of(st.integers(0, size + 8192), st.integers(0, size - 1), st.sampled_from([0, size - 1, size, 2**63 - 1, 2**63, 2**64 - 1])))
    count = draw(st.one_of(st.integers(0, 70000), st.sampled_from([0, 1, 4096, 1 << 20, (1 << 20) + 1, 2**32 - 1])))
    if proc in (NFSPROC3.READ, NFSPROC3.COMMIT):
        args = fh + struct.pack(">QI", max(0, min(offset, 2**64 - 1)), count)
    elif proc == NFSPROC3.ACCESS:
        args = fh + struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    elif proc == NFSPROC3.LOOKUP:
        name = draw(st.sampled_from([*names, b"lane", b"missing", b"", b".", b"..", b"x" * 300]))
        args = fh + _fh(name)
    elif proc == NFSPROC3.WRITE:
        n = draw(st.integers(0, 9000))
        data = draw(st.binary(min_size=n, max_size=n)) if draw(st.booleans()) else bytes([draw(st.integers(0, 255))]) * n
        wcount = draw(st.sampled_from([n, max(n - 1, 0), n + 1]))
        stable = draw(st.sampled_from([0, 0, 1, 2, 3, -1]))
        woff = max(0, min(offset, 2**64 - 1))
        args = fh + struct.pack(">QIi", woff, wcount, stable) + _fh(data)
    else:
        args = fh
    if draw(st.integers(0, 9)) == 0:  # malformed: cut short, or random bytes
        args = args[: draw(st.integers(0, len(args)))] if draw(st.booleans()) else draw(st.binary(max_size=120))
    if draw(st.integers(0, 9)) == 0:
        args += draw(st.binary(max_size=8))  # trailing bytes
    cred = draw(st.sampled_from([auth_sys(0, 0), auth_sys(1000, 1000, (4, 24)), AUTH_NONE, (1, b"\xff\xff"), (7, b"")]))
    xid = draw(st.integers(0, 2**32 - 1))
    client = ALLOWED if draw(st.integers(0, 7)) else OUTSIDER
    return build_call(xid, NFS, draw(st.sampled_from([3, 3, 3, 2])), int(proc), args, cred=cred), client


def test_both_lanes_answer_every_call_with_the_same_bytes(world: Any) -> None:
    w, loop, handles, sizes, names = world
    answered: dict[int, int] = {}

    def lane(record: Any, client: tuple[str, int], local: str = "") -> Any:
        r = w.lane(record, client, local)
        if r is not NOT_MINE:
            proc = struct.unpack_from(">I", record, 20)[0]
            answered[proc] = answered.get(proc, 0) + 1
        return r

    w.fast.fast = lane

    def same(seq: list[tuple[bytes, tuple[str, int]]]) -> None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("engine.datastore.diskfile.time.time_ns", lambda: CLOCK)
            for record, client in seq:
                a = _answer(loop, w.fast, record, client)
                b = _answer(loop, w.slow, record, client)
                assert a == b, (record.hex(), client)

    @given(st.lists(calls(handles, sizes, names), min_size=1, max_size=12))
    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    def check(seq: list[tuple[bytes, tuple[str, int]]]) -> None:
        same(seq)

    # and, whatever hypothesis drew, one well-formed call of each fast procedure (twice:
    # the first may meet a credential or chunk not seen yet), cached and not, written and not
    disk, sdir, cred = _fh(handles["disk0"]), _fh(handles["session"]), auth_sys(0, 0)
    common = [
        (NFSPROC3.GETATTR, disk), (NFSPROC3.ACCESS, disk + struct.pack(">I", 0x3F)),
        (NFSPROC3.LOOKUP, sdir + _fh(names[0])), (NFSPROC3.READ, disk + struct.pack(">QI", 4096, 8192)),
        (NFSPROC3.WRITE, disk + struct.pack(">QIi", 8192, 5, 0) + _fh(b"hello")),
        (NFSPROC3.WRITE, disk + struct.pack(">QIi", 3 * 65536 + 7, 3, 2) + _fh(b"abc")),
        (NFSPROC3.READ, disk + struct.pack(">QI", 8190, 20)), (NFSPROC3.COMMIT, disk + struct.pack(">QI", 0, 0)),
    ]
    try:
        check()
        same([(build_call(0x1000 + i, NFS, 3, int(p), a, cred=cred), ALLOWED) for i, (p, a) in enumerate(common * 2)])
    finally:
        w.fast.fast = w.lane
    # the lane itself answered every fast procedure (and handed the rest back)
    assert set(answered) == {int(p) for p in FAST}, answered
    for name in ("GETATTR", "ACCESS", "LOOKUP", "READ", "WRITE", "COMMIT"):
        assert w.fast.programs[NFS].stats.get(name, 0) > 0, name
    assert w.fast.programs[NFS].stats == w.slow.programs[NFS].stats
    assert w.fast.calls == w.slow.calls and w.fast.io_calls == w.slow.io_calls


def test_the_lane_takes_the_common_calls_and_hands_back_the_rest(images: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    w = World(images, tmp_path_factory.mktemp("takes"))
    loop = asyncio.new_event_loop()
    try:
        _takes_and_hands_back(w, loop)
    finally:
        loop.close()
        w.close()


def _takes_and_hands_back(w: World, loop: asyncio.AbstractEventLoop) -> None:
    ds = w.ds
    sdir = ds.lookup(ds.root(), b"lane")
    handles = {"session": ds.handle(sdir), "disk0": ds.handle(ds.lookup(sdir, f"{ds.sessions['lane'].disks[0].name}.img".encode()))}
    handles["forged"] = handles["disk0"][:-1] + bytes([handles["disk0"][-1] ^ 1])
    lane = w.lane
    good = _fh(handles["disk0"])
    cred = auth_sys(0, 0)
    # a credential the dispatcher has not seen yet goes the generic way (which parses it)
    fresh = auth_sys(4242, 4242)
    rec = build_call(1, NFS, 3, NFSPROC3.GETATTR, good, cred=fresh)
    assert lane(memoryview(rec), ALLOWED) is NOT_MINE
    _answer(loop, w.fast, rec, ALLOWED)
    assert isinstance(lane(memoryview(rec), ALLOWED), list)
    _answer(loop, w.fast, build_call(2, NFS, 3, NFSPROC3.GETATTR, good, cred=cred), ALLOWED)
    cases = {
        "getattr": (NFSPROC3.GETATTR, good, list),
        "cached read": (NFSPROC3.READ, good + struct.pack(">QI", 0, 4096), None),
        "forged handle": (NFSPROC3.GETATTR, _fh(handles["forged"]), NOT_MINE),
        "missing name": (NFSPROC3.LOOKUP, _fh(handles["session"]) + _fh(b"missing"), NOT_MINE),
        "not a fast procedure": (NFSPROC3.FSINFO, good, NOT_MINE),
        "cut short": (NFSPROC3.READ, good + b"\0\0", NOT_MINE),
        "count over the data": (NFSPROC3.WRITE, good + struct.pack(">QIi", 0, 10, 0) + _fh(b"abc"), NOT_MINE),
    }
    for what, (proc, args, want) in cases.items():
        r = lane(memoryview(build_call(7, NFS, 3, proc, args, cred=cred)), ALLOWED)
        if want is None:  # a READ: at once when cached, else one coroutine
            if inspect.isawaitable(r):
                loop.run_until_complete(r)
                r = lane(memoryview(build_call(7, NFS, 3, proc, args, cred=cred)), ALLOWED)
            assert isinstance(r, list), what
        elif want is NOT_MINE:
            assert r is NOT_MINE, what
        else:
            assert isinstance(r, want), what
    assert lane(memoryview(build_call(8, NFS, 3, NFSPROC3.GETATTR, good, cred=cred)), OUTSIDER) is NOT_MINE


def test_a_read_only_export_refuses_writes_through_the_generic_path(images: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    w = World(images, tmp_path_factory.mktemp("ro"), read_only=True)
    loop = asyncio.new_event_loop()
    try:
        ds = w.ds
        fh = _fh(ds.handle(ds.lookup(ds.lookup(ds.root(), b"lane"), f"{images['disks'][0]['name']}.img".encode())))
        cred = auth_sys(0, 0)
        _answer(loop, w.fast, build_call(1, NFS, 3, NFSPROC3.GETATTR, fh, cred=cred), ALLOWED)
        for proc, args in ((NFSPROC3.WRITE, fh + struct.pack(">QIi", 0, 3, 2) + _fh(b"abc")),
                           (NFSPROC3.COMMIT, fh + struct.pack(">QI", 0, 0))):
            rec = build_call(2, NFS, 3, proc, args, cred=cred)
            assert w.lane(memoryview(rec), ALLOWED) is NOT_MINE
            rep = _answer(loop, w.fast, rec, ALLOWED)
            assert rep is not None and struct.unpack_from(">I", rep, 24)[0] == 30  # NFS3ERR_ROFS
        assert ds.sessions["lane"].caches[0].read(0, 3) == images["data"][0][:3]
    finally:
        loop.close()
        w.close()


# -- the compiled codec against its twin ---------------------------------------------------


def _compiled() -> Any:
    try:
        from engine.nfs import _wire
    except ImportError:  # pragma: no cover - CI builds it (scripts/setup.sh)
        pytest.fail("engine.nfs._wire is not built: run 'python setup.py build_ext --inplace'")
    return _wire


@given(st.binary(max_size=200), st.integers(0, 220))
@settings(max_examples=800, deadline=None)
def test_decoders_match_their_twin(data: bytes, pos: int) -> None:
    c = _compiled()
    assert c.call_head(data) == _wire_py.call_head(data)
    for fn in ("fh_arg", "read_args", "access_args", "lookup_args", "write_args"):
        assert getattr(c, fn)(data, pos) == getattr(_wire_py, fn)(data, pos), fn
        assert getattr(c, fn)(memoryview(bytearray(data)), pos) == getattr(_wire_py, fn)(data, pos), fn


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.one_of(st.none(), st.binary(min_size=84, max_size=84)),
       st.one_of(st.none(), st.binary(min_size=84, max_size=84)), st.one_of(st.none(), st.binary(min_size=24, max_size=24)),
       st.binary(max_size=64), st.binary(min_size=8, max_size=8), st.booleans(), st.integers(0, 2))
@settings(max_examples=400, deadline=None)
def test_encoders_match_their_twin(xid: int, n: int, fattr: Any, dattr: Any, before: Any, fh: bytes, verf: bytes,
                                   eof: bool, committed: int) -> None:
    c, p = _compiled(), _wire_py
    assert c.ok_head(xid) == p.ok_head(xid)
    if fattr is not None:
        assert c.getattr_reply(xid, fattr) == p.getattr_reply(xid, fattr)
    assert c.read_reply_head(xid, fattr, n, eof) == p.read_reply_head(xid, fattr, n, eof)
    assert c.pad(n) == p.pad(n)
    assert c.access_reply(xid, fattr, n) == p.access_reply(xid, fattr, n)
    assert c.lookup_reply(xid, fh, fattr, dattr) == p.lookup_reply(xid, fh, fattr, dattr)
    assert c.write_reply(xid, before, fattr, n, committed, verf) == p.write_reply(xid, before, fattr, n, committed, verf)
    assert c.commit_reply(xid, before, fattr, verf) == p.commit_reply(xid, before, fattr, verf)


def test_the_selected_codec_is_the_one_asked_for() -> None:
    import os

    want = "pure-python" if os.environ.get("INSTANTNFS_PURE") == "1" else "cython"
    assert wire.IMPLEMENTATION == want and compiled.IMPLEMENTATION == want
    assert (FastLane.__module__ == "engine.nfs.fastlane") == (want == "pure-python")
