"""The run: prepare the input, start the systems, run the scenarios, write the results.

Order of a run:

1. Outside any namespace, as root, re-execute inside a private network namespace
   (``unshare --net --mount``; loopback up; a tmpfs over ``/run`` hides a host rpcbind),
   so fixed ports (111, 2049) are the suite's alone and nothing it starts is reachable
   from outside. In a chroot, where "/" is no mount point and so cannot be made private,
   the run gets the network namespace alone and Ganesha is left out (its portmapper
   socket needs a private /run). Not root: run on loopback addresses, port 111 of
   127.0.0.2 must be free.
2. The input: a seeded disk image (cached across runs), backed up into a fresh
   instantnfs repository in the work directory.
3. instantnfs on 127.0.0.2 (its chunk cache holds the whole disk), and each selected,
   installed peer set up (Ganesha started, borg/restic backups made and mounted).
4. Every selected scenario, in the order of ``SCENARIOS``; each yields its rows as they
   complete. ``results.json`` is rewritten after every row, so a run stopped half way
   keeps what it measured.
5. The report and plots; the servers and mounts stopped (by PID) whatever happened.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.bench import diskgen, machine
from engine.bench.core import OURS, Goal, Measure, Row, Systems, alternate
from engine.bench.ours import OurDaemon

NETNS_ENV = "INSTANTNFS_BENCH_NETNS"
MOUNTNS_ENV = "INSTANTNFS_BENCH_MOUNTNS"
OURS_ADDRESS = "127.0.0.2"
MIB = 1 << 20
GIB = 1 << 30

# scenario name -> module under engine.bench.scenarios, in run order
SCENARIOS: dict[str, str] = {
    "seq-read": "seqread",
    "rand-read": "randread",
    "getattr": "getattr",
    "writes": "writes",
    "many-vms": "manyvms",
    "publish": "publish",
    "ingest": "ingest",
    "files": "files",
    "memory": "memory",
    # the recovery product (issue 13)
    "verify": "verify",
    "migrate": "migrate",
    "boot": "boot",
    "boot-trace": "boottrace",
    "sandboxes": "sandboxes",
}
# scenarios that boot the test guest (a TCG boot takes 15-30 s here); the CI quick run
# (tests/bench/test_bench_cli.py) keeps boot-trace (one boot) and leaves the others out
BOOTS = ("boot", "boot-trace", "sandboxes")
DEFAULT_PEERS = ("ganesha", "borg", "borg-fixed", "restic", "local")


class Scenario(Protocol):
    NAME: str
    GROUP: str
    PEERS: tuple[str, ...]  # the peers it compares with ("local" included)

    def rows(self, ctx: Context) -> int: ...  # how many rows run() will yield (for progress)

    def run(self, ctx: Context) -> Iterator[Row]: ...


def load_scenario(name: str) -> Scenario:
    try:
        module = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; the scenarios are: {', '.join(SCENARIOS)}") from None
    return importlib.import_module(f"engine.bench.scenarios.{module}")  # type: ignore[return-value]


@dataclass
class Settings:
    out: Path
    work: Path
    quick: bool = False
    only: Sequence[str] = tuple(SCENARIOS)
    peers: Sequence[str] = DEFAULT_PEERS
    pairs: int = 3
    disk_size: int = 2 * GIB
    seed: int = 1
    seconds: float = 3.0  # the measured window of a timed load
    keep: bool = False
    command: str = "instantnfs bench"

    @classmethod
    def for_mode(cls, quick: bool, **kw: Any) -> Settings:
        base: dict[str, Any] = {"pairs": 2, "disk_size": 256 * MIB, "seconds": 1.0} if quick else {}
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(quick=quick, **base)


@dataclass
class Context:
    """What a scenario gets: the input, the systems, the settings and the progress hooks."""

    settings: Settings
    image: Path
    image_info: dict[str, Any]
    repo: Path
    point: str
    disk: str  # the disk's name in the restore point
    ours: OurDaemon
    peers: dict[str, Any] = field(default_factory=dict)  # name -> engine.bench.peers.Peer, set up
    missing: dict[str, str] = field(default_factory=dict)  # name -> why it is not measured
    log: Callable[[str], None] = print
    step: Callable[[str], None] = lambda what: None
    _sessions: int = 0

    @property
    def quick(self) -> bool:
        return self.settings.quick

    @property
    def pairs(self) -> int:
        return self.settings.pairs

    @property
    def size(self) -> int:
        return int(self.image_info["size"])

    @property
    def work(self) -> Path:
        return self.settings.work

    def conditions(self, **kw: Any) -> dict[str, Any]:
        """A row's conditions, with the server-side ones every row shares."""
        base = {
            "blockmap": "pure" if os.environ.get("INSTANTNFS_PURE") == "1" else "cython",
            "event_loop": "uvloop",
            "disk": f"{self.size >> 20} MiB seeded mixed disk",
        }
        base.update(kw)
        return base

    def session_name(self, what: str) -> str:
        self._sessions += 1
        return f"{what}{self._sessions}"

    def row(self, id: str, title: str, group: str, unit: str, better: str, conditions: dict[str, Any],
            goal: Goal | None = None, peers: Sequence[str] = ()) -> Row:
        """A new row; peers the run does not measure are recorded as missing with the reason."""
        r = Row(id, title, group, unit, better, self.conditions(**conditions), goal)
        for p in peers:
            if p in self.missing:
                r.missing[p] = self.missing[p]
        return r

    def measure(self, row: Row, systems: Systems,
                before: Callable[[str], None] | None = None, pairs: int | None = None,
                warmup: bool = False) -> Row:
        """Run ``systems`` alternately into ``row``; a failure becomes the row's error.

        ``warmup``: run each system once, untimed, first (a "warm" row's full pass).
        """
        t0 = time.monotonic()
        try:
            if warmup:
                for name, fn in systems.items():
                    self.step(f"{row.id}: {name} warm-up")
                    fn()
            row.results = alternate(systems, pairs or self.pairs, before=before,
                                    progress=lambda n, r: self.step(f"{row.id}: {n} run {r + 1}"))
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the run goes on
            row.error = f"{type(e).__name__}: {e}"
            self.log(f"{row.id} failed: {row.error}")
        row.seconds = time.monotonic() - t0
        return row

    def unpublish(self, *names: str) -> None:
        """Unpublish sessions a scenario made; a failure is logged (the daemon may be what failed)."""
        for n in names:
            try:
                self.ours.unpublish(n)
            except Exception as e:  # noqa: BLE001 - cleaning up after a row; the row has its error
                self.log(f"unpublishing {n} failed: {e}")


# -- the namespace -------------------------------------------------------------------------


def in_namespace() -> bool:
    return os.environ.get(NETNS_ENV) == "1"


def private_mounts() -> bool:
    """Whether the run has a mount namespace of its own (a private /run for Ganesha)."""
    return os.environ.get(MOUNTNS_ENV) == "1"


def reexec_in_namespace(argv: Sequence[str]) -> None:
    """Replace this process with itself inside a private network namespace, and a private
    mount namespace where the root can be made private (not in a chroot, where "/" is no
    mount point: there the run gets the network namespace alone, and no Ganesha)."""
    if shutil.which("unshare") is None:
        raise SystemExit("instantnfs bench: 'unshare' (util-linux) is needed to run in a private network namespace")
    mounts = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    env = dict(os.environ, **{NETNS_ENV: "1", MOUNTNS_ENV: "1" if mounts else "0"})
    cmd = ["unshare", "--net", *(["--mount", "--propagation", "private"] if mounts else [])]
    os.execvpe("unshare", [*cmd, sys.executable, "-m", "engine.bench", *argv], env)


def setup_namespace() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if private_mounts():
        # hide any host rpcbind's unix socket: Ganesha must register with our portmapper
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)


# -- the run -------------------------------------------------------------------------------


class Progress:
    """Where the run is: a progress bar on a terminal, one line per finished row otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        from tqdm import tqdm

        self.quiet = quiet
        self.tty = sys.stderr.isatty() and not quiet
        self.done = 0
        self.total = 0
        self.bar = tqdm(total=0, unit="row", dynamic_ncols=True, disable=not self.tty, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}<{remaining}]")

    def set_total(self, total: int) -> None:
        self.total = total
        self.bar.total = total
        self.bar.refresh()

    def log(self, msg: str) -> None:
        if not self.quiet:
            self.bar.write(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)

    def step(self, what: str) -> None:
        if self.tty:
            self.bar.set_description_str(what[:60], refresh=True)

    def row_done(self, row: Row) -> None:
        self.done += 1
        self.bar.update(1)
        if not self.tty and not self.quiet:
            status = f"error: {row.error}" if row.error else ", ".join(
                f"{n} {s.median:.4g}" for n, s in row.results.items())
            print(f"[{time.strftime('%H:%M:%S')}] {self.done}/{self.total} {row.id} ({row.unit}): {status}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def prepare_repo(settings: Settings, log: Callable[[str], None]) -> tuple[Path, dict[str, Any], Path, str, str]:
    from engine.repo.ingest import BackupSettings, backup
    from engine.repo.repository import Repository

    image, info = diskgen.cached_image(settings.disk_size, settings.seed, log)
    repo = settings.work / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    Repository.init(repo, MIB)
    log(f"backing up the {settings.disk_size >> 20} MiB disk into {repo}")
    with Repository.open(repo) as r:
        p = backup(r, BackupSettings(vm="bench"), [str(image)])
    return image, info, repo, p["id"], p["disks"][0]["name"]


def setup_peers(settings: Settings, image: Path, size: int, log: Callable[[str], None],
                ready: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Set up every selected peer that is installed, into ``ready`` (so that the caller
    stops them even if this is interrupted); the others are missing, with why."""
    from engine.bench import peers as peermod

    found = peermod.find_peers(settings.peers)
    status: dict[str, Any] = {}
    missing: dict[str, str] = {}
    ws = peermod.Workspace(work=settings.work / "peers", image=image, size=size, log=log)
    ws.work.mkdir(parents=True, exist_ok=True)
    for name, peer in found.items():
        st = peer.status()
        status[name] = st
        if not st["installed"]:
            missing[name] = f"not installed: {st['install']}"
            log(f"peer {name}: not installed ({st['install']})")
            continue
        if name == "ganesha" and not (in_namespace() and private_mounts()):
            missing[name] = ("needs private network and mount namespaces (run instantnfs bench as root, "
                             "not in a chroot)")
            continue
        try:
            log(f"peer {name}: setting up")
            peer.setup(ws)
            ready[name] = peer
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, the run goes on
            missing[name] = f"set-up failed: {e}"
            log(f"peer {name}: set-up failed: {e}")
            peer.close()
        except BaseException:
            peer.close()
            raise
    return missing, status


def run(settings: Settings, quiet: bool = False) -> dict[str, Any]:
    """Run the selected scenarios; returns the results (also written to ``out``)."""
    from engine.bench import report

    scenarios = {n: load_scenario(n) for n in settings.only}
    settings.out.mkdir(parents=True, exist_ok=True)
    settings.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "schema": 1,
        "command": settings.command,
        "quick": settings.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine.describe(),
        "settings": {
            "disk_size": settings.disk_size, "seed": settings.seed, "pairs": settings.pairs,
            "seconds": settings.seconds, "scenarios": list(settings.only),
            "blockmap": "pure" if os.environ.get("INSTANTNFS_PURE") == "1" else "cython",
            "event_loop": "uvloop",
            "namespace": ("private" if private_mounts() else "private network") if in_namespace() else "loopback",
        },
        "peers": {},
        "rows": [],
    }
    out_json = settings.out / "results.json"
    progress = Progress(quiet=quiet)
    ours: OurDaemon | None = None
    ready: dict[str, Any] = {}
    try:
        image, info, repo, point, disk = prepare_repo(settings, progress.log)
        cache_bytes = max(GIB, int(info["size"] * 1.25))
        ours = OurDaemon(settings.work / "ours", repo, OURS_ADDRESS, cache_bytes)
        ours.start()
        results["settings"]["cache_bytes"] = cache_bytes
        results["settings"]["input"] = {k: info[k] for k in ("size", "seed", "generator_version", "sha256", "blocks") if k in info}
        wanted = sorted({p for s in scenarios.values() for p in s.PEERS} & set(settings.peers),
                        key=list(settings.peers).index)
        missing, status = setup_peers(Settings(**{**settings.__dict__, "peers": wanted}), image, info["size"],
                                      progress.log, ready)
        results["peers"] = status
        results["machine"]["versions"].update({n: s.get("version") for n, s in status.items() if n != "local"})
        ctx = Context(settings, image, info, repo, point, disk, ours, ready, missing, progress.log, progress.step)
        progress.set_total(sum(s.rows(ctx) for s in scenarios.values()))
        for name, scenario in scenarios.items():
            progress.log(f"scenario {name}")
            for row in scenario.run(ctx):
                results["rows"].append(row.to_json())
                out_json.write_text(json.dumps(results, indent=1))
                progress.row_done(row)
    finally:
        progress.close()
        for p in ready.values():
            p.close()
        if ours is not None:
            ours.stop()
        results["machine"]["load_after"] = machine.loadavg()
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ")
        results["seconds"] = round(time.time() - started, 1)
        out_json.write_text(json.dumps(results, indent=1))
        if not settings.keep:
            shutil.rmtree(settings.work, ignore_errors=True)
    report.write_report(results, settings.out)
    return results


def ours_first(systems: dict[str, Callable[[], Measure | float]]) -> dict[str, Callable[[], Measure | float]]:
    """instantnfs first, then the peers in the order given."""
    return {OURS: systems[OURS], **{k: v for k, v in systems.items() if k != OURS}}
