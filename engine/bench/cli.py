"""``instantnfs bench``: its options, and the run they start.

``add_arguments`` fills the ``bench`` sub-command of the ``instantnfs`` parser (and the
parser of ``python -m engine.bench``); ``run_args`` runs it. As root, the run moves into
a private network namespace first (see ``runner``), so it re-executes
``python -m engine.bench`` with the same arguments.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

from engine.bench import runner

DESCRIPTION = textwrap.fill(
    "Measure instantnfs beside the systems a backup administrator runs today: NFS-Ganesha serving the "
    "raw image, borg and restic FUSE mounts of the same disk, and the local file. The suite generates "
    "a seeded disk, backs it up, serves it, runs every scenario on each system alternately (A B A B ...) "
    "and writes results.json, report.md and PNG plots into --out.", 88)
EPILOG = f"""scenarios: {', '.join(runner.SCENARIOS)}
peers:     {', '.join(runner.DEFAULT_PEERS)}
           (a peer that is not installed is a line in the report, with the command
           that installs it; --install-peers installs them)

A full run takes about 30 minutes on 2 cores with every peer installed (borg's and
restic's mounts read at 30-150 MB/s); --quick (a 256 MiB disk, 2 rounds, 1-second
windows) takes 2 minutes without peers, 6 with them. The scenarios that boot the test
guest under QEMU (boot, boot-trace, sandboxes) add about 7 minutes to --quick and 25 to
a full run where KVM is not usable (TCG boots of 20-40 s each). As root the run happens
in a private network namespace (nothing it starts is reachable from outside; ports 111
and 2049 are its own). Figures from a shared machine move by 2x: compare the ratios,
which come from alternating runs in one session, not single figures across runs.

examples:
  instantnfs bench --quick --out /tmp/bench
  instantnfs bench --only seq-read,rand-read --peers ganesha,local
  instantnfs bench --install-peers && instantnfs bench --out docs/bench --update-readme README.md
"""


def _names(known: Sequence[str], what: str):  # noqa: ANN202 - an argparse type
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; choose from {', '.join(known)}")
        return names

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a short run (256 MiB disk, 2 rounds, short windows, fewer boots): minutes, see below")
    p.add_argument("--only", type=_names(list(runner.SCENARIOS), "scenario"), metavar="SCENARIO,...",
                   help=f"run only these scenarios (default all: {','.join(runner.SCENARIOS)})")
    p.add_argument("--peers", type=_names(list(runner.DEFAULT_PEERS), "peer"), metavar="PEER,...",
                   help=f"compare with these peers when installed (default {','.join(runner.DEFAULT_PEERS)})")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where results.json, report.md and plots/ go (default ./bench-results/<UTC time>)")
    p.add_argument("--install-peers", action="store_true",
                   help="install the missing peers first (apt-get/pip, as root; their services are kept from starting)")
    p.add_argument("--pairs", type=int, metavar="N", help="rounds of alternating runs per figure (default 3; --quick 2)")
    p.add_argument("--size", type=_size, metavar="SIZE", help="size of the generated disk (default 2G; --quick 256M)")
    p.add_argument("--seed", type=int, default=1, help="the generated disk's seed (default 1)")
    p.add_argument("--seconds", type=float, metavar="S", help="measured window of a timed load (default 3; --quick 1)")
    p.add_argument("--work", type=Path, metavar="DIR", help="scratch space for repositories and servers (default a temporary directory under /var/tmp; removed after)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--update-readme", type=Path, metavar="README",
                   help="put the report's table and plots between the '<!-- bench:begin -->' and '<!-- bench:end -->' markers of this file")
    p.add_argument("--no-namespace", action="store_true", help="do not move into a private network namespace (root only; uses loopback addresses)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def _size(text: str) -> int:
    from engine.bench.diskgen import parse_size

    value = parse_size(text)
    if value < 64 << 20:
        raise argparse.ArgumentTypeError("the disk must be at least 64M")
    return value


def run_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    _interruptible()
    if args.pairs is not None and args.pairs < 1:
        print("instantnfs bench: --pairs must be at least 1", file=sys.stderr)
        return 2
    if args.install_peers:
        from engine.bench import peers

        names = [n for n in (args.peers or runner.DEFAULT_PEERS) if not peers.find_peers([n])[n].installed()]
        if names:
            try:
                peers.install(names, log=lambda m: print(f"instantnfs bench: {m}", file=sys.stderr))
            except Exception as e:  # noqa: BLE001 - shown to the user with what to do
                print(f"instantnfs bench: installing {', '.join(names)} failed: {e}", file=sys.stderr)
                return 1
    if argv is None:
        argv = getattr(args, "argv", None) or sys.argv[1:]
    argv = list(argv)
    if argv and argv[0] == "bench":
        argv = argv[1:]
    if os.geteuid() == 0 and not runner.in_namespace() and not args.no_namespace:
        argv = [a for a in argv if a != "--install-peers"]
        if args.out is None:  # fix the output directory before the namespace (and print it)
            argv += ["--out", str(_default_out())]
        runner.reexec_in_namespace(argv)  # does not return
    if runner.in_namespace():
        runner.setup_namespace()
    out = (args.out or _default_out()).absolute()
    work = args.work or Path(tempfile.mkdtemp(prefix="instantnfs-bench-", dir="/var/tmp"))
    settings = runner.Settings.for_mode(
        args.quick, out=out, work=work.absolute(), only=args.only, peers=args.peers, pairs=args.pairs,
        disk_size=args.size, seed=args.seed, seconds=args.seconds, keep=args.keep,
        command="instantnfs bench " + shlex.join(argv),
    )
    print(f"instantnfs bench: results go to {out}", file=sys.stderr)
    results = runner.run(settings, quiet=args.quiet)
    if args.update_readme is not None:
        from engine.bench import report

        if not report.update_readme(args.update_readme, results, out):
            print(f"instantnfs bench: {args.update_readme} has no '<!-- bench:begin -->' ... '<!-- bench:end -->' markers", file=sys.stderr)
            return 1
    failed = [r["id"] for r in results["rows"] if r.get("error")]
    print(f"instantnfs bench: {len(results['rows'])} rows in {results['seconds']:.0f} s; report: {out / 'report.md'}", file=sys.stderr)
    if failed:
        print(f"instantnfs bench: {len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _default_out() -> Path:
    import time

    return (Path("bench-results") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())).absolute()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instantnfs bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _interruptible() -> None:
    """SIGTERM (and a SIGINT a shell set to be ignored) stop the run like Ctrl-C: the
    servers and mounts it started are stopped and results.json keeps what was measured."""
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_args(args, argv)
    except KeyboardInterrupt:
        print("instantnfs bench: interrupted", file=sys.stderr)
        return 130
