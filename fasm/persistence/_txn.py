"""Transactional state: a machine whose state is a database transaction (SQLite, PostgreSQL).

The stf receives a :class:`Transaction` and reads and writes through it, in SQL or through its
ordered key-value layer (:attr:`Transaction.kv`). It never commits: the runtime does, once per
group of inputs, and only then dispatches actions and answers submitters.

What is shared here, and what each backend owns
================================================

This module holds everything that does not depend on the database: the :class:`Transaction` users
see, the :class:`Session` that keeps one database transaction's bookkeeping (lazy ``BEGIN``,
a savepoint per input, the key-value cache and write buffer, the fence on the machine's sequence
number, the classification of failures) and the :class:`Database` base class. A backend supplies a
:class:`Driver`: a synchronous object that runs statements in order on its one connection and says
what a driver error means. The SQLite driver runs each statement as it comes; the PostgreSQL driver
sends queued statements in one pipeline with the next statement that needs an answer, so that a
savepoint, its release, the key-value writes and the bookkeeping cost no round trips of their own.

Threads
=======

Drivers block. The runtime runs a whole group of inputs (its stf calls included: they never
suspend, because a :class:`Transaction` method called on the thread driving its session runs the
statement inline) in one worker thread, so the event loop never waits on the database and a group
costs one thread hop, not one per statement. A :class:`Transaction` used from the event loop (from
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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeAlias, TypeVar

import anyio
import anyio.to_thread

from ..errors import (
    ConstraintViolation,
    StoreConflict,
    StoreError,
    StoreUnavailable,
    TransactionConflict,
)
from ._kv import KV

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

Params: TypeAlias = Sequence[Any] | Mapping[str, Any]
"""Statement parameters: a sequence for ``?`` placeholders, a mapping for ``:name``."""

Fetch: TypeAlias = Literal["rowcount", "one", "all"]

_SAVEPOINT: Final = "fasm_input"
_MISSING: Final = object()
_PRESENT: Final = object()  # the key exists; its value was not read
_OWNED = ("BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE", "START", "ABORT")


@dataclass(frozen=True, slots=True)
class Stmt:
    """One statement for a driver, already in the driver's placeholder style.

    Attributes:
        sql: the statement.
        params: its parameters, or for ``many`` a sequence of parameter sets.
        many: run once per parameter set (``executemany``).
        check: called with the statement's cursor once it ran (its ``fetchone()`` and
            ``rowcount``), to check the result.
    """

    sql: str
    params: Any = ()
    many: bool = False
    check: Callable[[Any], None] | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """What a driver error means.

    ``constraint``: a constraint refused a write (the input is rejected). ``contention``: the
    database aborted the transaction to keep it serializable, or a lock did not come in time (run
    the group again). ``lost``: the connection broke (reconnect, run the group again).
    ``unavailable``: the database cannot go on (disk full, damaged file): stop.
    """

    kind: Literal["constraint", "contention", "lost", "unavailable"]
    constraint: str | None = None


class Abort(BaseException):
    """Internal: the whole transaction is lost. Raised out of an stf through the engine (a
    BaseException, so that an stf's ``except Exception`` cannot swallow it) to the runtime, which
    runs the group again when ``retry`` is true and stops otherwise."""

    def __init__(self, error: StoreError, *, retry: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry = retry


class Driver(Protocol):
    """One backend's connection, used from one thread at a time. Every method blocks."""

    description: str
    fence_at_begin: bool
    """Whether the transaction's first statement checks the machine's sequence number and locks
    its row (``SELECT ... FOR UPDATE``): needed where COMMIT goes out in one pipeline with the
    bookkeeping, so that the check is known before. Without it the bookkeeping's own conditional
    update is the fence, checked before COMMIT."""
    commit_token: bool
    """Whether commits record a token in the machine's row, for :meth:`commit` to find out after
    a lost connection whether a COMMIT in flight happened."""

    def table(self, name: str) -> str:
        """The quoted, qualified name of an internal table: ``machines``, ``idempotency`` or
        ``kv``."""
        ...

    def translate(self, sql: str) -> str:
        """``sql`` with ``?`` / ``:name`` placeholders in the driver's own style.

        Raises:
            ValueError: the statement mixes both styles.
        """
        ...

    def open(self) -> None:
        """Connect and create the internal tables when missing."""
        ...

    def close(self) -> None:
        """Release every key and disconnect. Safe to call twice."""
        ...

    def acquire(self, key: str) -> None:
        """Take exclusive use of a machine key (StoreConflict when another process has it)."""
        ...

    def release(self, key: str) -> None:
        """Give up a machine key."""
        ...

    def begin(self, write: bool) -> list[Stmt]:
        """The statements opening a transaction, after (re)connecting when needed."""
        ...

    def run(self, queued: Sequence[Stmt], last: Stmt | None, fetch: Fetch) -> Any:
        """Run ``queued`` then ``last`` in order, and return ``last``'s rowcount, first row or
        rows. Raises the driver's own errors (classified by :meth:`classify`)."""
        ...

    def commit(self, queued: Sequence[Stmt], token: tuple[str, str] | None) -> None:
        """Run ``queued`` and commit. ``token`` is ``(machine key, commit token)`` when the
        statements set the machine row's ``last_commit`` to it: if the connection breaks while
        COMMIT is in flight, the driver looks for it after reconnecting, returns if it committed,
        and raises a ``lost`` error if it did not.

        Raises:
            StoreUnavailable: the outcome cannot be known (the database cannot be reached).
        """
        ...

    def rollback(self) -> None:
        """End whatever transaction is open; does nothing on a broken connection."""
        ...

    def in_transaction(self) -> bool:
        """Whether the connection has a transaction open on the database's side."""
        ...

    def classify(self, error: Exception) -> Failure | None:
        """What a driver error means, or None for a mistake in the statement itself."""
        ...


def _first(sql: str) -> str:
    word = sql.lstrip().split(None, 1)
    return word[0].upper().rstrip(";") if word else ""


class Session:
    """The bookkeeping of one database transaction, shared by every backend.

    Statements queue until one needs an answer, then go to the driver together. The transaction
    begins lazily (an input that only validates costs nothing), each input after the first that
    touched the database runs inside a savepoint (the first is undone by rolling back the whole
    transaction, so it needs none), and key-value writes are buffered per input and queued when
    the input is accepted.

    Args:
        database: the database whose driver runs the statements.
        write: a read-write transaction (a read-only one refuses key-value writes, and the
            database refuses SQL writes).
        fence: ``(machine key, expected seq)``: the transaction checks, when it begins, that the
            machine's stored sequence number is the expected one (and locks its row), so a stale
            writer never commits.
        runtime: failures of the whole transaction raise :class:`Abort` (the runtime's signal)
            instead of the public store error.
    """

    def __init__(self, database: Database, *, write: bool, fence: tuple[str, int] | None = None,
                 runtime: bool = False) -> None:
        self._db = database
        self._driver = database._driver
        self.write = write
        self._fence = fence
        self._runtime = runtime
        self._queued: list[Stmt] = []
        self._open = False          # BEGIN queued or sent
        self._begun = False         # BEGIN sent
        self._fence_ok = fence is None or not self._driver.fence_at_begin
        self._sp: int | None = None  # index of this input's queued SAVEPOINT; -1 once sent
        self._input_error: Exception | None = None
        self.aborted: Abort | None = None
        self.closed = False
        self.thread: int | None = None  # the thread that drives the session inline
        self._cache: dict[tuple[str, bytes], Any] = {}
        self._writes: dict[tuple[str, bytes], bytes | None] = {}

    # -- statements -------------------------------------------------------------------------

    def usable(self) -> None:
        """Raise when the transaction cannot take a statement now."""
        if self.closed:
            raise RuntimeError("this transaction has ended: use the state only while the stf, "
                               "restore or transaction block it was given to is running")
        if self.aborted is not None:
            raise self.aborted if self._runtime else self.aborted.error
        if self._input_error is not None:
            raise self._input_error

    def statement(self, sql: str, params: Params, fetch: Fetch, many: bool = False) -> Any:
        """Run one of the user's statements: the key-value writes of this input go first, and
        the key-value cache is dropped, since the statement may touch its table.

        Raises:
            ConstraintViolation: a constraint refused the write.
            ValueError: the statement would end or nest the transaction, which the runtime owns,
                or mixes placeholder styles.
            Abort: (runtime) the transaction is lost. StoreError: (otherwise) the same.
        """
        self.usable()
        self._flush_writes()
        try:
            result = self._send(Stmt(self._db._user_sql(sql), params, many), fetch)
        finally:
            self._cache.clear()
        return result

    def _send(self, last: Stmt | None, fetch: Fetch) -> Any:
        self._ensure_open()
        queued, self._queued = self._queued, []
        if self._sp is not None:
            self._sp = -1
        self._begun = True
        try:
            return self._driver.run(queued, last, fetch)
        except Exception as e:
            raise self._failed(e) from e

    def _ensure_open(self) -> None:
        if self._open:
            return
        try:
            self._queued += self._driver.begin(self.write)
        except Exception as e:
            raise self._failed(e) from e
        self._open = True
        self._begun = False
        if self._fence is not None and self._driver.fence_at_begin:
            key, expected = self._fence
            self._fence_ok = False

            def check(cursor: Any) -> None:
                row = cursor.fetchone()
                current = None if row is None else row[0]
                if current != expected:
                    raise StoreConflict("stale writer: the machine's stored seq is "
                                        f"{current}, this runtime expected {expected}; another "
                                        "process wrote it", store=self._driver.description,
                                        key=key, seq=expected)
                self._fence_ok = True

            self._queued.append(Stmt(self._db._sql("machine_fence"), (key,), check=check))

    def _failed(self, e: Exception) -> BaseException:
        """Record what a failed statement means and return the exception to raise."""
        was_open = self._begun
        if isinstance(e, StoreError):
            return self._abort(e, retry=False)
        failure = self._driver.classify(e)
        if failure is not None and failure.kind in ("contention", "lost"):
            return self._abort(self._store_error(e, failure), retry=True)
        if failure is not None and failure.kind == "unavailable":
            return self._abort(StoreUnavailable(f"the database failed: {e}",
                                                store=self._driver.description), retry=False)
        if was_open and not self._driver.in_transaction():
            # The database ended the whole transaction (SQLite does on some errors): the work
            # of the inputs before this one went with it, so the group must run again.
            return self._abort(TransactionConflict(
                f"the database rolled the whole transaction back after {e!r}",
                store=self._driver.description), retry=True)
        if failure is not None and failure.kind == "constraint":
            error: Exception = ConstraintViolation(
                f"the database refused the write: {e}", constraint=failure.constraint)
            error.__cause__ = e
        else:
            error = e
        self._input_error = error
        return error

    def _store_error(self, e: Exception, failure: Failure) -> StoreError:
        if failure.kind == "lost":
            error: StoreError = StoreUnavailable(f"connection to the database lost: {e}",
                                                 store=self._driver.description)
        else:
            error = TransactionConflict(f"the database aborted the transaction: {e}",
                                        store=self._driver.description)
        error.__cause__ = e
        return error

    def _abort(self, error: StoreError, *, retry: bool) -> BaseException:
        self.aborted = Abort(error, retry=retry)
        return self.aborted if self._runtime else error

    # -- inputs: a savepoint each -----------------------------------------------------------

    def mark(self) -> None:
        """An input starts: what it does from here can be undone alone."""
        self._input_error = None
        if self._open:
            self._queued.append(Stmt(f"SAVEPOINT {_SAVEPOINT}"))
            self._sp = len(self._queued) - 1
        else:
            self._sp = None

    def undo(self) -> None:
        """The input failed: undo what it did, in the database and in the cache."""
        self._writes.clear()
        self._cache.clear()
        self._input_error = None
        sp, self._sp = self._sp, None
        if sp is not None and sp >= 0:
            del self._queued[sp:]  # nothing of the input was sent
        elif sp is not None:
            self._queued += [Stmt(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}"),
                             Stmt(f"RELEASE SAVEPOINT {_SAVEPOINT}")]
        elif self._open:
            # The input was the first to touch this transaction: end it; the next input that
            # needs the database begins a new one.
            pending_rollback = any(stmt.sql == "ROLLBACK" for stmt in self._queued)
            self._queued = [Stmt("ROLLBACK")] if self._begun or pending_rollback else []
            self._open = self._begun = False
            self._fence_ok = self._fence is None or not self._driver.fence_at_begin

    def keep(self) -> None:
        """The input was accepted: its savepoint is released and its key-value writes queued."""
        sp, self._sp = self._sp, None
        if sp is not None and sp >= 0:
            del self._queued[sp]  # it sent nothing: the savepoint was never needed
        elif sp is not None:
            self._queued.append(Stmt(f"RELEASE SAVEPOINT {_SAVEPOINT}"))
        self._flush_writes()

    def finish(self) -> None:
        """The stf returned: fail it anyway if it swallowed a database error (engine rule 8)."""
        if self.aborted is not None:
            raise self.aborted if self._runtime else self.aborted.error
        if self._input_error is not None:
            raise self._input_error

    # -- end --------------------------------------------------------------------------------

    def commit(self, extra: Sequence[Stmt] = (), token: tuple[str, str] | None = None) -> None:
        """Queue ``extra`` (the runtime's bookkeeping) and commit everything.

        Raises:
            Abort: (runtime) the transaction is lost. StoreError: (otherwise) the same.
        """
        self.usable()
        self._flush_writes()
        self._ensure_open()
        if not self._fence_ok:
            self._send(None, "rowcount")  # the fence must hold before COMMIT goes out
        queued, self._queued = [*self._queued, *extra], []
        self.closed = True
        try:
            self._driver.commit(queued, token)
        except Exception as e:
            error = self._failed(e)
            try:
                self._driver.rollback()  # a COMMIT that failed may leave the transaction open
            except Exception:
                pass  # a broken connection has none left
            raise error from e

    def end(self) -> None:
        """End without committing (rolls back whatever is open). Never raises."""
        self.closed = True
        self._queued.clear()
        self._writes.clear()
        self._cache.clear()
        try:
            self._driver.rollback()
        except Exception:
            pass  # a broken connection has no transaction left to end

    # -- the key-value layer ----------------------------------------------------------------

    def kv_get(self, space: str, key: bytes) -> bytes | None:
        """The value of ``key`` (this transaction's writes included), or None."""
        self.usable()
        k = (space, key)
        if k in self._writes:
            return self._writes[k]
        hit = self._cache.get(k, _MISSING)
        if hit is not _MISSING and hit is not _PRESENT:
            return hit  # type: ignore[no-any-return]
        row = self._send(Stmt(self._db._sql("kv_get"), (space, key)), "one")
        value = None if row is None else bytes(row[0])
        self._cache[k] = value
        return value

    def kv_exists(self, space: str, key: bytes) -> bool:
        """Whether ``key`` is present (this transaction's writes included)."""
        self.usable()
        k = (space, key)
        if k in self._writes:
            return self._writes[k] is not None
        hit = self._cache.get(k, _MISSING)
        if hit is not _MISSING:
            return hit is not None
        row = self._send(Stmt(self._db._sql("kv_exists"), (space, key)), "one")
        self._cache[k] = None if row is None else _PRESENT
        return row is not None

    def kv_set(self, space: str, key: bytes, value: bytes | None) -> None:
        """Buffer a write (None deletes); it reaches the database with the next statement that
        needs an answer, or when the input is accepted."""
        self.usable()
        if not self.write:
            raise RuntimeError("this transaction is read-only (restore may not write)")
        self._writes[(space, key)] = value
        self._cache[(space, key)] = value

    def kv_range(self, space: str, start: bytes | None, end: bytes | None, reverse: bool,
                 limit: int | None) -> list[tuple[bytes, bytes]]:
        """Pairs with ``start <= key < end`` (None: unbounded), in key order."""
        self.usable()
        self._flush_writes()
        sql, params = self._db._range_sql(space, start, end, reverse, limit)
        rows = self._send(Stmt(sql, params), "all")
        out = [(bytes(k), bytes(v)) for k, v in rows]
        for k, v in out:
            self._cache[(space, k)] = v
        return out

    def kv_delete_range(self, space: str, start: bytes | None, end: bytes | None) -> int:
        """Delete the keys with ``start <= key < end``; returns how many there were."""
        self.usable()
        if not self.write:
            raise RuntimeError("this transaction is read-only (restore may not write)")
        self._flush_writes()
        sql, params = self._db._delete_range_sql(space, start, end)
        try:
            count: int = self._send(Stmt(sql, params), "rowcount")
        finally:
            self._cache.clear()
        return count

    def _flush_writes(self) -> None:
        if not self._writes:
            return
        self._ensure_open()
        puts = [(s, k, v) for (s, k), v in self._writes.items() if v is not None]
        deletes = [(s, k) for (s, k), v in self._writes.items() if v is None]
        self._writes.clear()
        if puts:
            self._queued.append(Stmt(self._db._sql("kv_put"), puts, many=True))
        if deletes:
            self._queued.append(Stmt(self._db._sql("kv_delete"), deletes, many=True))


class Transaction:
    """The state an stf receives when its runtime keeps state in a database: one database
    transaction, shared by the inputs of a group, with a savepoint around each input.

    Declare it as the machine's state type: ``class Booking(StateMachine[Transaction, ...])``.
    Read and write through it only while the stf (or restore) runs; the runtime begins, commits
    and rolls back. Two ways in, freely mixed: SQL (:meth:`execute`, :meth:`fetchone`, ...) with
    ``?`` or ``:name`` placeholders on every backend, and the key-value layer :attr:`kv`.

    A database error in a statement ends what the stf can do with the transaction: the statement
    raises (a :class:`~fasm.errors.ConstraintViolation` for a refused write), every later
    statement raises the same error, and the input is rejected even if the stf catches it.
    """

    __slots__ = ("_db", "_session", "kv")

    def __init__(self, database: Database, session: Session) -> None:
        self._db = database
        self._session = session
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

    The database holds three internal tables next to yours (``<prefix>machines``: each machine
    key's sequence number; ``<prefix>idempotency``: its remembered submit keys;
    ``<prefix>kv``: the key-value layer), all written in the same transactions as your data.
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
        self._limiter: anyio.CapacityLimiter | None = None
        self._lock: anyio.Lock | None = None
        self._sql_cache: dict[str, str] = {}
        self._user_cache: dict[str, str] = {}

    @property
    def description(self) -> str:
        """The backend and where it keeps data, for messages."""
        return self._driver.description

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
        await self._in_thread(self._driver.close)
        # Made again on the next open: the object may next be used under another event loop.
        self._lock = self._limiter = None

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
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _sql(self, name: str) -> str:
        """An internal statement, translated for the driver once."""
        found = self._sql_cache.get(name)
        if found is None:
            d = self._driver
            m, i, kv = d.table("machines"), d.table("idempotency"), d.table("kv")
            text = {
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
                "keys_load": f"SELECT idempotency_key, seq FROM {i} WHERE key = ? ORDER BY seq",
                "key_put": f"INSERT INTO {i} (key, idempotency_key, seq) VALUES (?, ?, ?) "
                           "ON CONFLICT (key, idempotency_key) DO UPDATE SET seq = excluded.seq",
                "keys_prune": f"DELETE FROM {i} WHERE key = ? AND seq < ?",
            }[name]
            found = self._sql_cache[name] = d.translate(text)
        return found

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

    def _load_sync(self, key: str) -> tuple[int, list[tuple[str, int]]]:
        """Register ``key`` if new and read its sequence number and idempotency keys."""
        session = Session(self, write=True)
        try:
            session._ensure_open()
            session._queued.append(Stmt(self._sql("machine_create"), (key,)))
            row = session._send(Stmt(self._sql("machine_seq"), (key,)), "one")
            rows = session._send(Stmt(self._sql("keys_load"), (key,)), "all")
            session.commit()
        finally:
            if not session.closed:
                session.end()
        return int(row[0]), [(str(k), int(s)) for k, s in rows]

    def _bookkeeping(self, key: str, expected: int, seq: int,
                     new_keys: Sequence[tuple[str, int]],
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
            stmts.append(Stmt(self._sql("key_put"), [(key, k, s) for k, s in new_keys],
                              many=True))
            if oldest_kept is not None:
                stmts.append(Stmt(self._sql("keys_prune"), (key, oldest_kept)))
        return stmts, None if token is None else (key, token)
