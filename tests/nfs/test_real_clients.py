"""The server against real NFS clients: libnfs-utils (nfs-ls, nfs-cat, nfs-cp) and QEMU."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

from engine.nfs.client import NFSClient
from tests.conftest import require_tool
from tests.nfs.conftest import ROOT, run


def sh(*cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=timeout, check=check)


def test_nfs_ls_lists_export_and_session(served, images):
    require_tool("nfs-ls")
    root = sh("nfs-ls", served.libnfs_url("/instantnfs/")).stdout.decode()
    assert re.search(r"^d.* sess$", root, re.M), root
    out = sh("nfs-ls", served.libnfs_url("/instantnfs/sess/")).stdout.decode()
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    for d in images["disks"]:
        assert {f"{d['name']}.img", f"{d['name']}-flat.vmdk", f"{d['name']}.vmdk"} <= names
        size_line = [ln for ln in out.splitlines() if ln.endswith(f" {d['name']}.img")][0]
        assert f" {d['size']} " in size_line
    assert any(n.endswith(".vmx") for n in names) or "testvm.vmx" in out


def test_nfs_cat_reads_every_disk_byte_exact(served, images):
    require_tool("nfs-cat")
    for d in images["disks"]:
        for fname in (f"{d['name']}.img", f"{d['name']}-flat.vmdk"):
            data = sh("nfs-cat", served.libnfs_url(f"/instantnfs/sess/{fname}")).stdout
            assert len(data) == d["size"]
            assert hashlib.sha256(data).hexdigest() == d["sha256"], fname
    st = served.api("GET", "/status")
    assert st["rpc"]["nfs_io_calls"] >= st["rpc"]["nfs_procs"]["READ"] > 0


def test_generated_descriptor_and_vmx(served, images):
    require_tool("nfs-cat")
    d = images["disks"][0]
    desc = sh("nfs-cat", served.libnfs_url(f"/instantnfs/sess/{d['name']}.vmdk")).stdout.decode()
    assert 'createType="vmfs"' in desc
    assert f'RW {d["size"] // 512} VMFS "{d["name"]}-flat.vmdk"' in desc
    vmx = sh("nfs-cat", served.libnfs_url("/instantnfs/sess/testvm.vmx")).stdout.decode()
    assert 'numvcpus = "2"' in vmx and 'memSize = "512"' in vmx
    assert f'scsi0:1.fileName = "{images["disks"][1]["name"]}.vmdk"' in vmx


def test_nfs_cp_creates_reads_and_client_removes(served, tmp_path):
    require_tool("nfs-cp")
    src = tmp_path / "up.bin"
    payload = os.urandom(3 * 1024 * 1024 + 123)
    src.write_bytes(payload)
    sh("nfs-cp", str(src), served.libnfs_url("/instantnfs/sess/uploaded.bin"))
    back = tmp_path / "back.bin"
    sh("nfs-cp", served.libnfs_url("/instantnfs/sess/uploaded.bin"), str(back))
    assert back.read_bytes() == payload
    listing = sh("nfs-ls", served.libnfs_url("/instantnfs/sess/")).stdout.decode()
    assert "uploaded.bin" in listing

    async def remove() -> None:
        c = await NFSClient.connect(served.addr, served.mount_port, served.nfs_port)
        try:
            root = await c.mount("/instantnfs/sess")
            await c.remove(root, "uploaded.bin")
        finally:
            await c.close()

    run(remove())
    listing = sh("nfs-ls", served.libnfs_url("/instantnfs/sess/")).stdout.decode()
    assert "uploaded.bin" not in listing


def test_nfs_cp_onto_a_backup_disk_is_refused(served, images, tmp_path):
    require_tool("nfs-cp")
    src = tmp_path / "x.bin"
    src.write_bytes(b"x" * 1000)
    d = images["disks"][0]
    r = sh("nfs-cp", str(src), served.libnfs_url(f"/instantnfs/sess/{d['name']}.img"), check=False)
    assert r.returncode != 0
    data = sh("nfs-cat", served.libnfs_url(f"/instantnfs/sess/{d['name']}.img")).stdout
    assert hashlib.sha256(data).hexdigest() == d["sha256"]


def test_qemu_img_info_compare_convert_bench(served, images, tmp_path):
    require_tool("qemu-img")
    for d in images["disks"]:
        url = f"nfs://{served.addr}/instantnfs/sess/{d['name']}.img"
        info = json.loads(sh("qemu-img", "info", "--output=json", "-f", "raw", url).stdout)
        assert info["virtual-size"] == d["size"]
        r = sh("qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(d["path"]), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        out = tmp_path / f"{d['name']}.qcow2"
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", url, str(out))
        r = sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out), str(d["path"]), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    url = f"nfs://{served.addr}/instantnfs/sess/{images['disks'][0]['name']}-flat.vmdk"
    r = sh("qemu-img", "bench", "-f", "raw", "-t", "none", "-c", "200", "-d", "8", "-s", "65536", url)
    assert b"Run completed in" in r.stdout


def test_sessions_json_gives_urls_that_work(served, images):
    require_tool("qemu-img", "nfs-cat")
    out = subprocess.run(
        [sys.executable, "-m", "engine.control.cli", "sessions", "--json", "--server", served.url],
        cwd=ROOT, capture_output=True, check=True, timeout=30,
    ).stdout
    sessions = json.loads(out)
    s = [x for x in sessions if x["name"] == "sess"][0]
    assert s["point"] == images["point"] and s["path"] == "/instantnfs/sess"
    for d, want in zip(s["disks"], images["disks"], strict=True):
        assert d["url"] == f"nfs://{served.addr}/instantnfs/sess/{want['name']}.img"
        info = json.loads(sh("qemu-img", "info", "--output=json", "-f", "raw", d["url"]).stdout)
        assert info["virtual-size"] == want["size"]
        head = sh("nfs-cat", d["url_libnfs"]).stdout
        assert hashlib.sha256(head).hexdigest() == want["sha256"]


def test_qemu_img_reads_through_system_style_portmap_query(served):
    """rpcinfo (libtirpc, rpcbind v3/v4 and v2) sees our registrations on port 111."""
    require_tool("rpcinfo")
    out = sh("rpcinfo", "-p", served.addr).stdout.decode()
    assert re.search(rf"100005\s+3\s+tcp\s+{served.mount_port}", out), out
    assert re.search(rf"100003\s+3\s+tcp\s+{served.nfs_port}", out), out
    out = sh("rpcinfo", "-T", "tcp", served.addr, "nfs", "3").stdout.decode()
    assert "ready and waiting" in out


