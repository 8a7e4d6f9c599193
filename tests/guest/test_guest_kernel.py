"""The builder's other kernel source: Debian's kernel package, downloaded with ``apt-get
download`` and unpacked with ``dpkg-deb -x`` into the cache, never installed. Slow: it
downloads the package (~70 MB) from the configured Debian mirror, then boots the guest
built from it once."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from engine.vm import guest as g
from tests.conftest import require, require_tool
from tests.guest.boot import boot_guest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_guest_from_the_debian_kernel_package_boots(tmp_path):
    require_tool("qemu-system-x86_64", "apt-get", "apt-cache", "dpkg-deb")
    require(not g.missing_tools(), f"the guest builder lacks: {g.missing_tools()} (scripts/system-deps.sh test)")
    package = g.debian_kernel_package()
    assert package.startswith("linux-image-") and package.endswith("-amd64")
    cache = tmp_path / "cache"
    phases: list[tuple[str, str]] = []
    guest = g.ensure_guest(cache, kernel_source="debian", progress=lambda p, d: phases.append((p, d)))
    assert ("kernel", f"apt-get download {package}") in phases
    kver = package.removeprefix("linux-image-")
    assert guest.kver == kver
    info = json.loads((guest.disk.parent / "guest.json").read_text())
    assert info["kernel"] == f"debian:{package}"
    tree = cache / "kernels" / package
    vmlinuz = tree / f"vmlinuz-{kver}"
    # nothing was installed: dpkg does not know the unpacked copy, only the cache has it
    listed = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True)
    assert str(vmlinuz) not in listed.stdout
    # only the guest's module closure is kept, not the ~400 MB tree; no .deb left behind
    kept = [p for p in tree.rglob("*.ko*")]
    assert 10 <= len(kept) <= 30, kept
    assert not list(cache.rglob("*.deb"))
    mods = tree / "modules" / kver
    assert sorted(str(p.relative_to(mods)) for p in kept) == sorted(
        g.module_closure(kver, g.GUEST_MODULES, tree / "modules", tree / f"config-{kver}"))
    # the guest boots with that kernel
    disk = tmp_path / "guest.img"
    shutil.copyfile(guest.disk, disk)
    r = boot_guest(disk, "debian-kernel", timeout=240, log_dir=tmp_path / "logs")
    assert f"GUEST-INFO kernel={kver} " in r.console_log
    assert r.datacheck_ok, r.console_log[-2000:]
    assert g.read_guest_file(disk, "/var/heartbeat.txt").decode().strip() == "debian-kernel"
    # a second call reuses the unpacked kernel and the built guest: no download, no build
    phases.clear()
    assert g.ensure_guest(cache, kernel_source="debian", progress=lambda p, d: phases.append((p, d))) == guest
    assert [p for p, _ in phases] == ["done"]
