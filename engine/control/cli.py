"""The instantnfs command line.

Every command prints a one-line error and exits non-zero on an expected failure
(``engine.errors``); ``--json`` commands print exactly one JSON document on stdout.
Long operations show a progress bar on a terminal.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence

from engine.control.progress import Progress
from engine.errors import InstantNFSError, UsageError
from engine.tuning import tune_malloc

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'1M', '256K', '4MiB', '1048576' -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256K, 1M, 4M)")
    return int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _emit_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _open_repo(args: argparse.Namespace):
    from engine.repo.repository import Repository

    if not args.repo:
        raise UsageError("no repository given: use --repo PATH or set INSTANTNFS_REPO")
    return Repository.open(args.repo)


# -- repo --------------------------------------------------------------------------------


def cmd_repo_init(args: argparse.Namespace) -> int:
    from engine.repo.repository import Repository

    path = Repository.init(args.path, args.block_size)
    print(f"created repository {path} (block size {_human(args.block_size)})")
    return 0


def cmd_repo_check(args: argparse.Namespace) -> int:
    from engine.repo.check import check

    with _open_repo(args) as repo:
        with Progress("verifying", None if not args.json else False) as bar:
            total = sum(p.stat().st_size for p in repo.packs_dir.glob("*.pack")) if args.verify_data else 0
            report = check(repo, args.verify_data, bar.start(total) if args.verify_data else None)
        removed = []
        if args.remove_stale_pins:
            from engine.repo.pins import remove_pin

            for pin in report.stale_pins:
                remove_pin(repo, pin.point, pin.daemon, pin.session)
                removed.append(pin)
    if args.json:
        _emit_json({**report.to_json(), "removed_pins": [p.to_json() for p in removed]})
    else:
        what = f"{report.points} restore points, {report.chunks} chunks"
        if args.verify_data:
            what += f", {report.chunks_verified} chunks read and verified"
        for e in report.errors:
            print(f"ERROR: {e}")
        for b in report.bad_chunks:
            print(f"BAD CHUNK: {b.error}")
            for pid, disk, off in b.users:
                print(f"    used by restore point {pid} disk {disk} at offset {off}")
            if not b.users:
                print("    used by no restore point")
        for g in report.garbage:
            print(f"garbage: {g}")
        if report.garbage:
            print("(garbage is harmless; 'instantnfs repo gc' removes it)")
        stale = set(report.stale_pins)
        for pin in report.pins:
            if pin in removed:
                print(f"removed stale pin: restore point {pin.point} was pinned by {pin.describe()}, which no longer serves it")
            elif pin in stale:
                print(f"STALE PIN: restore point {pin.point} pinned by {pin.describe()}, which no longer serves it; "
                      f"remove with 'instantnfs repo unpin {pin.point} --session {pin.session} --daemon {pin.daemon}' "
                      "or 'instantnfs repo check --remove-stale-pins'")
            else:
                print(f"pin: restore point {pin.point} is published as {pin.describe()}")
        print(f"{'OK' if report.ok else 'DAMAGED'}: {what}")
    return 0 if report.ok else 1


def cmd_repo_unpin(args: argparse.Namespace) -> int:
    from engine.errors import NotFound
    from engine.repo.pins import list_pins, pin_is_stale, remove_pin

    with _open_repo(args) as repo:
        pins = [p for p in list_pins(repo) if p.point.startswith(args.point) and p.session == args.session
                and (args.daemon is None or p.daemon == args.daemon)]
        if not pins:
            raise NotFound(f"no pin of restore point {args.point!r} by session {args.session!r} (see 'instantnfs repo check')")
        if len({(p.point, p.daemon) for p in pins}) > 1:
            raise UsageError(f"{len(pins)} pins match: name the point in full and the daemon with --daemon")
        pin = pins[0]
        if not pin_is_stale(pin) and not args.force:
            raise UsageError(
                f"the pin of {pin.point} by {pin.describe()} is live (or cannot be judged from this host): "
                "unpublish the session instead, or pass --force if that daemon is really gone"
            )
        remove_pin(repo, pin.point, pin.daemon, pin.session)
    print(f"removed the pin of restore point {pin.point} by {pin.describe()}")
    return 0


def cmd_repo_gc(args: argparse.Namespace) -> int:
    from engine.repo.check import gc

    with _open_repo(args) as repo:
        out = gc(repo)
    if args.json:
        _emit_json(out)
    else:
        for note in out["notes"]:
            print(f"note: {note}")
        print(
            f"removed {out['chunks_removed']} unused chunks, {out['packs_removed']} packs, "
            f"{out['tmp_removed']} leftovers; reclaimed {_human(out['bytes_reclaimed'])}"
        )
    return 0


# -- backup, points, restore -------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    from engine.repo.ingest import BackupSettings, backup

    settings = BackupSettings(
        vm=args.vm, cpus=args.cpus, memory_mib=args.memory, firmware=args.firmware, guest_os=args.guest_os
    )
    with _open_repo(args) as repo:
        with Progress(f"backup {args.vm}", False if (args.json or args.quiet) else None) as bar:
            manifest = backup(repo, settings, args.disks, args.changed_extents, bar.start)
    st = manifest["stats"]
    result = {
        "id": manifest["id"],
        "vm": manifest["vm"],
        "parent": manifest["parent"],
        "disks": [{"name": d["name"], "size": d["size"], "source": d["source"]} for d in manifest["disks"]],
        **{k: st[k] for k in st},
    }
    if args.json:
        _emit_json(result)
        return 0
    ratio = lambda r: f"{r:.2f}x" if r else "n/a (nothing new stored)"  # noqa: E731
    secs = st["elapsed_s"] or 1e-9
    print(f"restore point {manifest['id']} of VM {manifest['vm']}")
    print(f"  logical size   {_human(st['logical_bytes'])} in {len(manifest['disks'])} disk(s)")
    print(f"  read           {_human(st['read_bytes'])} in {st['elapsed_s']:.2f} s ({_human(st['read_bytes'] / secs)}/s)")
    print(f"  new stored     {_human(st['stored_bytes'])} ({st['new_chunks']} new chunks)")
    print(f"  dedup          {ratio(st['dedup_ratio'])}   compression {ratio(st['compression_ratio'])}")
    return 0


def cmd_points_list(args: argparse.Namespace) -> int:
    from engine.repo.pins import list_pins

    with _open_repo(args) as repo:
        points = [p.to_json() for p in repo.points(args.vm)]
        pins = list_pins(repo)
    for p in points:
        p["pinned_by"] = [pin.to_json() for pin in pins if pin.point == p["id"]]
    if args.json:
        _emit_json(points)
        return 0
    if not points:
        print("no restore points" + (f" of VM {args.vm}" if args.vm else ""))
        return 0
    print(f"{'ID':<24} {'VM':<20} {'CREATED':<21} {'DISKS':<28} {'STORED':>10}")
    for p in points:
        disks = ", ".join(f"{d['name']} {_human(d['size'])}" for d in p["disks"])
        stored = _human(p["stats"].get("stored_bytes", 0))
        print(f"{p['id']:<24} {p['vm']:<20} {p['created']:<21} {disks:<28} {stored:>10}")
        for pin in p["pinned_by"]:
            print(f"    published as session {pin['session']} by daemon {pin['daemon']} ({pin['host']}:{pin['cache_dir']})")
    return 0


def cmd_points_delete(args: argparse.Namespace) -> int:
    from engine.repo.pins import list_pins, remove_pin

    with _open_repo(args) as repo:
        if args.force:
            point = repo.point(args.point).id
            for pin in list_pins(repo, point):
                _unpublish_for_delete(args, pin)
                remove_pin(repo, pin.point, pin.daemon, pin.session)  # the daemon normally did
        pt = repo.delete_point(args.point)
    print(f"deleted restore point {pt.id} of VM {pt.vm}; run 'instantnfs repo gc' to reclaim its space")
    return 0


def _unpublish_for_delete(args: argparse.Namespace, pin) -> None:
    """Unpublish a pinned point's session through its daemon's control API, or refuse."""
    from engine.control.server_cli import api_call, server_url

    try:
        api_call(args, "DELETE", f"/sessions/{pin.session}")
    except InstantNFSError as e:
        raise UsageError(
            f"cannot unpublish {pin.describe()} through the daemon at {server_url(args)} ({e}); "
            "the restore point was not deleted (give that daemon's --server, or unpublish it there)"
        ) from None
    print(f"unpublished {pin.describe()}")


def cmd_restore(args: argparse.Namespace) -> int:
    from engine.repo.restore import restore_disk
    from engine.stack import Stack

    with _open_repo(args) as repo, Stack(repo) as stack:
        pt = repo.point(args.point)
        info = pt.disk_info(args.disk)
        with Progress(f"restore {info.name}", False if (args.json or args.quiet) else None) as bar:
            out = restore_disk(pt, stack.backup_disk(pt, args.disk), args.output, args.force, bar.start(info.size))
    if args.json:
        _emit_json(out)
    else:
        print(f"restored disk {out['disk']} of {out['point']} to {out['output']} ({_human(out['size'])}, "
              f"{_human(out['data_bytes'])} of data)")
    return 0


# -- parser ------------------------------------------------------------------------------


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
    p.set_defaults(func=cmd_repo_init)
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
    p.set_defaults(func=cmd_repo_check)
    p = rsub.add_parser(
        "gc", help="remove chunks no restore point uses and reclaim their space",
        description="Delete unused packs, punch unused chunks out of partly used packs, and remove "
        "leftovers of interrupted writers. Takes the writer lock; readers keep working.",
    )
    _repo_opt(p)
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.set_defaults(func=cmd_repo_gc)
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
    p.set_defaults(func=cmd_repo_unpin)

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
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("points", help="list (or delete) restore points", description="List restore points, oldest first.")
    _repo_opt(p)
    p.add_argument("--vm", help="only this VM's restore points")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_points_list)
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
    d.set_defaults(func=cmd_points_delete)

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
    p.set_defaults(func=cmd_restore)

    try:
        from engine.control import server_cli
    except ImportError:
        server_cli = None  # type: ignore[assignment]
    if server_cli is not None and hasattr(server_cli, "add_commands"):
        server_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    tune_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
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
