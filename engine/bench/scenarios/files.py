"""File-level recovery: browse a restore point and pull files out of it, against the peers.

The input is a guest disk: a sparse image of ``--size`` (larger if the tree needs it)
holding an ext4 filesystem made with ``mke2fs -d`` from a seeded tree -- one big file
(1 GiB; 64 MiB with ``--quick``) and many small ones (100k; 2000 with ``--quick``; 512 B
to 8 KiB each, 1000 to a directory), half random and half text-like bytes -- backed up
into the run's repository. Rows:

- **list the root** of the filesystem of a point just opened: a fresh process opens the
  repository, the point, finds the volume and the filesystem and lists ``/``, the pack
  files dropped from the page cache first. The figure is timed inside that process
  (from opening the repository, imports excluded); the process's whole wall time is an
  extra. Once for the benchmark's disk and once for a 100 GiB sparse disk holding a
  small tree (the issue's goal: < 0.5 s at 100 GiB, since only metadata is read).
- **extract the big file** and **extract the small files**: ``instantnfs files get``
  (the CLI, a process per run) beside ``instantnfs restore`` of the whole disk (what
  one has to do without file-level recovery: the figure is the files' bytes or count
  over the time to restore the disk) and beside ``borg extract`` / ``restic restore``
  of the same files from a file-level backup of the same tree (made once, untimed).
  Every run starts from a cold page cache (every repository's files dropped) and an
  empty target; each run's output is checked (sizes, count) so a silent failure is no
  figure.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from engine.bench.core import OURS, Goal, Measure, Row, Systems
from engine.bench.ours import cli_backup
from engine.bench.pagecache import drop_file_pages, files_under

NAME = "files"
GROUP = "file-level recovery"
PEERS = ("borg", "restic")
RESTORE = "instantnfs restore"  # the whole disk restored, as a system of its own in a row
MIB = 1 << 20
GIB = 1 << 30
PER_DIR = 1000
TREE = "tree"  # the tree's directory: its bare name is what the peers back up


def plan(ctx) -> tuple[int, int]:  # noqa: ANN001
    """(big file bytes, number of small files)."""
    return (64 * MIB, 2000) if ctx.quick else (GIB, 100_000)


def rows(ctx) -> int:  # noqa: ANN001, ARG001
    return 4


# -- the input ---------------------------------------------------------------------------


def make_tree(root: Path, big: int, small: int, seed: int = 12) -> int:
    """The seeded tree under ``root``; its size in bytes."""
    rng = random.Random(seed)
    text = b"".join(b"instant file level recovery %d of a backup\n" % i for i in range(40000))
    root.mkdir(parents=True)
    with open(root / "big.bin", "wb") as f:
        for i in range(0, big, MIB):
            n = min(MIB, big - i)
            f.write(rng.randbytes(n) if (i // MIB) % 2 == 0 else text[i % 4096 : i % 4096 + n])
    total = big
    for i in range(small):
        d = root / "small" / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True)
        n = rng.randint(512, 8192)
        at = rng.randrange(len(text) - n)
        data = rng.randbytes(n) if i % 2 == 0 else text[at : at + n]
        (d / f"f{i:06d}.txt").write_bytes(data)
        total += n
    return total


def ext4_disk(path: Path, tree: Path, size: int, inodes: int) -> None:
    """A sparse image of ``size`` bytes with an ext4 filesystem holding ``tree``."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    r = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-N", str(inodes), "-d", str(tree), str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"mke2fs -d of {tree} into {path} failed: {r.stderr.strip()[-500:]}")


class Input:
    """The tree, its disk backed up into the run's repository, and the peers' backups of it."""

    def __init__(self, ctx) -> None:  # noqa: ANN001
        self.ctx = ctx
        self.big, self.small = plan(ctx)
        self.dir = ctx.work / "files"
        self.src = self.dir / "src"
        shutil.rmtree(self.dir, ignore_errors=True)
        ctx.step("files: writing the tree")
        self.bytes = make_tree(self.src / TREE, self.big, self.small)
        # 4 KiB blocks per small file and their inodes, the big file, then a third more room
        need = int((self.big + self.small * 8192 + 64 * MIB) * 1.35) // MIB * MIB
        self.disk_size = max(ctx.size, need)
        img = self.dir / "guest.img"
        ctx.step("files: making and backing up the guest disk")
        ext4_disk(img, self.src / TREE, self.disk_size, self.small + self.small // 100 + 4096)
        out = cli_backup(ctx.repo, "files-guest", img)
        self.point, self.disk = str(out["id"]), str(out["disks"][0]["name"])
        img.unlink()
        self.peers: dict[str, tuple[Any, Any]] = {}  # name -> (peer, its workspace)
        self.peer_seconds: dict[str, float] = {}

    def peer(self, name: str) -> tuple[Any, Any] | None:
        """The peer ``name`` with a file-level backup of the tree (made once), or None."""
        from engine.bench.peers import Workspace

        p = self.ctx.peers.get(name)
        if p is None:
            return None
        if name not in self.peers:
            self.ctx.step(f"files: {name} backup of the tree")
            ws = Workspace(self.ctx.work / "peers", self.ctx.image, self.ctx.size, self.ctx.log)
            m = p.backup(ws, self.src / TREE, "files")
            self.peer_seconds[name] = m.value
            self.peers[name] = (p, ws)
        return self.peers[name]

    def repos(self) -> list[Path]:
        """Every repository a row reads from, whose pages ``cold`` drops."""
        out = [self.ctx.repo]
        for p, ws in self.peers.values():
            out.append(p.state_dir(ws) / "ingest" / "files")
        return out

    def cold(self, target: Path) -> None:
        shutil.rmtree(target, ignore_errors=True)
        for r in self.repos():
            drop_file_pages(files_under(r))


# -- listing the root --------------------------------------------------------------------


def list_root_here(repo: str, point: str) -> dict[str, float | int]:
    """(in the measuring process) Open the point's filesystem and list its root."""
    from engine.files.point import PointFiles
    from engine.repo.repository import Repository
    from engine.stack import Stack

    t0 = time.perf_counter()
    with Repository.open(repo) as r, Stack(r) as stack:
        fs = PointFiles(stack, r.point(point)).filesystem(None)
        names = sum(1 for _ in fs.listdir("/"))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "entries": names}


def list_root(ctx, point: str) -> Measure:  # noqa: ANN001
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "engine.bench.scenarios.files", "list-root", str(ctx.repo), point],
                       capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"listing the root of {point} failed: {r.stderr.strip()[-500:]}")
    got = json.loads(r.stdout)
    if got["entries"] < 2:
        raise RuntimeError(f"the root of {point} lists {got['entries']} entries")
    return Measure(got["seconds"] * 1e3, {**got, "process_seconds": round(wall, 3)})


def sparse_100g_point(ctx, inp: Input) -> str:  # noqa: ANN001
    """A 100 GiB sparse disk holding ext4 with a small tree, backed up; its point id."""
    tree = inp.dir / "src-100g"
    tree.mkdir()
    shutil.copytree(inp.src / TREE / "small" / "d0000", tree / "small")
    (tree / "hello.txt").write_text("hello\n")
    img = inp.dir / "guest-100g.img"
    try:
        ext4_disk(img, tree, 100 * GIB, 1 << 16)
        return str(cli_backup(ctx.repo, "files-100g", img, timeout=1800)["id"])
    finally:
        img.unlink(missing_ok=True)


# -- extraction --------------------------------------------------------------------------


def _cli(*args: str, what: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "engine.control.cli", *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=3600)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return seconds


def _count(root: Path) -> tuple[int, int]:
    files = size = 0
    for d, _dirs, names in os.walk(root):
        for n in names:
            files += 1
            size += os.lstat(os.path.join(d, n)).st_size
    return files, size


def _figure(seconds: float, files: int, nbytes: int, per: str, extra: dict) -> Measure:
    value = nbytes / seconds / 1e6 if per == "MB/s" else files / seconds
    return Measure(value, {"seconds": round(seconds, 3), "files": files, "bytes": nbytes, **extra})


def _check(out: Path, files: int, nbytes: int, who: str) -> None:
    got = _count(out)
    if got != (files, nbytes):
        raise RuntimeError(f"{who} extracted {got[0]} files of {got[1]} bytes, not {files} of {nbytes}")


def ours_get(inp: Input, path: str, out: Path, files: int, nbytes: int, per: str) -> Measure:
    seconds = _cli("files", "get", "--repo", str(inp.ctx.repo), inp.point, path, "-o", str(out), "-q",
                   what=f"instantnfs files get {path}")
    _check(out, files, nbytes, "instantnfs files get")
    return _figure(seconds, files, nbytes, per, {})


def ours_restore(inp: Input, out: Path, files: int, nbytes: int, per: str) -> Measure:
    out.mkdir(parents=True)
    img = out / "disk.img"
    seconds = _cli("restore", "--repo", str(inp.ctx.repo), inp.point, inp.disk, "-o", str(img), "-q",
                   what="instantnfs restore")
    if os.path.getsize(img) != inp.disk_size:
        raise RuntimeError(f"instantnfs restore wrote {os.path.getsize(img)} bytes, not {inp.disk_size}")
    return _figure(seconds, files, nbytes, per, {"restored_bytes": inp.disk_size})


def peer_extract(inp: Input, name: str, path: str, out: Path, files: int, nbytes: int, per: str) -> Measure:
    got = inp.peer(name)
    if got is None:
        raise RuntimeError(f"{name} is not set up")
    p, ws = got
    m = p.extract(ws, "files", [TREE + path], out)
    _check(out, files, nbytes, name)
    return _figure(m.value, files, nbytes, per, {"command": m.extra.get("command")})


def extraction_row(ctx, inp: Input, what: str, path: str, files: int, nbytes: int, per: str) -> Row:  # noqa: ANN001
    row = ctx.row(f"files/extract-{what}", f"extract {_title(what, files, nbytes)} from a restore point", GROUP, per,
                  "higher", {"client": "CLI, a process per run (instantnfs files get / restore of the whole disk; "
                                       "borg extract / restic restore of a file-level backup of the tree)",
                             "cache": "cold page cache", "disk": f"ext4 guest, {inp.disk_size >> 20} MiB disk",
                             "files": files, "bytes": nbytes,
                             "restore": "the whole disk written out; its figure is the files over that time "
                                        "(getting them out of the image, which needs a mount, not counted)"},
                  None, peers=PEERS)
    out = ctx.work / "files" / "out"
    systems: Systems = {
        OURS: partial(ours_get, inp, path, out, files, nbytes, per),
        RESTORE: partial(ours_restore, inp, out, files, nbytes, per),
    }
    for name in PEERS:
        try:
            if inp.peer(name) is not None:
                systems[name] = partial(peer_extract, inp, name, path, out, files, nbytes, per)
        except Exception as e:  # noqa: BLE001 - a peer that cannot back the tree up is a note, not the row
            row.missing[name] = f"file-level backup failed: {e}"
    before: Callable[[str], None] = lambda _name: inp.cold(out)  # noqa: E731
    ctx.measure(row, systems, before=before)
    shutil.rmtree(out, ignore_errors=True)
    for name, s in inp.peer_seconds.items():
        note = f"{name}: file-level backup of the tree made once beforehand ({s:.1f} s)"
        if name in row.results and note not in row.notes:
            row.notes.append(note)
    return row


def _title(what: str, files: int, nbytes: int) -> str:
    if what == "big-file":
        return f"one {nbytes >> 20} MiB file" if nbytes < GIB else f"one {nbytes / GIB:g} GiB file"
    return f"{files} small files ({nbytes / 1e6:.0f} MB)"


# -- the rows ----------------------------------------------------------------------------


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    try:
        inp = Input(ctx)
    except Exception as e:  # noqa: BLE001 - every row reports why the input is missing
        for rid, title in (("list-root", "list the root"), ("list-root-100GiB", "list the root, 100 GiB"),
                           ("extract-big-file", "extract a big file"), ("extract-small-files", "extract small files")):
            row = ctx.row(f"files/{rid}", title, GROUP, "ms", "lower", {})
            row.error = f"{type(e).__name__}: {e}"
            yield row
        return
    try:
        goal = Goal("< 500 ms for a 100 GiB disk", absolute=500.0)
        for rid, size_label, make in (("list-root", f"{inp.disk_size >> 20} MiB", None),
                                      ("list-root-100GiB", "100 GiB sparse", sparse_100g_point)):
            row = ctx.row(f"files/{rid}", f"list the root of a just-opened point's filesystem, {size_label} disk",
                          GROUP, "ms", "lower", {"client": "a fresh process: open repository, point, volume, ext4; "
                                                           "list / (timed inside, imports excluded)",
                                                 "cache": "cold page cache", "disk": f"ext4 guest, {size_label} disk"}, goal)
            try:
                point = inp.point if make is None else make(ctx, inp)
            except Exception as e:  # noqa: BLE001
                row.error = f"{type(e).__name__}: {e}"
                yield row
                continue
            yield ctx.measure(row, {OURS: partial(list_root, ctx, point)},
                              before=lambda _n: drop_file_pages(files_under(ctx.repo)))
        n_small, small_bytes = _count(inp.src / TREE / "small")
        yield extraction_row(ctx, inp, "big-file", "/big.bin", 1, inp.big, "MB/s")
        yield extraction_row(ctx, inp, "small-files", "/small", n_small, small_bytes, "files/s")
    finally:
        shutil.rmtree(inp.dir, ignore_errors=True)


if __name__ == "__main__":  # the measuring process of the list rows
    if len(sys.argv) != 4 or sys.argv[1] != "list-root":
        sys.exit("usage: python -m engine.bench.scenarios.files list-root REPO POINT")
    print(json.dumps(list_root_here(sys.argv[2], sys.argv[3])))
