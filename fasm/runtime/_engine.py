"""The transition engine: every rule about commits, rollback, dispatch and restore lives here.

Theory of operation
===================

The engine is sans-IO. It runs the user's ``stf`` and ``restore`` and keeps the bookkeeping around
them, but it never touches a store, a clock, a socket or a task: it answers "here is an input" with
a :class:`Step` that says what the caller must do, and the caller (the anyio :class:`Runtime`, or
the simulator, which may crash between any two of these) does it. Awaiting the user's coroutines
is not I/O: for in-memory state they never suspend, and for transactional state the suspension is
the state's own business.

Rule 1 - a transition is *accepted* when ``stf`` returned. The engine's ``seq`` advances and the
  step carries the input and the actions. Nothing is visible outside yet.
Rule 2 - a transition is *committed* when the caller has made it durable and calls
  :meth:`Engine.committed`. Only then are its actions released for dispatch, and only then may its
  submitter be answered. Several accepted steps may be committed together (group commit); they are
  committed in order.
Rule 3 - a *failed* transition (``stf`` raised) leaves the state as the last accepted step left it.
  How that is achieved is the rollback policy: ``"reload"`` asks the caller to load the
  last committed state, and :meth:`Engine.reset` re-applies the accepted steps not yet committed
  on top of it (paid only on failure: decode + a short replay); ``"copy"`` deep-copies the state
  before every stf (paid on every transition); ``"trust"`` does nothing, for machines the testing
  toolkit has proven atomic; ``"trust-rejected"`` (the Runtime's default for a state object)
  trusts the machine for :class:`Rejected` (raised while validating, before any mutation, as
  the rules require) and reloads after anything else, so a domain rejection costs in
  proportion to the input, not the state. Until a required reset is done,
  ``step`` refuses.
Rule 4 - a tracked action is *in flight* from its release until the commit of a
  ``TrackedActionCompleted`` with its id. An id in flight is never released twice, so a restore or
  an stf that emits it again does not double-dispatch.
Rule 5 - ``restore`` runs on committed state only (at start, after recovery), with a cleared
  container, and may emit only tracked actions; they are released like committed actions.
Rule 6 - an idempotency key maps to the committed transition that first used it
  (:class:`Remembered`: its seq, when it was committed, and the actions it emitted); a later submit
  with the same key is answered with that outcome and runs nothing. Keys are state-like: they live
  in the checkpoint and the journal, so they survive crashes. A key is remembered for
  ``idempotency_ttl`` seconds of the caller's clock after its commit (:attr:`Engine.now`, which
  the caller sets), and at most ``idempotency_window`` keys are kept (the oldest go first), so
  whichever bound is reached first ends a key's window. Rejections are not recorded, so a
  rejected submit may be retried with the same key.
Rule 7 - replay (recovery from a journal) reruns committed inputs through ``stf`` with actions
  discarded. A committed input that now raises proves nondeterminism.
Rule 8 - transactional state: when ``state`` is a database transaction, the database is the
  atomicity (the caller rolls a failed input back to a savepoint, so the policy is ``"trust"``),
  and ``finish(state)``, called after ``stf`` returned, may still fail the transition (the stf
  swallowed a database error that left its work undone). A transaction abandoned as a whole (a
  serialization failure, a lost connection) takes its accepted steps with it:
  :meth:`Engine.abandon` forgets them and the caller runs the same inputs again on a fresh
  transaction. They may now end differently, because another writer changed the database in
  between: that is new state, not nondeterminism.
Rule 9 - an stf interrupted by something that is not an ``Exception`` (``KeyboardInterrupt``,
  ``SystemExit``, a cancellation) has not failed: the process is being stopped in the middle of
  a transition, whose mutations may be half done. Nothing rolls them back here; the engine
  records the input in :attr:`Engine.interrupted`, lets the exception through unchanged, and
  refuses every later step. The caller stops (the committed state in the store is intact, and a
  new engine starts from it), unless the state was a transaction abandoned as a whole, which
  takes the half-done work with it (:meth:`Engine.abandon`, rule 8). ``restore`` and ``replay``
  let such exceptions through unchanged too.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import pydantic

from .._actions import ActionList, ActionsContainer, Tracked, Untracked
from .._inputs import Input, Normal, TrackedActionCompleted
from .._machine import StateMachine
from .._remembered import AnyAction, Remembered
from .._send import MESSAGE_PREFIX
from ..errors import (
    DefinitionError,
    InvalidInput,
    NondeterminismError,
    Rejected,
    RestoreFailed,
    TransitionFailed,
)

__all__ = (
    "Accepted",
    "Duplicate",
    "Remembered",
    "Engine",
    "Failed",
    "Release",
    "Rollback",
    "Step",
)

Rollback: TypeAlias = Literal["reload", "copy", "trust", "trust-rejected"]
_ROLLBACKS = ("reload", "copy", "trust", "trust-rejected")

AnyMachine: TypeAlias = StateMachine[Any, Any, Any, Any, Any, Any]


@dataclass(frozen=True, slots=True)
class Accepted:
    """stf returned: commit this (in order with earlier accepted steps), then call
    :meth:`Engine.committed`. ``at`` is :attr:`Engine.now` when it ran (the date its
    idempotency key is remembered with)."""

    seq: int
    input: Input[Any, Any, Any]
    actions: tuple[AnyAction, ...]
    idempotency_key: str | None = None
    at: float | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The idempotency key was committed before: answer with that transition's outcome
    (``remembered``: its seq and actions), run nothing."""

    seq: int
    idempotency_key: str
    remembered: Remembered | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """stf raised: nothing to commit, nothing to dispatch. ``error`` is what the submitter gets
    (a :class:`Rejected`, or a :class:`TransitionFailed` chaining the cause). When ``reload`` is
    true, the caller must load the last committed state and :meth:`Engine.reset` to it before the
    next step."""

    input: Input[Any, Any, Any]
    error: Rejected | TransitionFailed
    reload: bool


Step: TypeAlias = Accepted | Duplicate | Failed


@dataclass(slots=True)
class Release:
    """What committed transitions release for execution, in order."""

    tracked: list[Tracked[Any, Any]] = field(default_factory=list)
    untracked: list[tuple[int, Untracked[Any]]] = field(default_factory=list)
    already_in_flight: list[Tracked[Any, Any]] = field(default_factory=list)
    completed: list[Any] = field(default_factory=list)


class Engine:
    """The sans-IO transition engine for one machine instance.

    Args:
        machine: the user's machine instance.
        state: the committed state to start from.
        seq: the sequence number of that state.
        idempotency: committed idempotency keys (key -> :class:`Remembered`, or a bare seq),
            oldest first.
        rollback: the rollback policy (see the module docstring, rule 3).
        idempotency_window: at most how many keys to remember (None: no count bound); the
            oldest are forgotten first.
        idempotency_ttl: how many seconds of :attr:`now` a key is remembered after its commit
            (None: no time bound).
        actions_factory: makes the container handed to stf and restore.
        finish: called with the state after each stf returned; raising fails the transition as
            if the stf had raised (rule 8).
    """

    def __init__(
        self,
        machine: AnyMachine,
        *,
        state: Any,
        seq: int = 0,
        idempotency: Iterable[tuple[str, Remembered | int]] = (),
        rollback: Rollback = "trust-rejected",
        idempotency_window: int | None = 100_000,
        idempotency_ttl: float | None = 600.0,
        actions_factory: type[ActionList[Any, Any, Any]] | None = None,
        finish: Callable[[Any], None] | None = None,
    ) -> None:
        if rollback not in _ROLLBACKS:
            raise DefinitionError(f"rollback must be one of {_ROLLBACKS}, got {rollback!r}")
        _check_window(idempotency_window, idempotency_ttl)
        self.machine = machine
        self.types = type(machine).machine_types()
        self.rollback: Rollback = rollback
        self.state: Any = state
        self.seq = seq
        self.committed_seq = seq
        self.idempotency_window = idempotency_window
        self.idempotency_ttl = idempotency_ttl
        self._keys: OrderedDict[str, Remembered] = OrderedDict()
        self._messages: OrderedDict[str, Remembered] = OrderedDict()
        self._undated = False
        self._set_keys(idempotency)
        self.cut_short: tuple[int, float] | None = None
        """(how many, the youngest age in seconds) of the keys the count bound forgot before
        their ttl ran out since the caller last cleared it: their window was shorter than
        promised (the runtime warns)."""
        self.now: float | None = None
        """The caller's time (seconds): it dates the idempotency keys committed from now on and
        decides which have expired. None leaves new keys undated and expires none by time."""
        self._actions: ActionsContainer[Any, Any, Any] = (actions_factory or ActionList)()
        self._in_flight: dict[Any, Tracked[Any, Any]] = {}
        self._pending: list[Accepted] = []  # accepted, not yet committed, in order
        self._needs_reload = False
        self._input_adapter: StrictValidator | None = None
        self._finish = finish
        self.interrupted: Input[Any, Any, Any] | None = None
        """The input whose stf was interrupted by a non-``Exception`` (rule 9), if one was."""

    # -- inputs -------------------------------------------------------------------------------

    def validate(self, value: Any) -> Any:
        """Check that ``value`` is of the machine's declared input type (strictly: no coercion).

        Raises:
            InvalidInput: it is not; nothing was run.
        """
        if self._input_adapter is None:
            self._input_adapter = Engine.validator(self.machine)
        return Engine.validated(self._input_adapter, self.machine, value)

    @staticmethod
    def validator(machine: AnyMachine) -> StrictValidator:
        """The strict validator of ``machine``'s input type (built once per runtime).

        Raises:
            DefinitionError: the type cannot be validated.
        """
        types = type(machine).machine_types()
        try:
            return _strict_adapter(types.input)
        except pydantic.PydanticSchemaGenerationError as e:
            raise DefinitionError(
                f"input type {types.input!r} of {type(machine).__qualname__} "
                f"cannot be validated: {e}"
            ) from e

    @staticmethod
    def validated(adapter: StrictValidator, machine: AnyMachine, value: Any) -> Any:
        """``value`` validated by ``adapter`` (see :meth:`validate`).

        Raises:
            InvalidInput: it is not valid.
        """
        try:
            return adapter.validate_python(value, strict=True)
        except pydantic.ValidationError as e:
            raise InvalidInput(
                f"{type(value).__qualname__} is not a valid input for "
                f"{type(machine).__qualname__} (expected "
                f"{_type_name(type(machine).machine_types().input)}): "
                f"{e.error_count()} error(s): {adapter.describe(e)}"
            ) from e

    # -- transitions --------------------------------------------------------------------------

    async def step(self, input: Input[Any, Any, Any], idempotency_key: str | None = None) -> Step:
        """Run one input through stf (rules 1, 3, 6).

        Raises:
            RuntimeError: a reload was required and not done, or an earlier step was interrupted
                (a bug in the caller).
            BaseException: what interrupted the stf, if it was not an ``Exception`` (rule 9).
        """
        if self._needs_reload:
            raise RuntimeError("engine needs reset() after a failed transition")
        if self.interrupted is not None:
            raise RuntimeError("an stf was interrupted mid-transition; its state may be half done: "
                               "start a new engine from the committed state")
        if idempotency_key is not None:
            if idempotency_key.startswith(MESSAGE_PREFIX):
                seen = self._messages.get(idempotency_key)
                if seen is not None:  # a message key is never expired by time
                    return Duplicate(seen.seq, idempotency_key, seen)
            else:
                seen = self._keys.get(idempotency_key)
                if seen is not None:
                    if not self._expired(seen, self.now):
                        return Duplicate(seen.seq, idempotency_key, seen)
                    del self._keys[idempotency_key]  # its window is over: a new submit
        before = copy.deepcopy(self.state) if self.rollback == "copy" else None
        actions = self._actions
        actions.clear()
        try:
            await self.machine.stf(self.state, input, actions)
            if self._finish is not None:
                self._finish(self.state)
        except Exception as e:
            error = e if isinstance(e, Rejected) else _failed(e, input)
            if self.rollback == "copy":
                self.state = before
            reload = self.rollback == "reload" or (
                self.rollback == "trust-rejected" and not isinstance(e, Rejected))
            self._needs_reload = reload
            return Failed(input, error, reload)
        except BaseException:
            self.interrupted = input  # rule 9: not a failed transition; the caller stops
            raise
        self.seq += 1
        emitted = tuple(actions)
        if idempotency_key is not None:
            self._remember(idempotency_key, Remembered(self.seq, self.now, emitted), self.now)
        step = Accepted(self.seq, input, emitted, idempotency_key, self.now)
        self._pending.append(step)
        return step

    def committed(self, steps: Sequence[Accepted]) -> Release:
        """Mark accepted steps durable (rule 2) and release their actions (rule 4).

        Raises:
            RuntimeError: steps are not the next accepted ones, in order.
        """
        release = Release()
        for step in steps:
            if not self._pending or self._pending[0] is not step:
                raise RuntimeError(f"commit out of order: {step.seq} after {self.committed_seq}")
            del self._pending[0]
            self.committed_seq = step.seq
            if (isinstance(step.input, TrackedActionCompleted)
                    and self._in_flight.pop(step.input.id, None) is not None):
                release.completed.append(step.input.id)
            for action in step.actions:
                if isinstance(action, Tracked):
                    self._release(action, release)
                else:
                    release.untracked.append((step.seq, action))
        return release

    async def reset(self, state: Any, seq: int,
                    idempotency: Iterable[tuple[str, Remembered | int]]) -> None:
        """Start again from the last committed state after a failure (rule 3): take ``state`` as
        of ``seq`` and re-apply the accepted steps not yet committed, so the state is exactly what
        the last accepted step left.

        Raises:
            NondeterminismError: an accepted step raised when re-applied.
            RuntimeError: ``seq`` is not the committed sequence number.
        """
        if seq != self.committed_seq:
            raise RuntimeError(f"reset to seq {seq} but {self.committed_seq} is committed")
        self.state = state
        self.seq = seq
        self._set_keys(idempotency)
        actions = self._actions
        for step in self._pending:
            actions.clear()
            try:
                await self.machine.stf(self.state, step.input, actions)
            except Exception as e:
                raise NondeterminismError(
                    f"accepted input at seq {step.seq} ({_describe(step.input)}) raised {e!r} when "
                    "re-applied after a rollback: the stf is not deterministic"
                ) from e
            if tuple(actions) != step.actions:
                raise NondeterminismError(
                    f"accepted input at seq {step.seq} ({_describe(step.input)}) emitted different "
                    "actions when re-applied after a rollback: the stf is not deterministic"
                )
            self.seq = step.seq
            if step.idempotency_key is not None:
                self._remember(step.idempotency_key,
                               Remembered(step.seq, step.at, step.actions), step.at)
        actions.clear()
        self._needs_reload = False

    def abandon(self, idempotency: Iterable[tuple[str, Remembered | int]]) -> None:
        """Forget every accepted step not yet committed, because the transaction holding them was
        rolled back as a whole (rule 8): ``seq`` goes back to the committed one and the
        idempotency keys to ``idempotency``, the committed keys. The caller runs the inputs again.
        """
        self._pending.clear()
        self.seq = self.committed_seq
        self._set_keys(idempotency)
        self._needs_reload = False
        self.interrupted = None  # what it did went with the transaction
        self._actions.clear()

    # -- restore and replay -------------------------------------------------------------------

    async def restore(self) -> Release:
        """Run the machine's restore on the committed state and release what it emits (rule 5).

        Raises:
            RestoreFailed: restore raised or emitted an untracked action.
        """
        if self.seq != self.committed_seq:
            raise RuntimeError("restore needs committed state")
        actions = self._actions
        actions.clear()
        try:
            await self.machine.restore(self.state, actions)
        except Exception as e:
            raise RestoreFailed(f"{type(self.machine).__qualname__}.restore raised {e!r}") from e
        release = Release()
        for action in actions:
            if not isinstance(action, Tracked):
                raise RestoreFailed(
                    f"{type(self.machine).__qualname__}.restore emitted {action!r}: restore may "
                    "only re-emit pending tracked actions"
                )
            self._release(action, release)
        return release

    async def replay(self, entries: Iterable[tuple[Any, ...]]) -> None:
        """Re-apply committed inputs after a checkpoint (rule 7): ``(seq, input, key)`` or
        ``(seq, input, key, at)`` tuples. Actions are discarded, except that those of an input
        with an idempotency key are remembered with the key (they are its outcome, rule 6).

        Raises:
            NondeterminismError: a committed input raised now, or a seq is out of order.
        """
        actions = self._actions
        for seq, input, key, *dated in entries:
            at: float | None = dated[0] if dated else None
            if seq != self.seq + 1:
                raise NondeterminismError(f"journal seq {seq} does not follow {self.seq}")
            actions.clear()
            try:
                await self.machine.stf(self.state, input, actions)
            except Exception as e:
                raise NondeterminismError(
                    f"committed input at seq {seq} ({_describe(input)}) raised {e!r} on replay: "
                    "the stf is not deterministic, or the code changed incompatibly"
                ) from e
            self.seq = self.committed_seq = seq
            if key is not None:
                self._remember(key, Remembered(seq, at, tuple(actions)), at)
        actions.clear()

    # -- bookkeeping --------------------------------------------------------------------------

    @property
    def in_flight(self) -> dict[Any, Tracked[Any, Any]]:
        """Tracked actions released and not yet completed, by id (a live view: do not mutate)."""
        return self._in_flight

    @property
    def pending(self) -> Sequence[Accepted]:
        """Accepted steps not yet committed, in order (a live view: do not mutate)."""
        return self._pending

    @property
    def idempotency(self) -> OrderedDict[str, Remembered]:
        """Committed submit idempotency keys, oldest first (a live view: do not mutate). The
        keys of messages between keys are in :attr:`messages`."""
        return self._keys

    @property
    def messages(self) -> OrderedDict[str, Remembered]:
        """Committed keys of messages received from other keys (:class:`~fasm.Send`), oldest
        first (a live view: do not mutate). They are bounded by ``idempotency_window`` only,
        never by time: a message is resent after its sender's crash however long that lasted."""
        return self._messages

    def all_keys(self) -> list[tuple[str, Remembered]]:
        """Every remembered key, submits' then messages', as a checkpoint writes them."""
        return [*self._keys.items(), *self._messages.items()]

    def forget(self, action_id: Any) -> None:
        """Stop tracking an in-flight id without a result (its executor was cancelled at stop);
        restore re-emits it on the next start."""
        self._in_flight.pop(action_id, None)

    def _release(self, action: Tracked[Any, Any], release: Release) -> None:
        if action.id in self._in_flight:
            release.already_in_flight.append(action)
        else:
            self._in_flight[action.id] = action
            release.tracked.append(action)

    def _set_keys(self, idempotency: Iterable[tuple[str, Remembered | int]]) -> None:
        every = _keys(idempotency)
        self._keys = OrderedDict((k, r) for k, r in every.items()
                                 if not k.startswith(MESSAGE_PREFIX))
        self._messages = OrderedDict((k, r) for k, r in every.items()
                                     if k.startswith(MESSAGE_PREFIX))
        self._undated = any(r.at is None for r in self._keys.values())

    def _expired(self, remembered: Remembered, now: float | None) -> bool:
        ttl = self.idempotency_ttl
        return (ttl is not None and now is not None and remembered.at is not None
                and remembered.at + ttl <= now)

    def _remember(self, key: str, remembered: Remembered, now: float | None) -> None:
        if key.startswith(MESSAGE_PREFIX):
            messages = self._messages
            messages[key] = remembered
            messages.move_to_end(key)
            if self.idempotency_window is not None:
                while len(messages) > self.idempotency_window:
                    messages.popitem(last=False)
            return
        keys = self._keys
        keys[key] = remembered
        keys.move_to_end(key)
        window = self.idempotency_window
        if window is not None:
            while len(keys) > window:
                _, gone = keys.popitem(last=False)
                if (now is not None and gone.at is not None and self.idempotency_ttl is not None
                        and not self._expired(gone, now)):
                    count, _age = self.cut_short or (0, 0.0)
                    self.cut_short = (count + 1, now - gone.at)
        if now is None or self.idempotency_ttl is None:
            return
        if self._undated:
            # Keys of an older fasm carry no date: their window starts now, in full.
            for k, r in keys.items():
                if r.at is None:
                    keys[k] = Remembered(r.seq, now, r.actions, r.packed)
            self._undated = False
        # Keys are in commit order, so the expired ones are at the front (a clock set back
        # only keeps a key longer).
        while keys:
            first = next(iter(keys.values()))
            if not self._expired(first, now):
                break
            keys.popitem(last=False)


def _keys(idempotency: Iterable[tuple[str, Remembered | int]]) -> OrderedDict[str, Remembered]:
    return OrderedDict((k, v if isinstance(v, Remembered) else Remembered(v))
                       for k, v in idempotency)


def _check_window(window: int | None, ttl: float | None) -> None:
    """Raise DefinitionError for a negative idempotency bound (shared by the hosts)."""
    if window is not None and window < 0:
        raise DefinitionError(f"idempotency_window must be >= 0 or None, got {window}")
    if ttl is not None and not ttl >= 0:
        raise DefinitionError(f"idempotency_ttl must be >= 0 seconds or None, got {ttl}")


def input_kind(input: Input[Any, Any, Any]) -> str:
    """The input's class name, or ``TrackedActionCompleted`` (for events and metrics labels)."""
    if isinstance(input, Normal):
        return type(input.value).__qualname__
    return "TrackedActionCompleted"


def _describe(input: Input[Any, Any, Any]) -> str:
    if isinstance(input, Normal):
        return type(input.value).__qualname__
    return f"TrackedActionCompleted(id={input.id!r})"


def _failed(e: Exception, input: Input[Any, Any, Any]) -> TransitionFailed:
    err = TransitionFailed(f"stf raised {type(e).__qualname__} on {_describe(input)}: {e}")
    err.__cause__ = e
    return err


class StrictValidator:
    """Strict validation of one declared type that also checks the fields of dataclass
    instances, whatever the shape: pydantic passes instances through unchecked by default, so
    ``Deposit("a", "lots")`` would reach the stf and be committed. pydantic refuses ``config=``
    for a bare dataclass, model or TypedDict, so such a type is validated as the only member of a
    one-element tuple, where the config reaches it (and the dataclasses nested in it). A model
    instance keeps its own config (pydantic does not revalidate it, nor the dataclasses inside
    it); the runtime's encode check at submit (:meth:`~fasm.persistence._codec.Codec.pack`)
    catches a model built with ``model_construct`` or mutated into a mismatch by reading it
    back.
    """

    __slots__ = ("_adapter", "_wrapped")

    def __init__(self, tp: Any) -> None:
        config = pydantic.ConfigDict(revalidate_instances="always")
        try:
            self._adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(tp, config=config)
            self._wrapped = False
        except pydantic.PydanticUserError:
            self._adapter = pydantic.TypeAdapter(tuple[tp], config=config)
            self._wrapped = True

    def validate_python(self, value: Any, *, strict: bool = True) -> Any:
        """The validated value (``strict``: no coercion).

        Raises:
            pydantic.ValidationError: it does not validate.
        """
        if self._wrapped:
            return self._adapter.validate_python((value,), strict=strict)[0]
        return self._adapter.validate_python(value, strict=strict)

    def describe(self, error: pydantic.ValidationError) -> str:
        """The first error, with where it is (``amount: Input should be a valid integer``)."""
        first = error.errors()[0]
        loc = first["loc"][1:] if self._wrapped else first["loc"]
        where = ".".join(str(p) for p in loc)
        return f"{where}: {first['msg']}" if where else str(first["msg"])


def _strict_adapter(tp: Any) -> StrictValidator:
    """The strict validator of ``tp`` (see :class:`StrictValidator`)."""
    return StrictValidator(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or repr(tp)

