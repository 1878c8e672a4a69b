"""What a simulation is configured with: the fault plan, the checks, and simulated executors.

Every value here is a frozen dataclass, so one configuration can be shared by many seeds and
printed in a report.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeAlias, TypeVar

from .._machine import type_members
from .._timer import Timer
from ..errors import DefinitionError
from ..runtime._executors import ActionContext, RetryPolicy

__all__ = (
    "CRASH_POINTS",
    "Checks",
    "CrashPoint",
    "ExecutorSpec",
    "FaultPlan",
    "SimExecutor",
    "Weighted",
)

A = TypeVar("A")
R = TypeVar("R")

CrashPoint: TypeAlias = Literal["before-commit", "after-commit", "in-flight", "result-uncommitted"]
"""Where a simulated process may die, named after the durability boundary it sits on:

* ``before-commit``: inputs were accepted by the stf, the store write has not happened;
* ``after-commit``: the store write returned, nothing was dispatched or answered yet;
* ``in-flight``: between transitions while tracked actions are being executed;
* ``result-uncommitted``: a tracked action's result was accepted but not yet committed.
"""

CRASH_POINTS: tuple[CrashPoint, ...] = (
    "before-commit", "after-commit", "in-flight", "result-uncommitted")


def _check_range(name: str, pair: tuple[float, float]) -> None:
    lo, hi = pair
    if not 0 <= lo <= hi:
        raise DefinitionError(f"{name} must be (low, high) with 0 <= low <= high, got {pair!r}")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What goes wrong, and how time passes, in a simulated run. Every choice is made by the
    seeded RNG, so a plan plus a seed is one exact run.

    Probabilities are per opportunity: ``crash`` is tried at each durability boundary the run
    passes (see :data:`CrashPoint`), ``fail`` and ``timeout`` at each executor attempt.

    Args:
        crash: chance of a crash at each boundary listed in ``crash_points``.
        crash_points: the boundaries where crashes may happen.
        store_failure: chance that a store commit fails (``StoreUnavailable``); the Runtime stops
            on that, so the simulated process restarts.
        fail: chance that an executor attempt raises (retried per the executor's policy).
        timeout: chance that an attempt hangs until its timeout (the executor policy's
            ``timeout``, else ``hang`` seconds), then counts as failed.
        duplicate: chance that a result is delivered a second time (at-least-once delivery).
        late: chance that a result being computed when the process crashed still arrives after
            the restart. Both are off by default: the fasm Runtime runs executors in its own
            process, so neither happens there. Turn them on when results reach your machine some
            other way (webhooks, queues, several processes).
        keyed: chance that a submit carries an idempotency key. After a crash, a client resends
            every keyed submit it got no answer for; and ``resubmit`` is the chance that it
            resends one it did get an answer for (a lost reply), which must not run twice.
        resubmit: see ``keyed``.
        latency: (low, high) simulated seconds an executor attempt takes.
        input_interval: (low, high) simulated seconds between two inputs.
        restart_delay: (low, high) simulated seconds a crashed process takes to come back.
        hang: how long a timed-out attempt hangs when its executor has no timeout.
        max_batch: most queued inputs the simulated runtime takes in one group commit.
        busy: chance that, with inputs queued, the simulated runtime lets one more event happen
            before it takes them, so that several share one commit (group commit) as under load.
    """

    crash: float = 0.02
    crash_points: tuple[CrashPoint, ...] = CRASH_POINTS
    store_failure: float = 0.005
    fail: float = 0.05
    timeout: float = 0.02
    duplicate: float = 0.0
    late: float = 0.0
    keyed: float = 0.2
    resubmit: float = 0.05
    latency: tuple[float, float] = (0.001, 2.0)
    input_interval: tuple[float, float] = (0.0, 1.0)
    restart_delay: tuple[float, float] = (0.0, 5.0)
    hang: float = 30.0
    max_batch: int = 4
    busy: float = 0.3

    def __post_init__(self) -> None:
        for name in ("crash", "store_failure", "fail", "timeout", "duplicate", "late", "keyed",
                     "resubmit", "busy"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise DefinitionError(f"FaultPlan.{name} is a probability, got {p!r}")
        for point in self.crash_points:
            if point not in CRASH_POINTS:
                raise DefinitionError(f"unknown crash point {point!r}; known: {CRASH_POINTS}")
        for name in ("latency", "input_interval", "restart_delay"):
            _check_range(f"FaultPlan.{name}", getattr(self, name))
        if self.hang <= 0 or self.max_batch < 1:
            raise DefinitionError("FaultPlan.hang must be > 0 and max_batch >= 1")

    @classmethod
    def none(cls) -> FaultPlan:
        """No faults at all: no crashes, no failures, no timeouts, one input per commit. Time
        still passes and executors still finish in a seed-chosen order."""
        return cls(crash=0.0, store_failure=0.0, fail=0.0, timeout=0.0, keyed=0.0,
                   resubmit=0.0, max_batch=1, busy=0.0)

    @classmethod
    def at_least_once(cls) -> FaultPlan:
        """The default faults plus duplicated results and results arriving after a crash: for
        machines whose results can be delivered more than once."""
        return cls(duplicate=0.05, late=0.3)

    @property
    def quiet(self) -> FaultPlan:
        """This plan with every fault switched off (used for the liveness phase)."""
        return FaultPlan(crash=0.0, crash_points=self.crash_points, store_failure=0.0, fail=0.0,
                         timeout=0.0, duplicate=0.0, late=0.0, keyed=0.0, resubmit=0.0,
                         latency=self.latency, input_interval=self.input_interval,
                         restart_delay=self.restart_delay, hang=self.hang,
                         max_batch=self.max_batch, busy=self.busy)


@dataclass(frozen=True, slots=True)
class Checks:
    """Which checks run after every step. The user's invariants are always cheap to turn on;
    the framework's own checks cost extra work per step (the benchmark prints how much).

    Attributes:
        invariants: the user's invariants, after every accepted transition and every restart.
        atomicity: after a refused input, state equals the state before it (an stf that mutates
            and then raises is reported even though the Runtime's rollback would hide it).
        determinism: the transition re-run on a decoded copy of the pre-state (the state a
            restarted process would load, with sets iterating in another order) gives equal state
            and equal actions, or raises the same way.
        restore: after every restart, and on the committed state after every store write,
            ``restore`` emits exactly the tracked actions emitted, committed and not completed.
        absorbed: a result for a pending tracked action is accepted and changes state.
        duplicates: a result for an action that is not pending (completed already, or never
            emitted) is refused or changes nothing.
        liveness: at the end, with faults off and the clock run forward, every tracked action
            committed and not completed at that point completes (by the store's record, not by
            what ``restore`` re-emitted), within 50 failed attempts in a row of one action and
            20,000 events ("work never finishes" otherwise); and ``restore`` on the final state
            re-emits nothing whose result was committed.
        idempotency: a resent submit whose key was committed is answered as a duplicate.
        errors: an stf raises only :class:`~fasm.Rejected` (or subclasses); anything else is a
            bug, not a refusal.
        ids: a tracked action is emitted with an id that is already in flight (the Runtime
            would silently not dispatch it): reported at that step as an id collision.
        encodable: after every accepted transition, the state encodes as a checkpoint. A
            transition that puts a value the codec cannot write into the state (an object in an
            ``Any`` field, an int of 2**64 or more, a lone surrogate) is reported at that step,
            naming the field, instead of when a checkpoint is next due (costs one encode of the
            state per step). Off, a state that fails to encode at a due checkpoint is still
            reported, at that commit.
    """

    invariants: bool = True
    atomicity: bool = True
    determinism: bool = True
    restore: bool = True
    absorbed: bool = True
    duplicates: bool = True
    liveness: bool = True
    idempotency: bool = True
    errors: bool = True
    ids: bool = True
    encodable: bool = True

    @classmethod
    def all(cls) -> Checks:
        """Every check (the default)."""
        return cls()

    @classmethod
    def invariants_only(cls) -> Checks:
        """Only the user's invariants: the fastest mode, for long soak runs."""
        return cls(atomicity=False, determinism=False, restore=False, absorbed=False,
                   duplicates=False, liveness=False, idempotency=False, errors=False,
                   ids=False, encodable=False)


class Weighted(Generic[R]):
    """A distribution over results: ``Weighted((Success(), 9), (Failed("declined"), 1))``.

    The first outcome is the one a shrunk (hypothesis) run falls back to, so list the ordinary
    result first.

    Raises:
        DefinitionError: no outcomes, or a weight that is not positive.
    """

    __slots__ = ("_outcomes", "_total")

    def __init__(self, *outcomes: tuple[R, float]) -> None:
        if not outcomes:
            raise DefinitionError("Weighted needs at least one (result, weight) pair")
        for _, weight in outcomes:
            if not weight > 0:
                raise DefinitionError(f"Weighted weights must be > 0, got {weight!r}")
        self._outcomes = tuple(outcomes)
        self._total = float(sum(w for _, w in outcomes))

    def sample(self, rng: random.Random) -> R:
        """One result, chosen by ``rng`` in proportion to the weights."""
        x = rng.random() * self._total
        for result, weight in self._outcomes:
            x -= weight
            if x < 0:
                return result
        return self._outcomes[-1][0]

    def __repr__(self) -> str:
        inner = ", ".join(f"({r!r}, {w!r})" for r, w in self._outcomes)
        return f"Weighted({inner})"


_NO_LIMIT = RetryPolicy()


@dataclass(frozen=True, slots=True)
class SimExecutor(Generic[A, R]):
    """A simulated executor for one tracked-action type.

    Args:
        result: what an attempt that does not fail returns: a :class:`Weighted` distribution, or
            a function of the action (``fn(action)``), of the action and the run's RNG
            (``fn(action, rng)``), or of those and the attempt's
            :class:`~fasm.runtime.ActionContext` (``fn(action, rng, ctx)``: the idempotency key
            and attempt number a production executor gets, to model an idempotent provider). It
            must be deterministic apart from ``rng``. A function that raises makes the attempt
            fail, retried per ``retry`` as in production.
        retry: the retry policy, as the production :class:`~fasm.runtime.Executor` would have it
            (attempts, backoff, per-attempt ``timeout``).
        on_exhausted: turns the last failure into a result when ``retry.max_attempts`` is
            reached (required then, as in production).
        latency: (low, high) simulated seconds per attempt; default: the fault plan's.

    Raises:
        DefinitionError: ``max_attempts`` without ``on_exhausted``, or a bad latency range.
    """

    result: Weighted[R] | Callable[[A], R] | Callable[[A, random.Random], R]
    retry: RetryPolicy = _NO_LIMIT
    on_exhausted: Callable[[A, BaseException], R] | None = None
    latency: tuple[float, float] | None = None
    _arity: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.retry.max_attempts is not None and self.on_exhausted is None:
            raise DefinitionError("a SimExecutor with retry.max_attempts needs on_exhausted, as "
                                  "a production Executor does")
        if self.latency is not None:
            _check_range("SimExecutor.latency", self.latency)
        if not isinstance(self.result, Weighted):
            object.__setattr__(self, "_arity", min(3, _positional_arity(self.result)))

    def produce(self, action: A, rng: random.Random, ctx: ActionContext) -> R:
        """The result of one attempt that is not an injected failure (raising: it failed)."""
        spec = self.result
        if isinstance(spec, Weighted):
            return spec.sample(rng)
        if self._arity >= 3:
            return spec(action, rng, ctx)  # type: ignore[call-arg]
        if self._arity == 2:
            return spec(action, rng)  # type: ignore[call-arg]
        return spec(action)  # type: ignore[call-arg]


ExecutorSpec: TypeAlias = (
    SimExecutor[Any, Any] | Weighted[Any] | Callable[[Any], Any]
    | Callable[[Any, random.Random], Any] | Callable[[Any, random.Random, ActionContext], Any]
)
"""What ``executors={Type: spec}`` accepts: a :class:`SimExecutor`, a :class:`Weighted`
distribution, or a function of the action (and optionally the RNG, and the action context)."""


def _positional_arity(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume fn(action)
        return 1
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 3
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def executor_table(
    machine_name: str, tracked_action: Any, given: Mapping[type[Any], Any]
) -> dict[type[Any], SimExecutor[Any, Any]]:
    """Normalize ``executors=`` into SimExecutors and check it covers the declared types, the
    way the Runtime checks its executor table (``Timer`` is built in).

    Raises:
        DefinitionError: a type is not declared, or a declared type has no executor.
    """
    declared = [m for m in type_members(tracked_action) if isinstance(m, type)]
    table: dict[type[Any], SimExecutor[Any, Any]] = {}
    for cls, spec in given.items():
        if not any(issubclass(m, cls) for m in declared):
            raise DefinitionError(f"simulated executor given for {cls.__qualname__}, which is not "
                                  f"in {machine_name}'s tracked-action type")
        table[cls] = spec if isinstance(spec, SimExecutor) else SimExecutor(spec)
    missing = [m.__qualname__ for m in declared
               if m is not Timer and lookup(table, m) is None]
    if missing:
        raise DefinitionError(f"no simulated executor for tracked action type(s) "
                              f"{', '.join(missing)} of {machine_name}: pass "
                              "executors={Type: fn or Weighted(...) or SimExecutor(...)}")
    return table


def lookup(table: Mapping[type[Any], Any], cls: type[Any]) -> Any:
    """The entry for ``cls`` or its nearest base class, or None."""
    for base in cls.__mro__:
        found = table.get(base)
        if found is not None:
            return found
    return None
