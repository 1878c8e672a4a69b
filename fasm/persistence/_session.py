"""One database transaction's bookkeeping, shared by every backend, and the driver protocol a
backend implements (see :mod:`fasm.persistence._txn` for the whole picture)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeAlias

from ..errors import (
    ConstraintViolation,
    StoreConflict,
    StoreError,
    StoreUnavailable,
    TransactionConflict,
)

if TYPE_CHECKING:
    from ._txn import Database

__all__ = ("Abort", "Driver", "Failure", "Fetch", "Params", "Session", "Stmt")

Params: TypeAlias = Sequence[Any] | Mapping[str, Any]
"""Statement parameters: a sequence for ``?`` placeholders, a mapping for ``:name``."""

Fetch: TypeAlias = Literal["rowcount", "one", "all"]

_SAVEPOINT: Final = "fasm_input"
_MISSING: Final = object()
_PRESENT: Final = object()  # the key exists; its value was not read


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
    identity: str
    """The database's identity, read (made the first time) by :meth:`open`: a UUID in the
    ``meta`` table (row ``database identity``)."""
    fence_at_begin: bool
    """Whether the transaction's first statement checks the machine's sequence number and locks
    its row (``SELECT ... FOR UPDATE``): needed where COMMIT goes out in one pipeline with the
    bookkeeping, so that the check is known before. Without it the bookkeeping's own conditional
    update is the fence, checked before COMMIT."""
    commit_token: bool
    """Whether commits record a token in the machine's row, for :meth:`commit` to find out after
    a lost connection whether a COMMIT in flight happened."""

    def table(self, name: str) -> str:
        """The quoted, qualified name of an internal table: ``machines``, ``idempotency``,
        ``kv`` or ``meta``."""
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

    def transaction_aborted(self) -> bool:
        """Whether the open transaction refuses every statement until it is rolled back (to a
        savepoint or wholly), as PostgreSQL's does after an error."""
        ...

    def classify(self, error: Exception) -> Failure | None:
        """What a driver error means, or None for a mistake in the statement itself."""
        ...

    def many(self, name: str, sql: str, rows: list[tuple[Any, ...]]) -> Stmt:
        """One statement that runs the internal statement ``name`` (``sql``, translated) once
        per row: ``executemany`` where that is cheap, a set-based form where the driver has one
        (PostgreSQL pays a message exchange per row of ``executemany`` in a pipeline)."""
        ...


class Session:
    """The bookkeeping of one database transaction, shared by every backend.

    Statements queue until one needs an answer, then go to the driver together. The transaction
    begins lazily (an input that only validates costs nothing). An input that may write (SQL, a
    range delete) while the transaction holds earlier inputs' work takes a savepoint first, so
    it can be undone alone; the first input to touch the transaction is undone by rolling all of
    it back, and an input that only reads the key-value layer needs no savepoint at all, since
    its writes are still in memory. Key-value writes are buffered: per input until it is
    accepted, then in one buffer for the transaction (a later write of a key replaces an earlier
    one) that goes to the database with the commit, or before a statement that could see the
    table (SQL, range scans). A group of inputs that read and write keys thus costs one round
    trip per read that misses the cache, and the writes ride with the commit.

    Args:
        database: the database whose driver runs the statements.
        write: a read-write transaction (a read-only one refuses key-value writes, and the
            database refuses SQL writes).
        fences: ``(machine key, expected seq)`` pairs, in the order to lock them (one, or the
            keys of a keyed runtime's group): the transaction checks that each machine's stored
            sequence number is the expected one, so a stale writer never commits: when it begins
            (locking the rows) where the driver sends COMMIT in one pipeline with the
            bookkeeping, else through the bookkeeping's conditional updates before COMMIT.
        runtime: failures of the whole transaction raise :class:`Abort` (the runtime's signal)
            instead of the public store error.
    """

    def __init__(self, database: Database, *, write: bool,
                 fences: Sequence[tuple[str, int]] = (), runtime: bool = False) -> None:
        self._db = database
        self._driver = database._driver
        self.write = write
        self._fences = list(fences)
        self._runtime = runtime
        self._queued: list[Stmt] = []
        self._open = False          # BEGIN queued or sent
        self._begun = False         # BEGIN sent
        self._fence_ok = not self._fences or not self._driver.fence_at_begin
        self._sp: int | None = None  # index of this input's queued SAVEPOINT; -1 once sent
        self._shared = False  # the transaction holds work of inputs before this one
        self._input_error: Exception | None = None
        self.aborted: Abort | None = None
        self.closed = False
        self.thread: int | None = None  # the thread that drives the session inline
        self._cache: dict[tuple[str, bytes], Any] = {}
        self._writes: dict[tuple[str, bytes], bytes | None] = {}  # this input's
        self._pending: dict[tuple[str, bytes], bytes | None] = {}  # accepted inputs', unsent

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
        self._flush_all()
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
        if self._fences and self._driver.fence_at_begin:
            self._fence_ok = False
            left = len(self._fences)
            for key, expected in self._fences:

                def check(cursor: Any, key: str = key, expected: int = expected) -> None:
                    nonlocal left
                    row = cursor.fetchone()
                    current = None if row is None else row[0]
                    if current != expected:
                        raise StoreConflict("stale writer: the machine's stored seq is "
                                            f"{current}, this runtime expected {expected}; "
                                            "another process wrote it",
                                            store=self._driver.description, key=key,
                                            seq=expected)
                    left -= 1
                    if not left:
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
        if self._shared and self._sp is None and self._driver.transaction_aborted():
            # A statement failed outside any savepoint of this input (a read), and the
            # database now refuses the transaction, which holds earlier inputs' work: it cannot
            # be kept, so the group must run again.
            return self._abort(TransactionConflict(
                f"a read failed and the database aborted the whole transaction: {e!r}",
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

    # -- inputs: a savepoint for each that writes -------------------------------------------

    def mark(self) -> None:
        """An input starts: what it does from here can be undone alone (its savepoint, when it
        needs one, is taken before its first write)."""
        self._input_error = None
        self._sp = None
        self._shared = self._open

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
        elif self._open and not self._shared:
            # The input was the first to touch this transaction: end it; the next input that
            # needs the database begins a new one. (An input that shared the transaction and
            # took no savepoint only read: there is nothing to undo.)
            pending_rollback = any(stmt.sql == "ROLLBACK" for stmt in self._queued)
            self._queued = [Stmt("ROLLBACK")] if self._begun or pending_rollback else []
            self._open = self._begun = False
            self._fence_ok = not self._fences or not self._driver.fence_at_begin

    def keep(self) -> None:
        """The input was accepted: its savepoint is released and its key-value writes join the
        transaction's buffer."""
        sp, self._sp = self._sp, None
        if sp is not None and sp >= 0:
            del self._queued[sp]  # it sent nothing: the savepoint was never needed
        elif sp is not None:
            self._queued.append(Stmt(f"RELEASE SAVEPOINT {_SAVEPOINT}"))
        self._pending.update(self._writes)
        self._writes.clear()

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
        self._pending.update(self._writes)  # a transaction block's own writes (no inputs)
        self._writes.clear()
        self._flush_pending()
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
        self._pending.clear()
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
        if k in self._pending:
            return self._pending[k]
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
        if k in self._pending:
            return self._pending[k] is not None
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
        self._flush_all()
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
        self._flush_all()
        sql, params = self._db._delete_range_sql(space, start, end)
        try:
            count: int = self._send(Stmt(sql, params), "rowcount")
        finally:
            self._cache.clear()
        return count

    def _flush_all(self) -> None:
        """Get ready for a statement that may write or must see every write (SQL, a range scan
        or delete): queue the accepted inputs' buffered writes, outside this input's savepoint
        (they are not this input's to undo); take the savepoint when the transaction holds
        earlier inputs' work; then queue this input's own writes, inside it."""
        if self._pending:
            self._flush_pending()
            self._shared = True
        if self._sp is None and self._shared:
            self._queued.append(Stmt(f"SAVEPOINT {_SAVEPOINT}"))
            self._sp = len(self._queued) - 1
        self._queue_writes(self._writes)

    def _flush_pending(self) -> None:
        self._queue_writes(self._pending)

    def _queue_writes(self, writes: dict[tuple[str, bytes], bytes | None]) -> None:
        if not writes:
            return
        self._ensure_open()
        puts = [(s, k, v) for (s, k), v in writes.items() if v is not None]
        deletes = [(s, k) for (s, k), v in writes.items() if v is None]
        writes.clear()
        if puts:
            self._queued.append(self._db._many("kv_put", puts))
        if deletes:
            self._queued.append(self._db._many("kv_delete", deletes))
