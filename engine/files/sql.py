"""Read-only SQL on an SQLite database inside a restore point (item-level recovery).

``open_database(fs, path)`` copies the database file and its ``-wal`` and ``-journal``
siblings, when the guest has them, into a private temporary directory (mode 0700,
removed on exit; the copies get fixed names, never the guest's) and opens the copy
with ``sqlite3`` in the ordinary way: a WAL that was not checkpointed when the backup
was taken (a running VM) or a hot rollback journal needs recovery, which needs write
access, so a ``mode=ro`` URI on the backup's bytes would be wrong. The backup itself is
never written: only the copy is.

The database is hostile input, and so is the statement when it comes over the API:

* ``PRAGMA trusted_schema=OFF`` (functions with side effects and virtual tables are not
  run from views and triggers of the schema), extension loading off, ``PRAGMA
  query_only=ON``;
* an authorizer allows reading only: SELECT, reads of columns, functions (not
  ``load_extension``), recursive CTEs and the introspection pragmas (``table_info``,
  ``user_version``... without a value to set); everything else -- writes, ATTACH (which
  would open any file of this host), transactions, pragmas that set something or turn
  ``query_only`` off -- is refused with a clear error;
* one statement per query (``sqlite3`` refuses several);
* a file that is not an SQLite database, or a damaged one, is a ``SqlError`` saying so.

``query`` returns the column names and an iterator of rows, fetched as they are
consumed (a large table is never held). Single-threaded: one connection per call.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from engine.errors import InstantNFSError, NotFound, UsageError
from engine.files.fs import FileSystem

SIBLINGS = ("-wal", "-journal")
COPY_NAME = "database.sqlite"
FETCH = 512

_A = sqlite3
_ALLOWED = {_A.SQLITE_SELECT, _A.SQLITE_READ, _A.SQLITE_FUNCTION, getattr(_A, "SQLITE_RECURSIVE", 33)}
# pragmas that only report; those in _SETTABLE set something when given a value
_INTROSPECT = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
               "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check", "database_list",
               "collation_list", "function_list", "module_list", "pragma_list", "compile_options"}
_SETTABLE = {"user_version", "schema_version", "application_id", "page_size", "page_count", "encoding",
             "journal_mode", "freelist_count", "auto_vacuum", "data_version"}


class SqlError(InstantNFSError):
    """The query cannot be run."""


def _authorizer(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
    if action in _ALLOWED:
        if action == _A.SQLITE_FUNCTION and (arg2 or "").lower() == "load_extension":
            return _A.SQLITE_DENY
        return _A.SQLITE_OK
    if action == _A.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if name in _INTROSPECT or (name in _SETTABLE and arg2 is None):
            return _A.SQLITE_OK
    return _A.SQLITE_DENY


def _copy(fs: FileSystem, path: str, dest: str) -> bool:
    """Copy the guest file at ``path`` to ``dest`` (holes stay holes); False if there is none."""
    try:
        e = fs.stat(path)
    except NotFound:
        return False
    if e.type != "file":
        if dest.endswith(COPY_NAME):
            raise UsageError(f"{e.path} is a {e.type}, not a database file")
        return False
    f = fs.open_file(e)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        for off, length in f.data_runs():
            for piece in f.pieces(off, length):
                os.pwrite(fd, piece, off)
                off += len(piece)
        os.ftruncate(fd, e.size)
    finally:
        os.close(fd)
    return True


@contextmanager
def open_database(fs: FileSystem, path: str, tmp_dir: str | None = None) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a private copy of the database at ``path`` (with its
    ``-wal``/``-journal``); the copy is removed on exit."""
    where = tempfile.mkdtemp(prefix="instantnfs-sql-", dir=tmp_dir)  # mode 0700
    conn = None
    try:
        db = os.path.join(where, COPY_NAME)
        if not _copy(fs, path, db):
            raise NotFound(f"{fs.name}: no {path!r}")
        for suffix in SIBLINGS:
            _copy(fs, path.rstrip("/") + suffix, db + suffix)
        try:
            conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            if hasattr(conn, "enable_load_extension"):
                conn.enable_load_extension(False)
            conn.execute("PRAGMA trusted_schema=OFF")
            if conn.execute("PRAGMA trusted_schema").fetchone() != (0,):
                raise SqlError(f"SQLite {sqlite3.sqlite_version} cannot distrust a schema (3.31 or later can)")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # recovers the WAL/journal into the copy
            conn.execute("PRAGMA query_only=ON")
        except sqlite3.DatabaseError as e:
            raise SqlError(f"{fs.name}: {path}: not an SQLite database, or a damaged one ({e})") from None
        conn.set_authorizer(_authorizer)
        yield conn
    finally:
        if conn is not None:
            conn.close()
        shutil.rmtree(where, ignore_errors=True)


def query(conn: sqlite3.Connection, sql: str) -> tuple[list[str], Iterator[tuple]]:
    """Run one read-only statement: its column names and its rows, fetched as consumed."""
    try:
        cur = conn.execute(sql)
    except sqlite3.DatabaseError as e:
        if "not authorized" in str(e) or "prohibited" in str(e) or "readonly" in str(e):
            raise SqlError(f"only reading is allowed (SELECT, introspection pragmas): {e}") from None
        raise SqlError(f"the query failed: {e}") from None
    except (sqlite3.ProgrammingError, sqlite3.Warning) as e:
        raise SqlError(f"the query cannot be run: {e}") from None
    if cur.description is None:
        raise SqlError("the statement returns no rows: only queries (SELECT) are allowed")
    cols = [d[0] for d in cur.description]

    def rows() -> Iterator[tuple]:
        try:
            while batch := cur.fetchmany(FETCH):
                yield from batch
        except sqlite3.DatabaseError as e:
            raise SqlError(f"the query failed while reading rows: {e}") from None

    return cols, rows()
