"""files sql: a query on an SQLite database inside an ext4 guest, with rows still in its
WAL (not checkpointed when "backed up"), on a private copy; only reading is allowed."""
from __future__ import annotations

import csv
import io
import os
import shutil
import sqlite3
import tempfile

import pytest

from engine.files.point import PointFiles
from engine.files.sql import SqlError, open_database, query
from engine.stack import Stack
from tests.cli import ok, run
from tests.files.images import MiB, backup_images, ext4_image


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sql")
    src = tmp / "src"
    (src / "var" / "lib" / "app").mkdir(parents=True)
    live = tmp / "live.db"
    conn = sqlite3.connect(live, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, avatar BLOB)")
    conn.execute("INSERT INTO users (name, avatar) VALUES ('alice', x'00ff'), ('bob', NULL)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # these two are in the main file
    conn.executemany("INSERT INTO users (name) VALUES (?)", [(f"user{i}",) for i in range(1000)])
    conn.execute("UPDATE users SET name = 'Bob, \"the\" builder' WHERE name = 'bob'")
    # the VM is running: the WAL holds the newest rows; copy while the connection is open
    dest = src / "var" / "lib" / "app"
    for suffix in ("", "-wal"):
        shutil.copyfile(str(live) + suffix, dest / ("app.db" + suffix))
    conn.close()
    assert os.path.getsize(dest / "app.db-wal") > 0
    (src / "not-a-db").write_bytes(os.urandom(8192))
    img = ext4_image(tmp / "disk.img", src, 32 * MiB)
    point = backup_images(tmp / "repo", [img], vm="app")
    return tmp, point, dest


def test_query_sees_the_rows_in_the_wal(guest):
    tmp, point, dest = guest
    r = ok("files", "sql", "--repo", tmp / "repo", point, "/var/lib/app/app.db",
           "SELECT count(*) AS n, max(id) AS last FROM users", "--json").json()
    assert r["columns"] == ["n", "last"] and r["rows"] == [[1002, 1002]]
    # the main file alone (what a reader ignoring the WAL sees) has only the first two
    alone = tmp / "alone"
    alone.mkdir()
    shutil.copyfile(dest / "app.db", alone / "app.db")
    assert sqlite3.connect(alone / "app.db").execute("SELECT count(*) FROM users").fetchone() == (2,)


def test_csv_text_and_blobs(guest):
    tmp, point, _ = guest
    out = ok("files", "sql", "--repo", tmp / "repo", point, "disk0", "/var/lib/app/app.db",
             "SELECT id, name, avatar FROM users WHERE id <= 2 ORDER BY id", "--csv").out
    assert list(csv.reader(io.StringIO(out))) == [["id", "name", "avatar"], ["1", "alice", "X'00ff'"],
                                                  ["2", 'Bob, "the" builder', ""]]
    r = ok("files", "sql", "--repo", tmp / "repo", point, "/var/lib/app/app.db",
           "SELECT avatar FROM users WHERE id = 1", "--json").json()
    assert r["rows"] == [[{"blob": "00ff"}]]
    text = ok("files", "sql", "--repo", tmp / "repo", point, "/var/lib/app/app.db", "PRAGMA table_info(users)").out
    assert text.splitlines()[0].startswith("cid|name|type") and "avatar|BLOB" in text


REFUSED = [
    "DELETE FROM users",
    "INSERT INTO users (name) VALUES ('mallory')",
    "DROP TABLE users",
    "ATTACH DATABASE '/etc/passwd' AS p",
    "PRAGMA query_only=OFF",
    "PRAGMA user_version=7",
    "SELECT load_extension('/tmp/evil.so')",
    "SELECT 1; DELETE FROM users",
    "BEGIN",
    "VACUUM INTO '/tmp/copied.db'",
]


def test_only_reading_is_allowed(guest):
    tmp, point, _ = guest
    with Stack.open(tmp / "repo") as stack:
        fs = PointFiles(stack, stack.repo.point(point)).filesystem(None)
        with open_database(fs, "/var/lib/app/app.db") as conn:
            for stmt in REFUSED:
                with pytest.raises(SqlError):
                    query(conn, stmt)
            assert list(query(conn, "SELECT count(*) FROM users")[1]) == [(1002,)]
            assert list(query(conn, "PRAGMA user_version")[1]) == [(0,)]
    r = run("files", "sql", "--repo", tmp / "repo", point, "/var/lib/app/app.db", "DELETE FROM users")
    assert r.rc != 0 and "only reading is allowed" in r.err and "Traceback" not in r.err


def test_the_copy_is_private_and_removed_and_bad_files_are_named(guest):
    tmp, point, _ = guest
    scratch = tmp / "scratch"
    scratch.mkdir()
    with Stack.open(tmp / "repo") as stack:
        fs = PointFiles(stack, stack.repo.point(point)).filesystem(None)
        with open_database(fs, "/var/lib/app/app.db", str(scratch)) as conn:
            (made,) = list(scratch.iterdir())
            assert os.stat(made).st_mode & 0o777 == 0o700
            assert {"database.sqlite", "database.sqlite-wal"} <= {p.name for p in made.iterdir()}
            cols, rows = query(conn, "SELECT name FROM users WHERE id = 1000")
            assert cols == ["name"] and list(rows) == [("user997",)]
            with pytest.raises(SqlError, match="only reading"):
                query(conn, "UPDATE users SET name = 'x'")
        assert list(scratch.iterdir()) == []
        with pytest.raises(SqlError, match="not an SQLite database"):
            with open_database(fs, "/not-a-db", tempfile.gettempdir()):
                pass
    r = run("files", "sql", "--repo", tmp / "repo", point, "/nope.db", "SELECT 1")
    assert r.rc != 0 and "no '/nope.db'" in r.err and "Traceback" not in r.err
