"""Inputs: the only way data reaches an stf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar, Union

I = TypeVar("I")
TId = TypeVar("TId")
TR = TypeVar("TR")

__all__ = ("Input", "Normal", "TrackedActionCompleted")


@dataclass(frozen=True, slots=True)
class Normal(Generic[I]):
    """A request or outside event: a value of the machine's declared input type.

    Match it with ``case Normal(Process(amount=a)):``.
    """

    value: I
    # The record bytes of ``value``, made once by the runtime when it checked the submit and
    # reused when the input is journaled (not part of the value: no init, repr or comparison).
    _packed: bytes | None = field(default=None, init=False, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class TrackedActionCompleted(Generic[TId, TR]):
    """The result of a tracked action, fed back by the runtime.

    ``id`` is the id the stf gave the action; ``result`` is what its executor returned (or what the
    executor's ``on_exhausted`` mapping made of a failure).
    """

    id: TId
    result: TR


Input: TypeAlias = Union[Normal[I], TrackedActionCompleted[TId, TR]]  # noqa: UP007
"""What an stf receives: ``Input[InputType, TrackedId, TrackedResult]``."""
