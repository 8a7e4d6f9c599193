"""The control API trusts no caller without the daemon's token, and answers bad requests
with one line (issue 8: findings 5 and 13).

Before: from loopback anyone could publish, export over any file, unpublish; unknown body
fields were ignored; a publish into an unusable cache directory was an HTTP 500 with a
traceback; ``INSTANTNFS_SERVER=http://host:port/api/v1`` (as the docs print it) gave
"HTTP Error 404".
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
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


# -- the CLI's one request/print/error path (issue 9) ----------------------------------------
#
# Before: each command that calls the daemon repeated its own print and JSON tail, and an
# answer that was not JSON, or not HTTP at all, escaped as a traceback (JSONDecodeError,
# BadStatusLine) from every one of them.


def _command(capsys: Any, monkeypatch: Any, *argv: str) -> tuple[int, str, str]:
    """One CLI command run in this process, as the parser dispatches it (not through
    ``main``, whose own catch would hide a command that lets an error out)."""
    from engine.control.cli import build_parser

    monkeypatch.delenv("INSTANTNFS_TOKEN", raising=False)
    monkeypatch.delenv("INSTANTNFS_SERVER", raising=False)
    args = build_parser().parse_args(list(argv))
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


@contextlib.contextmanager
def _answering(addr: str, reply: bytes) -> Iterator[str]:
    """A loopback TCP server that reads each request (headers and body) and answers
    ``reply`` whatever was asked; its URL."""
    srv = socket.socket()
    srv.bind((addr, 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    got = conn.recv(65536)
                    if not got:
                        break
                    data += got
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    got = conn.recv(65536)
                    if not got:
                        break
                    body += got
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://{addr}:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(10)
        srv.close()


def test_client_commands_print_json_or_their_human_form(daemon_factory, images, capsys, monkeypatch):
    dmn = daemon_factory()
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "shown"})
    sessions = dmn.api("GET", "/sessions")
    s = sessions[0]
    rc, out, err = _command(capsys, monkeypatch, "sessions", "--json", "--server", dmn.url)
    assert (rc, err) == (0, "")
    assert out == json.dumps(sessions, indent=2) + "\n"  # exactly the API's document
    rc, out, err = _command(capsys, monkeypatch, "sessions", "--server", dmn.url)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"shown  VM {s['vm']}  point {s['point'][:12]}  {s['path']}"
    assert f"    QEMU:       {s['disks'][0]['url']}" in lines and "{" not in out
    rc, out, err = _command(capsys, monkeypatch, "status", "--json", "--server", dmn.url)
    assert (rc, err) == (0, "")
    st = json.loads(out)
    assert out == json.dumps(st, indent=2) + "\n" and st["ports"] == dmn.status["ports"] and st["sessions"] == 1
    rc, out, err = _command(capsys, monkeypatch, "status", "--server", dmn.url)
    assert (rc, err) == (0, "")
    p = st["ports"]
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"instantnfs pid {st['pid']}, up ")
    assert lines[1] == f"  export /instantnfs on {dmn.addr}: portmap 111, mount {p['mount']}, nfs {p['nfs']}, control {p['control']}"
    assert lines[2].startswith("  sessions 1, NFS calls ")


# every command that calls the daemon, with and without --json
_CLIENT_COMMANDS = [("sessions", "--json"), ("sessions",), ("status", "--json"), ("jobs",), ("publish", "p", "--json"),
                    ("unpublish", "x"), ("commit", "s", "-q"), ("export", "s", "0", "-o", "/tmp/never-written.raw", "--json"),
                    ("cancel", "export-1")]


def test_client_without_a_daemon_or_with_something_else_is_one_line(capsys, monkeypatch):
    addr = take_address()
    try:
        s = socket.socket()
        s.bind((addr, 0))
        url = f"http://{addr}:{s.getsockname()[1]}"
        s.close()  # bound, never listening: the port refuses connections
        for argv in _CLIENT_COMMANDS:
            rc, out, err = _command(capsys, monkeypatch, *argv, "--server", url)
            assert (rc, out) == (2, ""), argv
            assert err == f"instantnfs: no instantnfs daemon at {url} ([Errno 111] Connection refused); " \
                          "start one with 'instantnfs serve'\n", argv
        # something that answers 200 but not JSON, something that does not speak HTTP
        for reply, says in ((b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hello</html>", "not JSON"),
                            (b"SSH-2.0-OpenSSH_9.6\r\n", "did not answer")):
            with _answering(addr, reply) as url:
                for argv in _CLIENT_COMMANDS:
                    rc, out, err = _command(capsys, monkeypatch, *argv, "--server", url)
                    assert (rc, out) == (2, ""), (argv, err)
                    assert err.startswith(f"instantnfs: {url} ") and err.count("\n") == 1, (argv, err)
                    assert says in err and "is it an instantnfs daemon?" in err, (argv, err)
    finally:
        give_address(addr)
