"""Actions: descriptions of side effects that an stf emits, and the containers it adds them to."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeAlias, TypeVar, Union

from .errors import ActionsFull

TId = TypeVar("TId")
TA = TypeVar("TA")
U = TypeVar("U")
TId_co = TypeVar("TId_co", covariant=True)

__all__ = ("Action", "ActionList", "ActionsContainer", "BoundedActions", "Tracked", "Untracked")


@dataclass(frozen=True, slots=True)
class Tracked(Generic[TId, TA]):
    """A tracked action: its result comes back as ``TrackedActionCompleted(id, result)``.

    The stf must record the action in state (in the same transition) so that ``restore`` can emit
    it again after a crash. ``id`` must be derived from state (a counter), never random.
    """

    id: TId
    action: TA


@dataclass(frozen=True, slots=True)
class Untracked(Generic[U]):
    """A fire-and-forget action (notification, metric). Not recovered after a crash."""

    action: U


Action: TypeAlias = Union[Tracked[TId, TA], Untracked[U]]  # noqa: UP007
"""Either kind of action: ``Action[TrackedId, TrackedAction, UntrackedAction]``."""


class ActionsContainer(Protocol[TId, TA, U]):
    """What an stf adds actions to. ``add`` may fail; the runtime clears the container before
    every call and executes its contents only after the transition is committed."""

    def add(self, action: Tracked[TId, TA] | Untracked[U], /) -> None:
        """Append an action.

        Raises:
            ActionsFull: the container is bounded and full.
        """
        ...

    def clear(self) -> None:
        """Remove every action."""
        ...

    def __iter__(self) -> Iterator[Tracked[TId, TA] | Untracked[U]]: ...

    def __len__(self) -> int: ...


class ActionList(Generic[TId, TA, U]):
    """The default container: an unbounded list, in the order actions were added."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[Tracked[TId, TA] | Untracked[U]] = []

    def add(self, action: Tracked[TId, TA] | Untracked[U], /) -> None:
        self._items.append(action)

    def clear(self) -> None:
        self._items.clear()

    def __iter__(self) -> Iterator[Tracked[TId, TA] | Untracked[U]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


class BoundedActions(ActionList[TId, TA, U]):
    """A container that holds at most ``capacity`` actions; ``add`` beyond that raises
    :class:`~fasm.errors.ActionsFull`, which makes the transition fail (and roll back)."""

    __slots__ = ("capacity",)

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        super().__init__()
        self.capacity = capacity

    def add(self, action: Tracked[TId, TA] | Untracked[U], /) -> None:
        if len(self._items) >= self.capacity:
            raise ActionsFull(f"actions container is full (capacity {self.capacity})")
        self._items.append(action)
