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

Keyed (one machine instance per key, ``Runtime(keyed=True, database=...)``): a group spanning
keys is still one transaction. Each key's inputs run on its own engine with a
:class:`~fasm.persistence.Transaction` whose ``machine_key`` is that key, all sharing the one
session; every key's sequence number is fenced (at begin, in key order, where the driver needs
it) and bumped, and its idempotency keys written, in that transaction; and each key's in-flight
mark (``<prefix>in_flight``) is set or cleared in it too, so that a start restores exactly the
keys with tracked actions in flight, each in its own read-only transaction, without reading the
others. The runtime takes one lock for all the keys of its machine
(``fasm:keys/<machine name>``), not one per key.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
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
from ..persistence._txn import Abort, Database, Session, Stmt, Transaction
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
from ._state_object import _in_flight_after

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
        key: the machine key, or None for a keyed runtime (many keys).
        database: where state lives.
        idempotency_window: at most how many submit keys are remembered (in memory and in the
            database; None: no count bound).
        idempotency_ttl: how long (seconds) a submit key is remembered (None: no time bound).
        seed: seeds the jitter of the retry backoff.
    """

    def __init__(self, machine: AnyMachine, *, key: str | None, database: Database,
                 idempotency_window: int | None, seed: int | None,
                 idempotency_ttl: float | None = None) -> None:
        self.machine = machine
        self.keyed = key is None
        self.key = key if key is not None else f"fasm:keys/{type(machine).machine_name}"
        """The one machine key, or for a keyed runtime the name of the lock that holds all the
        keys of the machine."""
        self.database = database
        self._marked: dict[str, bool] = {}  # keyed: each active key's in-flight mark as stored
        self._idempotency_window = idempotency_window
        self._idempotency_ttl = idempotency_ttl
        self.codec = Codec(type(machine))
        """Checks inputs and encodes the outcome of each keyed transition."""
        self._rng = random.Random(seed)

    @classmethod
    def checked(cls, machine: AnyMachine, *, key: str | None, database: Database,
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
        """The one key; keyed, the keys whose in-flight mark is set.

        Raises:
            StoreError: the database cannot be read.
        """
        if not self.keyed:
            return [self.key]
        async with self.database.lock():
            return await self.database._blocking(
                self._retried, self.database._keys_in_flight_sync, None)

    async def activate(self, key: str) -> Engine:
        """Read the machine's sequence number and keys (keyed: of ``key``, and its mark).

        Raises:
            StoreError: the database cannot be read.
        """
        assert self.keyed or key == self.key
        async with self.database.lock():
            seq, keys, marked = await self.database._blocking(
                self._retried, self.database._load_sync, key)
        engine = self._engine(seq, keys)
        if self.keyed:
            self._marked[key] = marked
        return engine

    async def activate_many(self, keys: Sequence[str]) -> dict[str, Engine | Exception]:
        """:meth:`activate` of each key (a key that cannot be loaded maps to its error)."""
        out: dict[str, Engine | Exception] = {}
        for key in keys:
            try:
                out[key] = await self.activate(key)
            except Exception as e:
                out[key] = e
        return out

    def passivate(self, key: str) -> None:
        """Forget the key's in-flight mark (read again when it is next activated)."""
        self._marked.pop(key, None)

    async def peek(self, key: str) -> Any:
        """Never called: a runtime with database= reads through the database."""
        raise DefinitionError("a runtime with database= has no state object to read: read "
                              "through rt.database.transaction(readonly=True)")

    def open_sync(self) -> Engine:
        """:meth:`open`, on the calling thread (for a synchronous driver: the simulator).
        Every later call on this host must come from the same thread, one at a time."""
        self.database._driver.open()
        self.database._driver.acquire(self.key)
        seq, keys, _ = self._retried(self.database._load_sync, self.key)
        return self._engine(seq, keys)

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

    def _retried(self, fn: Callable[..., _T], key: str | None) -> _T:
        """``fn(key)`` (or ``fn()``) on a fresh transaction, again after a retryable abort."""
        for attempt in self._attempts():
            try:
                return fn(key) if key is not None else fn()
            except Abort as abort:
                # Not again when the driver gave up (its reconnect budget is spent already).
                if not abort.retry or attempt == self.database.max_attempts:
                    raise abort.error.located(store=self.description,
                                              key=key) from abort.error
                time.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    async def restore(self, key: str, engine: Engine) -> Release:
        """Run restore of ``key`` in a read-only transaction.

        Raises:
            RestoreFailed: restore raised (a write included) or emitted an untracked action.
            StoreUnavailable: the database could not be read.
        """
        async with self.database.lock():
            return await self.database._blocking(self.restore_sync, engine, key)

    def restore_sync(self, engine: Engine, key: str | None = None) -> Release:
        """:meth:`restore` (of the one key by default), on the calling thread (for a
        synchronous driver: the simulator)."""
        db = self.database
        key = key if key is not None else self.key
        for attempt in self._attempts():
            session = self._session(write=False)
            engine.state = Transaction(db, session, key)
            try:
                return drive(engine.restore(), "restore")
            except Abort as abort:
                if not abort.retry or attempt == db.max_attempts:
                    raise abort.error.located(store=self.description, key=key) from abort
            finally:
                session.end()
        raise AssertionError("unreachable")

    async def run(self, groups: Sequence[KeyGroup]) -> list[GroupResult]:
        """Run a group (of one key, or keyed of several) as one transaction (see the module
        docstring).

        Raises:
            StoreError: the runtime must stop: another writer moved a machine's sequence
                number, the connection cannot be re-established, or a commit's outcome cannot
                be known. Nothing of the group is acknowledged.
        """
        async with self.database.lock():
            return await self.database._blocking(self.run_many_sync, groups)

    def run_sync(self, engine: Engine, inputs: Sequence[Submitted]) -> GroupResult:
        """:meth:`run` of the one key, on the calling thread (for a synchronous driver: the
        simulator, which can stop between the commit this makes and the dispatch the caller
        does next)."""
        return self.run_many_sync([(self.key, engine, inputs)])[0]

    def run_many_sync(self, groups: Sequence[KeyGroup]) -> list[GroupResult]:
        """:meth:`run`, on the calling thread."""
        db = self.database
        # What each engine knew before the group, to go back to if the transaction is lost.
        committed = [engine.all_keys() if any(k is not None for _, k in inputs) else None
                     for _, engine, inputs in groups]
        fences = sorted((key, engine.committed_seq) for key, engine, _ in groups)
        retries: list[tuple[int, StoreError]] = []
        last: StoreError | None = None
        where = groups[0][0] if len(groups) == 1 else None
        for attempt in self._attempts():
            session = self._session(write=True, fences=fences)
            try:
                results: list[list[Step | StoreError]] = []
                extra: list[Stmt] = []
                token: tuple[str, str] | None = None
                marks: list[tuple[str, bool]] = []
                for key, engine, inputs in groups:
                    engine.state = Transaction(db, session, key)
                    steps = [self._one(engine, session, input, idem) for input, idem in inputs]
                    results.append(list(steps))
                    accepted = [s for s in steps if isinstance(s, Accepted)]
                    if not accepted:
                        continue
                    new_keys = [(s.idempotency_key, s.seq, s.at, self._outcome(s))
                                for s in accepted if s.idempotency_key is not None]
                    firsts = [next(iter(d.values())) for d in (engine.idempotency,
                                                                 engine.messages) if d]
                    oldest = min((r.seq for r in firsts), default=None)
                    stmts, key_token = db._bookkeeping(key, engine.committed_seq,
                                                       accepted[-1].seq, new_keys, oldest)
                    extra += stmts
                    token = token or key_token
                    if self.keyed:
                        mark = _in_flight_after(engine, accepted)
                        if mark != self._marked.get(key, False):
                            extra.append(db._mark(key, mark))
                            marks.append((key, mark))
                if extra:
                    session.commit(extra, token)
                for key, mark in marks:
                    self._marked[key] = mark
                return [GroupResult(steps, retries) for steps in results]
            except Abort as abort:
                for (_, engine, _), keys in zip(groups, committed, strict=True):
                    engine.abandon(keys if keys is not None else engine.all_keys())
                error = abort.error.located(store=self.description, key=where)
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
            out: list[GroupResult] = []
            for key, _, inputs in groups:
                errors: list[Step | StoreError] = []
                for _ in inputs:
                    gave_up = TransactionConflict(
                        f"gave up after {db.max_attempts} attempts: {last.message}",
                        store=self.description, key=key, attempts=db.max_attempts)
                    gave_up.__cause__ = last.__cause__
                    errors.append(gave_up)
                out.append(GroupResult(errors, retries))
            return out
        raise StoreUnavailable(f"gave up after {db.max_attempts} attempts: {last.message}",
                               store=self.description, key=where) from last.__cause__

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

    def _session(self, *, write: bool, fences: Sequence[tuple[str, int]] = ()) -> Session:
        session = Session(self.database, write=write, fences=fences, runtime=True)
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
