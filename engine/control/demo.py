"""The demo: the whole idea in one command. It builds the small bootable test guest
(``engine.vm.guest``: reused from its cache later), backs it up into a demo repository
(once), serves it, publishes the restore point, boots the VM under QEMU from the
daemon's own ``nfs://`` URL and prints the guest's console lines (its heartbeat) as they
come, then how to reach the datastore from QEMU, libnfs-utils and ESXi. ``--no-boot``
skips the boot. A second run reuses the repository, the session (with whatever the VM
wrote) and a VM still running from a run that was killed. Ctrl-C powers the demo VM off
and stops the server.

QEMU finds NFS servers only through the portmapper on port 111, which needs root (or a
portmapper already there, with which the daemon registers): without one the demo serves
and says why it does not boot. The session reserves 1 GiB, not the usual 100 GiB, on the
cache volume.
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
DEMO_MEMORY = 256  # MiB
BOOT_WAIT_S = 180.0  # seconds the demo waits for the first heartbeat before it prints the instructions


def _demo_repo(base: str) -> tuple[str, bool]:
    """The demo repository with one restore point of the guest (made once)."""
    from engine.repo.ingest import BackupSettings, backup
    from engine.repo.repository import Repository
    from engine.vm.guest import ensure_guest

    repo = os.path.join(base, "repo")
    if os.path.exists(os.path.join(repo, "config.json")):
        with Repository.open(repo) as r:
            if r.points(DEMO_VM):
                return repo, False
    os.makedirs(base, exist_ok=True)

    def progress(phase: str, detail: str) -> None:
        print(f"  guest: {phase}: {detail}" if detail else f"  guest: {phase}", flush=True)

    print("building the demo guest (a small Linux with busybox; cached for later runs)", flush=True)
    guest = ensure_guest(progress=progress)
    if not os.path.exists(os.path.join(repo, "config.json")):
        Repository.init(repo, 1 << 20)
    with Repository.open(repo) as r:
        backup(r, BackupSettings(vm=DEMO_VM, cpus=1, memory_mib=DEMO_MEMORY), [str(guest.disk)])
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

        return uvloop.run(_demo_main(cfg, boot=not args.no_boot))
    except InstantNFSError as e:
        print(f"instantnfs: {e}", file=sys.stderr)
        return e.exit_code


async def _demo_main(cfg: dict[str, Any], boot: bool = True) -> int:
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    booted: tuple[Any, int] | None = None

    async def power_off() -> None:  # Ctrl-C: the demo's VM goes with the demo, while NFS still serves
        if booted is not None:
            print("powering the demo VM off", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, api.recovery.stop_vm, booted[0].name)

    daemon = asyncio.get_running_loop().create_task(run_daemon(cfg, ready, exit_limit=SHUTDOWN_LIMIT,
                                                               before_stop=power_off))
    done, _ = await asyncio.wait({daemon, ready}, return_when=asyncio.FIRST_COMPLETED)
    if daemon in done:
        return daemon.result()
    ports, control_port, api = ready.result()
    # the demo disk is 256 MiB: no 100 GiB reserve for it
    s = api.ds.sessions.get(DEMO_SESSION) or await api.ds.apublish(f"{DEMO_VM}@latest", DEMO_SESSION, reserve=1 << 30)
    if boot:
        booted = await _boot(api, s, ports)
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
    follower = asyncio.get_running_loop().create_task(_follow(*booted)) if booted else None
    try:
        return await daemon
    finally:
        if follower is not None:
            follower.cancel()


async def _boot(api: Any, s: Any, ports: Any) -> tuple[Any, int] | None:
    """Boot the demo VM (or take the one still running) and print its console until the
    guest says it is up (its READY marker: heartbeat, data check and services done);
    (the VM, console bytes printed), or None with why it did not boot."""
    from engine.vm.guest import HEARTBEAT, READY

    if 111 not in (ports.portmap, ports.portmap_external):
        print("  not booting: QEMU finds NFS servers through a portmapper on port 111, and there is none "
              "(run as root, or start rpcbind); --no-boot hides this", flush=True)
        return None
    rec = api.recovery
    vm = rec.vm_of(s.name)
    loop = asyncio.get_running_loop()
    if vm is None or vm.state not in ("running", "paused"):
        print(f"booting VM {s.point.vm} under QEMU from the backup over NFS (TCG emulation when KVM is unusable: "
              "expect 10-30 s)", flush=True)
        try:
            vm = await rec.boot(s.name, net="user", memory_mib=DEMO_MEMORY)
        except InstantNFSError as e:
            print(f"  not booting: {e}", flush=True)
            return None
    else:
        print(f"VM {vm.name} is still running from before (pid {vm.pid})", flush=True)
    printed = 0
    beats = ready = 0
    deadline = loop.time() + BOOT_WAIT_S
    while loop.time() < deadline and not ready:
        printed, lines = await _print_console(vm, printed)
        beats += sum(HEARTBEAT in line for line in lines)
        ready += sum(READY in line for line in lines)
        if not lines and await loop.run_in_executor(None, vm.refresh, False) == "exited":
            print(f"  the VM ended ({vm.state}); its console: {vm.serial_log}", flush=True)
            return None
        await asyncio.sleep(0.3)
    if beats == 0:
        print(f"  no heartbeat after {BOOT_WAIT_S:.0f} s; the console is in {vm.serial_log}", flush=True)
    return vm, printed


async def _print_console(vm: Any, offset: int) -> tuple[int, list[str]]:
    """Print the whole lines the VM's console has written from byte ``offset`` on; the
    offset to go on from, and the lines printed."""
    data = await asyncio.get_running_loop().run_in_executor(None, vm.console_from, offset)
    whole = data[: data.rfind(b"\n") + 1]  # an unfinished line waits for its end
    lines = whole.decode(errors="replace").replace("\r", "").splitlines()
    for line in lines:
        print(f"  guest | {line.rstrip()}", flush=True)
    return offset + len(whole), lines


async def _follow(vm: Any, offset: int) -> None:
    """Go on printing the guest's console lines as they come."""
    while True:
        offset, _ = await _print_console(vm, offset)
        await asyncio.sleep(0.5)
