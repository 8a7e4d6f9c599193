"""The daemon as a whole: restart with the same handles, an ESXi-like session, the CLI,
portmapper modes, and garbage on the wire."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from engine.nfs.client import NFSClient, RpcClient, build_call, frame
from engine.nfs.mount_types import MOUNT_PROGRAM
from engine.nfs.nfs3_types import (
    DONT_CHANGE_TIME,
    NFS_PROGRAM,
    NFSPROC3,
    GETATTR3args,
    READ3args,
    RENAME3args,
    SETATTR3args,
    createmode3,
    diropargs3,
    ftype3,
    nfs_fh3,
    nfsstat3,
    sattr3,
)
from engine.nfs.portmap_types import PMAP_PROG, PMAPPROC, mapping
from engine.nfs.xdr import uint32
from tests.conftest import require_tool
from tests.nfs.conftest import ROOT, give_address, run, take_address


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.control.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)


def test_handles_and_client_files_survive_restart(daemon_factory, images, tmp_path):
    cache = tmp_path / "persist"
    dmn = daemon_factory(cache_dir=cache)
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "ir"})
    d = images["disks"][0]

    async def before() -> dict[str, bytes]:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            root = await c.mount("/instantnfs")
            sess = await c.lookup(root, "ir")
            img = await c.lookup(sess, f"{d['name']}.img")
            f = (await c.create(sess, "vm.nvram")).body.obj.data
            await c.write(f, 0, b"nvram-bytes")
            return {"root": root, "sess": sess, "img": img, "f": f}
        finally:
            await c.close()

    h = run(before())
    addr = dmn.addr
    assert dmn.stop() == 0  # SIGTERM: a clean stop
    dmn2 = daemon_factory(cache_dir=cache, addr=addr)
    assert [s["name"] for s in dmn2.api("GET", "/sessions")] == ["ir"]

    async def after() -> None:
        c = await NFSClient.connect(dmn2.addr, dmn2.mount_port, dmn2.nfs_port)
        try:
            assert await c.mount("/instantnfs") == h["root"]
            assert await c.lookup(h["root"], "ir") == h["sess"]
            assert (await c.getattr(h["img"])).size == d["size"]
            assert (await c.read(h["img"], 0, 4096))[0] == images["data"][0][:4096]
            assert (await c.read(h["f"], 0, 100))[0] == b"nvram-bytes"
        finally:
            await c.close()

    run(after())
    # unpublish: the same handles are STALE now
    dmn2.api("DELETE", "/sessions/ir")

    async def gone() -> None:
        c = await NFSClient.connect(dmn2.addr, dmn2.mount_port, dmn2.nfs_port)
        try:
            for k in ("sess", "img", "f"):
                r = await c.call(NFSPROC3.GETATTR, GETATTR3args(nfs_fh3(h[k])), check=False)
                assert r.tag == nfsstat3.NFS3ERR_STALE
        finally:
            await c.close()

    run(gone())


def test_esxi_like_session(served):
    """Mount; lock file rewritten by 84-byte WRITEs; GETATTR polling on the root; a .vswp
    sized by SETATTR; .vmx~ renamed over .vmx; lock removed; unmount."""

    async def main() -> None:
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
        try:
            root = await c.mount("/instantnfs")
            sess = await c.lookup(root, "sess")
            polls = 0
            stop = asyncio.Event()

            async def heartbeat() -> None:
                nonlocal polls
                while not stop.is_set():
                    assert (await c.getattr(root)).type == ftype3.NF3DIR
                    polls += 1
                    await asyncio.sleep(0.05)

            hb = asyncio.create_task(heartbeat())
            lock = (await c.create(sess, ".lck-0a1b2c3d00000000", createmode3.EXCLUSIVE, b"esxlock1")).body.obj.data
            for i in range(5):
                rec = bytes([i]) * 84
                w = await c.write(lock, 0, rec, stable=2)
                assert w.count == 84 and w.committed == 2
                assert (await c.read(lock, 0, 84))[0] == rec
                await asyncio.sleep(0.2)
            vswp = (await c.create(sess, "testvm-1234.vswp", createmode3.GUARDED)).body.obj.data
            sa = sattr3(None, None, None, 512 << 20, DONT_CHANGE_TIME, DONT_CHANGE_TIME)
            await c.call(NFSPROC3.SETATTR, SETATTR3args(nfs_fh3(vswp), sa, None))
            assert (await c.getattr(vswp)).size == 512 << 20
            await c.write(vswp, 300 << 20, b"swapped page", stable=0)
            new_vmx = b'displayName = "testvm"\nnumvcpus = "4"\n'
            tmp = (await c.create(sess, "testvm.vmx~")).body.obj.data
            await c.write(tmp, 0, new_vmx)
            await c.call(NFSPROC3.RENAME, RENAME3args(diropargs3(nfs_fh3(sess), b"testvm.vmx~"), diropargs3(nfs_fh3(sess), b"testvm.vmx")))
            vmx = await c.lookup(sess, "testvm.vmx")
            assert vmx == tmp and (await c.read(vmx, 0, 4096))[0] == new_vmx
            await c.remove(sess, ".lck-0a1b2c3d00000000")
            await c.remove(sess, "testvm-1234.vswp")
            stop.set()
            await hb
            assert polls >= 5
            names = {e.name for e in (await c.readdir_all(sess))[0]}
            assert b".lck-0a1b2c3d00000000" not in names and b"testvm.vmx" in names and b"testvm.vmx~" not in names
        finally:
            await c.close()

    run(main())


def test_cli_publish_sessions_status_unpublish(daemon_factory, images):
    dmn = daemon_factory()
    r = cli("publish", images["point"][:10], "--name", "clip", "--server", dmn.url)
    assert r.returncode == 0, r.stderr
    assert f"nfs://{dmn.addr}/instantnfs/clip/" in r.stdout
    env = dict(os.environ, INSTANTNFS_SERVER=dmn.url)
    r = cli("sessions", "--json", env=env)
    s = json.loads(r.stdout)
    assert [x["name"] for x in s] == ["clip"]
    assert s[0]["disks"][0]["url_libnfs"].endswith(f"?version=3&nfsport={dmn.nfs_port}&mountport={dmn.mount_port}")
    r = cli("status", "--server", dmn.url)
    assert r.returncode == 0 and f"nfs {dmn.nfs_port}" in r.stdout and "portmap 111" in r.stdout
    st = json.loads(cli("status", "--json", "--server", dmn.url).stdout)
    assert st["ports"]["portmap"] == 111 and st["sessions"] == 1
    r = cli("publish", images["point"], "--name", "clip", "--server", dmn.url)
    assert r.returncode != 0 and "already published" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("publish", "nosuchpoint", "--server", dmn.url)
    assert r.returncode != 0 and "no restore point" in r.stderr
    assert cli("unpublish", "clip", "--server", dmn.url).returncode == 0
    r = cli("unpublish", "clip", "--server", dmn.url)
    assert r.returncode != 0 and "no published session" in r.stderr
    assert json.loads(cli("sessions", "--json", "--server", dmn.url).stdout) == []
    # the OpenAPI document names every endpoint
    doc = dmn.api("GET", "/openapi.json")
    assert {"/api/v1/sessions", "/api/v1/status", "/api/v1/sessions/{name}"} <= set(doc["paths"])


def test_cli_without_daemon_and_with_bad_repo(tmp_path):
    r = cli("sessions", "--server", "http://127.0.0.39:1")
    assert r.returncode != 0 and "no instantnfs daemon" in r.stderr
    r = cli("serve", "--repo", str(tmp_path / "nope"), "--cache-dir", str(tmp_path / "c"), "--bind", "127.0.0.39")
    assert r.returncode == 2 and "no instantnfs repository" in r.stderr


def test_fixed_portmap_port_held_by_something_else(images, tmp_path):
    addr = take_address()
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 111))
        s.listen(1)
        r = subprocess.run(
            [sys.executable, "-m", "engine.control.cli", "serve", "--repo", str(images["repo"]),
             "--cache-dir", str(tmp_path / "c"), "--bind", addr, "--control-bind", addr],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert r.returncode != 0
        assert "port 111" in r.stderr and "portmap" in r.stderr
    finally:
        s.close()
        give_address(addr)


def test_registers_with_a_portmapper_already_on_111(daemon_factory, images):
    first = daemon_factory()
    second = daemon_factory(addr=first.addr, extra=["--control-port", "0"])
    assert second.status["ports"]["portmap"] is None
    assert second.status["ports"]["portmap_registered_with"] == 111
    assert second.nfs_port != first.nfs_port

    async def getport(prog: int, prot: int) -> int:
        c = await RpcClient.connect(first.addr, 111)
        try:
            return uint32.unpack(await c.call(PMAP_PROG, 2, PMAPPROC.GETPORT, mapping.encode(mapping(prog, 3, prot, 0))))
        finally:
            await c.close()

    assert run(getport(NFS_PROGRAM, 6)) == second.nfs_port
    assert run(getport(MOUNT_PROGRAM, 17)) == second.mount_port
    second.stop()
    assert run(getport(NFS_PROGRAM, 6)) == 0


def test_portmap_off(daemon_factory, images):
    require_tool("nfs-cat")
    dmn = daemon_factory(extra=["--portmap", "off"])
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "np"})
    with socket.socket() as s:
        assert s.connect_ex((dmn.addr, 111)) != 0
    d = images["disks"][1]
    out = subprocess.run(["nfs-cat", dmn.libnfs_url(f"/instantnfs/np/{d['name']}.img")], capture_output=True, timeout=60)
    assert out.stdout == images["data"][1]


def test_garbage_and_truncated_records_leave_other_connections_alone(served):
    async def main() -> None:
        # a record over the cap: that connection is closed
        r, w = await asyncio.open_connection(served.addr, served.nfs_port)
        w.write(b"\x80\x20\x00\x00" + b"\0" * 1024)  # 2 MiB announced, cap is 1 MiB + 64 KiB
        await w.drain()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        # garbage records: GARBAGE_ARGS or nothing, the connection survives
        c = await RpcClient.connect(served.addr, served.nfs_port)
        try:
            await c.send_raw(frame(b"\xff" * 3) + frame(os.urandom(50)) + frame(b""))
            rep = await c.call_raw(build_call(0xABC, NFS_PROGRAM, 3, 1, b"\0\0\0\x40" + b"\0" * 8))
            assert rep[-4:] == b"\0\0\0\x04"  # GARBAGE_ARGS: the handle's length says 64, 8 bytes follow
            assert await c.call_raw(build_call(0xABD, NFS_PROGRAM, 3, 0)) == bytes.fromhex("00000abd") + b"\0\0\0\1" + b"\0" * 16
        finally:
            await c.close()
        # a truncated record, then the peer goes away
        r, w = await asyncio.open_connection(served.addr, served.nfs_port)
        w.write(b"\x80\x00\x01\x00" + b"\0" * 10)
        await w.drain()
        w.close()
        # multi-fragment records are reassembled
        rec = build_call(0xABE, NFS_PROGRAM, 3, 0)
        r, w = await asyncio.open_connection(served.addr, served.nfs_port)
        w.write(len(rec[:10]).to_bytes(4, "big") + rec[:10] + (0x80000000 | len(rec[10:])).to_bytes(4, "big") + rec[10:])
        hdr = await asyncio.wait_for(r.readexactly(4), 10)
        body = await r.readexactly(int.from_bytes(hdr, "big") & 0x7FFFFFFF)
        assert body[:4] == (0xABE).to_bytes(4, "big") and body[-4:] == b"\0\0\0\0"
        w.close()
        # the server still answers others
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
        try:
            sess = await c.mount("/instantnfs/sess")
            assert (await c.getattr(sess)).type == ftype3.NF3DIR
        finally:
            await c.close()

    run(main())


def test_many_connections_like_nconnect(served, images):
    d = images["disks"][0]
    data = images["data"][0]

    async def main() -> None:
        clients = [await NFSClient.connect(served.addr, served.mount_port, served.nfs_port) for _ in range(8)]
        try:
            sess = await clients[0].mount("/instantnfs/sess")
            img = await clients[0].lookup(sess, f"{d['name']}.img")
            jobs = [cl.call(NFSPROC3.READ, READ3args(nfs_fh3(img), (i % 20) << 20, 1 << 20)) for i, cl in enumerate(clients * 4)]
            res = await asyncio.gather(*jobs)
            for i, r in enumerate(res):
                assert r.body.data == data[((i % 20) << 20) : ((i % 20) << 20) + (1 << 20)]
        finally:
            for cl in clients:
                await cl.close()

    run(main())


def test_publish_a_1tib_sparse_disk(daemon_factory, tmp_path):
    """Publishing maps the block map, it does not read it: a 1 TiB disk is there at once."""
    from engine.repo.ingest import BackupSettings, backup
    from engine.repo.repository import Repository

    img = tmp_path / "huge.img"
    head = os.urandom(1 << 20)
    with open(img, "wb") as f:
        f.truncate(1 << 40)
        f.write(head)
    repo = Repository.init(tmp_path / "hugerepo", 1 << 20)
    with Repository.open(repo) as r:
        m = backup(r, BackupSettings(vm="huge"), [str(img)])
    img.unlink()
    from tests.nfs.conftest import Daemon

    addr = take_address()
    dmn = Daemon(repo, tmp_path / "hcache", addr)
    try:
        dmn.start()
        s = dmn.api("POST", "/sessions", {"point": m["id"], "name": "huge"})
        assert s["disks"][0]["size"] == 1 << 40

        async def main() -> None:
            c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
            try:
                sess = await c.mount("/instantnfs/huge")
                fh = await c.lookup(sess, f"{m['disks'][0]['name']}.img")
                assert (await c.getattr(fh)).size == 1 << 40
                assert (await c.read(fh, 0, 4096))[0] == head[:4096]
                assert (await c.read(fh, (1 << 40) - 4096, 8192)) == (bytes(4096), True)
            finally:
                await c.close()

        run(main())
    finally:
        dmn.stop()
        give_address(addr)


def test_sigterm_with_clients_connected(daemon_factory):
    dmn = daemon_factory()
    socks = [socket.create_connection((dmn.addr, port), timeout=10) for port in (dmn.nfs_port, dmn.mount_port, 111)]
    try:
        socks[0].sendall(frame(build_call(7, NFS_PROGRAM, 3, 0)))
        assert socks[0].recv(100)[4:8] == (7).to_bytes(4, "big")
        assert dmn.stop() == 0
        for s in socks:
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
            assert data == b""  # the server closed it
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_builds_boots_serves_and_reuses(tmp_path):
    """The README's first command: the guest built and backed up once, published, booted
    under QEMU from our nfs:// URL with its heartbeat printed, then the instructions; a
    second run reuses the repository and the session (the VM sees its first boot's
    writes). Ctrl-C powers the VM off and stops the server."""
    require_tool("qemu-img", "qemu-system-x86_64", "mcopy", "syslinux")
    addr = take_address()
    try:
        for expect, boots in (("created", 1), ("reusing", 2)):
            cmd = [sys.executable, "-m", "engine.control.cli", "demo", "--dir", str(tmp_path / "demo"),
                   "--bind", addr, "--control-bind", addr]
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                assert p.stdout is not None
                lines = []
                for line in p.stdout:
                    lines.append(line)
                    if "Ctrl-C" in line:
                        break
                out = "".join(lines)
                assert f"{expect} the demo repository" in out, out
                assert "guest | GUEST-HEARTBEAT ok" in out, out
                assert out.index("guest | GUEST-HEARTBEAT") < out.index("QEMU/KVM disk:"), out
                url = f"nfs://{addr}/instantnfs/demo/demo-vm.img"
                assert f"QEMU/KVM disk:   {url}" in out and f"NFS server: {addr}" in out
                info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "raw", "-U", url],
                                                 capture_output=True, check=True, timeout=60).stdout)
                assert info["virtual-size"] > 0
                # the heartbeat goes on being printed after the instructions
                more = p.stdout.readline() + p.stdout.readline()
                assert "guest |" in more, more
                vms = list((tmp_path / "demo" / "cache" / "vms").glob("*/serial.log"))
                assert len(vms) == 1
                # the guest counts its boots on its disk: the session kept the first boot's writes
                assert f"GUEST-INFO boots={boots}" in vms[0].read_text(errors="replace")
            finally:
                p.send_signal(signal.SIGINT)
                assert p.wait(60) == 0
            assert "GUEST-" in vms[0].read_text(errors="replace")
            assert not any(ln.startswith("instantnfs") for ln in out.splitlines() if "error" in ln), out
    finally:
        give_address(addr)
