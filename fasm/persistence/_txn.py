"""Transactional state: a machine whose state is a database transaction (SQLite, PostgreSQL).

The stf receives a :class:`Transaction` and reads and writes through it, in SQL or through its
ordered key-value layer (:attr:`Transaction.kv`). It never commits: the runtime does, once per
group of inputs, and only then dispatches actions and answers submitters.

What is shared here, and what each backend owns
================================================

This module and :mod:`~fasm.persistence._session` hold everything that does not depend on the
database: the :class:`Transaction` users see, the :class:`Session` that keeps one database
transaction's bookkeeping (lazy ``BEGIN``, a savepoint per input that writes, the key-value cache
and write buffer, the fence on the machine's sequence number, the classification of failures) and
the :class:`Database` base class. A backend supplies a :class:`Driver`: a synchronous object that
runs statements in order on its one connection and says what a driver error means. The SQLite driver
runs each statement as it comes; the PostgreSQL driver sends queued statements in one pipeline with
the next statement that needs an answer, so that a savepoint, its release, the key-value writes and
the bookkeeping cost no round trips of their own.

Threads
=======

Drivers block. The runtime runs a whole group of inputs (its stf calls included: they never
suspend, because a :class:`Transaction` method called on the thread driving its session runs the
statement inline) in one worker thread, so the event loop never waits on the database and a group
costs one thread hop, not one per statement (or none: ``SQLiteDatabase(inline=True)`` runs groups
on the event loop's thread). A :class:`Transaction` used from the event loop (from
:meth:`Database.transaction`, in tests or set-up code) sends each call to a worker thread instead.

Placeholders
============

SQL passed to :meth:`Transaction.execute` and friends uses ``?`` with a sequence of parameters, or
``:name`` with a mapping, on every backend (SQLite's own styles; the PostgreSQL driver rewrites
them, leaving string literals, quoted identifiers, comments and ``::`` casts alone).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio

from .._remembered import Remembered
from ..errors import StoreConflict, StoreUnavailable
from ._kv import KV
from ._session import Abort as Abort
from ._session import Driver as Driver
from ._session import Failure as Failure
from ._session import Fetch as Fetch
from ._session import Params as Params
from ._session import Session as Session
from ._session import Stmt as Stmt
from ._worker import Worker

__all__ = (
    "Abort",
    "Database",
    "Driver",
    "Failure",
    "Fetch",
    "Params",
    "Session",
    "Stmt",
    "Transaction",
)

_T = TypeVar("_T")
_OWNED = ("BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE", "START", "ABORT")


def _first(sql: str) -> str:
    word = sql.lstrip().split(None, 1)
    return word[0].upper().rstrip(";") if word else ""




class Transaction:
    """The state an stf receives when its runtime keeps state in a database: one database
    transaction, shared by the inputs of a group, each input undone alone when it fails.

    Declare it as the machine's state type: ``class Booking(StateMachine[Transaction, ...])``.
    Read and write through it only while the stf (or restore) runs; the runtime begins, commits
    and rolls back. Two ways in, freely mixed: SQL (:meth:`execute`, :meth:`fetchone`, ...) with
    ``?`` or ``:name`` placeholders on every backend, and the key-value layer :attr:`kv`.

    A database error in a statement ends what the stf can do with the transaction: the statement
    raises (a :class:`~fasm.errors.ConstraintViolation` for a refused write), every later
    statement raises the same error, and the input is rejected even if the stf catches it.
    """

    __slots__ = ("_db", "_session", "kv", "machine_key")

    def __init__(self, database: Database, session: Session,
                 machine_key: str | None = None) -> None:
        self._db = database
        self._session = session
        self.machine_key = machine_key
        """The key of the machine instance whose stf or restore runs: the runtime's ``key``, or
        in a keyed runtime the key of the input (one transaction then spans the keys of a
        group, each input's stf getting its own key here). None in a
        :meth:`Database.transaction` block. Keyed machines scope their rows by it
        (``WHERE account = ?``)."""
        self.kv: KV = KV(self)
        """The ordered key-value layer over the database's ``kv`` table (see :class:`KV`)."""

    @property
    def readonly(self) -> bool:
        """True for the read transaction ``restore`` gets."""
        return not self._session.write

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._session.thread == threading.get_ident():
            return fn(*args)  # the runtime drives this session on this thread: run inline
        return await self._db._in_thread(fn, *args)

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement and return the number of rows it changed (as the driver reports it).

        Raises:
            ConstraintViolation: the database refused the write (unique, exclusion, foreign key,
                check, not null); the input is rejected.
            ValueError: ``sql`` begins, commits or rolls back (the runtime owns the transaction),
                or mixes ``?`` and ``:name`` placeholders.
            Exception: the driver's own error for a mistake in the statement (sqlite3.Error,
                psycopg.Error); the input fails with :class:`~fasm.errors.TransitionFailed`.
        """
        result: int = await self._call(self._session.statement, sql, params, "rowcount")
        return result

    async def executemany(self, sql: str, params: Sequence[Params]) -> None:
        """Run a statement once per parameter set (raises as :meth:`execute`)."""
        await self._call(self._session.statement, sql, list(params), "rowcount", True)

    async def fetchone(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        """Run a query and return its first row, or None (raises as :meth:`execute`)."""
        row: tuple[Any, ...] | None = await self._call(self._session.statement, sql, params,
                                                       "one")
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Run a query and return all its rows (raises as :meth:`execute`)."""
        rows: list[Any] = await self._call(self._session.statement, sql, params, "all")
        return [tuple(r) for r in rows]

    async def fetchval(self, sql: str, params: Params = ()) -> Any:
        """Run a query and return the first column of its first row, or None (raises as
        :meth:`execute`)."""
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]


class Database:
    """Where a runtime keeps transactional state: the base of
    :class:`~fasm.persistence.SQLiteDatabase` and :class:`~fasm.persistence.PostgresDatabase`.

    Pass one to a runtime as ``Runtime(machine, database=...)``; the runtime opens it on start and
    closes it on stop. Use :meth:`transaction` (and ``async with database:``) outside a runtime to
    create your schema, seed data and read results.

    The database holds internal tables next to yours (``<prefix>machines``: each machine
    key's sequence number; ``<prefix>idempotency``: its remembered submit keys;
    ``<prefix>kv``: the key-value layer; ``<prefix>meta``: the database's identity;
    ``<prefix>in_flight``: the keys of a keyed runtime with tracked actions in flight), all
    written in the same transactions as your data.
    """

    def __init__(self, driver: Driver, *, max_attempts: int, inline: bool = False) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self._driver = driver
        self.max_attempts = max_attempts
        """How many times a group of inputs is run before contention is reported."""
        self.inline = inline
        """Whether the runtime runs each group on the event loop's thread rather than on a
        worker thread (see :class:`~fasm.persistence.SQLiteDatabase`)."""
        self._worker = Worker(f"fasm-{driver.description}")
        self._lock: anyio.Lock | None = None
        self._sql_cache: dict[str, str] = {}
        self._user_cache: dict[str, str] = {}

    @property
    def description(self) -> str:
        """The backend and where it keeps data, for messages."""
        return self._driver.description

    @property
    def identity(self) -> str:
        """The database's identity: a UUID made once, durably, when fasm first prepared its
        tables in it (row ``database identity`` of ``<prefix>meta``), the same at every later
        open and different for every other database. The runtime puts it at the head of the
        idempotency keys it hands executors.

        Raises:
            StoreUnavailable: the database is not open.
        """
        if not self._driver.identity:
            raise StoreUnavailable("database is not open", store=self.description)
        return self._driver.identity

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create the internal tables when missing (again after :meth:`close`).

        Raises:
            StoreUnavailable: the database cannot be reached or prepared.
            StoreCorrupt: the file or tables are not something this code can use.
        """
        await self._in_thread(self._driver.open)

    async def close(self) -> None:
        """Release held keys and disconnect. Safe to call twice."""
        try:
            await self._in_thread(self._driver.close)
        finally:
            self._worker.stop()
        # Made again on the next open: the object may next be used under another event loop.
        self._lock = None

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

    async def acquire(self, key: str) -> None:
        """Take exclusive use of a machine key (the runtime does on start).

        Raises:
            StoreConflict: another database object or process holds it.
            StoreUnavailable: the database cannot be reached.
        """
        await self._in_thread(self._driver.acquire, key)

    async def release(self, key: str) -> None:
        """Give up a machine key; does nothing when it is not held."""
        await self._in_thread(self._driver.release, key)

    @asynccontextmanager
    async def transaction(self, *, readonly: bool = False) -> AsyncIterator[Transaction]:
        """A transaction outside any machine: commits when the block ends normally, rolls back
        when it raises. For schema set-up, seed data, migrations and reading results; a machine's
        state changes belong in its stf. While the block runs, a runtime on this database waits.

        Raises:
            ConstraintViolation: a statement broke a constraint (raised where it ran, and again
                at the end of the block if the block caught it).
            TransactionConflict: the database aborted the transaction (it is not retried here).
            StoreUnavailable: the connection was lost; nothing was committed.
        """
        async with self.lock():
            session = Session(self, write=not readonly)
            tx = Transaction(self, session)
            try:
                yield tx
                if readonly:
                    session.finish()
                else:
                    await self._in_thread(session.commit)
            finally:
                if not session.closed:
                    with anyio.CancelScope(shield=True):
                        await self._in_thread(session.end)

    # -- for the runtime --------------------------------------------------------------------

    def lock(self) -> anyio.Lock:
        """The lock that keeps one transaction at a time on the connection."""
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    async def _blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a blocking call of the runtime's (a whole group, a restore): on the event loop's
        thread when the database is ``inline``, else on the worker thread."""
        if self.inline:
            return fn(*args)
        return await self._in_thread(fn, *args)

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self._worker.run(fn, *args)

    def _sql(self, name: str) -> str:
        """An internal statement, translated for the driver once."""
        found = self._sql_cache.get(name)
        if found is None:
            d = self._driver
            m, i, kv = d.table("machines"), d.table("idempotency"), d.table("kv")
            f = d.table("in_flight")
            text = {
                "in_flight_keys": f"SELECT key FROM {f} ORDER BY key",
                "in_flight_one": f"SELECT 1 FROM {f} WHERE key = ?",
                "in_flight_mark": f"INSERT INTO {f} (key) VALUES (?) ON CONFLICT (key) DO NOTHING",
                "in_flight_clear": f"DELETE FROM {f} WHERE key = ?",
                "kv_get": f"SELECT value FROM {kv} WHERE space = ? AND key = ?",
                "kv_exists": f"SELECT 1 FROM {kv} WHERE space = ? AND key = ?",
                "kv_put": f"INSERT INTO {kv} (space, key, value) VALUES (?, ?, ?) "
                          "ON CONFLICT (space, key) DO UPDATE SET value = excluded.value",
                "kv_delete": f"DELETE FROM {kv} WHERE space = ? AND key = ?",
                "machine_create": f"INSERT INTO {m} (key, seq) VALUES (?, 0) "
                                  "ON CONFLICT (key) DO NOTHING",
                "machine_seq": f"SELECT seq FROM {m} WHERE key = ?",
                "machine_fence": f"SELECT seq FROM {m} WHERE key = ? FOR UPDATE",
                "machine_bump": f"UPDATE {m} SET seq = ?, last_commit = ? "
                                "WHERE key = ? AND seq = ?",
                "keys_load": f"SELECT idempotency_key, seq, at, outcome FROM {i} WHERE key = ? "
                             "ORDER BY seq",
                "key_put": f"INSERT INTO {i} (key, idempotency_key, seq, at, outcome) "
                           "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key, idempotency_key) DO UPDATE "
                           "SET seq = excluded.seq, at = excluded.at, outcome = excluded.outcome",
                "keys_prune": f"DELETE FROM {i} WHERE key = ? AND seq < ?",
            }[name]
            found = self._sql_cache[name] = d.translate(text)
        return found

    def _many(self, name: str, rows: list[tuple[Any, ...]]) -> Stmt:
        """The internal statement ``name`` for every row, in the driver's cheapest form."""
        return self._driver.many(name, self._sql(name), rows)

    def _bounds(self, space: str, start: bytes | None,
                end: bytes | None) -> tuple[str, list[Any]]:
        where = "space = ?"
        params: list[Any] = [space]
        if start is not None:
            where += " AND key >= ?"
            params.append(start)
        if end is not None:
            where += " AND key < ?"
            params.append(end)
        return where, params

    def _range_sql(self, space: str, start: bytes | None, end: bytes | None, reverse: bool,
                   limit: int | None) -> tuple[str, list[Any]]:
        where, params = self._bounds(space, start, end)
        sql = (f"SELECT key, value FROM {self._driver.table('kv')} WHERE {where} "
               f"ORDER BY key {'DESC' if reverse else 'ASC'}")
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self._translated(sql), params

    def _delete_range_sql(self, space: str, start: bytes | None,
                          end: bytes | None) -> tuple[str, list[Any]]:
        where, params = self._bounds(space, start, end)
        return self._translated(f"DELETE FROM {self._driver.table('kv')} WHERE {where}"), params

    def _user_sql(self, sql: str) -> str:
        """A user's statement in the driver's placeholder style (cached).

        Raises:
            ValueError: it would begin, end or nest the transaction, which the runtime owns, or
                it mixes placeholder styles.
        """
        found = self._user_cache.get(sql)
        if found is None:
            word = _first(sql)
            if word in _OWNED:
                raise ValueError(f"{word} is not allowed here: the runtime begins, commits and "
                                 "rolls back the transaction, and manages its savepoints")
            if len(self._user_cache) > 4096:
                self._user_cache.clear()
            found = self._user_cache[sql] = self._driver.translate(sql)
        return found

    def _translated(self, sql: str) -> str:
        found = self._sql_cache.get(sql)
        if found is None:
            found = self._sql_cache[sql] = self._driver.translate(sql)
        return found

    def _keys_in_flight_sync(self) -> list[str]:
        """The keys whose in-flight mark is set (a keyed runtime restores them at start).

        Raises:
            Abort: as :meth:`_load_sync`.
        """
        session = Session(self, write=False, runtime=True)
        try:
            session._ensure_open()
            rows = session._send(Stmt(self._sql("in_flight_keys"), ()), "all")
        finally:
            if not session.closed:
                session.end()
        return [str(r[0]) for r in rows]

    def _mark(self, key: str, in_flight: bool) -> Stmt:
        """The statement that sets or clears ``key``'s in-flight mark."""
        return Stmt(self._sql("in_flight_mark" if in_flight else "in_flight_clear"), (key,))

    def _load_sync(self, key: str) -> tuple[int, list[tuple[str, Remembered]], bool]:
        """Register ``key`` if new and read its sequence number, its idempotency keys and its
        in-flight mark.

        Raises:
            Abort: the transaction is lost; its ``retry`` says whether reading again may help
                (contention, a lost connection) or not (the database stayed unreachable for the
                driver's whole reconnect budget, a key taken by another process).
        """
        session = Session(self, write=True, runtime=True)
        try:
            session._ensure_open()
            session._queued.append(Stmt(self._sql("machine_create"), (key,)))
            row = session._send(Stmt(self._sql("machine_seq"), (key,)), "one")
            rows = session._send(Stmt(self._sql("keys_load"), (key,)), "all")
            marked = session._send(Stmt(self._sql("in_flight_one"), (key,)), "one") is not None
            session.commit()
        finally:
            if not session.closed:
                session.end()
        return int(row[0]), [(str(k), Remembered(int(s), None if at is None else float(at), None,
                                                 None if out is None else bytes(out)))
                             for k, s, at, out in rows], marked

    def _bookkeeping(self, key: str, expected: int, seq: int,
                     new_keys: Sequence[tuple[str, int, float | None, bytes | None]],
                     oldest_kept: int | None) -> tuple[list[Stmt], tuple[str, str] | None]:
        """The statements recording a committed group (the sequence number moves from
        ``expected`` to ``seq``, or the commit is refused as a stale writer's), and its commit
        token when the driver uses one."""
        token = uuid.uuid4().hex if self._driver.commit_token else None

        def fenced(cursor: Any) -> None:
            if cursor.rowcount != 1:
                raise StoreConflict(f"stale writer: the machine's stored seq is not {expected}; "
                                    "another process wrote it", store=self.description, key=key,
                                    seq=seq)

        stmts = [Stmt(self._sql("machine_bump"), (seq, token, key, expected), check=fenced)]
        if new_keys:
            stmts.append(self._many("key_put", [(key, *k) for k in new_keys]))
            if oldest_kept is not None:
                stmts.append(Stmt(self._sql("keys_prune"), (key, oldest_kept)))
        return stmts, None if token is None else (key, token)
