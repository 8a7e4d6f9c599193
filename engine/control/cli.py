"""The instantnfs command line: the one argparse home of every command, and ``main``.

The commands live beside it: ``repo_cli`` (repository, backup, points, restore: no
daemon), ``daemon`` (serve), ``demo``, ``client`` (the commands that call a running
daemon's control API). Every command prints a one-line error and exits non-zero on an
expected failure (``engine.errors``); ``--json`` commands print exactly one JSON
document on stdout. Long operations show a progress bar on a terminal.
``instantnfs bench`` is the benchmark suite (``engine.bench``).
``python -m engine.control.cli`` is the ``instantnfs`` command.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from engine.bench import cli as bench_cli
from engine.control import client, files_cli, repo_cli, vms_cli
from engine.control.daemon import cmd_serve
from engine.control.demo import cmd_demo
from engine.errors import InstantNFSError
from engine.tuning import tune_malloc

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'1M', '256K', '4MiB', '1048576' -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256K, 1M, 4M)")
    return int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.I)


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '2h', '1d' -> seconds (more than 0)."""
    m = _DURATION_RE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 30m, 2h, 1d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2).lower()]


# -- the parser (repository commands here, the daemon's and its clients' below) ---------------


def _repo_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repo", default=os.environ.get("INSTANTNFS_REPO"), metavar="PATH",
        help="the backup repository (default: $INSTANTNFS_REPO)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instantnfs",
        description="Boot virtual machines straight out of their backups: a compressed, deduplicated "
        "backup repository served over NFSv3 to ESXi or QEMU/KVM.",
        epilog="Run 'instantnfs COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    repo = sub.add_parser("repo", help="create, check and clean up a backup repository")
    rsub = repo.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    p = rsub.add_parser("init", help="create an empty repository", description="Create an empty repository in a new or empty directory.")
    p.add_argument("path", metavar="PATH")
    p.add_argument(
        "--block-size", type=parse_size, default=1 << 20, metavar="SIZE",
        help="dedup and compression unit: a power of two from 256K to 4M (default 1M)",
    )
    p.set_defaults(func=repo_cli.cmd_repo_init)
    p = rsub.add_parser(
        "check", help="verify the repository's structure (and data)",
        description="Verify configuration, manifests, block maps and pack indexes. With --verify-data, "
        "also read every chunk and check its checksum and fingerprint; each bad chunk is named with the "
        "restore points and disk offsets that use it. Exit status 1 when anything is damaged.",
    )
    _repo_opt(p)
    p.add_argument("--verify-data", action="store_true", help="read and verify every stored chunk")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--remove-stale-pins", action="store_true",
                   help="remove the pins of daemons that are gone (see 'repo unpin' for one pin)")
    p.set_defaults(func=repo_cli.cmd_repo_check)
    p = rsub.add_parser(
        "gc", help="remove chunks no restore point uses and reclaim their space",
        description="Delete unused packs, punch unused chunks out of partly used packs, and remove "
        "leftovers of interrupted writers. Takes the writer lock; readers keep working.",
    )
    _repo_opt(p)
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.set_defaults(func=repo_cli.cmd_repo_gc)
    p = rsub.add_parser(
        "unpin", help="remove the pin of a daemon that is gone",
        description="Remove a pin (a published restore point's protection against deletion) whose daemon "
        "no longer serves it; 'repo check' lists such stale pins. A live pin is removed only with --force.",
    )
    _repo_opt(p)
    p.add_argument("point", metavar="POINT", help="the pinned restore point's id (or a unique prefix)")
    p.add_argument("--session", required=True, help="the session name the pin names")
    p.add_argument("--daemon", metavar="ID", help="the daemon id the pin names (needed when several match)")
    p.add_argument("--force", action="store_true", help="remove the pin even if its daemon seems to serve it")
    p.set_defaults(func=repo_cli.cmd_repo_unpin)

    p = sub.add_parser(
        "backup", help="store a restore point of a VM",
        description="Store one restore point holding every disk given. Sources: raw image files and "
        "block devices (holes and zero blocks are not stored), qcow2/VMDK/VHDX (through qemu-img). "
        "Only chunks the repository does not hold yet are stored.",
    )
    _repo_opt(p)
    p.add_argument("--vm", required=True, help="the VM's name (restore points are grouped by it)")
    p.add_argument("--cpus", type=int, default=1, help="virtual CPUs of the VM (default 1)")
    p.add_argument("--memory", type=int, default=1024, metavar="MIB", help="memory of the VM in MiB (default 1024)")
    p.add_argument("--firmware", choices=("bios", "efi"), default="bios", help="boot firmware (default bios)")
    p.add_argument("--guest-os", default="other-64", metavar="ID", help="guest OS id, as VMware's guestOS (default other-64)")
    p.add_argument(
        "--changed-extents", action="append", metavar="FILE",
        help="read only these regions (one 'offset length' per line, sorted, disjoint) and take the rest "
        "from the VM's previous restore point; give one file per disk, in order",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("disks", nargs="+", metavar="DISK", help="disk image files or block devices, in VM order")
    p.set_defaults(func=repo_cli.cmd_backup)

    p = sub.add_parser("points", help="list (or delete) restore points", description="List restore points, oldest first.")
    _repo_opt(p)
    p.add_argument("--vm", help="only this VM's restore points")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=repo_cli.cmd_points_list)
    psub = p.add_subparsers(dest="points_command", metavar="ACTION")
    d = psub.add_parser(
        "delete", help="delete a restore point",
        description="Delete a restore point; 'repo gc' then reclaims the chunks only it used. A published "
        "(pinned) point is refused unless --force, which first unpublishes its sessions through the daemon.",
    )
    _repo_opt(d)
    d.add_argument("point", metavar="POINT", help="restore point id (or a unique prefix)")
    d.add_argument("--force", action="store_true", help="unpublish the point's sessions through the daemon first")
    d.add_argument("--server", help="the daemon's control API URL (default: $INSTANTNFS_SERVER, else the config's)")
    d.set_defaults(func=repo_cli.cmd_points_delete)

    p = sub.add_parser(
        "restore", help="write a disk of a restore point to a raw file",
        description="Write one disk back out as a sparse raw image (or onto a block device).",
    )
    _repo_opt(p)
    p.add_argument("point", metavar="POINT", help="restore point id, unique prefix, 'latest' or 'VM@latest'")
    p.add_argument("disk", metavar="DISK", help="disk name or index (0 = first)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="raw image file or block device to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=repo_cli.cmd_restore)

    files_cli.add_commands(sub, _repo_opt)
    _daemon_commands(sub)
    return parser


# -- daemon and client commands ---------------------------------------------------------


def _client_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="control API URL, e.g. http://127.0.0.1:6161 (default: $INSTANTNFS_SERVER, else the config's control address)")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--token-file", help="file holding the control API token (default: the one the daemon wrote for this "
                                        "server under ~/.local/state/instantnfs/tokens/, else control.token_file; "
                                        "or set $INSTANTNFS_TOKEN)")


def _serve_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--bind", help="address for portmap, MOUNT and NFS (default 0.0.0.0)")
    p.add_argument("--portmap", choices=("on", "off"), help="run a portmapper (or register with the one on its port)")
    p.add_argument("--portmap-port", type=int, help="portmapper port (default 111)")
    p.add_argument("--mount-port", type=int, help="MOUNT port (default 1058, next free if taken)")
    p.add_argument("--nfs-port", type=int, help="NFS port (default 2049, next free if taken)")
    p.add_argument("--export", help="export path (default /instantnfs)")
    p.add_argument("--allow", action="append", metavar="CIDR", help="allowed client network (repeatable)")
    p.add_argument("--read-only", action="store_true", default=None, help="refuse every change (NFS3ERR_ROFS)")
    p.add_argument("--export-dir", action="append", metavar="DIR",
                   help="directory exports may write into (repeatable; default <cache-dir>/exports)")
    p.add_argument("--cache-dir", help="session state and client files (default ~/.cache/instantnfs)")
    p.add_argument("--write-dir", help="default directory of the write caches (default <cache-dir>/writecache)")
    p.add_argument("--reserve-gib", type=int, help="free space a publish needs on the write-cache volume (default 100)")
    p.add_argument("--control-bind", help="control API address (default 127.0.0.1)")
    p.add_argument("--control-port", type=int, help="control API port (default 6161)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _daemon_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="run the NFS daemon in the foreground",
        description="Run the NFS daemon in the foreground (SIGTERM or Ctrl-C stops it).",
        epilog="The control API needs a bearer token on every request, from loopback too: control.token "
               "from the config, else a random one made at each start. The daemon writes it (mode 0600) to "
               "control.token_file (default <cache-dir>/control.token) and to "
               "~/.local/state/instantnfs/tokens/<control-bind>_<port>, where the CLI of the same user finds it.")
    p.add_argument("--repo", help="repository to serve")
    _serve_opts(p)
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "demo", help="build a small bootable guest, back it up, serve and publish it, boot it from the backup over NFS",
        description="The whole idea in one command: build the small test guest (cached), back it up into a demo "
                    "repository (once), serve it, publish its restore point, boot it under QEMU from the daemon's "
                    "nfs:// URL and print its console (heartbeat) lines, then how to use the datastore from QEMU, "
                    "libnfs-utils and ESXi. A second run reuses everything. Ctrl-C powers the VM off and stops.",
    )
    p.add_argument("--dir", help="demo repository and cache (default ~/.cache/instantnfs-demo)")
    p.add_argument("--no-boot", action="store_true", help="serve and publish only: do not boot the demo VM under QEMU")
    _serve_opts(p)
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser(
        "bench", help="measure instantnfs beside NFS-Ganesha, borg, restic and the local file; write a report",
        description=bench_cli.DESCRIPTION, epilog=bench_cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_cli.add_arguments(p)
    p.set_defaults(func=bench_cli.run_args)

    p = subparsers.add_parser("publish", help="publish a restore point in the running daemon's export")
    p.add_argument("point", help="restore point id, unique prefix, 'latest' or 'VM@latest'")
    p.add_argument("--name", help="session name (directory in the export)")
    p.add_argument("--mode", choices=("instant", "sandbox"), default="instant",
                   help="instant (default): the write cache survives daemon restarts; sandbox: a temporary cache removed at unpublish or stop")
    p.add_argument("--cache-dir", help="directory for this session's write caches (default: the daemon's)")
    p.add_argument("--reserve-gib", type=float, help="free space the cache volume must have (default: the daemon's, 100)")
    p.add_argument("--force", action="store_true", help="publish even when the cache volume has less free space than the reserve")
    p.add_argument("--disk", action="append", metavar="NAME",
                   help="publish only this disk (name or index; repeatable): instant disk recovery, to attach to another VM")
    p.add_argument("--ttl", type=parse_duration, metavar="DURATION",
                   help="unpublish the session (stopping its VM) after this long, e.g. 90m, 2h (kept across daemon restarts)")
    p.add_argument("--json", action="store_true", help="print the session as JSON")
    _client_opts(p)
    p.set_defaults(func=client.cmd_publish)

    p = subparsers.add_parser("unpublish", help="remove a session from the export")
    p.add_argument("name")
    _client_opts(p)
    p.set_defaults(func=client.cmd_unpublish)

    p = subparsers.add_parser("sessions", help="list published sessions with their nfs:// URLs")
    p.add_argument("--json", action="store_true")
    _client_opts(p)
    p.set_defaults(func=client.cmd_sessions)

    p = subparsers.add_parser("export", help="write a published disk (backup + write cache) to a raw or qcow2 file, while the VM runs")
    p.add_argument("session")
    p.add_argument("disk", help="disk name or index (0 = first)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="new file to write on the daemon's host, in one of its export directories (server.export_dirs)")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    p.add_argument("--force", action="store_true", help=argparse.SUPPRESS)  # refused: exports never overwrite
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _client_opts(p)
    p.set_defaults(func=client.cmd_export)

    p = subparsers.add_parser("commit", help="store a session's disks (backup + write cache) as a new restore point")
    p.add_argument("session")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _client_opts(p)
    p.set_defaults(func=client.cmd_commit)

    p = subparsers.add_parser("jobs", help="the running daemon's export and commit jobs")
    p.add_argument("--json", action="store_true")
    _client_opts(p)
    p.set_defaults(func=client.cmd_jobs)

    p = subparsers.add_parser("cancel", help="cancel a running export or commit job (it leaves nothing behind)")
    p.add_argument("job", help="job id, as 'instantnfs jobs' lists it")
    _client_opts(p)
    p.set_defaults(func=client.cmd_cancel)

    vms_cli.add_commands(subparsers, _client_opts)

    p = subparsers.add_parser("status", help="the running daemon's ports and counters")
    p.add_argument("--json", action="store_true")
    _client_opts(p)
    p.set_defaults(func=client.cmd_status)


def main(argv: Sequence[str] | None = None) -> int:
    tune_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (bench re-executes itself with them)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InstantNFSError as e:
        print(f"instantnfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("instantnfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (e.g. '| head'): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
