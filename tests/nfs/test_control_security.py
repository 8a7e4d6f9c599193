"""The control API trusts no caller without the daemon's token, and answers bad requests
with one line (issue 8: findings 5 and 13).

Before: from loopback anyone could publish, export over any file, unpublish; unknown body
fields were ignored; a publish into an unusable cache directory was an HTTP 500 with a
traceback; ``INSTANTNFS_SERVER=http://host:port/api/v1`` (as the docs print it) gave
"HTTP Error 404".
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest

from engine.control.auth import index_path
from tests.conftest import require
from tests.nfs.conftest import ROOT, Daemon, give_address, take_address


def _raw(dmn: Daemon, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(dmn.url + "/api/v1" + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("INSTANTNFS_TOKEN", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "engine.control.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env=e, timeout=60)


def test_every_request_needs_the_token_from_loopback_too(daemon_factory, images):
    dmn = daemon_factory()
    for method, path, body in [("GET", "/status", None), ("GET", "/sessions", None), ("GET", "/points", None),
                               ("POST", "/sessions", {"point": images["point"], "name": "x"}),
                               ("DELETE", "/sessions/x", None), ("GET", "/jobs", None)]:
        for token in (None, "", "wrong", dmn.token + "x"):
            code, answer = _raw(dmn, method, path, body, token)
            assert code == 401, (method, path, token, code, answer)
            assert "token" in answer["error"]
    assert dmn.api("GET", "/sessions") == []  # nothing was published by the refused calls
    code, doc = _raw(dmn, "GET", "/openapi.json")
    assert code == 200 and doc["openapi"].startswith("3.")
    code, _ = _raw(dmn, "GET", "/status", token=dmn.token)
    assert code == 200


def test_token_files_are_private_and_the_cli_finds_them(daemon_factory, images):
    dmn = daemon_factory()
    port = dmn.status["ports"]["control"]
    for path in (dmn.cache_dir / "control.token", index_path(dmn.addr, port)):
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, path
        assert st.st_uid == os.geteuid()
        assert path.read_text().strip() == dmn.token
    r = _cli("publish", images["point"], "--name", "viacli", "--server", dmn.url)
    assert r.returncode == 0, r.stderr
    # the documented form with the API suffix works too
    r = _cli("sessions", "--json", env={"INSTANTNFS_SERVER": dmn.url + "/api/v1/"})
    assert r.returncode == 0, r.stderr
    assert [s["name"] for s in json.loads(r.stdout)] == ["viacli"]
    # a token given by hand that is wrong is refused with the daemon's one line
    r = _cli("sessions", "--server", dmn.url, env={"INSTANTNFS_TOKEN": "not-the-token"})
    assert r.returncode != 0 and "bearer token" in r.stderr and "Traceback" not in r.stderr
    # a clean stop removes the per-user index entry (the token dies with the daemon)
    dmn.stop()
    assert not index_path(dmn.addr, port).exists()


def test_cli_pointed_at_something_else_says_so(daemon_factory):
    dmn = daemon_factory()
    r = _cli("sessions", "--server", dmn.url + "/not-the-api")
    assert r.returncode != 0
    assert "HTTP 404" in r.stderr and "instantnfs daemon" in r.stderr and "Traceback" not in r.stderr


def test_token_file_symlink_is_never_followed(tmp_path, images):
    addr = take_address()
    try:
        victim = tmp_path / "victim"
        victim.write_text("precious\n")
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / "control.token").symlink_to(victim)
        dmn = Daemon(images["repo"], cache, addr)
        with pytest.raises(RuntimeError, match="not a regular file"):
            dmn.start()
        dmn.stop()
        assert victim.read_text() == "precious\n"
    finally:
        give_address(addr)


def test_unknown_and_mistyped_fields_are_refused_by_name(daemon_factory, images):
    dmn = daemon_factory()
    code, answer = _raw(dmn, "POST", "/sessions", {"point": images["point"], "nmae": "typo"}, dmn.token)
    assert code == 400 and "'nmae'" in answer["error"]
    code, answer = _raw(dmn, "POST", "/sessions", {"point": images["point"], "force": "yes"}, dmn.token)
    assert code == 400 and "'force'" in answer["error"]
    code, answer = _raw(dmn, "POST", "/sessions", {"point": images["point"], "reserve_gib": True}, dmn.token)
    assert code == 400 and "'reserve_gib'" in answer["error"]
    code, answer = _raw(dmn, "POST", "/sessions", ["not", "an", "object"], dmn.token)
    assert code == 400
    code, answer = _raw(dmn, "POST", "/sessions", {"name": "nopoint"}, dmn.token)
    assert code == 400 and "'point'" in answer["error"]
    assert dmn.api("GET", "/sessions") == []
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "s"})
    code, answer = _raw(dmn, "POST", "/sessions/s/export", {"disk": 0, "output": "/tmp/x.img", "fromat": "qcow2"}, dmn.token)
    assert code == 400 and "'fromat'" in answer["error"]
    code, answer = _raw(dmn, "POST", "/sessions/s/commit", {"quiesce": True}, dmn.token)
    assert code == 400 and "'quiesce'" in answer["error"]
    assert dmn.api("GET", "/jobs") == []


def test_publish_into_an_unusable_cache_dir_is_one_line(daemon_factory, images, tmp_path):
    dmn = daemon_factory()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    code, answer = _raw(dmn, "POST", "/sessions", {"point": images["point"], "cache_dir": str(afile / "sub")}, dmn.token)
    assert code in (400, 409), (code, answer)
    assert isinstance(answer, dict) and "\n" not in answer["error"] and str(afile) in answer["error"]
    assert dmn.api("GET", "/sessions") == []
    assert "Traceback" not in dmn.log.read_text()


def test_publish_onto_a_full_volume_is_507(daemon_factory, images, tmp_path):
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    dmn = daemon_factory()
    vol = tmp_path / "full"
    vol.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(vol)], check=True)
    try:
        fd = os.open(vol / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\xff" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        code, answer = _raw(dmn, "POST", "/sessions", {"point": images["point"], "name": "full", "cache_dir": str(vol),
                                                       "force": True}, dmn.token)
        assert code == 507, (code, answer)
        assert "space" in answer["error"] and "\n" not in answer["error"]
        # a volume out of inodes: the cache directory cannot even be made (mkdir fails
        # ENOSPC, an OSError under the publish's error): 507 too
        subprocess.run(["umount", "-l", str(vol)], check=False)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=16", "tmpfs", str(vol)], check=True)
        try:
            for i in range(64):
                (vol / f"i{i}").touch()
        except OSError:
            pass  # out of inodes
        code, answer = _raw(dmn, "POST", "/sessions", {"point": images["point"], "name": "full2",
                                                       "cache_dir": str(vol / "new"), "force": True}, dmn.token)
        assert code == 507, (code, answer)
        assert "\n" not in answer["error"]
        assert dmn.api("GET", "/sessions") == []
        assert "Traceback" not in dmn.log.read_text()
    finally:
        subprocess.run(["umount", "-l", str(vol)], check=False)
