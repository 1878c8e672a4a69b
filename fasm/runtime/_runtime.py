"""The Runtime: an anyio shell that performs what the engine decides, against real storage, real
executors and a real clock.

Where state lives is the host's business (:mod:`fasm.runtime._host`): a Python object written
through a store, or a database transaction. The loop here knows only the host's protocol."""

from __future__ import annotations

import contextvars
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, cast

import anyio
import anyio.abc
import pydantic
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._actions import Tracked, Untracked
from .._inputs import Input, Normal, TrackedActionCompleted
from .._machine import StateMachine, type_members
from .._timer import Timer, TimerFired
from ..errors import (
    DefinitionError,
    FasmError,
    InvalidInput,
    Overloaded,
    Rejected,
    RuntimeClosed,
    StoreCorrupt,
    StoreError,
)
from ..persistence._codec import Codec, Unencodable
from ..persistence._durability import Durability
from ..persistence._store import Store
from ..persistence._txn import Database
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
    _strict_adapter,
    input_kind,
)
from ._events import (
    ActionCompleted,
    ActionDispatched,
    ActionFailed,
    ActionRetried,
    ActionSlow,
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
    with_deadline,
)
from ._host import StateHost
from ._state_database import DatabaseHost
from ._state_object import ObjectHost
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


@dataclass(frozen=True, slots=True)
class Committed(Generic[TId, TA, U]):
    """The outcome of a submit: the transition is durable.

    Attributes:
        seq: the transition's sequence number.
        actions: the actions it emitted. For a duplicate, the actions of the transition that
            first used the key (they were released then and are not released again); empty when
            they are not known (a key a fasm before record format 3 wrote, or actions that could
            not be encoded).
        duplicate: true when the idempotency key had been committed before; nothing ran now.
    """

    seq: int
    actions: tuple[Tracked[TId, TA] | Untracked[U], ...] = ()
    duplicate: bool = False


@dataclass(eq=False, slots=True)
class _Submit:
    input: Input[Any, Any, Any]
    key: str | None
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: Committed[Any, Any, Any] | None = None
    error: BaseException | None = None
    # For listeners only (0 and None without them): when it was queued, the submitter's context.
    submitted_ns: int = 0
    context: contextvars.Context | None = None

    def answer(self, outcome: Committed[Any, Any, Any] | None, error: BaseException | None) -> None:
        self.outcome, self.error = outcome, error
        self.done.set()


@dataclass(eq=False, slots=True)
class _Call:
    """An executor call running now: reported slow at ``report_at`` (clock time)."""

    attempt: int
    started: float
    report_at: float


@dataclass(eq=False, slots=True)
class _Result:
    input: TrackedActionCompleted[Any, Any]
    key: None = None
    submitted_ns: int = 0  # for listeners only
    context: None = None


_Item = _Submit | _Result


@dataclass(eq=False, slots=True)
class _Read:
    fn: Callable[[Any], Any]
    done: anyio.Event = field(default_factory=anyio.Event)
    value: Any = None
    error: BaseException | None = None

    def run(self, state: Any) -> None:
        try:
            self.value = self.fn(state)
        except Exception as e:  # the reader's error, raised in the reader's task
            self.error = e
        self.done.set()

    def refuse(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


async def _timer_executor(clock: Clock, action: Timer) -> TimerFired:
    """The built-in timer executor. The runtime fires its timers from one heap instead
    (:class:`~fasm.runtime._dispatch.TimerHeap`); this runs only a ``Timer`` subclass."""
    await clock.sleep_until(action.at)
    return TimerFired(at=action.at, now=clock.now())


class Runtime(Generic[S, I, TId, TA, TR, U]):
    """Hosts one machine instance: owns its input queue, makes every committed transition durable
    before answering, dispatches tracked actions to executors and untracked ones to handlers, and
    feeds results back as inputs. On start it loads the state and calls ``restore``.

    Use it as ``async with Runtime(...) as rt: await rt.submit(value)``. Works on asyncio and trio.

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
            when needed, or a zero-argument factory).
        key: the machine key in the store or database.
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
        initial_state: S | Callable[[], S] | None = None,
        key: str = "default",
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
        self.key = key
        self.clock: Clock = clock if clock is not None else SystemClock()
        for name, value, low in (("queue_size", queue_size, 1), ("max_group", max_group, 1),
                                 ("max_in_flight", max_in_flight, 1)):
            if value < low:
                raise DefinitionError(f"{name} must be >= {low}, got {value}")
        if max_pending_actions is not None and max_pending_actions < 1:
            raise DefinitionError(f"max_pending_actions must be >= 1 or None, got "
                                  f"{max_pending_actions}")
        if admission_timeout is not None and admission_timeout < 0:
            raise DefinitionError(f"admission_timeout must be >= 0 or None, got "
                                  f"{admission_timeout}")
        self._max_pending = max_pending_actions
        self._cut_short_warned = -math.inf
        self._admission_timeout = admission_timeout
        # Tracked actions in flight (timers not counted), overall and by registered executor
        # class: kept here, not counted from the engine's table, so admission is O(1).
        self._pending_total = 0
        self._pending_by: dict[type[Any], int] = {}
        # Submits admitted and not yet answered: each may still emit actions, so each holds a
        # place under every limit until its transition's own actions are counted.
        self._admitted = 0
        self._room: anyio.Event | None = None  # set when in-flight work completes
        if handler_timeout <= 0 or shutdown_grace < 0:
            raise DefinitionError("handler_timeout must be > 0 and shutdown_grace >= 0")
        if slow_action_after is not None and not slow_action_after > 0:
            raise DefinitionError(f"slow_action_after must be > 0 or None, got {slow_action_after}")
        self._slow_action_after = slow_action_after
        self._queue_size = queue_size
        self._max_group = max_group
        self._handler_timeout = handler_timeout
        self.shutdown_grace = shutdown_grace
        self._listeners = tuple(listeners)
        self._machine_name: str = type(machine).machine_name
        self._rng = random.Random(seed)
        self._executors = self._check_executors(dict(executors or {}))
        self._handlers = self._check_handlers(dict(handlers or {}))
        self._result_adapter: StrictValidator | None = None
        self._engine: Engine | None = None
        self._status = "new"
        self._identity = ""  # the store's or database's identity, read at start
        self._failure: BaseException | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._work: anyio.abc.TaskGroup | None = None
        self._work_stop: anyio.Event | None = None  # made in __aenter__ (needs a loop)
        self._work_done: anyio.Event | None = None
        self._abandoned = False
        self._calls: dict[Any, _Call] = {}  # executor calls running now, by action id
        self._watch_wake: anyio.Event | None = None  # the slow watchdog waits for a first call
        self._watch_sleep: anyio.CancelScope | None = None  # ... or sleeps until _watch_due
        self._watch_due = math.inf
        self._send: MemoryObjectSendStream[_Item] | None = None
        self._receive: MemoryObjectReceiveStream[_Item] | None = None
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
        self._reads: list[_Read] = []
        self.store: Store | None = None
        """The store of a state-object runtime (None with ``database=``)."""
        self.durability: Durability | None = None
        self.database: Database | None = database
        """The database of a transactional runtime (None otherwise)."""
        self._host: StateHost
        if database is not None:
            self._host = DatabaseHost.checked(
                machine, key=key, database=database, idempotency_window=idempotency_window,
                idempotency_ttl=idempotency_ttl, seed=seed, initial_state=initial_state,
                store=store, durability=durability, rollback=rollback)
        else:
            if initial_state is None:
                raise DefinitionError(
                    "pass initial_state= (state kept as a Python object, made durable through "
                    "a store) or database= (state kept in a database)")
            host = ObjectHost(machine, key=key, initial_state=initial_state, store=store,
                              durability=durability, rollback=rollback or "trust-rejected",
                              idempotency_window=idempotency_window,
                              idempotency_ttl=idempotency_ttl)
            self.store, self.durability, self._host = host.store, host.durability, host

    # -- definition checks ----------------------------------------------------------------------

    def _check_executors(
        self, given: dict[type[Any], Executor[Any, Any] | ExecutorFn[Any, Any]]
    ) -> dict[type[Any], Executor[Any, Any]]:
        declared = [m for m in type_members(self.types.tracked_action) if isinstance(m, type)]
        table: dict[type[Any], Executor[Any, Any]] = {}
        for cls, spec in given.items():
            if not any(issubclass(m, cls) for m in declared):
                raise DefinitionError(
                    f"executor registered for {cls.__qualname__}, which is not in "
                    f"{type(self.machine).__qualname__}'s tracked-action type"
                )
            table[cls] = spec if isinstance(spec, Executor) else Executor(spec)
        self._builtin_timer: Executor[Any, Any] | None = None
        if Timer in declared and not any(issubclass(Timer, c) for c in table):
            clock = self.clock
            table[Timer] = self._builtin_timer = Executor(
                lambda a, _ctx: _timer_executor(clock, a))
        missing = [m.__qualname__ for m in declared if _lookup(table, m) is None]
        if missing:
            raise DefinitionError(
                f"no executor for tracked action type(s) {', '.join(missing)} of "
                f"{type(self.machine).__qualname__}: pass executors={{Type: fn}}"
            )
        return table

    def _check_handlers(self, given: dict[type[Any], Handler]) -> dict[type[Any], Handler]:
        declared = [m for m in type_members(self.types.untracked) if isinstance(m, type)]
        for cls in given:
            if not any(issubclass(m, cls) for m in declared):
                raise DefinitionError(
                    f"handler registered for {cls.__qualname__}, which is not in "
                    f"{type(self.machine).__qualname__}'s untracked-action type"
                )
        missing = [m.__qualname__ for m in declared if _lookup(given, m) is None]
        if missing:
            raise DefinitionError(
                f"no handler for untracked action type(s) {', '.join(missing)} of "
                f"{type(self.machine).__qualname__}: pass handlers={{Type: fn}}"
            )
        return given

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
        database through ``database.transaction(readonly=True)`` instead."""
        return cast(S, self._require_engine().state)

    async def read(self, fn: Callable[[S], R]) -> R:
        """Run ``fn`` on the state as of the last durable transition and return its result.

        This is how to serve reads: what ``fn`` sees has been committed, so a crash cannot undo
        it. When no group of inputs is waiting for its commit, ``fn`` runs at once; otherwise it
        runs as soon as that group is durable, before the next group starts, so reads never
        starve under load (a read waits at most for one commit). ``fn`` is synchronous and must
        not mutate the state or keep references into it; return plain values or copies.

        Args:
            fn: ``fn(state) -> value``, called once on the runtime's task.

        Returns:
            What ``fn`` returned.

        Raises:
            RuntimeClosed: the runtime was never started, or it failed (chained to the error
                that stopped it): its live state may then hold a group that was never
                committed. After a normal stop, reads still work.
            DefinitionError: the runtime keeps its state in a database (``database=``): read it
                through ``async with rt.database.transaction(readonly=True) as txn:``, which sees
                committed data only.
            Exception: whatever ``fn`` raised.
        """
        engine = self._require_engine()
        if self.database is not None:
            raise DefinitionError(
                "Runtime.read serves a state-object runtime; with database= read committed data "
                "through 'async with rt.database.transaction(readonly=True) as txn:'")
        if self._status == "failed":
            raise self._closed() from self._failure
        if not self._in_group:
            return fn(cast(S, engine.state))
        if self._driver_done is not None and self._driver_done.is_set():
            # Cancelled (a crash) between a group's stf and its commit: nothing durable to show.
            raise self._closed() from self._failure
        read = _Read(fn)
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
        """The sequence number of the last committed transition."""
        return self._require_engine().committed_seq

    @property
    def in_flight(self) -> dict[TId, TA]:
        """Tracked actions dispatched and not yet completed: id -> action (a copy)."""
        return {i: a.action for i, a in self._require_engine().in_flight.items()}

    @property
    def running(self) -> bool:
        """True between a successful start and the beginning of stop."""
        return self._status == "running"

    async def submit(
        self, value: I, *, idempotency_key: str | None = None,
        admission_timeout: float | None = None,
    ) -> Committed[TId, TA, U]:
        """Run ``value`` through the stf and return once the transition is durable.

        Transitions run one at a time, in the order submits entered the queue. Cancelling a
        submit that is already queued does not cancel its transition.

        Args:
            value: an input of the machine's declared input type.
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
                ``str`` or holds NUL. Nothing ran and the runtime goes on.
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
        engine = self._require_running()
        item = _Submit(self._checked(engine.validate(value)), _checked_key(idempotency_key))
        if self._listeners:
            item.submitted_ns = time.time_ns()
            item.context = contextvars.copy_context()  # O(1): contexts are immutable maps
        if self._full() is not None:
            # Admission comes before the queue: a waiting submit holds no queue slot, so the
            # results that make room never wait behind it.
            await self._admit(self._admission_timeout if admission_timeout is None
                              else admission_timeout)
        send = self._send
        assert send is not None
        self._admitted += 1
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
            self._admitted -= 1
            self._wake_room()
        if item.error is not None:
            raise item.error
        assert item.outcome is not None
        return cast(Committed[TId, TA, U], item.outcome)

    def _full(self) -> str | None:
        """The limit on in-flight tracked actions that is reached, or None.

        A submit cannot know which action types its transition will emit (the stf has not run),
        so it waits while *any* limit is reached: a per-executor limit exists to stop one slow
        provider's backlog from growing, and letting other inputs through could not promise
        that. Inputs that emit nothing wait too; that is the price of not guessing."""
        admitted = self._admitted
        if (self._max_pending is not None
                and self._pending_total + admitted >= self._max_pending):
            return "max_pending_actions"
        for cls, spec in self._executors.items():
            limit = spec.max_pending
            if limit is not None and self._pending_by.get(cls, 0) + admitted >= limit:
                return f"{cls.__qualname__}.max_pending"
        return None

    def _wake_room(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    async def _admit(self, timeout: float | None) -> None:  # noqa: ASYNC109 (clock time)
        """Wait until no limit on in-flight work is reached.

        Raises:
            Overloaded: still reached after ``timeout`` seconds (clock time).
            RuntimeClosed: the runtime stopped while waiting.
        """
        deadline = None if timeout is None or math.isinf(timeout) else self.clock.now() + timeout
        while (limit := self._full()) is not None:
            if self._status != "running":
                raise self._closed() from self._failure
            if deadline is not None and self.clock.now() >= deadline:
                raise Overloaded(
                    f"{self._pending_total} tracked action(s) in flight ({limit} reached) and "
                    f"no room within {timeout} s; nothing was queued: retry later",
                    pending=self._pending_total, limit=limit)
            self._room = room = self._room or anyio.Event()
            try:
                await with_deadline(self.clock, deadline, room.wait())
            except TimeoutError:
                continue  # the loop raises Overloaded, or admits if room was made meanwhile

    def _count(self, action: Any, delta: int) -> None:
        cls = type(action)
        if cls is Timer:
            return
        self._pending_total += delta
        key = _registered(self._executors, cls)
        if key is not None:
            self._pending_by[key] = self._pending_by.get(key, 0) + delta
        if delta < 0:
            self._wake_room()

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
        try:
            self._engine = await self._host.open()
            where: Any = self.store if self.store is not None else self.database
            identity = getattr(where, "identity", None)
            if not isinstance(identity, str) or not identity:
                raise DefinitionError(
                    f"{type(where).__qualname__} has no identity (got {identity!r}): a Store "
                    "gives a non-empty str made once with its data, the first part of every "
                    "executor idempotency key (see fasm.persistence.Store)")
            self._identity = identity
            release = await self._host.restore(self._engine)
        except BaseException:
            self._status = "stopped"
            with anyio.CancelScope(shield=True):
                await self._host.close()
            raise
        self._send, self._receive = anyio.create_memory_object_stream[_Item](self._queue_size)
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
        self._dispatch(release)
        log.info("runtime started", extra={"fasm_key": self.key, "fasm_seq": self.seq,
                                           "fasm_restored": len(release.tracked)})
        return self

    async def _host_work(self, ready: anyio.Event) -> None:
        """The task group of executors and handlers. It runs in a task of its own that no task
        group of the runtime waits for (see :func:`_spawn_detached`), so that a stop can abandon
        a call stuck where cancellation cannot reach it instead of waiting for it."""
        assert self._work_stop is not None and self._work_done is not None
        try:
            async with anyio.create_task_group() as work:
                self._work = work
                if self._slow_action_after is not None:
                    work.start_soon(self._guarded, self._watch_slow, self._slow_action_after)
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
        batch: list[_Item] = []
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
                self._notify_progress()
        except Exception as e:
            # A failure does not cancel the body of ``async with``: the runtime refuses input
            # from here on, wait_failed() reports it, and __aexit__ raises it.
            self._fail(e)
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

    async def _process(self, batch: list[_Item]) -> None:
        engine = self._require_engine()
        engine.now = self.clock.now()  # dates the group's idempotency keys (rule 6)
        try:
            result = await self._host.run(engine, [(item.input, item.key) for item in batch])
        except Exception as e:
            # Nothing of the group is acknowledged: the runtime stops (see _drive).
            error = e if isinstance(e, FasmError) else StoreError(
                f"store commit raised {e!r}", store=self._host.description, key=self.key)
            for item in batch:
                if isinstance(item, _Submit) and not item.done.is_set():
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
            culprit = engine.interrupted if _fatal(e) else None
            for item in batch:
                if isinstance(item, _Submit) and not item.done.is_set():
                    item.answer(None, e if item.input is culprit else closed)
            raise
        for attempt, retried in result.retries:
            self._emit(TransactionRetried(self.key, attempt, len(batch), retried))
        for event in result.events:
            self._emit(event)
        committed: list[tuple[_Item, Accepted]] = []
        emitted_by: dict[Any, int] | None = None
        for item, step in zip(batch, result.steps, strict=True):
            if isinstance(step, Accepted):
                committed.append((item, step))
            elif isinstance(step, Failed):
                self._rejected(item, step)
        if committed:
            in_flight = engine.in_flight
            done_actions = [in_flight[s.input.id].action for _, s in committed
                            if isinstance(s.input, TrackedActionCompleted)
                            and s.input.id in in_flight]
            release = engine.committed([s for _, s in committed])
            for action in done_actions:
                self._count(action, -1)
            if self._listeners:
                queued = self._queued()
                emitted_by = {}
                for item, step in committed:
                    done = (step.input.id if isinstance(step.input, TrackedActionCompleted)
                            else None)
                    self._emit(TransitionCommitted(
                        self.key, step.seq, input_kind(step.input), len(step.actions),
                        len(committed), done, self._machine_name, item.submitted_ns,
                        item.context, queued))
                    for action in step.actions:
                        if isinstance(action, Tracked):
                            emitted_by[action.id] = step.seq
            if engine.cut_short is not None:
                self._window_cut_short(engine)
            # The engine's order: commit, then dispatch, then answer the submitters.
            self._dispatch(release, emitted_by)
        for item, step in zip(batch, result.steps, strict=True):
            if isinstance(item, _Result):
                if isinstance(step, StoreError):
                    self._redeliver(item, step)
            elif isinstance(step, Accepted):
                item.answer(Committed(step.seq, step.actions), None)
            elif isinstance(step, Duplicate):
                self._answer_duplicate(item, step)
            elif isinstance(step, Failed):
                item.answer(None, step.error)
            else:
                item.answer(None, step)

    def _window_cut_short(self, engine: Engine) -> None:
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
                     count, age, engine.idempotency_ttl, extra={"fasm_key": self.key})

    def _answer_duplicate(self, item: _Item, step: Duplicate) -> None:
        """Answer a duplicate submit with the outcome of the transition that first used its key
        (decoded from the store's bytes the first time it is asked for after a restart)."""
        assert isinstance(item, _Submit)
        actions: tuple[Any, ...] | None = None
        if step.remembered is not None:
            try:
                actions = self._codec_().outcome(step.remembered)
            except StoreCorrupt as e:
                item.answer(None, e.located(store=self._host.description, key=self.key))
                return
        if self._listeners:
            self._emit(DuplicateSubmitted(self.key, step.seq, input_kind(item.input),
                                          self._machine_name, item.submitted_ns, item.context))
        item.answer(Committed(step.seq, actions or (), True), None)

    def _run_reads(self) -> None:
        """Answer the reads that waited for the group just committed (the live state is the
        durable one now)."""
        reads, self._reads = self._reads, []
        state = self._require_engine().state
        for read in reads:
            read.run(state)

    def _redeliver(self, item: _Result, error: StoreError) -> None:
        """A result the database kept refusing to commit (contention) goes back in the queue:
        it is still in flight, and dropping it would stall its action until a restart."""
        log.warning("result of tracked action %r not committed (%s); queued again",
                    item.input.id, error, extra={"fasm_key": self.key,
                                                 "fasm_action_id": item.input.id})
        assert self._work is not None
        self._work.start_soon(self._deliver, item.input.id, item.input.result)

    def _rejected(self, item: _Item, step: Failed) -> None:
        kind = input_kind(step.input)
        expected = isinstance(step.error, Rejected)
        if self._listeners:
            self._emit(TransitionRejected(
                self.key, kind, step.error, expected, self._machine_name, item.submitted_ns,
                item.context, item.input.id if isinstance(item, _Result) else None))
        extra = {"fasm_key": self.key, "fasm_input_kind": kind}
        if isinstance(item, _Result):
            # A result the stf refuses is dropped, never fatal. The id is no longer waited on
            # here; the state still says what is pending, so restore re-emits it on next start.
            engine = self._require_engine()
            forgotten = engine.in_flight.get(item.input.id)
            engine.forget(item.input.id)
            if forgotten is not None:
                self._count(forgotten.action, -1)
            log.error("stf refused the result of tracked action %r; dropped: %s", item.input.id,
                      step.error, extra={**extra, "fasm_action_id": item.input.id})
        elif expected:
            log.debug("input rejected: %s", step.error, extra=extra)
        else:
            log.warning("stf raised on %s: %r", kind, step.error.__cause__, extra=extra)

    def _fail(self, error: BaseException, batch: Sequence[_Item] = ()) -> None:
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
            if isinstance(item, _Submit) and not item.done.is_set():
                item.answer(None, closed)
        while True:
            try:
                item = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if isinstance(item, _Submit):
                item.answer(None, closed)
        self._receive.close()

    # -- actions --------------------------------------------------------------------------------

    def _dispatch(self, release: Release, emitted_by: dict[Any, int] | None = None) -> None:
        """Start the released actions; ``emitted_by`` maps a tracked action's id to the seq of
        the transition that emitted it (for listeners; None at restore)."""
        work = self._work
        assert work is not None
        if anyio.current_effective_deadline() == -math.inf:
            # The runtime is being cancelled (a crash), and its work runs in a task of its own
            # that the cancellation does not reach: start nothing more, as if the process died
            # here. The actions are in flight in the state, so restore re-emits them.
            return
        for action in release.already_in_flight:
            log.debug("tracked action %r already in flight; not dispatched again", action.id,
                      extra={"fasm_key": self.key, "fasm_action_id": action.id})
        dispatcher = self._dispatcher
        for tracked in release.tracked:
            action = tracked.action
            self._count(action, +1)
            if self._listeners:
                self._emit(ActionDispatched(
                    self.key, tracked.id, action, self._machine_name,
                    None if emitted_by is None else emitted_by.get(tracked.id)))
            if type(action) is Timer and self._builtin_timer is not None:
                self._timers.add(tracked.id, action.at)
            else:
                lane = _registered(self._executors, type(action))
                assert lane is not None  # every declared class has one (_check_executors)
                dispatcher.put(lane, tracked)
        dispatcher.pump()  # workers for what may run now; the rest waits as queue entries
        for seq, untracked in release.untracked:
            self._handlers_running += 1  # counted now: a stop must wait for it from here on
            work.start_soon(self._guarded, self._run_handler, seq, untracked)

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

    async def _perform(self, tracked: Tracked[Any, Any]) -> None:
        """One dispatched action, in a slot of its executor: its attempts, then its result."""
        spec = _lookup(self._executors, type(tracked.action))
        assert spec is not None
        result = await self._attempts(tracked, spec)
        await self._deliver(tracked.id, result)

    async def _fire_timer(self, action_id: Any, at: float) -> None:
        await self._deliver(action_id, TimerFired(at=at, now=self.clock.now()))

    async def _attempts(self, tracked: Tracked[Any, Any], spec: Executor[Any, Any]) -> Any:
        policy = spec.retry
        attempt = 0
        extra: dict[str, Any] = {"fasm_key": self.key, "fasm_action_id": tracked.id}
        while True:
            attempt += 1
            started_ns = time.time_ns() if self._listeners else 0
            deadline = None if policy.timeout is None else self.clock.now() + policy.timeout
            try:
                result = await self._attempt(tracked, spec, attempt, deadline)
                self._check_result(result)
            except Exception as e:
                if policy.max_attempts is not None and attempt >= policy.max_attempts:
                    assert spec.on_exhausted is not None
                    try:
                        result = spec.on_exhausted(tracked.action, e)
                        self._check_result(result)
                    except Exception as mapping_error:
                        log.error("on_exhausted for %r raised %r; retrying the action",
                                  tracked.id, mapping_error, extra=extra)
                    else:
                        log.warning("tracked action %r gave up after %d attempts: %r",
                                    tracked.id, attempt, e, extra=extra)
                        self._emit(ActionFailed(self.key, tracked.id, attempt, e, result,
                                                self._machine_name, started_ns))
                        return result
                delay = policy.delay(attempt, self._rng)
                # Proportionate: a WARNING for the first failure and at attempts 10, 100, 1000,
                # ... (an outage of a day logs a handful of lines), DEBUG otherwise; listeners
                # still get every ActionRetried.
                level = logging.WARNING if _loud_attempt(attempt) else logging.DEBUG
                log.log(level, "tracked action %r attempt %d failed: %r; retry in %.3fs",
                        tracked.id, attempt, e, delay, extra=extra)
                self._emit(ActionRetried(self.key, tracked.id, attempt, e, delay,
                                         self._machine_name, started_ns))
                await self.clock.sleep_until(self.clock.now() + delay)
                continue
            self._emit(ActionCompleted(self.key, tracked.id, attempt, self._machine_name,
                                       started_ns))
            return result

    async def _attempt(self, tracked: Tracked[Any, Any], spec: Executor[Any, Any], attempt: int,
                       deadline: float | None) -> Any:
        """One executor call, under its deadline, listed in ``_calls`` while it runs: for the
        slow watchdog, and so that a stop that abandons it can say which."""
        now = self.clock.now()
        after = None if type(tracked.action) is Timer else self._slow_action_after
        call = _Call(attempt, now, now + after if after is not None else math.inf)
        self._calls[tracked.id] = call
        if self._watch_wake is not None:
            self._watch_wake.set()
        elif call.report_at < self._watch_due and self._watch_sleep is not None:
            self._watch_sleep.cancel()
        try:
            result = await with_deadline(
                self.clock, deadline,
                spec.fn(tracked.action, self._context(tracked.id, attempt, deadline)))
        except Exception:
            # A call that ignored a stop's cancellation and ended late reports nothing more.
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise
        finally:
            del self._calls[tracked.id]
            if not self._calls and self._watch_sleep is not None:
                self._watch_sleep.cancel()  # nothing to watch: leave no deadline on the clock
        await anyio.lowlevel.checkpoint_if_cancelled()
        return result

    async def _watch_slow(self, after: float) -> None:
        """One task watches every running executor call: a call that has run ``after`` seconds
        (clock time) is reported (``_slow``), then again each time its running time doubles.
        It sleeps only while calls run, until the next report is due."""
        clock = self.clock
        while True:
            now = clock.now()
            for action_id, call in list(self._calls.items()):
                if call.report_at <= now:
                    self._slow(action_id, call.attempt, now - call.started)
                    while call.report_at <= now:
                        call.report_at = call.started + 2 * (call.report_at - call.started)
            due = min((call.report_at for call in self._calls.values()), default=math.inf)
            if due == math.inf:  # no calls, or only timers (not watched)
                self._watch_wake = wake = anyio.Event()
                await wake.wait()
                self._watch_wake = None
                continue
            self._watch_due = due
            with anyio.CancelScope() as self._watch_sleep:
                await clock.sleep_until(self._watch_due)
            self._watch_sleep, self._watch_due = None, math.inf

    def _slow(self, action_id: Any, attempt: int, elapsed: float) -> None:
        log.warning("tracked action %r attempt %d has been running for %.1fs (slow_action_after="
                    "%ss); it is not cancelled", action_id, attempt, elapsed,
                    self._slow_action_after, extra={"fasm_key": self.key,
                                                    "fasm_action_id": action_id})
        self._emit(ActionSlow(self.key, action_id, attempt, elapsed, self._machine_name))

    def _check_result(self, result: Any) -> None:
        """A result that does not validate field for field, or cannot be written as a record,
        fails its attempt (retried like an executor exception) instead of reaching the store."""
        if self._result_adapter is None:
            self._result_adapter = _strict_adapter(self.types.tracked_result)
        try:
            self._result_adapter.validate_python(result, strict=True)
        except pydantic.ValidationError as e:
            raise TypeError(
                f"executor returned {type(result).__qualname__}, not the machine's tracked "
                f"result type: {self._result_adapter.describe(e)}"
            ) from e
        try:
            self._codec_().pack("tracked_result", result)
        except Unencodable as e:
            raise TypeError(f"executor returned {type(result).__qualname__}, which cannot be "
                            f"committed: {e}") from e

    def _context(self, action_id: Any, attempt: int, deadline: float | None) -> ActionContext:
        return ActionContext(
            machine_key=self.key,
            action_id=action_id,
            idempotency_key=(f"{self._identity}/{type(self.machine).machine_name}/{self.key}/"
                             f"{action_id}"),
            attempt=attempt,
            deadline=deadline,
        )

    async def _deliver(self, action_id: Any, result: Any) -> None:
        assert self._send is not None
        try:
            await self._send.send(_Result(TrackedActionCompleted(action_id, result),
                                          submitted_ns=time.time_ns() if self._listeners else 0))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # Stopping: the result is not committed, so the state still says the action is
            # pending and restore re-emits it on the next start.
            log.info("result of %r arrived while stopping; restore will re-emit it", action_id,
                     extra={"fasm_key": self.key, "fasm_action_id": action_id})

    async def _run_handler(self, seq: int, untracked: Untracked[Any]) -> None:
        handler = _lookup(self._handlers, type(untracked.action))
        assert handler is not None
        extra = {"fasm_key": self.key, "fasm_seq": seq}
        try:
            await with_deadline(self.clock, self.clock.now() + self._handler_timeout,
                                 handler(untracked.action))
        except anyio.get_cancelled_exc_class():
            # Only a stop cancels handlers: after the grace period, or at once on a crash.
            log.warning("handler for %r (from transition %d) cancelled by stop",
                        untracked.action, seq, extra=extra)
            self._emit(HandlerFailed(self.key, seq, untracked.action,
                                     RuntimeClosed("handler cancelled by stop")))
            raise
        except Exception as e:
            log.error("handler for %r (from transition %d) failed: %r", untracked.action, seq, e,
                      extra=extra)
            self._emit(HandlerFailed(self.key, seq, untracked.action, e))
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
            if self._room is not None:  # submits waiting for room are refused now
                self._room.set()
                self._room = None
            await self._drain()
        self._end_work()
        if self._driver_done is not None:
            await self._driver_done.wait()
        await self._wait_work()

    def _end_work(self) -> None:
        """Cancel executors and handlers, and let the driver finish what is queued."""
        if self._room is not None:  # submits waiting for room see the runtime is closed
            self._room.set()
            self._room = None
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
        log.warning("stop abandoned %d executor call(s) (action ids %s) and %d handler(s) that did "
                    "not return within %.1fs of being cancelled (a blocking call in a worker "
                    "thread ignores cancellation); they may still be running. Their actions stay "
                    "in flight in the state: restore re-emits them on the next start",
                    len(self._calls), ", ".join(repr(i) for i in self._calls) or "none",
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
        engine = self._require_engine()
        while self._busy(engine, include_timers):
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

    def _busy(self, engine: Engine, include_timers: bool) -> bool:
        if self._queued() or self._handlers_running:
            return True
        return any(include_timers or type(a.action) is not Timer
                   for a in engine.in_flight.values())

    async def _drain(self) -> None:
        """Let queued inputs commit and in-flight actions finish, within the grace period."""
        engine = self._require_engine()
        with anyio.move_on_after(self.shutdown_grace):
            await self.wait_idle()
        left = [i for i, a in engine.in_flight.items() if type(a.action) is not Timer]
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

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeClosed("the runtime has not been started (use 'async with Runtime(...)')")
        return self._engine

    def _require_running(self) -> Engine:
        if self._status != "running":
            raise self._closed() from self._failure
        return self._require_engine()

    def _closed(self) -> RuntimeClosed:
        if self._failure is not None:
            return RuntimeClosed(f"the runtime stopped after a failure: {self._failure!r}")
        return RuntimeClosed(f"the runtime is {self._status}; it accepts no input")


def _checked_key(key: Any) -> str | None:
    """An idempotency key every store keeps as it was given: a ``str`` (an int key would be
    deduplicated within a run and forgotten after a restart) of valid Unicode without NUL
    (SQLite and PostgreSQL text cannot hold lone surrogates, PostgreSQL text no NUL; refused on
    every store alike, so behaviour does not depend on the backend).

    Raises:
        InvalidInput: the key is refused; nothing ran.
    """
    if key is None:
        return None
    if not isinstance(key, str):
        raise InvalidInput(f"idempotency_key must be a str, got {type(key).__qualname__}")
    if "\x00" in key:
        raise InvalidInput("idempotency_key cannot hold NUL ('\\x00')")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"idempotency_key is not valid Unicode (lone surrogate at "
                           f"index {e.start})") from e
    return key


def _loud_attempt(attempt: int) -> bool:
    """Whether a failed attempt is logged at WARNING: the first, then 10, 100, 1000, ..."""
    while attempt >= 10 and attempt % 10 == 0:
        attempt //= 10
    return attempt == 1


def _registered(table: Mapping[type[Any], Any], cls: type[Any]) -> type[Any] | None:
    """The class ``cls`` is registered under in ``table`` (itself or its nearest base)."""
    for c in cls.__mro__:
        if c in table:
            return c
    return None


def _lookup(table: Mapping[type[Any], Any], cls: type[Any]) -> Any:
    found = table.get(cls)
    if found is not None:
        return found
    for base in cls.__mro__[1:]:
        found = table.get(base)
        if found is not None:
            return found
    return None
