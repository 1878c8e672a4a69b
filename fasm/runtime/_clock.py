"""Clocks: where the runtime's time comes from. Timers, retry backoff and executor deadlines all
read the clock they are given, so a test with a :class:`ManualClock` never sleeps for real."""

from __future__ import annotations

import heapq
import itertools
import math
import time
from typing import Protocol, runtime_checkable

import anyio

__all__ = ("Clock", "ManualClock", "SystemClock")


@runtime_checkable
class Clock(Protocol):
    """A source of time in seconds. Durable timers compare stored deadlines with ``now()`` after
    a restart, so a clock used with a durable store must keep its epoch across processes."""

    def now(self) -> float:
        """The current time in seconds."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (at once if it already is)."""
        ...


class SystemClock:
    """Wall-clock time (``time.time()``), so deadlines mean the same after a restart."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        # Re-check after waking: wall-clock time can be adjusted while we sleep.
        while (remaining := deadline - time.time()) > 0:  # noqa: ASYNC110
            await anyio.sleep(min(remaining, 60.0))


class ManualClock:
    """A clock that moves only when told: ``advance(seconds)`` or ``advance_to(t)``.

    Sleepers whose deadline is reached are woken at once. Works on asyncio and trio.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._counter = itertools.count()

    def now(self) -> float:
        return self._now

    @property
    def next_deadline(self) -> float:
        """The earliest deadline anyone sleeps until, or ``math.inf``."""
        while self._sleepers and self._sleepers[0][2].is_set():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else math.inf

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock."""
        return sum(1 for _, _, e in self._sleepers if not e.is_set())

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake every sleeper that is due."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self.advance_to(self._now + seconds)

    def advance_to(self, t: float) -> None:
        """Move time forward to ``t`` (no-op if it is in the past) and wake who is due."""
        self._now = max(self._now, t)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            heapq.heappop(self._sleepers)[2].set()

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._sleepers, (deadline, next(self._counter), event))
        try:
            await event.wait()
        finally:
            # A sleeper cancelled early (a finished attempt's watchdog) is no longer waiting:
            # ``next_deadline`` and ``sleepers`` skip set events, so it does not linger there.
            event.set()
