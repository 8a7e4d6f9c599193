"""The demo: a repository made once from a generated sample disk (reused later), served
by a daemon in the foreground with its restore point published, and the lines to try it
with QEMU, libnfs-utils and ESXi printed.

The demo disk is sparse (256 MiB, holes, text, incompressible and repeated blocks), so
the repository is small and quick to make; its session reserves 1 GiB, not the usual
100 GiB, on the cache volume.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from engine.control.daemon import SHUTDOWN_LIMIT, log_to_stderr, run_daemon, serve_config
from engine.errors import InstantNFSError

DEMO_VM = "demo-vm"
DEMO_SESSION = "demo"
DEMO_SIZE = 256 << 20


def make_demo_disk(path: str, size: int = DEMO_SIZE) -> None:
    """A sparse sample disk: a boot sector, text, incompressible and repeated blocks, holes."""
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


def _demo_repo(base: str) -> tuple[str, bool]:
    from engine.repo.ingest import BackupSettings, backup
    from engine.repo.repository import Repository

    repo = os.path.join(base, "repo")
    if os.path.exists(os.path.join(repo, "config.json")):
        with Repository.open(repo) as r:
            if r.points(DEMO_VM):
                return repo, False
    os.makedirs(base, exist_ok=True)
    if not os.path.exists(os.path.join(repo, "config.json")):
        Repository.init(repo, 1 << 20)
    img = os.path.join(base, "sample.img")
    make_demo_disk(img)
    with Repository.open(repo) as r:
        backup(r, BackupSettings(vm=DEMO_VM, cpus=1, memory_mib=512), [img])
    os.unlink(img)
    return repo, True


def cmd_demo(args: argparse.Namespace) -> int:
    log_to_stderr(args.verbose)
    try:
        base = os.path.expanduser(args.dir or "~/.cache/instantnfs-demo")
        repo, made = _demo_repo(base)
        print(("created" if made else "reusing") + f" the demo repository {repo}", flush=True)
        args.repo = repo
        if not args.cache_dir:
            args.cache_dir = os.path.join(base, "cache")
        cfg = serve_config(args)
        import uvloop

        return uvloop.run(_demo_main(cfg))
    except InstantNFSError as e:
        print(f"instantnfs: {e}", file=sys.stderr)
        return e.exit_code


async def _demo_main(cfg: dict[str, Any]) -> int:
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    daemon = asyncio.get_running_loop().create_task(run_daemon(cfg, ready, exit_limit=SHUTDOWN_LIMIT))
    done, _ = await asyncio.wait({daemon, ready}, return_when=asyncio.FIRST_COMPLETED)
    if daemon in done:
        return daemon.result()
    ports, control_port, api = ready.result()
    # the demo disk is 256 MiB: no 100 GiB reserve for it
    s = api.ds.sessions.get(DEMO_SESSION) or await api.ds.apublish(f"{DEMO_VM}@latest", DEMO_SESSION, reserve=1 << 30)
    view = api.session_view(s)
    host = api.host
    d = view["disks"][0]
    pm = ports.portmap or ports.portmap_external
    lines = [
        "",
        f"instantnfs demo: restore point {s.point.id} of VM {s.point.vm} is published as {view['path']}",
        "",
        f"  QEMU/KVM disk:   {d['url']}",
        f"  try:             qemu-img info {d['url']}",
        f"                   qemu-img convert -f raw -O qcow2 {d['url']} /tmp/demo-vm.qcow2",
        f"  libnfs-utils:    nfs-ls '{d['url_libnfs'].replace(d['name'] + '.img', '')}'",
        f"                   nfs-cat '{d['url_libnfs']}' | head -c 512 | od -c | head",
        "",
        "  VMware ESXi, Storage > New datastore > Mount NFS datastore, NFS 3:",
        f"      Name: instantnfs-demo    NFS server: {host}    NFS share: {api.services.mount3.export}",
        f"      then register {view['vmx']} as a VM",
        "",
        f"  ports: portmap {pm or 'off'}, mount {ports.mount}, nfs {ports.nfs}; control API http://{cfg['control']['bind']}:{control_port}/api/v1",
        "  Ctrl-C stops the server.",
        "",
    ]
    if not pm:
        lines.insert(4, "  (no portmapper: QEMU needs one on port 111; use the libnfs URL)")
    print("\n".join(lines), flush=True)
    return await daemon
