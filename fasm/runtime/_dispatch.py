"""Bounded dispatch: tracked actions wait as plain queue entries, never as one task each.

A restart re-emits every pending tracked action at once (tens of thousands after an outage of a
provider), and so does a burst of submits. The runtime does not start a task per action that
then waits for a slot: that costs a coroutine, a task and a wait-queue entry per action, and the
event loop's time to schedule each (``bench/bench_restore.py``, 70,000 pending: about 6 KB and a
ready time of 9 to 14 s, against 0.5 KB and under a second this way). Instead:

- :class:`Dispatcher` keeps one FIFO queue per executor (a *lane*). Entries are ``(seq, item)``
  pairs, nothing else. A worker task runs one entry at a time and, when it is done, takes the
  next one itself; workers are started only when an entry can run now, so there are never more
  of them than calls running: at most ``Executor.concurrency`` per lane and ``max_in_flight``
  over every counted lane. When the global limit is what holds entries back, a freed slot goes
  to the lane whose head entry was queued first, so dispatch order across executors is FIFO as
  well.
- :class:`TimerHeap` keeps every pending durable timer in one heap and one task that sleeps on
  the runtime's clock until the earliest deadline, instead of one sleeping task per timer.

Neither does any I/O or knows the engine: the runtime gives them a function that performs an
entry (attempts, retries, delivery of the result) and a function that starts a task in its work
task group, which a stop cancels (queued entries are then simply dropped: their actions are in
flight in the state, and restore re-emits them)."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from ._clock import Clock

__all__ = ("Dispatcher", "TimerHeap")

Spawn = Callable[..., None]
"""``spawn(fn, *args)``: start ``fn(*args)`` in the runtime's work task group."""


class _Lane:
    """One executor's queue: entries waiting, and how many of its calls run now."""

    __slots__ = ("counted", "limit", "queue", "running")

    def __init__(self, limit: float, counted: bool) -> None:
        self.limit = limit
        self.counted = counted  # counts against the dispatcher's global limit
        self.queue: deque[tuple[int, Any]] = deque()
        self.running = 0


class Dispatcher:
    """Per-executor FIFO queues of tracked actions, run by at most as many worker tasks as may
    run at once.

    Args:
        lanes: the class an executor is registered for -> (most calls at once, or None for no
            limit of its own; whether its calls count against ``max_in_flight``).
        max_in_flight: most calls running at once over all counted lanes.
        run: ``await run(item)`` performs one entry (it must not raise but to crash or be
            cancelled).
        spawn: starts a worker task (see :data:`Spawn`).
    """

    def __init__(self, lanes: Mapping[type[Any], tuple[float | None, bool]], *, max_in_flight: int,
                 run: Callable[[Any], Awaitable[None]], spawn: Spawn) -> None:
        self._lanes = {key: _Lane(math.inf if limit is None else limit, counted)
                       for key, (limit, counted) in lanes.items()}
        self._max = max_in_flight
        self._run = run
        self._spawn = spawn
        self._seq = itertools.count()
        self._running = 0  # calls of counted lanes running now
        self._queued = 0
        self._workers = 0
        self._open = True

    @property
    def queued(self) -> int:
        """Entries waiting for a slot."""
        return self._queued

    @property
    def workers(self) -> int:
        """Worker tasks alive (each runs one entry, or is about to)."""
        return self._workers

    def put(self, lane: type[Any], item: Any) -> None:
        """Queue ``item`` at the end of ``lane``. Nothing starts until :meth:`pump`."""
        self._lanes[lane].queue.append((next(self._seq), item))
        self._queued += 1

    def pump(self) -> None:
        """Start a worker for every entry that may run now."""
        while (claimed := self._claim()) is not None:
            self._workers += 1
            self._spawn(self._work, *claimed)

    def close(self) -> None:
        """Start nothing more (a stop or crash); what is queued stays where it is."""
        self._open = False

    def _claim(self) -> tuple[_Lane, Any] | None:
        """Take the entry that runs next, counting its slot, or None if none may run now."""
        if not self._open or not self._queued:
            return None
        best: _Lane | None = None
        for lane in self._lanes.values():
            if (lane.queue and lane.running < lane.limit
                    and (not lane.counted or self._running < self._max)
                    and (best is None or lane.queue[0][0] < best.queue[0][0])):
                best = lane
        if best is None:
            return None
        _, item = best.queue.popleft()
        self._queued -= 1
        best.running += 1
        if best.counted:
            self._running += 1
        return best, item

    async def _work(self, lane: _Lane, item: Any) -> None:
        """Run ``item``, then whatever entry may run next, until none may."""
        claimed: tuple[_Lane, Any] | None = (lane, item)
        try:
            while claimed is not None:
                lane, item = claimed
                try:
                    await self._run(item)
                finally:
                    lane.running -= 1
                    if lane.counted:
                        self._running -= 1
                # One slot was freed: at most one entry became runnable, and this task runs it.
                claimed = self._claim()
        finally:
            self._workers -= 1


class TimerHeap:
    """Every pending durable timer in one heap, fired by one task that sleeps on ``clock`` until
    the earliest deadline (woken early when an earlier timer is added).

    Args:
        clock: the runtime's clock.
        fire: ``await fire(id, at)`` delivers a timer whose deadline ``at`` has come.
        spawn: starts the heap's task, once, when the first timer is added (see :data:`Spawn`).
    """

    def __init__(self, clock: Clock, *, fire: Callable[[Any, float], Awaitable[None]],
                 spawn: Spawn) -> None:
        self._clock = clock
        self._fire = fire
        self._spawn = spawn
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._started = False
        self._open = True
        self._wake: anyio.Event | None = None  # the task waits for a first timer
        self._sleep: anyio.CancelScope | None = None  # ... or sleeps until _due
        self._due = math.inf

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, id: Any, at: float) -> None:
        """Fire ``id`` once the clock reaches ``at``."""
        heapq.heappush(self._heap, (at, next(self._seq), id))
        if not self._open:
            return
        if not self._started:
            self._started = True
            self._spawn(self._run)
        elif self._wake is not None:
            self._wake.set()
        elif at < self._due and self._sleep is not None:
            self._sleep.cancel()  # sleep again, until this earlier deadline

    def close(self) -> None:
        """Start nothing more (a stop or crash)."""
        self._open = False

    async def _run(self) -> None:
        clock, heap = self._clock, self._heap
        while True:
            if not heap:
                # Nothing to wait for: leave no deadline on the clock.
                self._wake = wake = anyio.Event()
                await wake.wait()
                self._wake = None
                continue
            at = heap[0][0]
            if at <= clock.now():
                _, _, id = heapq.heappop(heap)
                await self._fire(id, at)
                continue
            self._due = at
            with anyio.CancelScope() as self._sleep:
                await clock.sleep_until(at)
            self._sleep, self._due = None, math.inf
