"""``instantnfs files``: browse and pull files out of a restore point, offline.

``files ls`` (volumes, then directories), ``files get`` (extract), ``files cat``,
``files find``. Like ``points`` and ``restore`` they work on the repository directly
(no daemon): a ``Stack`` over it and ``engine.files.point.PointFiles`` over the point.
Positionals after POINT: an optional volume (``DISK[:PART]``: anything not starting
with '/') and then paths, which are absolute in the guest filesystem. ``--json``
prints exactly one JSON document, written as it goes (a listing of 100k names is not
held in memory). Names that are not UTF-8 are shown with surrogate escapes (JSON
``\\udcXX``), which ``files get`` takes back.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import stat
import sys
import textwrap
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime

from engine.control.progress import Progress
from engine.control.repo_cli import _human, _open_repo
from engine.errors import UsageError

EPILOG = """\
Volumes are named DISK:PART: disk0 is the restore point's first disk (its name in
'instantnfs points' works too), disk0:1 its first partition (MBR: 1-4 primary, 5+
logical; GPT: entry number), disk0:vg0/root an LVM logical volume (or just vg0/root).
Without one, a point with a single filesystem uses it; 'files ls POINT' lists them all.
Paths start with '/'. Filesystems: ext2/3/4, NTFS, FAT, exFAT, HFS+ (The Sleuth Kit);
XFS and btrfs with the optional extra (pip install 'instantnfs[xfs-btrfs]', AGPL).
Journals are not replayed, so the newest changes of a running VM may be missing (ls
says so per filesystem). Nothing needs root or a kernel mount.

examples:
  instantnfs files ls web01@latest
  instantnfs files ls web01@latest disk0:vg0/root /etc --long
  instantnfs files get web01@latest /etc/nginx /var/www -o restored --preserve
  instantnfs files cat web01@latest /etc/fstab
  instantnfs files find web01@latest --name '*.conf' --newer 2026-11-01
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def add_commands(sub: argparse._SubParsersAction, repo_opt) -> None:
    p = sub.add_parser("files", help="browse and extract files of a restore point (no restore, no root, no mount)",
                       description="Read the guest filesystems of a restore point straight out of the backup.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = p.add_subparsers(dest="files_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        repo_opt(q)
        q.add_argument("point", metavar="POINT", help="restore point id, unique prefix, 'latest' or 'VM@latest'")

    q = fsub.add_parser("ls", help="list volumes and filesystems, or a directory", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        usage="instantnfs files ls [options] POINT [DISK[:PART]] [PATH]",
                        description=_wrap("Without a volume and path: every disk, partition and logical volume with its "
                        "size and filesystem. With a path: the directory's entries (or the one file)."))
    common(q)
    q.add_argument("args", nargs="*", metavar="PATH", help="an optional volume (DISK[:PART]) first, then a path (default /)")
    q.add_argument("-l", "--long", action="store_true", help="mode, links, owner, size, mtime, symlink target, inode")
    q.add_argument("--json", action="store_true", help="print JSON (entries with every field)")
    q.set_defaults(func=cmd_ls)

    q = fsub.add_parser("get", help="extract files and trees into a directory", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        usage="instantnfs files get [options] POINT [DISK[:PART]] PATH... -o DIR",
                        description=_wrap("Extract each PATH (a file, a symlink or a whole directory) into DIR under its "
                        "own name. Never writes outside DIR and never overwrites: names with '/' or NUL are "
                        "escaped (%2F, %00), symlinks are made as symlinks and never followed, hard links stay "
                        "hard links inside DIR, devices/FIFOs/sockets are skipped, xattrs and ACLs are not "
                        "extracted. Sparse files stay sparse. A file that cannot be read (a damaged chunk) is "
                        "reported and left out; the others are extracted, and the exit status is 1."))
    common(q)
    q.add_argument("args", nargs="+", metavar="PATH", help="an optional volume (DISK[:PART]) first, then one or more paths")
    q.add_argument("-o", "--output", required=True, metavar="DIR", help="target directory (made if missing)")
    q.add_argument("--preserve", action="store_true", help="keep modes and times (and owners, as root)")
    q.add_argument("--json", action="store_true", help="print what was done as JSON")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_get)

    q = fsub.add_parser("cat", help="write a file's bytes to stdout", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        usage="instantnfs files cat [options] POINT [DISK[:PART]] PATH")
    common(q)
    q.add_argument("args", nargs="+", metavar="PATH", help="an optional volume (DISK[:PART]) first, then the file")
    q.set_defaults(func=cmd_cat)

    q = fsub.add_parser("find", help="find files by name and modification time", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        usage="instantnfs files find [options] POINT [DISK[:PART]] [PATH] [--name GLOB] [--newer DATE]",
                        description="Walk a tree (default /) and print the paths that match every condition given.")
    common(q)
    q.add_argument("args", nargs="*", metavar="PATH", help="an optional volume (DISK[:PART]) first, then where to start (default /)")
    q.add_argument("--name", metavar="GLOB", help="shell pattern on the name (not the path), e.g. '*.conf'")
    q.add_argument("--newer", metavar="DATE", type=_date,
                   help="modified after DATE (ISO 8601: 2026-11-01 or 2026-11-01T08:00, local time unless an offset is given)")
    q.add_argument("--type", choices=("file", "dir", "symlink"), help="only entries of this type")
    q.add_argument("--json", action="store_true", help="print the entries as JSON")
    q.set_defaults(func=cmd_find)

    # -- diff, sql ---------------------------------------------------------------------------
    q = fsub.add_parser("diff", help="which files changed between two restore points", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        usage="instantnfs files diff [options] POINT_A POINT_B [DISK[:PART]] [PATH]",
                        description=_wrap("Paths added, deleted and modified from POINT_A to POINT_B (of one "
                        "repository), in sorted order. Modified: the content (bytes compared where the block maps "
                        "differ, so unchanged data is not read) and/or metadata fields (type, size, mode, uid, gid, "
                        "mtime, ctime, symlink target; a directory: type, mode, owner). A rename is a delete and an "
                        "add. Exit status 1 if a file could not be read."))
    repo_opt(q)
    q.add_argument("point", metavar="POINT_A", help="the older restore point")
    q.add_argument("point_b", metavar="POINT_B", help="the newer restore point")
    q.add_argument("args", nargs="*", metavar="PATH", help="an optional volume (DISK[:PART]) first, then where to start (default /)")
    q.add_argument("--json", action="store_true", help="print one JSON document with the list of changes")
    q.set_defaults(func=cmd_diff)

    q = fsub.add_parser("sql", help="run a read-only SQL query on an SQLite database in a restore point", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        usage="instantnfs files sql [options] POINT [DISK[:PART]] PATH 'SELECT ...'",
                        description=_wrap("Copy the database at PATH with its -wal and -journal files (never touching "
                        "the backup) into a private temporary directory, recover them there (a WAL not yet "
                        "checkpointed holds the newest rows of a running VM), and run one query on the copy. "
                        "Only reading is allowed: SELECT and introspection pragmas (table_info, user_version...); "
                        "the schema is not trusted (trusted_schema=OFF), no extension is loaded, ATTACH is refused. "
                        "Blobs print as X'hex' (JSON: {\"blob\": hex})."))
    common(q)
    q.add_argument("args", nargs="+", metavar="ARG", help="an optional volume (DISK[:PART]), the database's path, the query")
    out = q.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="CSV with a header line")
    out.add_argument("--json", action="store_true", help="one JSON document: columns and rows")
    q.set_defaults(func=cmd_sql)

    # -- mount ------------------------------------------------------------------------------
    q = fsub.add_parser("mount", help="mount a filesystem of a restore point read-only (FUSE)", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        usage="instantnfs files mount [options] POINT [DISK[:PART]] DIR",
                        description=_wrap("Serve the filesystem read-only at DIR (an empty directory) through FUSE, "
                        "for tools that want a path. Runs in the background and prints its PID unless "
                        "--foreground; 'fusermount3 -u DIR', or SIGTERM/SIGINT to that PID, unmounts it. "
                        "Needs /dev/fuse, and fusermount3 (Debian fuse3) when not root."))
    common(q)
    q.add_argument("args", nargs="+", metavar="DIR", help="an optional volume (DISK[:PART]) first, then the mount point")
    q.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground until unmounted (Ctrl-C unmounts)")
    q.add_argument("--detached-child", action="store_true", help=argparse.SUPPRESS)  # the background process itself
    q.set_defaults(func=cmd_mount)


def _date(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use e.g. 2026-11-01 or 2026-11-01T08:00)") from None


def _split(args: list[str], need_path: bool) -> tuple[str | None, list[str]]:
    vol = None
    if args and not args[0].startswith("/"):
        vol, args = args[0], args[1:]
    bad = [a for a in args if not a.startswith("/")]
    if bad:
        raise UsageError(f"paths start with '/' ({bad[0]!r} does not; only the first argument may be a volume)")
    if need_path and not args:
        raise UsageError("no path given")
    return vol, args


@contextmanager
def _point_files(args: argparse.Namespace):
    from engine.files.point import PointFiles
    from engine.stack import Stack

    if hasattr(sys.stdout, "reconfigure"):  # names that are not UTF-8 print as their bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    with _open_repo(args) as repo, Stack(repo) as stack:
        yield PointFiles(stack, repo.point(args.point))


def _stream_json(head: dict, key: str, items: Iterable[dict]) -> None:
    """One JSON object whose ``key`` is a list, written item by item."""
    out = sys.stdout
    text = json.dumps(head, indent=2)
    out.write(text[:-2] + f",\n  {json.dumps(key)}: [" if head else "{\n  " + json.dumps(key) + ": [")
    first = True
    for item in items:
        out.write(("\n    " if first else ",\n    ") + json.dumps(item))
        first = False
    out.write("\n  ]\n}\n" if not first else "]\n}\n")


def cmd_ls(args: argparse.Namespace) -> int:
    vol, paths = _split(args.args, need_path=False)
    if len(paths) > 1:
        raise UsageError("files ls takes one path")
    with _point_files(args) as pf:
        if vol is None and not paths and len([f for f in pf.found() if f.filesystem]) != 1:
            return _ls_volumes(args, pf)
        fs = pf.filesystem(vol)
        path = paths[0] if paths else "/"
        top = fs.stat(path)
        entries: Iterator = fs.listdir(top) if top.type == "dir" else iter([top])
        if args.json:
            head = {"point": pf.point.id, "volume": fs.name, "filesystem": fs.kind, "journal": fs.journal_note,
                    "path": top.path}
            _stream_json(head, "entries", (e.to_json() for e in entries))
            return 0
        if fs.journal_note:
            print(f"# {fs.name} ({fs.kind}): {fs.journal_note}", file=sys.stderr if not args.long else sys.stdout)
        for e in entries:
            print(_long(e) if args.long else e.path.rsplit("/", 1)[-1] + ("/" if e.type == "dir" else ""))
    return 0


def _long(e) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.mtime_ns / 1e9))
    name = e.path.rsplit("/", 1)[-1] or "/"
    link = f" -> {e.link.decode('utf-8', 'surrogateescape')}" if e.type == "symlink" else ""
    return f"{stat.filemode(e.st_mode)} {e.nlink:>3} {e.uid:>6} {e.gid:>6} {e.size:>12} {when} {name}{link}  [inode {e.inode}]"


def _ls_volumes(args: argparse.Namespace, pf) -> int:
    found = pf.found()
    if args.json:
        json.dump({"point": pf.point.id, "volumes": [f.to_json() for f in found]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'VOLUME':<24} {'SIZE':>10} {'TYPE':<28} {'FILESYSTEM':<10} NOTE")
    for f in found:
        print(f"{f.volume.name:<24} {_human(f.volume.size):>10} {f.volume.label[:28]:<28} {f.filesystem or '-':<10} {f.note}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from engine.files.extract import Extractor, total_bytes

    vol, paths = _split(args.args, need_path=True)
    with _point_files(args) as pf:
        fs = pf.filesystem(vol)
        entries = [fs.stat(p) for p in paths]
        show = not (args.json or args.quiet)
        with Progress(f"extract from {fs.name}", False if not show else None) as bar:
            update = bar.start(total_bytes(fs, entries)) if bar.enabled else None
            with Extractor(fs, args.output, preserve=args.preserve, progress=update) as x:
                for e in entries:
                    x.extract(e)
                res = x.result
    if args.json:
        json.dump({"volume": fs.name, "filesystem": fs.kind, "journal": fs.journal_note, **res.to_json()},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for p, why in res.skipped:
            print(f"skipped {p}: {why}", file=sys.stderr)
        for p, new in res.renamed:
            print(f"renamed {p!r} to {new!r} (a name the local filesystem cannot hold)", file=sys.stderr)
        for p, err in res.failed:
            print(f"FAILED {p}: {err}", file=sys.stderr)
        print(f"extracted {_count(res.files, 'file')} ({_human(res.bytes)} of data), {_count(res.dirs, 'directory')}, "
              f"{_count(res.symlinks, 'symlink')}, {_count(res.hardlinks, 'hard link')} to {args.output}"
              + (f"; {len(res.failed)} FAILED" if res.failed else ""))
    return 1 if res.failed else 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"


def cmd_cat(args: argparse.Namespace) -> int:
    vol, paths = _split(args.args, need_path=True)
    if len(paths) != 1:
        raise UsageError("files cat takes one path")
    with _point_files(args) as pf:
        fs = pf.filesystem(vol)
        e = fs.stat(paths[0])
        if e.type != "file":
            raise UsageError(f"{e.path} is a {e.type}, not a file")
        out = sys.stdout.buffer
        for piece in fs.open_file(e).pieces():
            out.write(piece)
        out.flush()
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    vol, paths = _split(args.args, need_path=False)
    with _point_files(args) as pf:
        fs = pf.filesystem(vol)
        tops = paths or ["/"]

        def matches() -> Iterator:
            for top in tops:
                for e in fs.walk(top):
                    if args.name and not fnmatch.fnmatchcase(e.path.rsplit("/", 1)[-1], args.name):
                        continue
                    if args.newer is not None and e.mtime_ns <= args.newer * 1e9:
                        continue
                    if args.type and e.type != args.type:
                        continue
                    yield e

        if args.json:
            head = {"point": pf.point.id, "volume": fs.name, "filesystem": fs.kind, "journal": fs.journal_note}
            _stream_json(head, "entries", (e.to_json() for e in matches()))
        else:
            for e in matches():
                print(e.path)
    return 0


# -- diff, sql -------------------------------------------------------------------------------


def cmd_diff(args: argparse.Namespace) -> int:
    from engine.files.diff import BlockDiff, diff
    from engine.files.point import PointFiles
    from engine.stack import Stack

    vol, paths = _split(args.args, need_path=False)
    if len(paths) > 1:
        raise UsageError("files diff takes one path")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    with _open_repo(args) as repo, Stack(repo) as stack:
        a = PointFiles(stack, repo.point(args.point))
        b = PointFiles(stack, repo.point(args.point_b))
        fa = a.filesystem(vol)
        fb = b.filesystem(vol if vol is not None else fa.name)
        blocks = BlockDiff(a.disks, b.disks)
        errors = 0

        def changes() -> Iterator:
            nonlocal errors
            for c in diff(fa, fb, blocks, paths[0] if paths else "/"):
                errors += c.change == "unreadable"
                yield c

        if args.json:
            head = {"point_a": a.point.id, "point_b": b.point.id, "volume": fb.name, "filesystem": fb.kind,
                    "journal": fb.journal_note, "changed_blocks": blocks.count(), "block_size": blocks.block_size}
            _stream_json(head, "changes", (c.to_json() for c in changes()))
        else:
            for c in changes():
                print(c.line())
    return 1 if errors else 0


def _sql_cell(v: object, as_json: bool = False) -> object:
    if isinstance(v, bytes):
        return {"blob": v.hex()} if as_json else f"X'{v.hex()}'"
    if as_json:
        return v
    return "" if v is None else str(v)


def cmd_sql(args: argparse.Namespace) -> int:
    import csv
    from typing import Any

    from engine.files.sql import open_database, query

    if len(args.args) < 2:
        raise UsageError("files sql takes the database's path and a query")
    vol, paths = _split(args.args[:-1], need_path=True)
    if len(paths) != 1:
        raise UsageError("files sql takes one database path, then the query (quote it)")
    with _point_files(args) as pf:
        fs = pf.filesystem(vol)
        with open_database(fs, paths[0]) as conn:
            cols, rows = query(conn, args.args[-1])
            if args.json:
                cells: Iterator[Any] = ([_sql_cell(v, True) for v in r] for r in rows)  # lists, not objects
                _stream_json({"point": pf.point.id, "volume": fs.name, "path": paths[0], "columns": cols}, "rows", cells)
            elif args.csv:
                w = csv.writer(sys.stdout, lineterminator="\n")
                w.writerow(cols)
                for r in rows:
                    w.writerow([_sql_cell(v) for v in r])
            else:
                print("|".join(cols))
                for r in rows:
                    print("|".join(str(_sql_cell(v)) for v in r))
    return 0


# -- mount ---------------------------------------------------------------------------------

MOUNTED = "instantnfs: mounted"  # the line a background mount's parent waits for


def cmd_mount(args: argparse.Namespace) -> int:
    from engine.files.fusemount import MountError, check_mountpoint, fuse_problem, mount

    if len(args.args) > 2:
        raise UsageError("files mount takes an optional volume and one directory")
    vol, target = (args.args[0], args.args[1]) if len(args.args) == 2 else (None, args.args[0])
    why = fuse_problem()
    if why:
        raise MountError(f"cannot mount with FUSE: {why}")
    mnt = check_mountpoint(target)
    if not (args.foreground or args.detached_child):
        return _mount_in_background(args, mnt)

    def ready(where) -> None:
        print(f"{MOUNTED} {fs.kind} {fs.name} of restore point {pf.point.id} read-only at {where} (pid {os.getpid()}); "
              f"'fusermount3 -u {where}' or SIGTERM unmounts it", file=sys.stderr, flush=True)
        if args.detached_child:  # the parent has what it waits for: nothing more goes to its pipe
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.close(null)

    with _point_files(args) as pf:
        fs = pf.filesystem(vol)
        mount(fs, mnt, fsname=f"instantnfs:{pf.point.id}:{fs.name}", ready=ready)
    return 0


def _mount_in_background(args: argparse.Namespace, mnt) -> int:
    """Run the mount as a process of its own session; wait until it is mounted or has failed."""
    import subprocess

    argv = [a for a in args.argv if a not in ("-f", "--foreground")]
    proc = subprocess.Popen([sys.executable, "-m", "engine.control.cli", *argv, "--detached-child"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        text = line.decode(errors="replace")
        if text.startswith(MOUNTED):
            print(text.rstrip("\n"))
            proc.stderr.close()
            return 0
        sys.stderr.write(text)
    return proc.wait() or 1
