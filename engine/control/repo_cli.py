"""The CLI's commands that work on a repository directly (no daemon): repo init, check,
gc, unpin; backup; points (list, delete); restore.

Each takes the parsed arguments and returns the exit status; expected failures are
raised (``engine.errors``) and printed as one line by ``engine.control.cli.main``.
``--json`` prints exactly one JSON document on stdout; long operations show a progress
bar on a terminal. ``points delete --force`` is the one that calls a daemon (to
unpublish the point's sessions first), through ``engine.control.client``.
"""
from __future__ import annotations

import argparse
import json
import sys

from engine.control.progress import Progress
from engine.errors import InstantNFSError, UsageError


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
    from engine.control.client import api_call, server_url

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
