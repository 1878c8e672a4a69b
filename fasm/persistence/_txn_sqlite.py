"""SQLiteDatabase: transactional state in one SQLite file (stdlib ``sqlite3``, WAL mode).

A group of inputs is one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's write lock at once,
so no statement inside it waits for another writer, and its fence on the machine's sequence
number is a plain read. Statements run as they come, on the thread that drives the group; SQLite
serves them from its page cache in microseconds, so there is nothing to gain from batching.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import StoreConflict, StoreCorrupt, StoreUnavailable
from ._file_format import key_file_name
from ._file_locks import try_flock, unflock
from ._sqlite import connect
from ._txn import Database, Failure, Fetch, Stmt

__all__ = ("SQLiteDatabase",)

# Primary result codes (the low byte of an extended code).
_BUSY, _LOCKED, _CONSTRAINT = 5, 6, 19
_BROKEN = {7, 10, 11, 13, 14, 26}  # NOMEM, IOERR, CORRUPT, FULL, CANTOPEN, NOTADB


class _SQLiteDriver:
    # BEGIN IMMEDIATE holds the database's write lock, and statements run one by one: the
    # bookkeeping's conditional update is checked before COMMIT, and COMMIT's outcome is known.
    fence_at_begin = False
    commit_token = False

    def __init__(self, path: str, synchronous: str, busy_timeout: float, prefix: str) -> None:
        self._path = path
        self._memory = path == ":memory:"
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._prefix = prefix
        self._conn: sqlite3.Connection | None = None
        self._held: dict[str, int | None] = {}
        self._guard = threading.Lock()
        self._query_only = False
        self.description = f"sqlite:{path}"
        self.identity = ""

    def table(self, name: str) -> str:
        return f'"{self._prefix}{name}"'

    def translate(self, sql: str) -> str:
        return sql  # ? and :name are SQLite's own placeholder styles

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        if self._conn is not None:
            return
        conn: sqlite3.Connection | None = None
        try:
            conn = connect(self._path, self._busy_timeout, self._synchronous)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in self._schema():
                    conn.execute(statement)
                self._migrate(conn)
                meta = self.table("meta")
                conn.execute(f"INSERT OR IGNORE INTO {meta} VALUES ('database identity', ?)",
                             (str(uuid.uuid4()),))
                (identity,) = conn.execute(
                    f"SELECT value FROM {meta} WHERE name = 'database identity'").fetchone()
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if not self._memory:
                Path(self._path + ".locks").mkdir(exist_ok=True)
        except (sqlite3.Error, OSError) as e:
            if conn is not None:
                conn.close()
            text = str(e)
            if "not a database" in text or "malformed" in text:
                raise StoreCorrupt(f"cannot open the database: the file is damaged or not an "
                                   f"SQLite database ({text})", store=self.description) from e
            raise StoreUnavailable(f"cannot open the database: {type(e).__name__}: {text}",
                                   store=self.description) from e
        self.identity = str(identity)
        self._conn = conn

    def _schema(self) -> list[str]:
        m, i, kv = self.table("machines"), self.table("idempotency"), self.table("kv")
        return [
            f"CREATE TABLE IF NOT EXISTS {m} (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
            "last_commit TEXT)",
            f"CREATE TABLE IF NOT EXISTS {i} (key TEXT NOT NULL, idempotency_key TEXT NOT NULL, "
            "seq INTEGER NOT NULL, at REAL, outcome BLOB, PRIMARY KEY (key, idempotency_key)) "
            "WITHOUT ROWID",
            f'CREATE INDEX IF NOT EXISTS "{self._prefix}idempotency_seq" ON {i} (key, seq)',
            f"CREATE TABLE IF NOT EXISTS {kv} (space TEXT NOT NULL, key BLOB NOT NULL, "
            "value BLOB NOT NULL, PRIMARY KEY (space, key)) WITHOUT ROWID",
            f"CREATE TABLE IF NOT EXISTS {self.table('meta')} (name TEXT PRIMARY KEY, "
            "value TEXT NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {self.table('in_flight')} (key TEXT PRIMARY KEY) "
            "WITHOUT ROWID",
        ]

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Add what a database made by an older fasm lacks: the date and outcome of each
        idempotency key (NULL for the keys it holds: undated, outcome unknown)."""
        table = self.table("idempotency")
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column, kind in (("at", "REAL"), ("outcome", "BLOB")):
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._guard:
            held, self._held = self._held, {}
        for fd in held.values():
            if fd is not None:
                try:
                    unflock(fd)
                except OSError:
                    pass  # closing the descriptor released the lock anyway
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass  # an open transaction is rolled back by closing: nothing acknowledged is lost

    def acquire(self, key: str) -> None:
        self._connection()
        with self._guard:
            if key in self._held:
                return
            if self._memory:
                self._held[key] = None  # a private database: nobody else can see it
                return
            try:
                fd = try_flock(Path(self._path + ".locks") / ("txn-" + key_file_name(key)))
            except OSError as e:
                raise StoreUnavailable(f"cannot take the key's lock file: {e}",
                                       store=self.description, key=key) from e
            if fd is None:
                raise StoreConflict("key is held by another runtime or process",
                                    store=self.description, key=key)
            self._held[key] = fd

    def release(self, key: str) -> None:
        with self._guard:
            fd = self._held.pop(key, None)
        if fd is not None:
            try:
                unflock(fd)
            except OSError:
                pass

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("the database is not open", store=self.description)
        return self._conn

    # -- statements -------------------------------------------------------------------------

    def begin(self, write: bool) -> list[Stmt]:
        self._connection()
        if write:
            return [Stmt("BEGIN IMMEDIATE")]
        self._query_only = True  # reset by rollback(), which ends every read transaction
        return [Stmt("PRAGMA query_only = 1"), Stmt("BEGIN")]

    def run(self, queued: Sequence[Stmt], last: Stmt | None, fetch: Fetch) -> Any:
        conn = self._connection()
        for stmt in queued:
            self._exec(conn, stmt, "rowcount")
        return None if last is None else self._exec(conn, last, fetch)

    @staticmethod
    def _exec(conn: sqlite3.Connection, stmt: Stmt, fetch: Fetch) -> Any:
        if stmt.many:
            cur = conn.executemany(stmt.sql, stmt.params)
        else:
            cur = conn.execute(stmt.sql, stmt.params)
        if stmt.check is not None:
            stmt.check(cur)
        if fetch == "one":
            return cur.fetchone()
        if fetch == "all":
            return cur.fetchall()
        return cur.rowcount

    def commit(self, queued: Sequence[Stmt], token: tuple[str, str] | None) -> None:
        # A local COMMIT either happens or raises with the transaction still open (rolled back
        # by the caller): its outcome is never unknown, so the token is not needed.
        conn = self._connection()
        self.run(queued, None, "rowcount")
        conn.execute("COMMIT")

    def rollback(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        finally:
            if self._query_only:
                self._query_only = False
                conn.execute("PRAGMA query_only = 0")

    def in_transaction(self) -> bool:
        return self._conn is not None and self._conn.in_transaction

    def many(self, name: str, sql: str, rows: list[tuple[Any, ...]]) -> Stmt:
        return Stmt(sql, rows, many=True)  # a loop in C over one prepared statement

    def transaction_aborted(self) -> bool:
        return False  # after an error SQLite either goes on or has ended the transaction

    def classify(self, error: Exception) -> Failure | None:
        if not isinstance(error, sqlite3.Error):
            return None
        code = getattr(error, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        if primary == _CONSTRAINT:
            text = str(error)
            _, _, name = text.partition(" failed: ")
            return Failure("constraint", name or None)
        if primary in (_BUSY, _LOCKED):
            return Failure("contention")
        if primary in _BROKEN:
            return Failure("unavailable")
        return None


class SQLiteDatabase(Database):
    """Transactional state in one SQLite database file: the embedded default.

    Args:
        path: the database file (created when missing), or ``":memory:"`` for a private,
            non-durable database.
        synchronous: SQLite's ``PRAGMA synchronous``. ``"FULL"`` (default) fsyncs every commit,
            so a transition whose submit returned survives power loss; ``"NORMAL"`` survives a
            crash of the process but may lose the last commits on power loss; ``"OFF"`` is for
            throwaway data.
        busy_timeout: seconds a transaction waits for another connection's write lock before
            the attempt counts as contention.
        table_prefix: prefix of the internal tables (``<prefix>machines``, ``<prefix>idempotency``,
            ``<prefix>kv``).
        max_attempts: how many times the runtime runs a group of inputs that keeps meeting a
            locked database before answering :class:`~fasm.errors.TransactionConflict`.
        inline: run each group of inputs (its statements and its commit's fsync) on the event
            loop's thread instead of a worker thread. It saves the thread hop per group (on a
            virtual machine nearly as long as a fast fsync: a sequential submitter's throughput
            rose by half in bench/bench_transactional.py), at the price of blocking every other
            task of the loop for the length of each transaction, commit included, and for up to
            ``busy_timeout`` when another process holds the write lock. For a process that does
            little else, on a fast local disk.

    What a user should know:

    * One connection, owned by whoever opened the object (a runtime, or ``async with``). Other
      processes may read the file at any time (WAL mode); another writer makes a group wait up
      to ``busy_timeout`` and then try again.
    * A machine key is locked with ``flock`` on ``<path>.locks/txn-<key>``, so two runtimes can
      never drive one key; the kernel drops it when the process dies.
    * A constraint that refuses a write surfaces as :class:`~fasm.errors.ConstraintViolation`
      (SQLite names the columns rather than the constraint).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL", "OFF"] = "FULL",
        busy_timeout: float = 5.0,
        table_prefix: str = "fasm_",
        max_attempts: int = 5,
        inline: bool = False,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL", "OFF"):
            raise ValueError(f"synchronous must be FULL, NORMAL or OFF, not {synchronous!r}")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0")
        super().__init__(_SQLiteDriver(os.fspath(path), synchronous, busy_timeout, table_prefix),
                         max_attempts=max_attempts, inline=inline)
