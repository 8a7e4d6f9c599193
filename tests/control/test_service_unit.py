"""contrib/systemd: the unit file is valid for systemd and its ExecStart is a command
line our CLI takes, with the example configuration it names."""
from __future__ import annotations

import configparser
import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

from engine import config as configmod
from engine.control.cli import build_parser
from engine.control.daemon import cmd_serve, sd_notify, serve_config
from tests.conftest import require_tool
from tests.nfs.conftest import Daemon, give_address, take_address

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "systemd" / "instantnfs.service"
EXAMPLE = ROOT / "contrib" / "systemd" / "instantnfs.toml"


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    cp.read_string(UNIT.read_text())
    return cp


def exec_start() -> list[str]:
    return shlex.split(unit()["Service"]["ExecStart"])


def test_unit_sections_and_the_choices_it_documents():
    u = unit()
    assert set(u.sections()) == {"Unit", "Service", "Install"}
    s = u["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"  # the daemon sends READY=1 itself
    assert s["Restart"] == "on-failure"
    assert s["KillMode"] == "process"  # guests the daemon starts survive a restart (see the unit's comment)
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify(tmp_path):
    """systemd's own check; the ExecStart program is swapped for the installed
    `instantnfs` (verify wants it to exist), nothing else is changed."""
    require_tool("systemd-analyze", "instantnfs")
    text = UNIT.read_text()
    prog = exec_start()[0]
    assert text.count(prog) >= 1
    copy = tmp_path / "instantnfs.service"
    copy.write_text(text.replace(f"ExecStart={prog}", f"ExecStart={shutil.which('instantnfs')}"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # systemd-analyze only warns (exit 0) about a key or value it ignores: none may be ours
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if copy.name in ln]
    assert ours == [], ours


def test_verify_catches_a_bad_value(tmp_path):
    """The check above can fail: a kill mode systemd does not know is reported."""
    require_tool("systemd-analyze")
    copy = tmp_path / "instantnfs.service"
    copy.write_text(UNIT.read_text().replace("KillMode=process", "KillMode=bogus")
                    .replace(f"ExecStart={exec_start()[0]}", "ExecStart=/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    assert any(copy.name in ln and "kill mode" in ln.lower() for ln in (r.stdout + r.stderr).splitlines())


def test_exec_start_parses_with_our_cli():
    argv = exec_start()
    assert Path(argv[0]).name == "instantnfs"
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_serve
    assert args.config == "/etc/instantnfs/instantnfs.toml"


def test_example_config_is_a_valid_configuration():
    """The configuration the unit names, as installed from contrib/: every key known,
    every value valid, the repository and the unit's StateDirectory as cache.dir."""
    args = build_parser().parse_args(["serve", "--config", str(EXAMPLE)])
    cfg = serve_config(args)
    assert cfg["repo"]["path"] == "/srv/backups"
    assert cfg["cache"]["dir"] == "/var/lib/" + unit()["Service"]["StateDirectory"]
    assert configmod.validate(cfg) is not None


def test_daemon_tells_systemd_when_it_serves_and_when_it_stops(tmp_path, images, monkeypatch):
    """Type=notify: READY=1 (with the daemon's PID) once it serves, STOPPING=1 at SIGTERM."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    addr = take_address()
    dmn = Daemon(images["repo"], tmp_path / "cache", addr)
    try:
        dmn.start()
        assert dmn.proc is not None
        pid = dmn.proc.pid
        ready = sock.recv(4096).decode().split("\n")
        assert "READY=1" in ready and f"MAINPID={pid}" in ready
        assert dmn.stop() == 0
        assert sock.recv(4096).decode() == "STOPPING=1"
    finally:
        dmn.stop()
        give_address(addr)
        sock.close()


def test_sd_notify_abstract_socket_and_without_systemd(monkeypatch):
    name = f"instantnfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1") is True
        assert sock.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False  # not under systemd: nothing to tell
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/instantnfs-notify")
    assert sd_notify("READY=1") is False  # a socket that is not there: logged, not raised
