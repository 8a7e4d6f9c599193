"""The boot's recorded block I/O replayed against our NFS and against the local file.

Under TCG a boot is mostly the CPU's emulation; replaying only the reads the boot made
isolates the disk. How the trace is recorded, and why this way: QEMU's own trace event
``blk_co_preadv`` (Debian's QEMU has the ``log`` trace backend: ``-trace
enable=blk_co_preadv -D FILE``) logs every read the guest's block device issues, with
offset and length, in order, at the block layer above the format and protocol drivers,
so the trace is the same whatever the disk's source. One boot of the local image to
``GUEST-DONE`` (oneshot) is recorded, once per run. blkdebug has no read log, and
recording at our NFS server would see libnfs's splitting and QEMU's alignment instead
of the guest's requests; the trace event sees exactly what the guest asked for.

The replay reads the same offsets and lengths in the same order, one at a time (the
guest's boot is mostly one request at a time), with ``qemu-io -r -f raw -t none``: the
client is QEMU's own block layer, the one the boot went through (libnfs for our
``nfs://`` URL, ``O_DIRECT`` on the local file: ``cache=none`` both), so the only
difference is the disk's source. Against instantnfs on a session published for each run,
the chunk cache emptied by a daemon restart before each run (a first boot from a
backup); a second row replays with the chunk cache warm (one untimed replay first): the
NFS path alone, without decompression. The figure is the sum of the read commands'
times as qemu-io reports them (opening the image and connecting left out; the process's
wall time is an extra). The writes of the boot are not replayed (a few KiB: the agent's
value and counter). An earlier cut replayed with the in-repo Python NFS client: its own
per-call cost (~0.3 ms) dominated 730 small reads, so it measured the client.

Threads: none of its own; qemu-io is a subprocess with a timeout.
"""
from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

from engine.bench import guestvm
from engine.bench.core import OURS, Goal, Measure, Row
from engine.bench.guestvm import Read

NAME = "boot-trace"
GROUP = "VM boot: disk I/O replay"
PEERS: tuple[str, ...] = ()
LOCAL = "local"
MEMORY_MIB = 256


def rows(ctx) -> int:  # noqa: ANN001, ARG001
    return 2


def record(ctx, image: Path) -> list[Read]:  # noqa: ANN001
    """Boot a copy of ``image`` to GUEST-DONE under QEMU with the read trace on; its reads."""
    from engine.vm.guest import DONE, guest_config
    from engine.vm.qemu import DiskSpec, VMFiles, VMSpec, accel_verdict, command_line, prepare_files

    work = ctx.work / "boot-trace"
    copy = guestvm.fresh_copy(image, work / "guest.img")
    accel = accel_verdict(work / "probe")
    spec = VMSpec(name="trace", disks=[DiskSpec(str(copy))], memory_mib=MEMORY_MIB, net="none",
                  fw_cfg=guest_config("trace", value="trace", mode="oneshot"), accel=accel)
    files = VMFiles(work / "vm")
    prepare_files(spec, files)
    log = work / "trace.log"
    cmd = [*command_line(spec, files, accel=accel), "-trace", "enable=blk_co_preadv", "-D", str(log)]
    with open(files.qemu_log, "wb") as out:
        p = subprocess.Popen(cmd, cwd=files.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + guestvm.BOOT_TIMEOUT
        while DONE not in (files.serial.read_text(errors="replace") if files.serial.exists() else ""):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the traced boot did not reach {DONE}: "
                                   f"{files.serial.read_text(errors='replace')[-1500:] if files.serial.exists() else ''}")
            time.sleep(guestvm.POLL_S)
    finally:
        if p.poll() is None:
            p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    reads = guestvm.parse_trace(log.read_text(errors="replace"))
    if not reads:
        raise RuntimeError(f"the trace {log} holds no blk_co_preadv event (is QEMU's trace backend 'log'?)")
    return reads


QEMU_IO_RE = re.compile(r"(\d+) ops; [^(]*\(.*? and ([\d.]+) ops/sec\)")


def qemu_io_seconds(out: str) -> tuple[float, int]:
    """(seconds, commands) from ``qemu-io`` read reports: each command's time is its ops
    over its ops/sec (the printed seconds are rounded to 10 ms, the rate is not)."""
    seconds, n = 0.0, 0
    for m in QEMU_IO_RE.finditer(out):
        ops, rate = int(m.group(1)), float(m.group(2))
        if rate <= 0:
            raise ValueError(f"a qemu-io report with a rate of {rate}")
        seconds += ops / rate
        n += 1
    return seconds, n


def replay(source: str, reads: Sequence[Read]) -> Measure:
    """The reads against ``source`` (a file or an ``nfs://`` URL) with ``qemu-io -r -t none``:
    QEMU's block layer and protocol driver, as the guest's boot used them; one process,
    one read command per traced read, in order. Figure: the sum of the commands' times
    (opening the image left out); the process's wall time is an extra."""
    cmd = ["qemu-io", "-r", "-f", "raw", "-t", "none"]
    for r in reads:
        cmd += ["-c", f"read {r.offset} {r.length}"]
    t0 = time.perf_counter()
    p = subprocess.run([*cmd, source], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    seconds, n = qemu_io_seconds(p.stdout)
    if p.returncode != 0 or n != len(reads):
        raise RuntimeError(f"qemu-io replayed {n} of {len(reads)} reads of {source} (exit {p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()[-500:]}")
    return Measure(seconds * 1e3, {"reads": n, "bytes": sum(r.length for r in reads), "process_s": round(wall, 3)})


def replay_ours(ctx, point: str, reads: Sequence[Read]) -> Measure:  # noqa: ANN001
    """The replay on a session of ``point`` published for the run (unpublished after)."""
    d = ctx.ours
    name = ctx.session_name("trace")
    try:
        view = d.api("POST", "/sessions", {"point": point, "name": name})
        disk = view["disks"][0]
        return replay(d.target(name, disk["name"], disk["size"]).url, reads)
    finally:
        ctx.unpublish(name)


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    row = ctx.row("boot-trace/replay", "replay of the guest's boot reads (QEMU trace): from the backup over NFS vs the "
                  "local raw file", GROUP, "ms", "lower",
                  {"disk": "the test guest's 128 MiB raw disk (not the seeded disk)",
                   "client": "qemu-io -r -t none (QEMU's block layer; libnfs for nfs://), one read at a time, in order",
                   "trace": "QEMU -trace blk_co_preadv of one oneshot boot to GUEST-DONE (reads only, in order)",
                   "cache": "instantnfs: chunk cache emptied (daemon restarted) before each run; packs in the page cache"},
                  Goal("≤ 1.1× the local file (the boot's goal, the disk alone)", peer=LOCAL, ratio=1.1))
    warm = ctx.row("boot-trace/replay-warm", "replay of the guest's boot reads, chunk cache warm (the NFS path alone) "
                   "vs the local raw file", GROUP, "ms", "lower",
                   {**row.conditions, "cache": "instantnfs: one untimed replay first, so every chunk is decompressed "
                                               "already; packs in the page cache"})
    try:
        point, image = guestvm.guest_point(ctx)
        ctx.step("boot-trace: recording a boot's reads")
        reads = record(ctx, image)
    except Exception as e:  # noqa: BLE001 - reported in the row
        row.error = warm.error = f"{type(e).__name__}: {e}"
        yield row
        yield warm
        return
    row.conditions["trace_summary"] = warm.conditions["trace_summary"] = guestvm.trace_summary(reads)
    local = ctx.work / "boot-trace" / "guest.img"

    def cold(name: str) -> None:
        if name == OURS:
            ctx.ours.restart()

    systems = {OURS: partial(replay_ours, ctx, point, reads), LOCAL: partial(replay, str(local), reads)}
    yield ctx.measure(row, systems, before=cold)
    yield ctx.measure(warm, systems, warmup=True)
