"""How one NFS READ, WRITE and publish travel through the engine's modules, and how often
they cross between them: ``python scripts/callpath.py [--json] [--op OP] [--layers L]``.

It builds a temporary repository (the demo's generated disk, 16 MiB), runs the daemon in
this process as ``instantnfs serve`` composes it (``run_daemon`` on uvloop in the main
thread, on 127.0.0.91, portmapper off) and drives it from another thread with the
project's NFS client and urllib: publish, mount, lookup, a warm-up READ and WRITE, then
traces (a) a READ of a block never read before (a chunk-cache miss that reaches the pack
file), (b) an UNSTABLE WRITE of 64 KiB into a fresh region, (c) a publish of the same
point under another name. The daemon stops through its own path (SIGTERM to its loop).

``sys.setprofile`` + ``threading.setprofile`` record ``call`` events of code under engine/
while a global window is open (it opens and closes when no thread runs engine code).
Left out: the client thread; background threads (an engine function is their target,
like the pack sweeper; named in the output); coroutine and generator resumptions (not
calls: a resumed coroutine's calls go on in its thread's path segment).
Cython functions are invisible (the .pyx modules, and the compiled builds of
engine/nfs/fastlane.py and transport.py); ``INSTANTNFS_PURE=1`` shows the Python sources instead.

Per op: ``modules`` in first-visit order; ``crossings``, calls whose caller's module
differs from the callee's (both in engine/), per edge in ``edges``; ``path``, a segment
per entry into engine code from outside (event loop, thread pool), repeats collapsed, so
A->B->A is two ``transitions``; ``back_ups``, crossings to a module listed earlier in
``--layers`` (prefix match without ``engine.``; ``a/b`` is one layer; unknown ones last).
Engine names used (tried in order where modules move): run_daemon (engine.control.daemon,
engine.control.server_cli),
engine.repo.ingest, engine.repo.repository, engine.config, engine.nfs.client.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dis
import importlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import types
import urllib.request
from pathlib import Path
from typing import Any

Event = tuple[str | None, str, int]  # the caller's module (None: outside engine/), the callee's, the thread
RUN: Any = asyncio.run
try:
    import uvloop  # what `instantnfs serve` runs on

    RUN = uvloop.run
except ImportError:
    pass

ROOT = Path(__file__).resolve().parents[1]
ADDR = "127.0.0.91"
LAYERS = "control,jobs,nfs,datastore/export,stack,writecache,writecache_format,disk,cache,repo,blockmap/fsutil/errors/config/tuning"
MiB, KiB = 1 << 20, 1 << 10
DISK_SIZE = 16 * MiB
READ_AT = 7 * MiB  # demo disk: every 8th block (7, 15, ...) holds random bytes of its own
WARM_WRITE_AT, WRITE_AT, IO_SIZE = 3 * MiB, 12 * MiB, 64 * KiB
GEN_FLAGS = 0x20 | 0x80 | 0x100 | 0x200  # CO_GENERATOR, CO_COROUTINE, CO_ITERABLE_COROUTINE, CO_ASYNC_GENERATOR
FRESH = bytes((dis.opmap["RESUME"], 0))  # where a new frame starts; a resumed one has RESUME n>0


def first_of(names: list[str], attr: str) -> Any:
    """``attr`` of the first module of ``names`` that has it (modules move)."""
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        if hasattr(mod, attr):
            return getattr(mod, attr)
    raise SystemExit(f"callpath: no {attr} in {' or '.join(names)}")


class Tracer:
    def __init__(self, engine_dir: Path) -> None:
        self.prefix = str(engine_dir) + os.sep
        self.base = len(str(engine_dir.parent)) + 1
        self.window = False
        self.loop: asyncio.AbstractEventLoop  # the daemon's
        self.skip: set[int] = set()
        self.events: list[Event] = []
        self._names: dict[str, str | None] = {}

    def module(self, filename: str) -> str | None:
        if filename not in self._names:
            ours = filename.startswith(self.prefix) and filename.endswith(".py")
            self._names[filename] = filename[self.base:-3].replace(os.sep, ".").removesuffix(".__init__") if ours else None
        return self._names[filename]

    def __call__(self, frame: types.FrameType, event: str, arg: Any) -> None:
        if not self.window or event != "call" or threading.get_ident() in self.skip:
            return
        code, back, i = frame.f_code, frame.f_back, frame.f_lasti
        callee = self.module(code.co_filename)
        if callee is None:
            return
        if code.co_flags & GEN_FLAGS and code.co_code[i:i + 2] != FRESH:
            return  # a coroutine or generator resumed: not a call (its thread's segment goes on)
        self.events.append((self.module(back.f_code.co_filename) if back else None, callee, threading.get_ident()))

    def threads(self) -> tuple[set[int], set[int]]:
        """(working, background): threads with an engine frame on their stack; background
        ones run an engine function as their thread target (loops like a pack sweeper)."""
        working: set[int] = set()
        background: set[int] = set()
        for tid, top in sys._current_frames().items():
            f: types.FrameType | None = top
            outer = None
            while f is not None:
                if self.module(f.f_code.co_filename) is not None:
                    outer = f
                f = f.f_back
            if outer is not None:
                b = outer.f_back
                own = b is not None and b.f_code.co_filename == threading.__file__  # started by Thread.run
                (background if own else working).add(tid)
        return working - self.skip, background

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until, three times in a row, the daemon's loop has run what was queued on it
        and then no thread but background ones runs engine code."""
        deadline, quiet = time.monotonic() + timeout, 0
        while quiet < 3:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not go idle within {timeout:.0f} s")
            passed = threading.Event()
            self.loop.call_soon_threadsafe(passed.set)
            passed.wait(max(deadline - time.monotonic(), 0))
            quiet = 0 if self.threads()[0] else quiet + 1
            time.sleep(0.02)

    def trace(self, client: int, fn: Any) -> tuple[list[Event], list[str]]:
        """Run ``fn()`` with the window open; its events and the background threads left out."""
        self.skip = {client}
        self.settle()
        self.events = []
        self.window = True
        try:
            fn()
            self.settle()
        finally:
            self.window = False
        background = self.threads()[1]
        names = {t.ident: t.name for t in threading.enumerate()}
        return [e for e in self.events if e[2] not in background], sorted(names.get(t, str(t)) for t in background)


def parse_layers(text: str) -> list[list[str]]:
    return [[a.strip() for a in layer.split("/") if a.strip()] for layer in text.split(",") if layer.strip()]


def layer_of(module: str, layers: list[list[str]]) -> int:
    name = module.removeprefix("engine.")
    for i, alts in enumerate(layers):
        if any(name == a or name.startswith(a + ".") for a in alts):
            return i
    return len(layers)


def analyse(events: list[Event], layers: list[list[str]]) -> dict[str, Any]:
    segments: list[list[str]] = []  # a new one where a thread enters engine code from outside
    current: dict[int, list[str]] = {}
    edges, backs = collections.Counter[str](), collections.Counter[str]()
    for caller, callee, tid in events:
        seg = current.get(tid)
        if caller is None or seg is None:
            seg = current[tid] = []
            segments.append(seg)
        for m in (caller, callee):
            if m is not None and (not seg or seg[-1] != m):
                seg.append(m)
        if caller is not None and caller != callee:
            edges[f"{caller}->{callee}"] += 1
            if layer_of(callee, layers) < layer_of(caller, layers):
                backs[f"{caller}->{callee}"] += 1
    calls = [callee for _, callee, _ in events]
    return {"modules": list(dict.fromkeys(calls)), "calls": len(calls), "crossings": edges.total(),
            "transitions": sum(len(seg) - 1 for seg in segments), "entries": len(segments),
            "path": segments, "edges": dict(edges), "back_ups": dict(backs)}


def make_demo_disk(path: str, size: int) -> None:
    """A sparse sample disk: a boot sector, text, incompressible and repeated blocks, holes
    (what the demo served before it booted a real guest; the trace needs only variety)."""
    import random

    rng = random.Random(4)
    block = 1 << 20
    words = [b"instant", b"recovery", b"backup", b"restore", b"virtual", b"machine", b"disk", b"nfs", b"\n"]
    text = b" ".join(rng.choice(words) for _ in range(200_000))[:block]
    noise = rng.randbytes(block)
    with open(path, "wb") as f:
        f.truncate(size)
        boot = bytearray(512)
        boot[3:11] = b"INSTANTN"
        boot[510:512] = b"\x55\xaa"
        f.write(boot)
        for i in range(1, size // block):
            kind = i % 8
            if kind in (0, 5):
                continue  # holes: all zeros, not stored
            f.seek(i * block)
            f.write(noise if kind == 3 else text if kind != 7 else rng.randbytes(block))


def make_repo(base: Path) -> tuple[str, str]:
    """A repository holding one restore point of one VM with the demo's disk: (path, point id)."""
    ingest = importlib.import_module("engine.repo.ingest")
    Repository = importlib.import_module("engine.repo.repository").Repository
    repo, img = base / "repo", base / "disk.img"
    Repository.init(repo, MiB)
    make_demo_disk(str(img), DISK_SIZE)
    with Repository.open(repo) as r:
        manifest = ingest.backup(r, ingest.BackupSettings(vm="trace-vm", cpus=1, memory_mib=512), [str(img)])
    img.unlink()
    return str(repo), manifest["id"]


class Driver:
    """The client side, on its own thread: HTTP with urllib, NFS with engine.nfs.client."""

    def __init__(self, tracer: Tracer, cfg: dict[str, Any], point: str, ops: list[str], layers: list[list[str]]) -> None:
        self.tracer, self.cfg, self.point, self.ops, self.layers = tracer, cfg, point, ops, layers
        self.started = threading.Event()
        self.results: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.url = f"http://{ADDR}:{cfg['control']['port']}/api/v1"
        self.token = ""

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def publish(self, name: str) -> Any:  # as `instantnfs publish POINT --name NAME` sends it
        return self.api("POST", "/sessions", {"point": self.point, "mode": "instant", "force": False, "name": name})

    def run(self) -> None:
        try:
            if not self.started.wait(60):
                raise RuntimeError("the daemon did not start within 60 s")
            self.token = Path(self.cfg["control"]["token_file"]).read_text().strip()
            self.drive()
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            try:  # the daemon's own stop path: SIGTERM, handled by its loop
                self.tracer.loop.call_soon_threadsafe(os.kill, os.getpid(), signal.SIGTERM)
            except (AttributeError, RuntimeError):
                pass  # it never started or has already stopped

    def traced(self, op: str, what: str, fn: Any) -> None:
        before = self.api("GET", "/status")["chunk_cache"]["misses"]
        events, background = self.tracer.trace(threading.get_ident(), fn)
        res = {"what": what, **analyse(events, self.layers), "background_threads": background}
        res["chunk_cache_misses"] = self.api("GET", "/status")["chunk_cache"]["misses"] - before
        self.results[op] = res

    def drive(self) -> None:
        NFSClient = first_of(["engine.nfs.client"], "NFSClient")
        status = self.api("GET", "/status")
        export, img = status["export"], self.publish("trace")["disks"][0]["files"]["img"]
        loop = asyncio.new_event_loop()  # runs only inside run(): the client is idle in between
        run = loop.run_until_complete
        try:
            nfs = run(NFSClient.connect(ADDR, status["ports"]["mount"], status["ports"]["nfs"]))
            try:
                fh = run(nfs.walk(run(nfs.mount(export)), img[len(export):]))
                run(nfs.read(fh, 0, IO_SIZE))
                run(nfs.write(fh, WARM_WRITE_AT, b"w" * IO_SIZE, stable=0))
                if "read" in self.ops:
                    got: list[Any] = []
                    self.traced("read", f"READ {IO_SIZE // KiB} KiB at {READ_AT // MiB} MiB, a block never read before",
                                lambda: got.append(run(nfs.read(fh, READ_AT, IO_SIZE))))
                    if len(got[0][0]) != IO_SIZE:
                        raise RuntimeError(f"the traced READ returned {len(got[0][0])} bytes, not {IO_SIZE}")
                if "write" in self.ops:
                    self.traced("write", f"UNSTABLE WRITE {IO_SIZE // KiB} KiB at {WRITE_AT // MiB} MiB, a fresh region",
                                lambda: run(nfs.write(fh, WRITE_AT, b"t" * IO_SIZE, stable=0)))
                if "publish" in self.ops:
                    self.traced("publish", "POST /sessions: the same point again as trace-2",
                                lambda: self.publish("trace-2"))
            finally:
                run(nfs.close())
        finally:
            loop.close()


def config(base: Path, repo: str) -> dict[str, Any]:
    configmod = importlib.import_module("engine.config")
    cfg = configmod.load(None)  # the defaults `instantnfs serve` starts from
    cfg["repo"]["path"] = repo
    cfg["server"].update(bind=ADDR, portmap="off")
    cfg["cache"].update(dir=str(base / "cache"), reserve_gib=0)
    with socket.socket() as sock:  # a free port for the control API
        sock.bind((ADDR, 0))
        port = sock.getsockname()[1]
    cfg["control"].update(bind=ADDR, port=port, token_file=str(base / "control.token"))
    return configmod.validate(cfg)


def show(out: dict[str, Any]) -> None:
    print(f"call paths through engine/, {out['build']}")
    print(f"{'op':8} {'calls':>6} {'crossings':>9} {'transitions':>11} {'back-ups':>8} {'modules':>7}  misses")
    for op, r in out["ops"].items():
        print(f"{op:8} {r['calls']:6} {r['crossings']:9} {r['transitions']:11} {sum(r['back_ups'].values()):8} "
              f"{len(r['modules']):7}  {r['chunk_cache_misses']}")
    for op, r in out["ops"].items():
        print(f"\n{op}: {r['what']}")
        print("  modules:  " + " > ".join(m.removeprefix("engine.") for m in r["modules"]))
        print("  path:     " + " | ".join(" > ".join(m.removeprefix("engine.") for m in seg) for seg in r["path"]))
        for edge, n in r["back_ups"].items():
            print(f"  back-up:  {edge} x{n}")
        if r["background_threads"]:
            print("  not recorded (background): " + ", ".join(r["background_threads"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--op", choices=("read", "write", "publish", "all"), default="all")
    ap.add_argument("--layers", default=LAYERS, help="layer order, top first: comma-separated, a/b = one layer")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    engine_dir = Path(importlib.import_module("engine").__file__ or "").resolve().parent
    run_daemon = first_of(["engine.control.daemon", "engine.control.server_cli"], "run_daemon")
    ops = ["read", "write", "publish"] if args.op == "all" else [args.op]
    with tempfile.TemporaryDirectory(prefix="callpath-") as tmp:
        base = Path(tmp)
        os.environ["XDG_STATE_HOME"] = str(base / "state")  # the daemon's token index goes here too
        repo, point = make_repo(base)
        cfg = config(base, repo)
        tracer = Tracer(engine_dir)
        driver = Driver(tracer, cfg, point, ops, parse_layers(args.layers))
        client = threading.Thread(target=driver.run, name="callpath-client")

        async def serve() -> int:
            tracer.loop = asyncio.get_running_loop()
            ready = tracer.loop.create_future()
            ready.add_done_callback(lambda _f: driver.started.set())
            return await run_daemon(cfg, ready=ready)

        sys.setprofile(tracer)
        threading.setprofile(tracer)
        client.start()
        try:
            rc = RUN(serve())
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
            driver.started.set()
            client.join(60)
    if driver.error is not None:
        print(f"callpath: {type(driver.error).__name__}: {driver.error}", file=sys.stderr)
        return 1
    pure = os.environ.get("INSTANTNFS_PURE") == "1"
    out = {"build": "pure-Python build" if pure else "Cython build (.pyx functions are invisible)",
           "layers": parse_layers(args.layers), "ops": driver.results}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        show(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
