"""Configuration: TOML with embedded defaults that work out of the box.

``load(path)`` reads the defaults below, then the file (if given), then the caller
applies command-line overrides with ``override``. Unknown keys are an error with the
key's name, so a typo does not silently keep a default. Values are checked once here.
"""
from __future__ import annotations

import copy
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any

from engine.errors import UsageError

DEFAULTS_TOML = """
[server]
# Address the portmapper, MOUNT and NFS listen on.
bind = "0.0.0.0"
# "on": run our portmapper on portmap_port (or register with the one holding it);
# "off": no portmapper (clients must be told the MOUNT and NFS ports).
portmap = "on"
portmap_port = 111
# MOUNT and NFS move to the next free port when these are taken.
mount_port = 1058
nfs_port = 2049
export = "/instantnfs"
# Directories an export (instantnfs export -o FILE) may write into, on the daemon's host;
# an output must be a new file in one of them (never a symlink, never an existing
# file). Empty: <cache.dir>/exports, created at the first export.
export_dirs = []
# Block devices a migrate (instantnfs migrate SESSION --to DEV) may write onto, by path:
# never guessed, never anything else. Files go to export_dirs.
migrate_devices = []
# Client addresses (CIDR) allowed to mount; others get MNT3ERR_ACCES / AUTH_ERROR.
allowed_clients = ["0.0.0.0/0", "::/0"]
read_only = false
# Requests in flight per TCP connection before reading pauses.
max_inflight = 64
# Reply bytes queued on one TCP connection (a client slow to read its replies) before
# the daemon stops reading and dispatching its requests: room for a client's 1 MiB
# READs in flight (ESXi nConnect spreads them over several connections).
max_reply_queue_mib = 32
# TCP connections (NFS, MOUNT and portmapper together) from one client address, and in
# all: enough for many QEMU processes on one host and ESXi's nConnect; more are closed
# at once. The daemon raises its open-file limit to the hard limit at start.
max_connections_per_client = 128
max_connections = 4096
# Seconds a TCP connection may stay silent (no request, nothing in flight) before it is
# closed; clients reconnect and retransmit.
idle_timeout = 600
# Fragments one RPC record may come in (real clients send one).
max_fragments = 256

[cache]
# Where sessions keep their state and the files clients create.
dir = "~/.cache/instantnfs"
# Where the write caches of published disks go (default <dir>/writecache); a publish
# may name another directory.
write_dir = ""
# Free space (GiB) the write-cache volume must have at publish; a publish may lower it
# or force past it.
reserve_gib = 100
# Decompressed chunk cache, MiB.
chunk_cache_mib = 1024

[repo]
path = ""

[vm]
# The VMs the daemon runs (recover --boot, verify --boot, sandbox --boot) use
# qemu-system-x86_64 from PATH ($INSTANTNFS_QEMU names another).
# auto: KVM when a short probe shows it runs guests here, else TCG; or kvm, tcg.
accel = "auto"
# Seconds a verify boot waits for the guest's heartbeat by default.
verify_timeout = 300

[control]
bind = "127.0.0.1"
port = 6161
# Every request needs "Authorization: Bearer <token>", from loopback too. Empty: a
# random token is made at each start. Either way the daemon writes it (mode 0600) to
# token_file and to ~/.local/state/instantnfs/tokens/<bind>_<port>, where the CLI of
# the same user finds it.
token = ""
# Default <cache.dir>/control.token.
token_file = ""
"""

DEFAULTS: dict[str, Any] = tomllib.loads(DEFAULTS_TOML)


def _merge(base: dict, over: dict, where: str) -> None:
    for k, v in over.items():
        if k not in base:
            raise UsageError(f"unknown configuration key {where}{k}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise UsageError(f"configuration key {where}{k} must be a table")
            _merge(base[k], v, f"{where}{k}.")
        else:
            if type(v) is not type(base[k]) and not (isinstance(base[k], int) and isinstance(v, int)):
                raise UsageError(f"configuration key {where}{k} must be a {type(base[k]).__name__}, not {v!r}")
            base[k] = v


def load(path: str | os.PathLike | None = None) -> dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"configuration file {path} is not valid TOML: {e}") from None
        _merge(cfg, data, "")
    return cfg


def override(cfg: dict[str, Any], section: str, key: str, value: Any) -> None:
    if value is not None:
        cfg[section][key] = value


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    s = cfg["server"]
    if s["portmap"] not in ("on", "off"):
        raise UsageError(f"server.portmap must be \"on\" or \"off\", not {s['portmap']!r}")
    for key in ("portmap_port", "mount_port", "nfs_port"):
        if not 0 <= s[key] <= 65535:
            raise UsageError(f"server.{key} {s[key]} is not a port number")
    if not 0 <= cfg["control"]["port"] <= 65535:
        raise UsageError(f"control.port {cfg['control']['port']} is not a port number")
    for n in s["allowed_clients"]:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            raise UsageError(f"server.allowed_clients: {n!r} is not an address or network") from None
    if not s["export"].startswith("/") or s["export"].strip("/") == "":
        raise UsageError(f"server.export {s['export']!r} must be an absolute path like /instantnfs")
    if s["max_inflight"] < 2:
        raise UsageError("server.max_inflight must be at least 2")
    if s["max_reply_queue_mib"] < 2:
        raise UsageError("server.max_reply_queue_mib must be at least 2 (one 1 MiB READ reply and more)")
    if s["max_connections_per_client"] < 1:
        raise UsageError("server.max_connections_per_client must be at least 1")
    if s["max_connections"] < s["max_connections_per_client"]:
        raise UsageError("server.max_connections must be at least server.max_connections_per_client")
    if not s["idle_timeout"] > 0:
        raise UsageError("server.idle_timeout must be a positive number of seconds")
    if s["max_fragments"] < 1:
        raise UsageError("server.max_fragments must be at least 1")
    cfg["cache"]["dir"] = str(Path(os.path.expanduser(cfg["cache"]["dir"])))
    dirs = s["export_dirs"]
    if not all(isinstance(d, str) and d for d in dirs):
        raise UsageError("server.export_dirs must be a list of directory paths")
    s["export_dirs"] = [str(Path(os.path.expanduser(d)).absolute()) for d in dirs] or [str(Path(cfg["cache"]["dir"]).absolute() / "exports")]
    devs = s["migrate_devices"]
    if not all(isinstance(d, str) and d.startswith("/") for d in devs):
        raise UsageError("server.migrate_devices must be a list of absolute device paths")
    if cfg["vm"]["accel"] not in ("auto", "kvm", "tcg"):
        raise UsageError(f"vm.accel must be auto, kvm or tcg, not {cfg['vm']['accel']!r}")
    if not cfg["vm"]["verify_timeout"] > 0:
        raise UsageError("vm.verify_timeout must be a positive number of seconds")
    if cfg["cache"]["reserve_gib"] < 0:
        raise UsageError("cache.reserve_gib must not be negative")
    if cfg["control"]["token_file"]:
        cfg["control"]["token_file"] = str(Path(os.path.expanduser(cfg["control"]["token_file"])).absolute())
    if cfg["cache"]["write_dir"]:
        cfg["cache"]["write_dir"] = str(Path(os.path.expanduser(cfg["cache"]["write_dir"])).absolute())
    return cfg
