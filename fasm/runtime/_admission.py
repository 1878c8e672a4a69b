"""Admission: backpressure on acknowledged-but-unfinished work.

A submit waits before it enters the queue while tracked actions in flight (emitted and
committed, not yet completed; timers not counted) reach ``max_pending_actions`` or an
executor's ``max_pending``, and raises :class:`~fasm.errors.Overloaded` when no room is made
within its ``admission_timeout``. Results never wait here: they are what makes room."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from .._timer import Timer
from ..errors import Overloaded
from ._clock import Clock
from ._executors import Executor, with_deadline
from ._registry import registered

__all__ = ("Admission",)


class Admission:
    """The counts admission decides by, and the submits waiting for room.

    Tracked actions in flight are counted here, overall and by registered executor class, not
    from the engine's table, so admission is O(1)."""

    def __init__(self, clock: Clock, executors: Mapping[type[Any], Executor[Any, Any]], *,
                 max_pending: int | None, timeout: float | None) -> None:
        self._clock = clock
        self._executors = executors
        self._max_pending = max_pending
        self.timeout = timeout
        """The runtime's ``admission_timeout``: what a submit waits by default."""
        self.pending_total = 0
        self._pending_by: dict[type[Any], int] = {}
        # Submits admitted and not yet answered: each may still emit actions, so each holds a
        # place under every limit until its transition's own actions are counted.
        self.admitted = 0
        self._room: anyio.Event | None = None  # set when in-flight work completes

    def full(self) -> str | None:
        """The limit on in-flight tracked actions that is reached, or None.

        A submit cannot know which action types its transition will emit (the stf has not run),
        so it waits while *any* limit is reached: a per-executor limit exists to stop one slow
        provider's backlog from growing, and letting other inputs through could not promise
        that. Inputs that emit nothing wait too; that is the price of not guessing."""
        admitted = self.admitted
        if (self._max_pending is not None
                and self.pending_total + admitted >= self._max_pending):
            return "max_pending_actions"
        for cls, spec in self._executors.items():
            limit = spec.max_pending
            if limit is not None and self._pending_by.get(cls, 0) + admitted >= limit:
                return f"{cls.__qualname__}.max_pending"
        return None

    def wake(self) -> None:
        """Wake the submits waiting for room: to look again, or (stopping) to be refused."""
        if self._room is not None:
            self._room.set()
            self._room = None

    async def admit(self, timeout: float | None,  # noqa: ASYNC109 (clock time)
                    check_open: Callable[[], None]) -> None:
        """Wait until no limit on in-flight work is reached.

        Args:
            timeout: seconds (clock time) to wait; None or ``math.inf`` waits as long as it takes.
            check_open: raises when the runtime no longer runs (called each time it wakes).

        Raises:
            Overloaded: still reached after ``timeout`` seconds (clock time).
            RuntimeClosed: (from ``check_open``) the runtime stopped while waiting.
        """
        clock = self._clock
        deadline = None if timeout is None or math.isinf(timeout) else clock.now() + timeout
        while (limit := self.full()) is not None:
            check_open()
            if deadline is not None and clock.now() >= deadline:
                raise Overloaded(
                    f"{self.pending_total} tracked action(s) in flight ({limit} reached) and "
                    f"no room within {timeout} s; nothing was queued: retry later",
                    pending=self.pending_total, limit=limit)
            self._room = room = self._room or anyio.Event()
            try:
                await with_deadline(clock, deadline, room.wait())
            except TimeoutError:
                continue  # the loop raises Overloaded, or admits if room was made meanwhile

    def count(self, action: Any, delta: int) -> None:
        """Count a tracked action dispatched (+1) or completed or forgotten (-1)."""
        cls = type(action)
        if cls is Timer:
            return
        self.pending_total += delta
        key = registered(self._executors, cls)
        if key is not None:
            self._pending_by[key] = self._pending_by.get(key, 0) + delta
        if delta < 0:
            self.wake()
