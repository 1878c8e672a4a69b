"""The Runtime: an anyio shell that performs what the engine decides, against real storage, real
executors and a real clock.

Where state lives is the host's business (:mod:`fasm.runtime._host`): a Python object written
through a store, or a database transaction. The loop here knows only the host's protocol."""

from __future__ import annotations

import contextvars
import inspect
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, cast

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._actions import Tracked, Untracked
from .._inputs import Normal, TrackedActionCompleted
from .._machine import StateMachine
from .._send import Delivered, Refused, Send, declares_send, message_key
from .._timer import Timer, TimerFired
from ..errors import (
    DefinitionError,
    FasmError,
    InvalidInput,
    Rejected,
    RuntimeClosed,
    StoreCorrupt,
    StoreError,
    TransitionFailed,
)
from ..persistence._codec import Codec, Unencodable
from ..persistence._durability import Durability
from ..persistence._store import Store
from ..persistence._txn import Database
from ._admission import Admission
from ._attempts import Attempts
from ._clock import Clock, SystemClock
from ._dispatch import Dispatcher, TimerHeap
from ._engine import (
    Accepted,
    Duplicate,
    Engine,
    Failed,
    Release,
    Rollback,
    StrictValidator,
    input_kind,
)
from ._events import (
    ActionDispatched,
    DuplicateSubmitted,
    HandlerFailed,
    Listener,
    RuntimeEvent,
    TransactionRetried,
    TransitionCommitted,
    TransitionRejected,
)
from ._executors import (
    ActionContext,
    Executor,
    ExecutorFn,
    Handler,
    HandlerContext,
    with_deadline,
)
from ._host import GroupResult, KeyGroup, StateHost
from ._registry import check_executors, check_handlers, lookup, registered
from ._state_database import DatabaseHost
from ._state_object import ObjectHost
from ._submits import Committed, Item, Read, Result, Submit, checked_key, checked_machine_key
from ._tasks import fatal as _fatal
from ._tasks import leaves as _leaves
from ._tasks import real_error as _real
from ._tasks import spawn_detached as _spawn_detached

__all__ = ("Committed", "Runtime")

log = logging.getLogger("fasm.runtime")

S = TypeVar("S")
I = TypeVar("I")
TId = TypeVar("TId")
TA = TypeVar("TA")
TR = TypeVar("TR")
U = TypeVar("U")
R = TypeVar("R")

_ABANDON_AFTER = 0.5
"""Seconds (real time) a stop waits for cancelled executors and handlers to return before it
abandons them. Cancelled work that responds is gone in microseconds; what is still running after
this is stuck where cancellation cannot reach it (a blocking call in a worker thread)."""


class Runtime(Generic[S, I, TId, TA, TR, U]):
    """Hosts a machine: owns its input queue, makes every committed transition durable before
    answering, dispatches tracked actions to executors and untracked ones to handlers, and feeds
    results back as inputs. On start it loads the state and calls ``restore``.

    Use it as ``async with Runtime(...) as rt: await rt.submit(value)``. Works on asyncio and trio.

    It hosts one machine instance (the key ``key``), or, with ``keyed=True``, one instance per
    key: ``await rt.submit(value, key="acct-42")`` runs the stf on that key's state, created
    from ``initial_state`` the first time the key is used (a factory then receives the key).
    Each key's inputs run in submit order; a group of inputs of many keys is committed in one
    atomic store write (:meth:`~fasm.persistence.Store.commit_many`). A key is loaded (activated)
    on its first input or read and evicted (passivated) when idle once more than ``max_active``
    are active, so memory follows the active set, not the number of keys stored; a key with
    tracked actions in flight stays active until they complete. On start, every key the store
    marks as having actions in flight is loaded and restored; the others stay in the store. A
    stf sends an input to another key with the tracked action :class:`~fasm.Send`, delivered
    effectively once (see docs/08_keyed.md). A single-instance runtime is the same machinery
    with one key.

    State lives in one of two ways. Either it is a Python object, made durable through a store
    (``initial_state=``, optionally ``store=`` and ``durability=``); or it is a database
    transaction the stf reads and writes through (``database=``, a
    :class:`~fasm.persistence.SQLiteDatabase` or :class:`~fasm.persistence.PostgresDatabase`):
    each group of inputs is one transaction, each input undone alone when it fails, committed
    once, and ``restore`` reads in a read-only transaction. Give exactly one of
    ``initial_state`` and ``database``.

    Args:
        machine: the machine instance.
        initial_state: the state of a machine the store has never seen (a value, deep-copied
            when needed, or a factory: of no arguments, or with ``keyed=True`` of the key).
        key: the machine key in the store or database (not with ``keyed=True``).
        keyed: host one instance per key (see above); submits and reads then name the key.
            With ``database=``, each stf gets a ``Transaction`` whose ``machine_key`` is the
            input's key, and a group spanning keys is one database transaction.
        max_active: with ``keyed=True``, how many instances stay loaded while idle; the least
            recently used idle ones beyond it are evicted after each group. Keys with tracked
            actions in flight are never evicted, so the active set may exceed it while more
            keys than this have work in flight.
        store: where state is kept (default: a fresh :class:`~fasm.persistence.MemoryStore`).
            The runtime opens it on start and closes it on stop.
        durability: :class:`~fasm.persistence.Journal` (default) or
            :class:`~fasm.persistence.Snapshot`.
        database: keep state in this database instead (the machine's state type must be
            :class:`~fasm.persistence.Transaction`). The runtime opens it on start and closes it
            on stop.
        executors: tracked-action class -> ``Executor`` or ``async fn(action, ctx)``. Every class
            in the machine's tracked-action type needs one (``Timer`` has a built-in one).
        handlers: untracked-action class -> ``async fn(action)``. Every class in the machine's
            untracked type needs one.
        clock: time for timers, retry backoff and timeouts (default :class:`SystemClock`).
        queue_size: pending submits before ``submit`` waits (backpressure).
        max_group: most transitions committed in one store write (group commit).
        max_in_flight: most executor calls running at once (timers are not counted).
        max_pending_actions: most tracked actions in flight (emitted and committed, not yet
            completed: running, waiting for a slot, or retrying; timers are not counted) before
            new submits wait for room: backpressure on acknowledged-but-unfinished work. Results
            never wait for it. None: no limit. Restore re-emits every pending action whatever
            the limit; submits then wait until the backlog is below it.
        admission_timeout: seconds (clock time) a submit waits for room under
            ``max_pending_actions`` (or an executor's ``max_pending``) before it raises
            :class:`~fasm.errors.Overloaded`; None waits as long as it takes, 0 refuses at once.
        handler_timeout: seconds (clock time) a handler may run before it is cancelled.
        shutdown_grace: seconds (real time) that stop waits for in-flight work before cancelling
            it. Stop returns within about ``shutdown_grace`` plus half a second (and the time to
            commit what is queued): executor calls that do not respond to the cancellation (a
            blocking call in a worker thread) are abandoned, logged, and left running.
        slow_action_after: seconds (clock time) after which an executor attempt that has not
            returned is reported as slow (an ``ActionSlow`` event and a WARNING log), then again
            each time its running time doubles; None turns it off. It only reports: attempts
            have no default timeout (see ``RetryPolicy.timeout``).
        rollback: how a failed stf is undone: ``"trust-rejected"`` (default for a state
            object: a :class:`~fasm.errors.Rejected` is trusted to be raised before any
            mutation and costs nothing; anything else reloads the committed state),
            ``"reload"``, ``"copy"`` or ``"trust"`` (see docs/runtime.md and
            :mod:`fasm.runtime._engine`). With ``database=`` it is ``"trust"``: the database
            rolls the input back to its savepoint.
        idempotency_ttl: seconds (clock time) a submit idempotency key is remembered after its
            commit, durably, across restarts: a retry with the same key within that time is
            answered with the original outcome and runs nothing (None: no time bound). The
            default is ten minutes; see docs/06_web_service.md for what a retry window costs.
        idempotency_window: at most how many keys are remembered (None: no count bound); when
            more keys than this are committed within ``idempotency_ttl``, the oldest are
            forgotten early. It bounds the memory and checkpoint size the keys take.
        listeners: callables receiving every :mod:`runtime event <fasm.runtime>`.
        seed: seeds the retry jitter (None: from the OS).

    Raises:
        DefinitionError: a tracked or untracked action class has no executor or handler, an
            executor is registered for a class the machine does not declare, an option is out
            of range, both or neither of ``initial_state`` and ``database`` are given, or
            ``database=`` comes with ``store``, ``durability``, a rollback other than
            ``"trust"``, or a machine whose state type is not ``Transaction``.
    """

    def __init__(
        self,
        machine: StateMachine[S, I, TId, TA, TR, U],
        *,
        initial_state: S | Callable[[], S] | Callable[[str], S] | None = None,
        key: str = "default",
        keyed: bool = False,
        max_active: int = 10_000,
        store: Store | None = None,
        durability: Durability | None = None,
        database: Database | None = None,
        executors: Mapping[type[Any], Executor[Any, Any] | ExecutorFn[Any, Any]] | None = None,
        handlers: Mapping[type[Any], Handler] | None = None,
        clock: Clock | None = None,
        queue_size: int = 1024,
        max_group: int = 256,
        max_in_flight: int = 1000,
        max_pending_actions: int | None = 10_000,
        admission_timeout: float | None = None,
        handler_timeout: float = 30.0,
        shutdown_grace: float = 5.0,
        slow_action_after: float | None = 60.0,
        rollback: Rollback | None = None,
        idempotency_ttl: float | None = 600.0,
        idempotency_window: int | None = 100_000,
        listeners: Sequence[Listener] = (),
        seed: int | None = None,
    ) -> None:
        self.machine = machine
        self.types = type(machine).machine_types()
        self.keyed = keyed
        self.key: str | None = None if keyed else key
        """The machine key of a single-instance runtime (None when ``keyed``)."""
        if keyed and key != "default":
            raise DefinitionError("key= names the one key of a single-instance runtime; a keyed "
                                  "runtime's submits name their key (submit(value, key=...))")
        self.clock: Clock = clock if clock is not None else SystemClock()
        for name, value, low in (("queue_size", queue_size, 1), ("max_group", max_group, 1),
                                 ("max_in_flight", max_in_flight, 1),
                                 ("max_active", max_active, 1)):
            if value < low:
                raise DefinitionError(f"{name} must be >= {low}, got {value}")
        if max_pending_actions is not None and max_pending_actions < 1:
            raise DefinitionError(f"max_pending_actions must be >= 1 or None, got "
                                  f"{max_pending_actions}")
        if admission_timeout is not None and admission_timeout < 0:
            raise DefinitionError(f"admission_timeout must be >= 0 or None, got "
                                  f"{admission_timeout}")
        self._cut_short_warned = -math.inf
        if handler_timeout <= 0 or shutdown_grace < 0:
            raise DefinitionError("handler_timeout must be > 0 and shutdown_grace >= 0")
        if slow_action_after is not None and not slow_action_after > 0:
            raise DefinitionError(f"slow_action_after must be > 0 or None, got {slow_action_after}")
        self._queue_size = queue_size
        self._max_group = max_group
        self._handler_timeout = handler_timeout
        self.shutdown_grace = shutdown_grace
        self._listeners = tuple(listeners)
        self._machine_name: str = type(machine).machine_name
        self._max_active = max_active
        name = type(machine).__qualname__
        given = dict(executors or {})
        if declares_send(self.types.tracked_action) and not any(
                issubclass(Send, c) for c in given):
            # Messages between keys: the built-in executor submits to the receiving key.
            given[Send] = Executor(self._send_message, concurrency=256)
        self._executors, self._builtin_timer = check_executors(
            name, self.types.tracked_action, given, self.clock)
        self._handlers = check_handlers(name, self.types.untracked, dict(handlers or {}))
        self._handler_takes_ctx = {cls: _takes_context(fn) for cls, fn in self._handlers.items()}
        self._validator: StrictValidator | None = None
        self._attempts = Attempts(
            self.clock, machine_name=self._machine_name,
            slow_action_after=slow_action_after, rng=random.Random(seed), emit=self._emit,
            timed=bool(self._listeners), result_type=self.types.tracked_result,
            codec=self._codec_)
        self._admission = Admission(self.clock, self._executors, max_pending=max_pending_actions,
                                    timeout=admission_timeout)
        # The active instances, least recently used first: key -> engine.
        self._active: OrderedDict[str, Engine] = OrderedDict()
        self._started = False
        self._status = "new"
        self._failure: BaseException | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._work: anyio.abc.TaskGroup | None = None
        self._work_stop: anyio.Event | None = None  # made in __aenter__ (needs a loop)
        self._work_done: anyio.Event | None = None
        self._abandoned = False
        self._send: MemoryObjectSendStream[Item] | None = None
        self._receive: MemoryObjectReceiveStream[Item] | None = None
        # Tracked actions wait for their executor as queue entries, not tasks (_dispatch.py).
        # Timers are not counted against max_in_flight; the built-in ones are not queued at all
        # but kept in one heap.
        self._dispatcher = Dispatcher(
            {cls: (math.inf if cls is Timer else spec.concurrency, cls is not Timer)
             for cls, spec in self._executors.items()},
            max_in_flight=max_in_flight, run=self._perform, spawn=self._spawn_work)
        self._timers = TimerHeap(self.clock, fire=self._fire_timer, spawn=self._spawn_work)
        self._progress: anyio.Event | None = None
        self._handlers_running = 0
        self._driver_done: anyio.Event | None = None
        # Reads wait while a group is between its stf and its commit (the live state is then
        # ahead of the durable one); the driver runs them as soon as the group is durable.
        self._in_group = False
        self._reads: list[Read] = []
        self.store: Store | None = None
        """The store of a state-object runtime (None with ``database=``)."""
        self.durability: Durability | None = None
        self.database: Database | None = database
        """The database of a transactional runtime (None otherwise)."""
        self._host: StateHost
        if database is not None:
            self._host = DatabaseHost.checked(
                machine, key=self.key, database=database, idempotency_window=idempotency_window,
                idempotency_ttl=idempotency_ttl, seed=seed, initial_state=initial_state,
                store=store, durability=durability, rollback=rollback)
        else:
            if initial_state is None:
                raise DefinitionError(
                    "pass initial_state= (state kept as a Python object, made durable through "
                    "a store) or database= (state kept in a database)")
            host = ObjectHost(machine, key=self.key, initial_state=initial_state, store=store,
                              durability=durability, rollback=rollback or "trust-rejected",
                              idempotency_window=idempotency_window,
                              idempotency_ttl=idempotency_ttl)
            self.store, self.durability, self._host = host.store, host.durability, host

    # -- public surface -------------------------------------------------------------------------

    @property
    def state(self) -> S:
        """The live state: the last *accepted* transition's, which may not be durable yet.

        While a group of inputs waits for its commit, ``state`` already shows their changes; if
        the commit then fails (or the process dies) those changes never happened, and whoever
        read them saw something that was undone. To answer anyone outside the process (an HTTP
        GET, a report), use :meth:`read`, which sees only durable transitions. ``state`` is for
        tests, debugging, and code that runs after the runtime stopped.

        Read it; never mutate it. Read it again after every await rather than keeping a
        reference: a rollback that reloads (``"reload"``, or ``"trust-rejected"`` after an
        error that is not a ``Rejected``) replaces the state object with the reloaded one.
        With ``database=`` it is the transaction of the last group, already ended: read the
        database through ``database.transaction(readonly=True)`` instead.

        Raises:
            DefinitionError: the runtime is keyed (use :meth:`read` with ``key=``)."""
        return cast(S, self._require_engine().state)

    async def read(self, fn: Callable[[S], R], *, key: str | None = None) -> R:
        """Run ``fn`` on the state as of the last durable transition and return its result.

        This is how to serve reads: what ``fn`` sees has been committed, so a crash cannot undo
        it. When no group of inputs is waiting for its commit, ``fn`` runs at once; otherwise it
        runs as soon as that group is durable, before the next group starts, so reads never
        starve under load (a read waits at most for one commit). ``fn`` is synchronous and must
        not mutate the state or keep references into it; return plain values or copies.

        In a keyed runtime, ``key`` names the instance; one that is not active is read from the
        store without being activated (a key never used reads as its initial state).

        Args:
            fn: ``fn(state) -> value``, called once on the runtime's task.
            key: the machine key (required when the runtime is keyed; otherwise its one key).

        Returns:
            What ``fn`` returned.

        Raises:
            RuntimeClosed: the runtime was never started, or it failed (chained to the error
                that stopped it): its live state may then hold a group that was never
                committed. After a normal stop, reads still work.
            DefinitionError: the runtime keeps its state in a database (``database=``): read it
                through ``async with rt.database.transaction(readonly=True) as txn:``, which sees
                committed data only.
            InvalidInput: ``key`` is not a valid machine key, or names another key than a
                single-instance runtime's.
            StoreError: an inactive key could not be read from the store.
            Exception: whatever ``fn`` raised.
        """
        target = self._target(key)
        if not self._started:
            raise RuntimeClosed("the runtime has not been started (use 'async with Runtime(...)')")
        if self.database is not None:
            raise DefinitionError(
                "Runtime.read serves a state-object runtime; with database= read committed data "
                "through 'async with rt.database.transaction(readonly=True) as txn:'")
        if self._status == "failed":
            raise self._closed() from self._failure
        engine = self._active.get(target)
        if engine is None:
            # Idle: what the store holds is committed (a key is evicted only between groups).
            return fn(cast(S, await self._host.peek(target)))
        if not self._in_group:
            return fn(cast(S, engine.state))
        if self._driver_done is not None and self._driver_done.is_set():
            # Cancelled (a crash) between a group's stf and its commit: nothing durable to show.
            raise self._closed() from self._failure
        read = Read(fn, target)
        self._reads.append(read)
        await read.done.wait()
        if read.error is not None:
            raise read.error
        return cast(R, read.value)

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the runtime (a store that cannot commit, a bug in the
        runtime), or None while it is healthy or after a normal stop."""
        return self._failure

    async def wait_failed(self) -> BaseException | None:
        """Return the error that stopped the runtime as soon as it fails, or None once it has
        stopped normally (so a task watching it never outlives it).

        A failure does not cancel the body of ``async with runtime``: the runtime refuses input
        from then on (submits raise :class:`RuntimeClosed` chained to the error) and the error is
        raised when the block is left. Run this in a task to learn of the failure at once and
        end the block (a web service stops its server; see :mod:`fasm.web`).

        Raises:
            RuntimeClosed: the runtime has not been started.
        """
        if self._driver_done is None:
            raise RuntimeClosed("the runtime has not been started (use 'async with Runtime(...)')")
        await self._driver_done.wait()
        return self._failure

    @property
    def seq(self) -> int:
        """The sequence number of the last committed transition (single-instance runtime)."""
        return self._require_engine().committed_seq

    @property
    def in_flight(self) -> dict[TId, TA]:
        """Tracked actions dispatched and not yet completed: id -> action (a copy; of the one
        key of a single-instance runtime, see :attr:`in_flight_by_key` for a keyed one)."""
        return {i: a.action for i, a in self._require_engine().in_flight.items()}

    @property
    def in_flight_by_key(self) -> dict[str, dict[TId, TA]]:
        """Tracked actions dispatched and not yet completed, per key that has any: key ->
        id -> action (a copy). Keys with actions in flight are always active, so this is
        complete."""
        if not self._started:
            raise RuntimeClosed("the runtime has not been started (use 'async with Runtime(...)')")
        return {k: {i: a.action for i, a in e.in_flight.items()}
                for k, e in self._active.items() if e.in_flight}

    @property
    def active_keys(self) -> int:
        """How many instances are loaded now (at most ``max_active`` plus those with work in
        flight, after each group)."""
        return len(self._active)

    @property
    def running(self) -> bool:
        """True between a successful start and the beginning of stop."""
        return self._status == "running"

    async def submit(
        self, value: I, *, key: str | None = None, idempotency_key: str | None = None,
        admission_timeout: float | None = None,
    ) -> Committed[TId, TA, U]:
        """Run ``value`` through the stf and return once the transition is durable.

        Transitions of a key run one at a time, in the order submits entered the queue.
        Cancelling a submit that is already queued does not cancel its transition.

        Args:
            value: an input of the machine's declared input type.
            key: the machine key (required when the runtime is keyed; otherwise its one key).
            idempotency_key: when given, a transition already committed with this key is not run
                again: the submit returns its outcome with ``duplicate=True``.
            admission_timeout: overrides the runtime's ``admission_timeout`` for this submit
                (``math.inf`` waits as long as it takes).

        Returns:
            The committed outcome.

        Raises:
            InvalidInput: ``value`` is not of the declared input type, field for field, or it
                or the key cannot be written as a record (a lone surrogate, an int outside
                msgpack's 64 bits, an arbitrary object in an ``Any`` field), or the key is not a
                ``str`` or holds NUL, or ``key`` is missing or not a valid machine key. Nothing
                ran and the runtime goes on.
            Rejected: the stf refused the input (state unchanged).
            TransitionFailed: the stf raised something else, or (under ``Snapshot``) left a state
                that cannot be encoded, the message naming the field (state unchanged).
            RuntimeClosed: the runtime is not running (chained to the store error that stopped
                it, if one did).
            Overloaded: too many tracked actions are in flight and no room was made within
                ``admission_timeout``; nothing was queued.
            StoreError: the commit could not be made durable; the runtime stops.
            SystemExit, KeyboardInterrupt: raised by the stf on this input, as themselves (the
                transition may be half done: nothing of its group is committed, and the runtime
                stops as if the process had been killed).
        """
        self._check_open()
        target = self._target(key)
        item = Submit(self._checked(self._validate(value)), checked_key(idempotency_key), target)
        if self._listeners:
            item.submitted_ns = time.time_ns()
            item.context = contextvars.copy_context()  # O(1): contexts are immutable maps
        admission = self._admission
        if admission.full() is not None:
            # Admission comes before the queue: a waiting submit holds no queue slot, so the
            # results that make room never wait behind it.
            await admission.admit(admission.timeout if admission_timeout is None
                                  else admission_timeout, self._check_open)
        send = self._send
        assert send is not None
        admission.admitted += 1
        try:
            try:
                try:
                    send.send_nowait(item)  # the common case: room in the queue, no extra yield
                except anyio.WouldBlock:
                    await send.send(item)  # backpressure: wait for room
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                raise self._closed() from self._failure
            await item.done.wait()
        finally:
            # Answered: the actions it emitted are counted (dispatch comes before the answer).
            admission.admitted -= 1
            admission.wake()
        if item.error is not None:
            raise item.error
        assert item.outcome is not None
        return cast(Committed[TId, TA, U], item.outcome)

    def _target(self, key: str | None) -> str:
        """The machine key a submit or read is for.

        Raises:
            InvalidInput: it is missing in a keyed runtime, not valid, or another key than a
                single-instance runtime's.
        """
        if self.key is not None:
            if key is not None and key != self.key:
                raise InvalidInput(f"this runtime hosts the single key {self.key!r}, not "
                                   f"{key!r}: make it with keyed=True to host many")
            return self.key
        if key is None:
            raise InvalidInput("a keyed runtime needs the machine key: submit(value, key=...)")
        return checked_machine_key(key)

    def _validate(self, value: Any) -> Any:
        """``value`` checked against the machine's input type (strictly: no coercion).

        Raises:
            InvalidInput: it is not of that type.
        """
        if self._validator is None:
            self._validator = Engine.validator(self.machine)
        return Engine.validated(self._validator, self.machine, value)

    def _checked(self, value: Any) -> Normal[Any]:
        """The input, with its record bytes made now: one that cannot be written is refused
        here, alone, instead of failing its whole group's commit later. The journal reuses the
        bytes, so the check costs nothing extra there."""
        codec = self._codec_()
        try:
            packed = codec.pack("input", value)
        except (Unencodable, TypeError) as e:
            raise InvalidInput(
                f"{type(value).__qualname__} cannot be committed for "
                f"{type(self.machine).__qualname__}: {e}") from e
        normal = Normal(value)
        object.__setattr__(normal, "_packed", packed)  # frozen: set once, before it is shared
        return normal

    def _codec_(self) -> Codec:
        return self._host.codec  # one codec per runtime: what submit packs, the host writes

    # -- start ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._status != "new":
            raise RuntimeClosed("a Runtime starts once; make a new one to start again")
        self._status = "starting"
        restored: list[tuple[str, Release]] = []
        try:
            await self._host.open()
            where: Any = self.store if self.store is not None else self.database
            identity = getattr(where, "identity", None)
            if not isinstance(identity, str) or not identity:
                raise DefinitionError(
                    f"{type(where).__qualname__} has no identity (got {identity!r}): a Store "
                    "gives a non-empty str made once with its data, the first part of every "
                    "executor idempotency key (see fasm.persistence.Store)")
            self._attempts.identity = identity
            for key in await self._host.keys_to_restore():
                engine = await self._host.activate(key)
                self._active[key] = engine
                restored.append((key, await self._host.restore(key, engine)))
        except BaseException:
            self._status = "stopped"
            with anyio.CancelScope(shield=True):
                await self._host.close()
            raise
        self._send, self._receive = anyio.create_memory_object_stream[Item](self._queue_size)
        self._work_stop = anyio.Event()
        self._work_done = anyio.Event()
        self._driver_done = anyio.Event()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            ready = anyio.Event()
            _spawn_detached(self._host_work, ready)
            await ready.wait()
            self._tg.start_soon(self._drive)
        except BaseException as e:
            self._end_work()  # the detached work task must not outlive a failed start
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(type(e), e, e.__traceback__)
            raise
        self._status = "running"
        self._started = True
        for key, release in restored:
            self._dispatch(key, release)
        count = sum(len(release.tracked) for _, release in restored)
        if self.key is not None:
            log.info("runtime started", extra={"fasm_key": self.key, "fasm_seq": self.seq,
                                               "fasm_restored": count})
        else:
            log.info("keyed runtime started: %d key(s) with actions in flight restored",
                     len(restored), extra={"fasm_restored": count})
        return self

    async def _host_work(self, ready: anyio.Event) -> None:
        """The task group of executors and handlers. It runs in a task of its own that no task
        group of the runtime waits for (see :func:`_spawn_detached`), so that a stop can abandon
        a call stuck where cancellation cannot reach it instead of waiting for it."""
        assert self._work_stop is not None and self._work_done is not None
        try:
            async with anyio.create_task_group() as work:
                self._work = work
                after = self._attempts.slow_action_after
                if after is not None:
                    work.start_soon(self._guarded, self._attempts.watch_slow, after)
                ready.set()
                await self._work_stop.wait()
                work.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as e:
            # A bug in the runtime's own work code: stop as a crash, and raise it from the
            # ``async with`` (this task belongs to no task group that would).
            self._crash(_real(e))
        finally:
            ready.set()
            self._work_done.set()

    # -- the loop -------------------------------------------------------------------------------

    async def _drive(self) -> None:
        assert self._receive is not None
        receive = self._receive
        max_group = self._max_group
        batch: list[Item] = []
        try:
            while True:
                try:
                    first = await receive.receive()
                except anyio.EndOfStream:
                    return
                batch = [first]
                while len(batch) < max_group:
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                self._in_group = True
                await self._process(batch)
                self._in_group = False
                self._run_reads()
                self._passivate()
                self._notify_progress()
        except Exception as e:
            # A failure does not cancel the body of ``async with``: the runtime refuses input
            # from here on, wait_failed() reports it, and __aexit__ raises it. Submitters of the
            # batch not answered yet (a key's load raised something unexpected) are told too.
            self._fail(e, batch)
            self._end_work()
        except BaseException as e:
            self._fail(e, batch)
            if _fatal(e):
                # Raised out of this task, a SystemExit or KeyboardInterrupt would stop asyncio's
                # event loop itself; the runtime crashes instead and __aexit__ raises it.
                self._crash(e)
                return
            raise
        finally:
            if self._progress is not None:
                self._progress.set()
            if self._driver_done is not None:
                self._driver_done.set()

    async def _process(self, batch: list[Item]) -> None:
        """One group: the batch's inputs, per key in queue order, through their engines and
        into one store write; then dispatch, then answers."""
        by_key: dict[str, list[Item]] = {}
        for item in batch:
            by_key.setdefault(item.target, []).append(item)
        now = self.clock.now()  # dates the group's idempotency keys (rule 6)
        groups: list[KeyGroup] = []
        members: list[list[Item]] = []
        active = self._active
        missing = [key for key in by_key if key not in active]
        # The idle keys of the group are read from the store in one call, not one by one.
        loaded = await self._host.activate_many(missing) if len(missing) > 1 else {}
        for key, items in by_key.items():
            engine = active.get(key)
            if engine is not None:
                active.move_to_end(key)
            else:
                engine = await self._activated(key, items, loaded.get(key))
                if engine is None:
                    continue
            engine.now = now
            groups.append((key, engine, [(item.input, item.key) for item in items]))
            members.append(items)
        if not groups:
            return
        try:
            results = await self._host.run(groups)
        except Exception as e:
            # Nothing of the group is acknowledged: the runtime stops (see _drive).
            error = e if isinstance(e, FasmError) else StoreError(
                f"store commit raised {e!r}", store=self._host.description,
                key=groups[0][0] if len(groups) == 1 else None)
            for item in batch:
                if isinstance(item, Submit) and not item.done.is_set():
                    item.answer(None, error)
            if error is e:
                raise
            raise error from e
        except BaseException as e:
            # Not a store failure: a SystemExit or KeyboardInterrupt (the stf's, when the engine
            # names the input it interrupted), or a cancellation (a crash). Nothing of the group
            # is acknowledged; it goes on as itself, to the submitter whose stf raised it too.
            closed = RuntimeClosed(f"the runtime stopped after {e!r}; nothing of this group of "
                                   "transitions was committed")
            closed.__cause__ = e
            culprits = [engine.interrupted for _, engine, _ in groups] if _fatal(e) else []
            for item in batch:
                if isinstance(item, Submit) and not item.done.is_set():
                    item.answer(None, e if any(item.input is c for c in culprits) else closed)
            raise
        group_size = sum(sum(isinstance(st, Accepted) for st in r.steps) for r in results)
        for (key, engine, _), items, result in zip(groups, members, results, strict=True):
            self._committed(key, engine, items, result, group_size)

    async def _activated(self, key: str, items: list[Item],
                         loaded: Engine | Exception | None) -> Engine | None:
        """The engine of ``key``, which is not active: ``loaded`` (the engine, or the error
        loading it, when the group's idle keys were loaded together), or loaded from the store
        now; it becomes the most recently used. None when it cannot be loaded: its items are
        answered with the error and the other keys of the group go on."""
        try:
            try:
                if isinstance(loaded, Exception):
                    raise loaded
                engine = loaded if loaded is not None else await self._host.activate(key)
            except FasmError:
                raise
            except Exception as e:
                raise StoreError(f"loading key {key!r} raised {e!r}",
                                 store=self._host.description, key=key) from e
        except FasmError as e:
            log.error("key %r could not be loaded: %r; its inputs are refused", key, e,
                      extra={"fasm_key": key})
            for item in items:
                if isinstance(item, Submit):
                    item.answer(None, e)
            return None
        self._active[key] = engine
        return engine

    def _committed(self, key: str, engine: Engine, items: list[Item], result: GroupResult,
                   group_size: int) -> None:
        """After the group's write: release and dispatch what ``key``'s transitions emitted,
        then answer its submitters."""
        for attempt, retried in result.retries:
            self._emit(TransactionRetried(key, attempt, len(items), retried))
        for event in result.events:
            self._emit(event)
        committed: list[tuple[Item, Accepted]] = []
        emitted_by: dict[Any, int] | None = None
        for item, step in zip(items, result.steps, strict=True):
            if isinstance(step, Accepted):
                committed.append((item, step))
            elif isinstance(step, Failed):
                self._rejected(key, engine, item, step)
        if committed:
            in_flight = engine.in_flight
            done_actions = [in_flight[s.input.id].action for _, s in committed
                            if isinstance(s.input, TrackedActionCompleted)
                            and s.input.id in in_flight]
            release = engine.committed([s for _, s in committed])
            for action in done_actions:
                self._admission.count(action, -1)
            if self._listeners:
                queued = self._queued()
                emitted_by = {}
                for item, step in committed:
                    done = (step.input.id if isinstance(step.input, TrackedActionCompleted)
                            else None)
                    self._emit(TransitionCommitted(
                        key, step.seq, input_kind(step.input), len(step.actions),
                        group_size, done, self._machine_name, item.submitted_ns,
                        item.context, queued))
                    for action in step.actions:
                        if isinstance(action, Tracked):
                            emitted_by[action.id] = step.seq
            if engine.cut_short is not None:
                self._window_cut_short(key, engine)
            # The engine's order: commit, then dispatch, then answer the submitters.
            self._dispatch(key, release, emitted_by)
        for item, step in zip(items, result.steps, strict=True):
            if isinstance(item, Result):
                if isinstance(step, StoreError):
                    self._redeliver(item, step)
            elif isinstance(step, Accepted):
                item.answer(Committed(step.seq, step.actions), None)
            elif isinstance(step, Duplicate):
                self._answer_duplicate(key, item, step)
            elif isinstance(step, Failed):
                item.answer(None, step.error)
            else:
                item.answer(None, step)

    def _passivate(self) -> None:
        """Evict the least recently used idle instances beyond ``max_active`` (a key with
        tracked actions in flight, timers included, is kept: its results must find it). Keys
        kept are moved to the recent end, so each pass looks at each key at most once."""
        active = self._active
        excess = len(active) - self._max_active
        if excess <= 0 or self.key is not None:
            return
        for _ in range(len(active)):
            if excess <= 0:
                break
            key, engine = next(iter(active.items()))
            if engine.in_flight or engine.pending:
                active.move_to_end(key)
                continue
            del active[key]
            self._host.passivate(key)
            excess -= 1

    def _window_cut_short(self, key: str, engine: Engine) -> None:
        """Warn (at most once a minute) that ``idempotency_window`` forgot keys before their
        ``idempotency_ttl``: retries of those are no longer recognized."""
        assert engine.cut_short is not None
        now = self.clock.now()
        if now - self._cut_short_warned < 60.0:
            return
        count, age = engine.cut_short
        engine.cut_short = None
        self._cut_short_warned = now
        log.warning("idempotency_window (%d keys) forgot %d key(s) %.1f s after their commit, "
                     "before idempotency_ttl (%.0f s): a retry of those would run again; raise "
                     "idempotency_window or lower idempotency_ttl", engine.idempotency_window,
                     count, age, engine.idempotency_ttl, extra={"fasm_key": key})

    def _answer_duplicate(self, key: str, item: Item, step: Duplicate) -> None:
        """Answer a duplicate submit with the outcome of the transition that first used its key
        (decoded from the store's bytes the first time it is asked for after a restart)."""
        assert isinstance(item, Submit)
        actions: tuple[Any, ...] | None = None
        if step.remembered is not None:
            try:
                actions = self._codec_().outcome(step.remembered)
            except StoreCorrupt as e:
                item.answer(None, e.located(store=self._host.description, key=key))
                return
        if self._listeners:
            self._emit(DuplicateSubmitted(key, step.seq, input_kind(item.input),
                                          self._machine_name, item.submitted_ns, item.context))
        item.answer(Committed(step.seq, actions or (), True), None)

    def _run_reads(self) -> None:
        """Answer the reads that waited for the group just committed (the live state is the
        durable one now)."""
        reads, self._reads = self._reads, []
        for read in reads:
            read.run(self._active[read.target].state)

    def _redeliver(self, item: Result, error: StoreError) -> None:
        """A result the database kept refusing to commit (contention) goes back in the queue:
        it is still in flight, and dropping it would stall its action until a restart."""
        log.warning("result of tracked action %r not committed (%s); queued again",
                    item.input.id, error, extra={"fasm_key": item.target,
                                                 "fasm_action_id": item.input.id})
        assert self._work is not None
        self._work.start_soon(self._deliver, item.target, item.input.id, item.input.result)

    def _rejected(self, key: str, engine: Engine, item: Item, step: Failed) -> None:
        kind = input_kind(step.input)
        expected = isinstance(step.error, Rejected)
        if self._listeners:
            self._emit(TransitionRejected(
                key, kind, step.error, expected, self._machine_name, item.submitted_ns,
                item.context, item.input.id if isinstance(item, Result) else None))
        extra = {"fasm_key": key, "fasm_input_kind": kind}
        if isinstance(item, Result):
            # A result the stf refuses is dropped, never fatal. The id is no longer waited on
            # here; the state still says what is pending, so restore re-emits it on next start.
            forgotten = engine.in_flight.get(item.input.id)
            engine.forget(item.input.id)
            if forgotten is not None:
                self._admission.count(forgotten.action, -1)
            log.error("stf refused the result of tracked action %r; dropped: %s", item.input.id,
                      step.error, extra={**extra, "fasm_action_id": item.input.id})
        elif expected:
            log.debug("input rejected: %s", step.error, extra=extra)
        else:
            log.warning("stf raised on %s: %r", kind, step.error.__cause__, extra=extra)

    def _fail(self, error: BaseException, batch: Sequence[Item] = ()) -> None:
        """The driver is leaving abnormally: answer everyone still queued or in the ``batch``
        it was on (committed or not, unacknowledged), refuse new input."""
        if not isinstance(error, anyio.get_cancelled_exc_class()) and self._failure is None:
            self._failure = error
            self._status = "failed"
            log.error("runtime stopped by %r; it accepts no more input", error,
                      extra={"fasm_key": self.key})
        elif self._status == "running":
            self._status = "stopping"
        self._end_work()  # cancel executors and handlers now, as a crash would
        closed = self._closed()
        closed.__cause__ = self._failure
        # Reads still queued waited for a group whose commit never finished.
        reads, self._reads = self._reads, []
        for read in reads:
            read.refuse(closed)
        assert self._receive is not None
        for item in batch:
            if isinstance(item, Submit) and not item.done.is_set():
                item.answer(None, closed)
        while True:
            try:
                item = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if isinstance(item, Submit):
                item.answer(None, closed)
        self._receive.close()

    # -- actions --------------------------------------------------------------------------------

    def _dispatch(self, key: str, release: Release,
                  emitted_by: dict[Any, int] | None = None) -> None:
        """Start the actions ``key`` released; ``emitted_by`` maps a tracked action's id to the
        seq of the transition that emitted it (for listeners; None at restore)."""
        if not (release.tracked or release.untracked or release.already_in_flight):
            return  # most transitions release nothing: skip the checks below
        work = self._work
        assert work is not None
        if anyio.current_effective_deadline() == -math.inf:
            # The runtime is being cancelled (a crash), and its work runs in a task of its own
            # that the cancellation does not reach: start nothing more, as if the process died
            # here. The actions are in flight in the state, so restore re-emits them.
            return
        for action in release.already_in_flight:
            log.debug("tracked action %r already in flight; not dispatched again", action.id,
                      extra={"fasm_key": key, "fasm_action_id": action.id})
        dispatcher = self._dispatcher
        for tracked in release.tracked:
            action = tracked.action
            self._admission.count(action, +1)
            if self._listeners:
                self._emit(ActionDispatched(
                    key, tracked.id, action, self._machine_name,
                    None if emitted_by is None else emitted_by.get(tracked.id)))
            if type(action) is Timer and self._builtin_timer is not None:
                self._timers.add((key, tracked.id), action.at)
            else:
                lane = registered(self._executors, type(action))
                assert lane is not None  # every declared class has one (check_executors)
                dispatcher.put(lane, (key, tracked))
        dispatcher.pump()  # workers for what may run now; the rest waits as queue entries
        for seq, untracked in release.untracked:
            self._handlers_running += 1  # counted now: a stop must wait for it from here on
            work.start_soon(self._guarded, self._run_handler, key, seq, untracked)

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run an executor's or handler's task. A SystemExit or KeyboardInterrupt from user code
        crashes the runtime like one from an stf (raised out of the task, it would stop
        asyncio's event loop itself); ``async with`` raises it."""
        try:
            await fn(*args)
        except BaseException as e:
            if not _fatal(e):
                raise
            self._crash(_real(e))

    def _spawn_work(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start a task of the dispatcher or the timer heap among the executors' work."""
        assert self._work is not None
        self._work.start_soon(self._guarded, fn, *args)

    async def _perform(self, entry: tuple[str, Tracked[Any, Any]]) -> None:
        """One dispatched action, in a slot of its executor: its attempts, then its result."""
        key, tracked = entry
        spec = lookup(self._executors, type(tracked.action))
        assert spec is not None
        result = await self._attempts.run(key, tracked, spec)
        await self._deliver(key, tracked.id, result)

    async def _fire_timer(self, ident: tuple[str, Any], at: float) -> None:
        await self._deliver(ident[0], ident[1], TimerFired(at=at, now=self.clock.now()))

    async def _deliver(self, key: str, action_id: Any, result: Any) -> None:
        assert self._send is not None
        try:
            await self._send.send(Result(TrackedActionCompleted(action_id, result), key,
                                          submitted_ns=time.time_ns() if self._listeners else 0))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # Stopping: the result is not committed, so the state still says the action is
            # pending and restore re-emits it on the next start.
            log.info("result of %r arrived while stopping; restore will re-emit it", action_id,
                     extra={"fasm_key": key, "fasm_action_id": action_id})

    async def _send_message(self, send: Send[Any], ctx: ActionContext) -> Delivered | Refused:
        """The built-in executor of :class:`~fasm.Send`: submit the input to the receiving key
        with the message's idempotency key, and wait until that transition is durable. A resend
        (after a crash of either side) is answered as a duplicate by the receiver, so the
        message is applied once. It bypasses admission (``max_pending_actions``): the send is
        itself a pending action, and room is made only when such sends complete."""
        try:
            target = self._target(send.to)
            normal = self._checked(self._validate(send.input))
        except InvalidInput as e:
            return Refused(send.to, str(e))
        item = Submit(normal, message_key(self._machine_name, ctx.machine_key, ctx.action_id),
                      target)
        if self._status not in ("running", "stopping"):  # a stop's drain still delivers
            raise self._closed() from self._failure
        assert self._send is not None
        try:
            await self._send.send(item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._closed() from self._failure
        await item.done.wait()
        if isinstance(item.error, Rejected | TransitionFailed | InvalidInput):
            return Refused(send.to, str(item.error))
        if item.error is not None:
            raise item.error  # the runtime is stopping: retried, or re-sent after restart
        assert item.outcome is not None
        return Delivered(send.to, item.outcome.seq, item.outcome.duplicate)

    async def _run_handler(self, key: str, seq: int, untracked: Untracked[Any]) -> None:
        cls = registered(self._handlers, type(untracked.action))
        assert cls is not None
        handler: Any = self._handlers[cls]
        extra = {"fasm_key": key, "fasm_seq": seq}
        call = (handler(untracked.action, HandlerContext(key, seq))
                if self._handler_takes_ctx[cls] else handler(untracked.action))
        try:
            await with_deadline(self.clock, self.clock.now() + self._handler_timeout, call)
        except anyio.get_cancelled_exc_class():
            # Only a stop cancels handlers: after the grace period, or at once on a crash.
            log.warning("handler for %r (from transition %d) cancelled by stop",
                        untracked.action, seq, extra=extra)
            self._emit(HandlerFailed(key, seq, untracked.action,
                                     RuntimeClosed("handler cancelled by stop")))
            raise
        except Exception as e:
            log.error("handler for %r (from transition %d) failed: %r", untracked.action, seq, e,
                      extra=extra)
            self._emit(HandlerFailed(key, seq, untracked.action, e))
        finally:
            self._handlers_running -= 1
            self._notify_progress()

    def _emit(self, event: RuntimeEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("listener %r raised on %r", listener, event,
                              extra={"fasm_key": self.key})

    # -- stop -----------------------------------------------------------------------------------

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        tg = self._tg
        try:
            if exc is None and self._status in ("running", "stopping"):
                await self.stop()
            else:
                if self._status == "running":
                    self._status = "stopping"
                tg.cancel_scope.cancel()
                self._end_work()
            try:
                swallowed = await tg.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                raise self._unwrap(group) from None
            finally:
                await self._wait_work()
            # ``swallowed``: the body was cancelled by the runtime's own crash (see _crash).
            if self._failure is not None and (exc is None or swallowed):
                raise self._failure
        finally:
            if self._status != "failed":
                self._status = "stopped"
            for stream in (self._send, self._receive):
                if stream is not None:
                    stream.close()
            with anyio.CancelScope(shield=True):
                await self._host.close()

    async def stop(self) -> None:
        """Stop gracefully: refuse new input, let queued transitions commit and in-flight
        executors finish within ``shutdown_grace`` seconds, cancel what is left (restore
        re-emits it on the next start), and wait until the last queued input is committed.

        It returns within about ``shutdown_grace`` plus half a second, and the time to commit
        what is queued: an executor call or handler that does not return within half a second
        of being cancelled (a blocking call in a worker thread ignores cancellation) is
        abandoned and logged. It may still be running, in its thread; its action stays in
        flight in the state, so restore re-emits it on the next start, and a result it returns
        now is not committed.

        Leaving the ``async with`` block calls it; call it earlier to stop from inside. The store
        is closed when the block is left.
        """
        if self._status == "running":
            self._status = "stopping"
            self._admission.wake()  # submits waiting for room are refused now
            await self._drain()
        self._end_work()
        if self._driver_done is not None:
            await self._driver_done.wait()
        await self._wait_work()

    def _end_work(self) -> None:
        """Cancel executors and handlers, and let the driver finish what is queued."""
        self._admission.wake()  # submits waiting for room see the runtime is closed
        self._dispatcher.close()
        self._timers.close()
        if self._work_stop is not None:
            self._work_stop.set()
        if self._send is not None:
            self._send.close()

    async def _wait_work(self) -> None:
        """After ``_end_work``: give cancelled executors and handlers ``_ABANDON_AFTER`` seconds
        to return, then abandon what is left (it runs in a task nothing waits for)."""
        done = self._work_done
        if done is None or done.is_set() or self._abandoned:
            return
        with anyio.move_on_after(_ABANDON_AFTER, shield=True):
            await done.wait()
        if done.is_set():
            return
        self._abandoned = True
        calls = self._attempts.calls
        log.warning("stop abandoned %d executor call(s) (action ids %s) and %d handler(s) that did "
                    "not return within %.1fs of being cancelled (a blocking call in a worker "
                    "thread ignores cancellation); they may still be running. Their actions stay "
                    "in flight in the state: restore re-emits them on the next start",
                    len(calls), ", ".join(repr(i) for i in calls) or "none",
                    self._handlers_running, _ABANDON_AFTER, extra={"fasm_key": self.key})

    def _crash(self, error: BaseException) -> None:
        """Stop as if the process had been killed: a SystemExit or KeyboardInterrupt from user
        code (a transition may be half done, an executor is being told to exit), or a bug in the
        runtime's work. Nothing more is committed or acknowledged, executors and handlers are
        cancelled at once, the ``async with`` body is cancelled, and leaving it raises
        ``error``."""
        if self._status == "stopped":
            log.error("%r raised after the runtime stopped", error, extra={"fasm_key": self.key})
            return
        if self._failure is None:
            self._failure = error
            self._status = "failed"
            log.error("runtime stopped by %r; it accepts no more input", error,
                      extra={"fasm_key": self.key})
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        self._end_work()

    async def wait_idle(self, *, include_timers: bool = False) -> None:
        """Return once no input is queued, no tracked action is in flight (timers are not
        waited for unless ``include_timers``) and no handler is running. For tests, demos and
        orderly hand-overs; a graceful stop waits the same way, up to ``shutdown_grace``.

        Raises:
            RuntimeClosed: the runtime stopped while waiting.
        """
        self._require_started()
        while self._busy(include_timers):
            if self._status not in ("running", "stopping"):
                raise self._closed() from self._failure
            self._progress = event = self._progress or anyio.Event()
            await event.wait()
        if self._status == "failed":
            raise self._closed() from self._failure

    def _notify_progress(self) -> None:
        """Wake whoever waits in wait_idle (after a batch, or when a handler ends)."""
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def _busy(self, include_timers: bool) -> bool:
        if self._queued() or self._handlers_running:
            return True
        return any(include_timers or type(a.action) is not Timer
                   for engine in self._active.values() for a in engine.in_flight.values())

    async def _drain(self) -> None:
        """Let queued inputs commit and in-flight actions finish, within the grace period."""
        with anyio.move_on_after(self.shutdown_grace):
            await self.wait_idle()
        left = [i for engine in self._active.values() for i, a in engine.in_flight.items()
                if type(a.action) is not Timer]
        if left:
            log.info("stopping with %d tracked action(s) in flight; restore re-emits them",
                     len(left), extra={"fasm_key": self.key})
        if self._handlers_running:
            log.warning("stopping with %d handler(s) still running after the grace period; "
                        "they are cancelled", self._handlers_running, extra={"fasm_key": self.key})

    def _queued(self) -> int:
        return self._receive.statistics().current_buffer_used if self._receive else 0

    def _unwrap(self, group: BaseExceptionGroup[BaseException]) -> BaseException:
        cancelled = anyio.get_cancelled_exc_class()
        real = [e for e in _leaves(group) if not isinstance(e, cancelled)]
        if self._failure is not None and any(e is self._failure for e in real):
            return self._failure
        return real[0] if len(real) == 1 else group

    # -- helpers --------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeClosed("the runtime has not been started (use 'async with Runtime(...)')")

    def _require_engine(self) -> Engine:
        """The engine of a single-instance runtime's one key."""
        if self.key is None:
            raise DefinitionError("a keyed runtime has one state per key: read one with "
                                  "'await rt.read(fn, key=...)'")
        self._require_started()
        return self._active[self.key]

    def _check_open(self) -> None:
        if self._status != "running":
            raise self._closed() from self._failure

    def _closed(self) -> RuntimeClosed:
        if self._failure is not None:
            return RuntimeClosed(f"the runtime stopped after a failure: {self._failure!r}")
        return RuntimeClosed(f"the runtime is {self._status}; it accepts no input")


def _takes_context(handler: Any) -> bool:
    """Whether a handler takes a second positional argument (the :class:`HandlerContext`)."""
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: called with the action alone
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)
