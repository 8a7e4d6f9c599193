"""The recovery product's commands: recover, boot, stop, vms, console, migrate, sandbox,
verify. Each calls the running daemon's control API (``engine.control.vms_api``) through
``engine.control.client``, which finds the daemon and its token, turns every failure
into one line and polls jobs with a progress bar (Ctrl-C cancels the job in the daemon).

``verify`` over many points (``--vm NAME --all`` or ``--latest N``) starts one job per
point, ``--parallel`` at a time, prints each point's summary as it ends, writes one JSON
report of all (``--report``) and exits 0 only if every point passed (1 if any failed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from engine.control import client
from engine.control.client import _quoted, api_call, command, wait_job
from engine.errors import InstantNFSError, UsageError

FOLLOW_POLL_S = 0.5


def _hw_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB (default: as recorded at backup)")
    p.add_argument("--cpus", type=int, help="virtual CPUs (default: as recorded at backup)")
    p.add_argument("--disk-bus", choices=("virtio", "scsi", "sata", "ide"), default="virtio",
                   help="how the disks are attached (default virtio; VMware guests often lack virtio drivers: sata or scsi)")
    p.add_argument("--net", default="user", metavar="none|user|bridge:NAME",
                   help="network: none, user (QEMU user networking, default), bridge:NAME (an existing bridge)")
    p.add_argument("--firmware", choices=("bios", "efi"), help="boot firmware (default: as recorded at backup)")


def _hw(args: argparse.Namespace) -> dict[str, Any]:
    out = {"memory_mib": args.memory, "cpus": args.cpus, "disk_bus": args.disk_bus, "net": args.net,
           "firmware": args.firmware}
    return {k: v for k, v in out.items() if v is not None}


def add_commands(sub: Any, client_opts: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "recover", help="instant VM recovery: publish a restore point and run the VM from it",
        description="Publish a restore point for instant recovery (its writes go to a write cache that survives "
                    "daemon restarts; the backup is never written) and, with --boot, run the VM under QEMU/KVM (TCG "
                    "when KVM is unusable) with its disks from the daemon's nfs:// URLs and the CPUs, memory and "
                    "firmware recorded at backup. Then: 'instantnfs migrate' to move it to production storage while it "
                    "runs, 'instantnfs stop' to power it off.")
    p.add_argument("point", help="restore point id, unique prefix, 'latest' or 'VM@latest'")
    p.add_argument("--name", help="session (and VM) name (default <vm>-<point id prefix>)")
    p.add_argument("--cache-dir", help="directory for the write caches (default: the daemon's)")
    p.add_argument("--disk", action="append", metavar="NAME", help="only this disk (repeatable): instant disk recovery")
    p.add_argument("--boot", action="store_true", help="run the VM under QEMU on the daemon's host")
    p.add_argument("--follow", action="store_true", help="with --boot: print the VM's serial console until Ctrl-C")
    _hw_opts(p)
    p.add_argument("--json", action="store_true", help="print the session and VM as JSON")
    client_opts(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("boot", help="run a published session's VM under QEMU (again)",
                       description="Run the VM of a published session (after a stop or a daemon restart: it sees every "
                                   "write the session kept).")
    p.add_argument("session")
    p.add_argument("--follow", action="store_true", help="print the VM's serial console until Ctrl-C")
    _hw_opts(p)
    p.add_argument("--json", action="store_true")
    client_opts(p)
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("stop", help="power a session's VM off (with --discard, also unpublish and drop its writes)")
    p.add_argument("session")
    p.add_argument("--discard", action="store_true", help="also unpublish the session: its write cache is deleted")
    p.add_argument("--json", action="store_true")
    client_opts(p)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("vms", help="the VMs the daemon runs")
    p.add_argument("--json", action="store_true")
    client_opts(p)
    p.set_defaults(func=cmd_vms)

    p = sub.add_parser("console", help="print a VM's serial console")
    p.add_argument("vm", help="VM (= session) name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the VM ends or Ctrl-C")
    client_opts(p)
    p.set_defaults(func=cmd_console)

    p = sub.add_parser(
        "migrate", help="move a session's disks to production storage while the VM runs",
        description="For a VM the daemon runs: QEMU mirrors each disk live (blockdev-mirror) and pivots to the copy; "
                    "the guest never stops and the session can then be unpublished. For a VM run elsewhere (ESXi, "
                    "another QEMU): the disks are copied while it runs; then stop the VM and confirm (this command "
                    "asks, or --confirm JOB), and a final pass copies what was written meanwhile.")
    p.add_argument("session", nargs="?")
    p.add_argument("--to", metavar="DIR|DEV", help="a directory in the daemon's export directories (server.export_dirs: "
                                                     "one file per disk, <disk>.img or .qcow2) or a block device listed "
                                                     "in server.migrate_devices")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    p.add_argument("--yes", action="store_true", help="a VM run elsewhere: do not ask, confirm it has stopped once the "
                                                      "copy is done (it must have been stopped by then)")
    p.add_argument("--confirm", metavar="JOB", help="confirm that the VM of a waiting migrate job has stopped")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    client_opts(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "sandbox", help="N isolated throw-away copies of a restore point, ended after a time to live",
        description="Publish N copies of one restore point (they share the daemon's decompression cache), each with "
                    "its own write cache, all ended when --ttl runs out (also across daemon restarts); with --boot, "
                    "each VM runs with no route out (QEMU user networking, restrict=on).")
    p.add_argument("point")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--ttl", default="2h", metavar="DURATION", help="time to live, e.g. 30m, 2h (default 2h)")
    p.add_argument("--name", help="name prefix (default <vm>-sandbox)")
    p.add_argument("--boot", action="store_true", help="run each sandbox's VM, isolated")
    p.add_argument("--cache-dir", help="directory for the write caches (default: the daemon's)")
    _hw_opts(p)
    p.set_defaults(net="user")
    p.add_argument("--json", action="store_true")
    client_opts(p)
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser(
        "verify", help="prove restore points are good: every chunk, the filesystems, an isolated boot, tests",
        description="Publish a sandbox of the point; read and check every chunk it uses; recognise the partition "
                    "table and each filesystem (naming the file behind any bad block); with --boot, boot it with no "
                    "route out (QEMU user networking with restrict=on, only the tested ports forwarded to the "
                    "host's loopback), wait for the heartbeat, run the tests; power off, unpublish. Prints a summary, "
                    "writes a JSON report; exit status 0 = passed, 1 = failed.",
        epilog="Tests: tcp:PORT (the guest port accepts a connection), http:PORT[/PATH] (answers 200), --script FILE "
               "(run on the daemon's host with INSTANTNFS_VERIFY_HOST and INSTANTNFS_VERIFY_PORT_<guest port> set; "
               "exit 0 = pass). Many points: --vm NAME --all or --latest N, --parallel at a time.")
    p.add_argument("point", nargs="?", help="restore point id, unique prefix, 'latest' or 'VM@latest'")
    p.add_argument("--vm", help="verify this VM's restore points (with --all or --latest N)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--all", action="store_true", help="every restore point of --vm")
    g.add_argument("--latest", type=int, metavar="N", help="the newest N restore points of --vm")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="points verified at once (default 1)")
    p.add_argument("--boot", action="store_true", help="boot the VM in an isolated lab and run the tests")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for the heartbeat (default vm.verify_timeout, 300)")
    p.add_argument("--test", action="append", default=[], metavar="TEST", help="tcp:PORT or http:PORT[/PATH] (repeatable)")
    p.add_argument("--script", metavar="FILE", help="an executable run against the booted VM (on the daemon's host)")
    p.add_argument("--heartbeat", metavar="REGEX", help="console pattern that says the guest is up (default: a login "
                                                        "prompt or GUEST-HEARTBEAT)")
    p.add_argument("--disk-bus", choices=("virtio", "scsi", "sata", "ide"), default="virtio")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    client_opts(p)
    p.set_defaults(func=cmd_verify)


# -- recover, boot, stop, vms, console ----------------------------------------------------------


def _print_vm(vm: dict | None) -> None:
    if not vm:
        return
    fw = ", ".join(f"{g}->127.0.0.1:{h}" for g, h in (vm.get("forwards") or {}).items())
    print(f"  VM {vm['name']}: {vm['state']}, pid {vm.get('pid')}, {vm.get('accel', '')} "
          f"serial console {vm.get('serial_log')}" + (f", forwards {fw}" if fw else ""))


def follow_console(args: argparse.Namespace, name: str, until_end: bool = True) -> None:
    """Print a VM's console as it comes, until the VM ends (or Ctrl-C)."""
    offset = 0
    try:
        while True:
            c = api_call(args, "GET", f"/vms/{_quoted(name)}/console?offset={offset}")
            if c["text"]:
                sys.stdout.write(c["text"])
                sys.stdout.flush()
            offset = c["offset"]
            if until_end and c["state"] not in ("running", "paused") and not c["text"]:
                print(f"\n[VM {name} {c['state']}]")
                return
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        print(f"\n[stopped following {name}; it runs on: 'instantnfs stop {name}']", file=sys.stderr)


def _show_recovered(args: argparse.Namespace, r: dict) -> None:
    client._print_session(r["session"])
    _print_vm(r["vm"])
    if r["vm"] and getattr(args, "follow", False):
        follow_console(args, r["vm"]["name"])


@command(_show_recovered)
def cmd_recover(args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"point": args.point, "boot": args.boot, **_hw(args)}
    if args.name:
        body["name"] = args.name
    if args.cache_dir:
        body["cache_dir"] = os.path.abspath(args.cache_dir)
    if args.disk:
        body["disks"] = args.disk
    return api_call(args, "POST", "/recover", body)


def _show_booted(args: argparse.Namespace, vm: dict) -> None:
    _print_vm(vm)
    if args.follow:
        follow_console(args, vm["name"])


@command(_show_booted)
def cmd_boot(args: argparse.Namespace) -> Any:
    return api_call(args, "POST", f"/sessions/{_quoted(args.session)}/boot", _hw(args))


@command(lambda args, r: print(f"{r['session']}: VM {r['vm']['state'] if r['vm'] else 'none'}"
                               + (", session unpublished" if r["unpublished"] else ", session kept")))
def cmd_stop(args: argparse.Namespace) -> Any:
    return api_call(args, "POST", f"/sessions/{_quoted(args.session)}/stop", {"discard": args.discard})


def _show_vms(args: argparse.Namespace, vms: list[dict]) -> None:
    if not vms:
        print("no VMs")
    for vm in vms:
        print(f"{vm['name']}")
        _print_vm(vm)


@command(_show_vms)
def cmd_vms(args: argparse.Namespace) -> Any:
    return api_call(args, "GET", "/vms")


def cmd_console(args: argparse.Namespace) -> int:
    try:
        if args.follow:
            follow_console(args, args.vm)
        else:
            c = api_call(args, "GET", f"/vms/{_quoted(args.vm)}/console?offset=0")
            sys.stdout.write(c["text"])
    except InstantNFSError as e:
        print(f"instantnfs: {e}", file=sys.stderr)
        return e.exit_code
    return 0


# -- migrate, sandbox --------------------------------------------------------------------------


def _show_migrated(args: argparse.Namespace, r: dict) -> None:
    if "disks" not in r:  # --confirm
        print(f"job {r['id']}: confirmed; the final pass runs ('instantnfs jobs')")
        return
    for d in r["disks"]:
        print(f"migrated {args.session} ({r['mode']}): {d.get('path') or d.get('target')}")
    print(f"  {r.get('bytes_copied', 0) / (1 << 20):.1f} MiB copied"
          + (f", {r['recopied_bytes'] / (1 << 20):.1f} MiB copied again" if r.get("recopied_bytes") else "")
          + (f"; the VM now runs from the copy: 'instantnfs unpublish {args.session}' is safe"
             if r["mode"] == "live" else ""))


@command(_show_migrated)
def cmd_migrate(args: argparse.Namespace) -> Any:
    if args.confirm:
        return api_call(args, "POST", f"/jobs/{_quoted(args.confirm)}/confirm", {})
    if not args.session or not args.to:
        raise UsageError("migrate needs SESSION and --to DIR|DEV (or --confirm JOB)")
    job = api_call(args, "POST", f"/sessions/{_quoted(args.session)}/migrate", {"to": args.to, "format": args.format})
    path = f"/jobs/{_quoted(job['id'])}"
    # a copy migrate pauses in phase "waiting" for the VM run elsewhere to stop
    while job["state"] == "running":
        job = api_call(args, "GET", path)
        if job["phase"] == "waiting" and job["state"] == "running":
            if not args.yes:
                if not sys.stdin.isatty():
                    raise UsageError(f"job {job['id']} waits for the VM to stop: stop it, then run "
                                     f"'instantnfs migrate --confirm {job['id']}' (or give --yes)")
                input(f"The disks are copied. Stop the VM now, then press Enter for the final pass (job {job['id']}) ")
            api_call(args, "POST", f"{path}/confirm", {})
            break
        if job["kind"] == "migrate" and job["phase"].startswith("mirror"):
            break
        time.sleep(0.2)
    return wait_job(args, job, f"migrate {args.session}")["result"]


def _show_sandboxes(args: argparse.Namespace, out: list[dict]) -> None:
    for sb in out:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sb["expires"])) if sb.get("expires") else "never"
        print(f"sandbox {sb['session']}: expires {when}")
        _print_vm(sb["vm"])


@command(_show_sandboxes)
def cmd_sandbox(args: argparse.Namespace) -> Any:
    from engine.control.cli import parse_duration

    try:
        ttl = parse_duration(args.ttl)
    except argparse.ArgumentTypeError as e:
        raise UsageError(str(e)) from None
    body: dict[str, Any] = {"point": args.point, "count": args.count, "ttl_s": ttl, "boot": args.boot, **_hw(args)}
    if args.boot and args.net == "user":
        body["net"] = "user-restricted"  # a sandbox never gets a route out
    if args.name:
        body["name"] = args.name
    if args.cache_dir:
        body["cache_dir"] = os.path.abspath(args.cache_dir)
    return api_call(args, "POST", "/sandboxes", body)


# -- verify ------------------------------------------------------------------------------------


def _points_to_verify(args: argparse.Namespace) -> list[str]:
    if args.point and (args.vm or args.all or args.latest):
        raise UsageError("give a POINT, or --vm NAME with --all or --latest N, not both")
    if args.point:
        return [args.point]
    if not args.vm or not (args.all or args.latest):
        raise UsageError("verify needs a POINT, or --vm NAME with --all or --latest N")
    points = [p for p in api_call(args, "GET", "/points") if p["vm"] == args.vm]
    if not points:
        raise UsageError(f"the repository has no restore point of VM {args.vm!r}")
    points.sort(key=lambda p: p.get("created") or "")
    if args.latest:
        if args.latest < 1:
            raise UsageError("--latest takes a count of 1 or more")
        points = points[-args.latest:]
    return [p["id"] for p in points]


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        ids = _points_to_verify(args)
        if args.parallel < 1:
            raise UsageError("--parallel takes 1 or more")
        body: dict[str, Any] = {"boot": args.boot, "tests": args.test, "disk_bus": args.disk_bus}
        if args.timeout is not None:
            body["timeout_s"] = args.timeout
        if args.script:
            body["script"] = os.path.abspath(args.script)
        if args.heartbeat:
            body["heartbeat"] = args.heartbeat
        reports: dict[str, dict] = {}
        pending = list(ids)
        running: dict[str, dict] = {}
        while pending or running:
            while pending and len(running) < args.parallel:
                pid = pending.pop(0)
                running[pid] = api_call(args, "POST", f"/points/{_quoted(pid)}/verify", body)
            if len(ids) == 1:
                pid = ids[0]
                try:
                    job = wait_job(args, running.pop(pid), f"verify {pid[:12]}")
                except InstantNFSError as e:
                    reports[pid] = {"point": pid, "passed": False, "errors": [str(e)]}
                else:
                    reports[pid] = job["result"]
                _print_report(args, reports[pid])
                continue
            time.sleep(0.5)
            for pid, job in list(running.items()):
                job = api_call(args, "GET", f"/jobs/{_quoted(job['id'])}")
                if job["state"] == "running":
                    running[pid] = job
                    continue
                del running[pid]
                reports[pid] = job["result"] if job["state"] == "done" else \
                    {"point": pid, "passed": False, "errors": [job["error"] or job["state"]]}
                _print_report(args, reports[pid])
    except InstantNFSError as e:
        print(f"instantnfs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        for job in running.values():
            client._cancel_and_wait(args, job["id"])
        print("instantnfs: interrupted: the running verifications were cancelled", file=sys.stderr)
        return 130
    doc: Any = reports[ids[0]] if len(ids) == 1 else {"points": [reports[i] for i in ids],
                                                      "passed": all(reports[i].get("passed") for i in ids)}
    if args.report:
        tmp = args.report + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.report)
    if args.json:
        print(json.dumps(doc, indent=2))
    if len(ids) > 1 and not args.json:
        ok = sum(1 for i in ids if reports[i].get("passed"))
        print(f"{ok} of {len(ids)} restore points passed")
    return 0 if all(reports[i].get("passed") for i in ids) else 1


def _print_report(args: argparse.Namespace, report: dict) -> None:
    if args.json:
        return
    if report.get("summary"):
        print(report["summary"])
    else:  # the job itself failed: no report, its error
        print(f"verify restore point {report['point']}: FAIL")
        for e in report.get("errors") or []:
            print(f"  error: {e}")
