"""The persistence seam inside the Runtime: where state lives and how a group of inputs becomes a
durable commit.

Two hosts implement it, one per kind of state, and the Runtime's loop knows only this protocol:

* :class:`~fasm.runtime._state_object.ObjectHost` keeps a Python state object and writes records
  through a :class:`~fasm.persistence.Store` (snapshot or journal);
* :class:`~fasm.runtime._state_database.DatabaseHost` hands the stf a database transaction and
  commits each group as one transaction (SQLite, PostgreSQL).

Either way the engine decides (it runs stf and restore and keeps the rules), the host performs the
steps against its storage, and the Runtime releases actions and answers submitters only after
``run`` returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from .._inputs import Input
from ..errors import StoreError
from ..persistence._codec import Codec
from ._engine import Engine, Release, Step
from ._events import RuntimeEvent

__all__ = ("GroupResult", "KeyGroup", "StateHost", "Submitted")

Submitted: TypeAlias = tuple[Input[Any, Any, Any], str | None]
"""An input and its idempotency key, as the runtime queued them."""

KeyGroup: TypeAlias = tuple[str, Engine, Sequence[Submitted]]
"""One machine key's part of a group: the key, its engine, and its inputs in queue order."""


@dataclass(slots=True)
class GroupResult:
    """What became of a group of inputs, in order.

    Attributes:
        steps: per input, the engine's step (every :class:`Accepted` one is durable now), or the
            store error that kept it from committing while the runtime can go on (contention).
        retries: ``(attempt, error)`` for each time the group had to be run again.
        events: what the host has to report to the runtime's listeners (a checkpoint that could
            not be encoded).
    """

    steps: list[Step | StoreError]
    retries: list[tuple[int, StoreError]] = field(default_factory=list)
    events: list[RuntimeEvent] = field(default_factory=list)


class StateHost(Protocol):
    """Where a runtime's state lives."""

    codec: Codec
    """The machine's codec: the one the runtime checks submits and results with, so that the
    bytes packed at submit are the bytes the host writes."""

    @property
    def description(self) -> str:
        """The storage backend and location, for messages."""
        ...

    async def open(self) -> None:
        """Open the storage and take exclusive use of the machine key (of every key, for a keyed
        runtime).

        Raises:
            StoreError: the storage cannot be opened, or the key is held elsewhere.
        """
        ...

    async def keys_to_restore(self) -> list[str]:
        """The keys to activate and restore at start (every key with tracked actions in flight,
        found through the store's index, not by loading every key)."""
        ...

    async def activate(self, key: str) -> Engine:
        """Load ``key`` and return an engine at its last committed state (a key never seen
        starts from the initial state).

        Raises:
            StoreError: what is stored cannot be read.
        """
        ...

    async def activate_many(self, keys: Sequence[str]) -> dict[str, Engine | Exception]:
        """:meth:`activate` of several keys at once (a key that cannot be loaded maps to its
        error; the others are loaded all the same)."""
        ...

    def passivate(self, key: str) -> None:
        """Forget what the host keeps for ``key`` (it was evicted)."""
        ...

    async def peek(self, key: str) -> Any:
        """The committed state of a key that is not active, without activating it."""
        ...

    async def restore(self, key: str, engine: Engine) -> Release:
        """Run the machine's restore on the committed state of ``key`` (``engine``, just
        activated).

        Raises:
            RestoreFailed: restore raised or emitted an untracked action.
        """
        ...

    async def run(self, groups: Sequence[KeyGroup]) -> list[GroupResult]:
        """Run each key's inputs through its engine and make the accepted ones of every key
        durable, in order, in one atomic write; one result per key, in order.

        Raises:
            StoreError: the group could not be made durable and the runtime must stop; nothing
                of it is acknowledged.
        """
        ...

    async def close(self) -> None:
        """Give up the machine key and close the storage. Safe after a failed open."""
        ...
