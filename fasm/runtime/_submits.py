"""What travels the runtime's input queue (a submit, or an executor's result), what a submit
is answered with, and the reads that wait for a group's commit."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from .._actions import Tracked, Untracked
from .._inputs import Input, TrackedActionCompleted
from ..errors import InvalidInput

__all__ = ("Committed", "Item", "Read", "Result", "Submit", "checked_key", "checked_machine_key")

TId = TypeVar("TId")
TA = TypeVar("TA")
U = TypeVar("U")


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
class Submit:
    input: Input[Any, Any, Any]
    key: str | None  # the idempotency key
    target: str  # the machine key
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
class Result:
    input: TrackedActionCompleted[Any, Any]
    target: str  # the machine key whose action completed
    key: None = None
    submitted_ns: int = 0  # for listeners only
    context: None = None


Item = Submit | Result


@dataclass(eq=False, slots=True)
class Read:
    fn: Callable[[Any], Any]
    target: str  # the machine key read
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


def checked_machine_key(key: Any) -> str:
    """A machine key every store keeps as it was given: a non-empty ``str`` of valid Unicode
    without NUL.

    Raises:
        InvalidInput: the key is refused; nothing ran.
    """
    if not isinstance(key, str):
        raise InvalidInput(f"a machine key must be a str, got {type(key).__qualname__}")
    if not key or "\x00" in key:
        raise InvalidInput(f"a machine key must be non-empty and hold no NUL, got {key!r}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"machine key is not valid Unicode (lone surrogate at "
                           f"index {e.start})") from e
    return key


def checked_key(key: Any) -> str | None:
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
    if key.startswith("fasm:"):
        raise InvalidInput(f"idempotency_key {key!r} starts with 'fasm:', which is reserved for "
                           "the keys fasm delivers messages between keys with")
    if "\x00" in key:
        raise InvalidInput("idempotency_key cannot hold NUL ('\\x00')")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"idempotency_key is not valid Unicode (lone surrogate at "
                           f"index {e.start})") from e
    return key
