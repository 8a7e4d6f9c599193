"""The daemon's TOML configuration: embedded defaults, file overrides, clear errors."""
from __future__ import annotations

import pytest

from engine import config
from engine.errors import UsageError


def test_defaults_work_out_of_the_box():
    cfg = config.validate(config.load())
    s = cfg["server"]
    assert (s["portmap_port"], s["mount_port"], s["nfs_port"], s["export"]) == (111, 1058, 2049, "/instantnfs")
    assert cfg["control"] == {"bind": "127.0.0.1", "port": 6161, "token": "", "token_file": ""}
    assert not cfg["cache"]["dir"].startswith("~")
    assert cfg["cache"]["reserve_gib"] == 100 and cfg["cache"]["write_dir"] == ""


def test_file_overrides_and_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[server]\nnfs_port = 12049\nallowed_clients = ["10.0.0.0/8"]\n[control]\nport = 7000\n')
    cfg = config.validate(config.load(f))
    assert cfg["server"]["nfs_port"] == 12049 and cfg["server"]["mount_port"] == 1058
    assert cfg["server"]["allowed_clients"] == ["10.0.0.0/8"] and cfg["control"]["port"] == 7000
    cases = {
        "[server]\nnfs_prot = 1\n": "unknown configuration key server.nfs_prot",
        "[server]\nnfs_port = \"x\"\n": "server.nfs_port must be a int",
        "[server]\nportmap = \"maybe\"\n": "server.portmap must be",
        "[server]\nallowed_clients = [\"nonsense\"]\n": "not an address or network",
        "[server]\nexport = \"relative\"\n": "must be an absolute path",
        "[server\n": "not valid TOML",
        "[cache]\nreserve_gib = -1\n": "reserve_gib must not be negative",
    }
    for text, msg in cases.items():
        f.write_text(text)
        with pytest.raises(UsageError, match=msg.replace("[", r"\[")):
            config.validate(config.load(f))
    with pytest.raises(UsageError, match="does not exist"):
        config.load(tmp_path / "missing.toml")
