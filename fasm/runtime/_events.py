"""Runtime events for listeners (metrics exporters, audit logs).

A listener is a plain callable taking one event. It runs inline in the runtime's loop, so keep it
quick; one that raises is logged and never stops the runtime. The fields a listener alone needs
(times, the submitter's context, the queue depth) are only gathered when a runtime has listeners.
:mod:`fasm.otel` is a listener that turns these events into OpenTelemetry spans and metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import Context
from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = (
    "ActionCompleted",
    "ActionDispatched",
    "ActionFailed",
    "ActionRetried",
    "CheckpointFailed",
    "ActionSlow",
    "DuplicateSubmitted",
    "HandlerFailed",
    "Listener",
    "RuntimeEvent",
    "TransactionRetried",
    "TransitionCommitted",
    "TransitionRejected",
)


@dataclass(frozen=True, slots=True)
class TransitionCommitted:
    """A transition is durable. ``input_kind`` is the input's class name or
    ``TrackedActionCompleted`` (then ``action_id`` names the action); ``group`` is how many
    transitions shared its store write."""

    key: str
    seq: int
    input_kind: str
    actions: int
    group: int
    action_id: Any = None
    """For a committed ``TrackedActionCompleted``: the id of the completed action."""
    machine: str = ""
    """The machine's ``machine_name``."""
    submitted_ns: int = 0
    """Wall-clock time (``time.time_ns()``) the input entered the runtime's queue: the submit
    call, or the executor's return for a result. Commit latency is the time of the event minus
    this."""
    context: Context | None = None
    """The submitter's :mod:`contextvars` context, captured by ``submit`` (None for a result):
    what a tracing listener reads the caller's current span from."""
    queued: int = 0
    """Inputs waiting in the runtime's queue behind this group when it committed."""


@dataclass(frozen=True, slots=True)
class DuplicateSubmitted:
    """A submit's idempotency key had been committed, as transition ``seq``: it was answered
    with that outcome and nothing ran (no transition, so no :class:`TransitionCommitted`)."""

    key: str
    seq: int
    input_kind: str
    machine: str = ""
    submitted_ns: int = 0
    """As in :class:`TransitionCommitted`."""
    context: Context | None = None
    """As in :class:`TransitionCommitted`."""


@dataclass(frozen=True, slots=True)
class TransitionRejected:
    """stf raised. ``expected`` is true for a :class:`~fasm.Rejected`, false for a bug."""

    key: str
    input_kind: str
    error: BaseException
    expected: bool
    machine: str = ""
    submitted_ns: int = 0
    """As in :class:`TransitionCommitted`."""
    context: Context | None = None
    """As in :class:`TransitionCommitted`."""
    action_id: Any = None
    """For a refused ``TrackedActionCompleted``: the id of the action whose result it was."""


@dataclass(frozen=True, slots=True)
class ActionDispatched:
    """A tracked action was handed to its executor (first attempt)."""

    key: str
    action_id: Any
    action: Any
    machine: str = ""
    seq: int | None = None
    """The transition that emitted it; None when restore re-emitted it at start."""


@dataclass(frozen=True, slots=True)
class ActionRetried:
    """An attempt failed or timed out; the next starts after ``delay`` seconds."""

    key: str
    action_id: Any
    attempt: int
    error: BaseException
    delay: float
    machine: str = ""
    started_ns: int = 0
    """Wall-clock time (``time.time_ns()``) the failed attempt started."""


@dataclass(frozen=True, slots=True)
class ActionCompleted:
    """An executor returned; its result is queued as ``TrackedActionCompleted``."""

    key: str
    action_id: Any
    attempts: int
    machine: str = ""
    started_ns: int = 0
    """Wall-clock time (``time.time_ns()``) the last attempt started."""


@dataclass(frozen=True, slots=True)
class ActionFailed:
    """The retry policy ran out; ``on_exhausted`` made ``result`` of the failure, which is fed
    back like any result."""

    key: str
    action_id: Any
    attempts: int
    error: BaseException
    result: Any
    machine: str = ""
    started_ns: int = 0
    """Wall-clock time (``time.time_ns()``) the last attempt started."""


@dataclass(frozen=True, slots=True)
class HandlerFailed:
    """An untracked action's handler raised or timed out (``error`` is ``TimeoutError``)."""

    key: str
    seq: int
    action: Any
    error: BaseException


@dataclass(frozen=True, slots=True)
class TransactionRetried:
    """The database abandoned the transaction of a group of ``inputs`` inputs (``error``: a
    :class:`~fasm.errors.TransactionConflict` for a serialization failure, deadlock or busy
    database, a :class:`~fasm.errors.StoreUnavailable` for a lost connection); attempt
    ``attempt`` failed and the group is run again on a fresh transaction, unless that was the
    last attempt."""

    key: str
    attempt: int
    inputs: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class CheckpointFailed:
    """The state could not be encoded for the store: a transition put a value in it that the codec
    cannot write (an object in an ``Any`` field, an int of 2**64 or more, a lone surrogate in a
    string). ``path`` says where in the state, ``culprit_seq`` and ``input_kind`` which
    transition put it there (``culprit_seq`` is None when it could not be found), ``error`` is the
    codec's :class:`~fasm.persistence._codec.Unencodable`.

    Under :class:`~fasm.persistence.Journal` (``refused`` false) nothing is lost: the transitions
    are committed as journal entries, and only the checkpoint due at ``seq`` was skipped. The
    runtime keeps running, tries again after another checkpoint interval, and resumes checkpoints
    once a later transition makes the state encodable again; until then the journal keeps
    growing. Reported once per culprit.

    Under :class:`~fasm.persistence.Snapshot` (``refused`` true) the culprit input was refused
    (``seq`` is ``culprit_seq``, the seq it would have had): its submitter got a
    :class:`~fasm.errors.TransitionFailed` naming the field (a tracked result is dropped, and
    restore re-emits its action at the next start), and the rest of its group was committed.
    """

    key: str
    seq: int
    culprit_seq: int | None
    input_kind: str
    path: str
    error: BaseException
    refused: bool = False


@dataclass(frozen=True, slots=True)
class ActionSlow:
    """Attempt ``attempt`` of a tracked action has been running for ``elapsed`` seconds (clock
    time) without returning: reported once it passes the runtime's ``slow_action_after``, then
    each time the elapsed time doubles. Nothing is cancelled: it says that work may be hung."""

    key: str
    action_id: Any
    attempt: int
    elapsed: float
    machine: str = ""


RuntimeEvent: TypeAlias = (
    TransitionCommitted
    | TransitionRejected
    | ActionDispatched
    | ActionRetried
    | ActionCompleted
    | ActionFailed
    | HandlerFailed
    | TransactionRetried
    | CheckpointFailed
    | ActionSlow
    | DuplicateSubmitted
)

Listener: TypeAlias = Callable[[RuntimeEvent], None]
