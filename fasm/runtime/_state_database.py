"""DatabaseHost: state that is a database transaction (SQLite, PostgreSQL).

A group of queued inputs becomes one database transaction, run in one worker thread:

1. each input runs through the engine, and takes a savepoint before its first statement that
   may write (the first input that touches the database needs none, since undoing it is rolling
   the whole transaction back, nor does one that only reads the key-value layer, whose writes
   are still in memory);
   the stf's statements run inline on that thread, so the coroutine never suspends and is driven
   to its end synchronously, as the simulator drives it;
2. a failed input is rolled back to its savepoint: the database is the atomicity (the engine's
   ``"trust"`` policy), and a database error the stf swallowed still fails it (engine rule 8);
3. the runtime's bookkeeping (the machine's sequence number, fenced at the transaction's start,
   and the new submit idempotency keys) is written in the same transaction, and it commits once;
4. only after ``run`` returns does the Runtime release actions and answer submitters.

A serialization failure, deadlock, lock timeout or busy database abandons the transaction: the
engine forgets the group's accepted steps and the whole group runs again on a fresh transaction
(safe, because the stf is deterministic: on the same data it does the same; on data another
writer changed, it does what that data calls for). After ``max_attempts`` the submitters get
:class:`~fasm.errors.TransactionConflict` and the runtime goes on. A lost connection is retried the
same way on a new connection (the driver keeps trying to connect for its reconnect budget); when
none can be had, the runtime stops with :class:`~fasm.errors.StoreUnavailable`. Nothing uncommitted
is ever acknowledged.

Tracked actions in flight are not written: ``restore`` finds them in the user's own rows, read in
a read-only transaction, as invariant 4 requires (tracked actions are stored in state when they
are emitted).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar, get_origin

from .._remembered import Remembered
from ..errors import (
    DefinitionError,
    StoreError,
    StoreUnavailable,
    TransactionConflict,
    TransitionFailed,
)
from ..persistence._codec import Codec, Unencodable
from ..persistence._txn import Abort, Database, Session, Transaction
from ._engine import (
    Accepted,
    AnyMachine,
    Engine,
    Failed,
    Release,
    Rollback,
    Step,
    _check_window,
    _describe,
)
from ._host import GroupResult, KeyGroup, Submitted

__all__ = ("DatabaseHost",)

_T = TypeVar("_T")


class _Suspended(Exception):
    """The stf or restore awaited something that is not the state (it may not)."""


def drive(coro: Coroutine[Any, Any, _T], what: str) -> _T:
    """Run a coroutine that never suspends to its end, on this thread.

    Raises:
        _Suspended: it awaited something outside the state (real I/O, a sleep).
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise _Suspended(f"{what} awaited something other than the state (a sleep, a network call); "
                     "with transactional state only the transaction's own methods may be awaited")


def _finish(state: Any) -> None:
    state._session.finish()


class DatabaseHost:
    """The transactional path of the :class:`~fasm.runtime.Runtime` (see the module docstring).

    Args:
        machine: the machine instance.
        key: the machine key.
        database: where state lives.
        idempotency_window: at most how many submit keys are remembered (in memory and in the
            database; None: no count bound).
        idempotency_ttl: how long (seconds) a submit key is remembered (None: no time bound).
        seed: seeds the jitter of the retry backoff.
    """

    def __init__(self, machine: AnyMachine, *, key: str, database: Database,
                 idempotency_window: int | None, seed: int | None,
                 idempotency_ttl: float | None = None) -> None:
        self.machine = machine
        self.key = key
        self.database = database
        self._idempotency_window = idempotency_window
        self._idempotency_ttl = idempotency_ttl
        self.codec = Codec(type(machine))
        """Checks inputs and encodes the outcome of each keyed transition."""
        self._rng = random.Random(seed)

    @classmethod
    def checked(cls, machine: AnyMachine, *, key: str, database: Database,
                idempotency_window: int | None, seed: int | None, initial_state: Any, store: Any,
                durability: Any, rollback: Rollback | None,
                idempotency_ttl: float | None = None) -> DatabaseHost:
        """A host for a Runtime given ``database=``, after checking the options that go with it.

        Raises:
            DefinitionError: ``initial_state``, ``store`` or ``durability`` is given too, the
                rollback policy is not ``"trust"``, or the machine's declared state type is not
                :class:`~fasm.persistence.Transaction` (or a base of it).
        """
        given = [name for name, value in (("initial_state", initial_state), ("store", store),
                                          ("durability", durability)) if value is not None]
        if given:
            raise DefinitionError(
                f"database= keeps state in the database: {', '.join(given)} cannot be given "
                "with it (give one of initial_state= and database=)")
        if rollback not in (None, "trust"):
            raise DefinitionError(
                f"rollback={rollback!r} cannot be used with database=: the database rolls a "
                "failed input back to its savepoint (the policy is 'trust')")
        declared = type(machine).machine_types().state
        origin = get_origin(declared) or declared
        if isinstance(origin, type) and not issubclass(Transaction, origin):
            raise DefinitionError(
                f"{type(machine).__qualname__} declares its state as {declared!r}, "
                "but database= hands the stf a fasm.persistence.Transaction: declare "
                "StateMachine[Transaction, ...]")
        _check_window(idempotency_window, idempotency_ttl)
        return cls(machine, key=key, database=database, idempotency_window=idempotency_window,
                   seed=seed, idempotency_ttl=idempotency_ttl)

    @property
    def description(self) -> str:
        """The database's description."""
        return self.database.description

    async def open(self) -> None:
        """Open the database and take the key.

        Raises:
            StoreError: the database cannot be opened, or another runtime holds the key.
        """
        db = self.database
        await db.open()
        await db.acquire(self.key)

    async def keys_to_restore(self) -> list[str]:
        """The one key."""
        return [self.key]

    async def activate(self, key: str) -> Engine:
        """Read the machine's sequence number and keys.

        Raises:
            StoreError: the database cannot be read.
        """
        assert key == self.key
        async with self.database.lock():
            seq, keys = await self.database._blocking(self._load_sync)
        return self._engine(seq, keys)

    def passivate(self, key: str) -> None:
        """Nothing is kept per key besides the engine."""

    async def peek(self, key: str) -> Any:
        """Never called: a transactional runtime hosts one key, always active."""
        raise DefinitionError("a runtime with database= hosts one key")

    def open_sync(self) -> Engine:
        """:meth:`open`, on the calling thread (for a synchronous driver: the simulator).
        Every later call on this host must come from the same thread, one at a time."""
        self.database._driver.open()
        self.database._driver.acquire(self.key)
        return self._engine(*self._load_sync())

    def close_sync(self) -> None:
        """:meth:`close`, on the calling thread."""
        try:
            self.database._driver.release(self.key)
        finally:
            self.database._driver.close()

    def _engine(self, seq: int, keys: list[tuple[str, Remembered]]) -> Engine:
        return Engine(self.machine, state=None, seq=seq, idempotency=keys, rollback="trust",
                      idempotency_window=self._idempotency_window,
                      idempotency_ttl=self._idempotency_ttl, finish=_finish)

    def _load_sync(self) -> tuple[int, list[tuple[str, Remembered]]]:
        for attempt in self._attempts():
            try:
                return self.database._load_sync(self.key)
            except Abort as abort:
                # Not again when the driver gave up (its reconnect budget is spent already).
                if not abort.retry or attempt == self.database.max_attempts:
                    raise abort.error.located(store=self.description,
                                              key=self.key) from abort.error
                time.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    async def restore(self, engine: Engine) -> Release:
        """Run restore in a read-only transaction.

        Raises:
            RestoreFailed: restore raised (a write included) or emitted an untracked action.
            StoreUnavailable: the database could not be read.
        """
        async with self.database.lock():
            return await self.database._blocking(self.restore_sync, engine)

    def restore_sync(self, engine: Engine) -> Release:
        """:meth:`restore`, on the calling thread (for a synchronous driver: the simulator)."""
        db = self.database
        for attempt in self._attempts():
            session = self._session(write=False, fence=None)
            engine.state = Transaction(db, session)
            try:
                return drive(engine.restore(), "restore")
            except Abort as abort:
                if not abort.retry or attempt == db.max_attempts:
                    raise abort.error.located(store=self.description, key=self.key) from abort
            finally:
                session.end()
        raise AssertionError("unreachable")

    async def run(self, groups: Sequence[KeyGroup]) -> list[GroupResult]:
        """Run a group as one transaction (see the module docstring).

        Raises:
            StoreError: the runtime must stop: another writer moved the machine's sequence
                number, the connection cannot be re-established, or a commit's outcome cannot
                be known. Nothing of the group is acknowledged.
        """
        ((_key, engine, inputs),) = groups
        async with self.database.lock():
            return [await self.database._blocking(self.run_sync, engine, inputs)]

    def run_sync(self, engine: Engine, inputs: Sequence[Submitted]) -> GroupResult:
        """:meth:`run`, on the calling thread (for a synchronous driver: the simulator, which
        can stop between the commit this makes and the dispatch the caller does next)."""
        db = self.database
        keyed = any(k is not None for _, k in inputs)
        committed_keys = engine.all_keys() if keyed else None
        retries: list[tuple[int, StoreError]] = []
        last: StoreError | None = None
        for attempt in self._attempts():
            session = self._session(write=True, fence=(self.key, engine.committed_seq))
            engine.state = Transaction(db, session)
            try:
                steps = [self._one(engine, session, input, key) for input, key in inputs]
                accepted = [s for s in steps if isinstance(s, Accepted)]
                if accepted:
                    new_keys = [(s.idempotency_key, s.seq, s.at, self._outcome(s))
                                for s in accepted if s.idempotency_key is not None]
                    firsts = [next(iter(d.values())) for d in (engine.idempotency,
                                                                 engine.messages) if d]
                    oldest = min((r.seq for r in firsts), default=None)
                    extra, token = db._bookkeeping(self.key, engine.committed_seq,
                                                   accepted[-1].seq, new_keys, oldest)
                    session.commit(extra, token)
                return GroupResult(list(steps), retries)
            except Abort as abort:
                engine.abandon(committed_keys if committed_keys is not None
                               else engine.all_keys())
                error = abort.error.located(store=self.description, key=self.key)
                if not abort.retry:
                    raise error from abort.error.__cause__
                retries.append((attempt, error))
                last = error
                if attempt < db.max_attempts:
                    time.sleep(self._backoff(attempt))
            finally:
                session.end()
        assert last is not None
        if isinstance(last, TransactionConflict):
            errors: list[Step | StoreError] = []
            for _ in inputs:
                gave_up = TransactionConflict(
                    f"gave up after {db.max_attempts} attempts: {last.message}",
                    store=self.description, key=self.key, attempts=db.max_attempts)
                gave_up.__cause__ = last.__cause__
                errors.append(gave_up)
            return GroupResult(errors, retries)
        raise StoreUnavailable(f"gave up after {db.max_attempts} attempts: {last.message}",
                               store=self.description, key=self.key) from last.__cause__

    def _one(self, engine: Engine, session: Session, input: Any, key: str | None) -> Step:
        session.mark()
        try:
            step = drive(engine.step(input, key), "stf")
        except _Suspended as e:
            error = TransitionFailed(f"stf suspended on {_describe(input)}: {e}")
            error.__cause__ = e
            step = Failed(input, error, reload=False)
        if session.aborted is not None:
            raise session.aborted  # an stf that caught it must not commit half a transaction
        if isinstance(step, Failed):
            session.undo()
        elif isinstance(step, Accepted):
            session.keep()
        return step

    def _outcome(self, step: Accepted) -> bytes | None:
        """The stored form of a keyed step's actions (None when they cannot be encoded: a
        duplicate is then answered without them)."""
        try:
            return self.codec.pack_outcome(step.actions)
        except (Unencodable, TypeError):
            return None

    def _session(self, *, write: bool, fence: tuple[str, int] | None) -> Session:
        session = Session(self.database, write=write, fence=fence, runtime=True)
        session.thread = threading.get_ident()
        return session

    def _attempts(self) -> range:
        return range(1, self.database.max_attempts + 1)

    def _backoff(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: exponential, capped, jittered so that two
        runtimes that collided do not collide again in step."""
        return min(0.005 * 2.0 ** (attempt - 1), 0.5) * (0.5 + self._rng.random())

    async def close(self) -> None:
        """Release the key and close the database."""
        try:
            await self.database.release(self.key)
        finally:
            await self.database.close()
