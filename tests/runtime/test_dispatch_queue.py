"""Bounded dispatch: a restart with tens of thousands of pending tracked actions (or timers)
keeps them as queue entries, not as one task each; each executor's actions start in the order
they were emitted, within ``Executor.concurrency`` and ``max_in_flight``; one task fires every
timer. On asyncio and trio. (The queue itself: fasm/runtime/_dispatch.py.)"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from fasm import (
    ActionsContainer,
    Input,
    Normal,
    StateMachine,
    Timer,
    TimerFired,
    Tracked,
    TrackedActionCompleted,
)
from fasm.persistence import MemoryStore
from fasm.runtime import ActionContext, Executor, ManualClock, Runtime
from tests.runtime.conftest import JumpingClock

pytestmark = pytest.mark.anyio

N = 20_000
TASKS = 50  # "a few": the runtime's own tasks, the test's, and one per call running


@dataclass(frozen=True)
class Call:
    n: int


@dataclass(frozen=True)
class Ping:
    p: int


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Emit:
    """Emit ``count`` actions in one transition: ``kind`` "call", "ping", "both" (alternating,
    calls on even ids) or "timer" (deadlines ``at + spread`` scrambled by id)."""

    kind: str
    count: int
    at: float = 0.0
    spread: float = 0.0


@dataclass
class Book:
    calls: dict[int, int] = field(default_factory=dict)
    pings: dict[int, int] = field(default_factory=dict)
    timers: dict[int, float] = field(default_factory=dict)
    done: list[int] = field(default_factory=list)
    fired: list[tuple[int, float, float]] = field(default_factory=list)  # id, at, now
    next_id: int = 0


Actions = ActionsContainer[int, Call | Ping | Timer, Any]


class Backlog(StateMachine[Book, Emit, int, Call | Ping | Timer, Done | TimerFired]):
    async def stf(self, state: Book, input: Input[Emit, int, Done | TimerFired],
                  actions: Actions) -> None:
        match input:
            case Normal(Emit(kind, count, at, spread)):
                for _ in range(count):
                    i = state.next_id
                    state.next_id += 1
                    if kind == "timer":
                        deadline = at + (i * 7919 % count) * spread / count
                        state.timers[i] = deadline
                        actions.add(Tracked(i, Timer(deadline)))
                    elif kind == "call" or (kind == "both" and i % 2 == 0):
                        state.calls[i] = i
                        actions.add(Tracked(i, Call(i)))
                    else:
                        state.pings[i] = i
                        actions.add(Tracked(i, Ping(i)))
            case TrackedActionCompleted(i, TimerFired(at, now)):
                del state.timers[i]
                state.fired.append((i, at, now))
            case TrackedActionCompleted(i, Done()):
                if state.calls.pop(i, None) is None:
                    del state.pings[i]
                state.done.append(i)

    async def restore(self, state: Book, actions: Actions) -> None:
        for i in sorted([*state.calls, *state.pings]):
            actions.add(Tracked(i, Call(i) if i in state.calls else Ping(i)))
        for i, at in state.timers.items():
            actions.add(Tracked(i, Timer(at)))


def live_tasks() -> int:
    """Every task of the event loop, on asyncio or trio."""
    if "trio" in sys.modules:
        import trio

        try:
            root = trio.lowlevel.current_root_task()
        except RuntimeError:
            root = None
        if root is not None:
            def count(task: Any) -> int:
                return 1 + sum(count(child) for nursery in task.child_nurseries
                               for child in nursery.child_tasks)
            return count(root)
    return len(asyncio.all_tasks())


async def never(action: Any, ctx: ActionContext) -> Done:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


class Recorder:
    """An executor that records the order calls start in, how many run at once, and how many
    tasks are alive while they do."""

    def __init__(self, running: list[int] | None = None) -> None:
        self.started: list[int] = []
        self.running = running if running is not None else [0]  # shared between executors
        self.mine = 0
        self.most_mine = 0
        self.most_total = 0
        self.most_tasks = 0

    async def __call__(self, action: Call | Ping, ctx: ActionContext) -> Done:
        self.started.append(ctx.action_id)
        self.mine += 1
        self.running[0] += 1
        self.most_mine = max(self.most_mine, self.mine)
        self.most_total = max(self.most_total, self.running[0])
        if len(self.started) % 500 == 1:
            self.most_tasks = max(self.most_tasks, live_tasks())
        try:
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
        finally:
            self.mine -= 1
            self.running[0] -= 1
        return Done()


def runtime(store: MemoryStore, executors: dict[type[Any], Any], **kw: Any) -> Runtime[
        Book, Emit, int, Any, Any, Any]:
    kw.setdefault("clock", ManualClock())
    return Runtime(Backlog(), initial_state=Book, store=store, executors=executors,
                   max_pending_actions=None, shutdown_grace=0.0, slow_action_after=None, **kw)


async def backlog(store: MemoryStore, kind: str, count: int, *, at: float = 0.0,
                  spread: float = 0.0) -> None:
    """A first runtime whose executors never finish leaves ``count`` actions in flight."""
    async with runtime(store, {Call: Executor(never), Ping: Executor(never)}) as rt:
        await rt.submit(Emit(kind, count, at, spread))
        await anyio.wait_all_tasks_blocked()
        # The same holds before a restart: the emitted actions are queue entries.
        assert live_tasks() < TASKS + 64 * 2
    assert len(rt.in_flight) == count


async def test_a_restart_with_20000_pending_actions_keeps_a_few_tasks_in_fifo_order() -> None:
    store = MemoryStore()
    await backlog(store, "both", N)
    running = [0]
    calls, pings = Recorder(running), Recorder(running)
    async with runtime(store, {Call: Executor(calls, concurrency=1),
                               Ping: Executor(pings, concurrency=4)}) as rt:
        assert len(rt.in_flight) == N
        assert live_tasks() < TASKS  # restored: nothing waits as a task
        with anyio.fail_after(120):
            await rt.wait_idle()
        assert sorted(rt.state.done) == list(range(N)) and not rt.in_flight
    for rec in (calls, pings):
        assert rec.most_tasks < TASKS
        assert len(rec.started) == N // 2
    # Concurrency: each executor's own limit (max_in_flight: the next test).
    assert calls.most_mine == 1 and pings.most_mine == 4
    assert max(calls.most_total, pings.most_total) == 5
    # FIFO per executor: one at a time, exactly in order; four at a time, each call starts
    # no later than three places after its turn (entries are taken in order; a worker just
    # started may run after one that was already running took the next).
    assert calls.started == sorted(calls.started)
    rank = {i: r for r, i in enumerate(sorted(pings.started))}
    assert all(rank[i] <= k + 3 for k, i in enumerate(pings.started))


async def test_a_slot_freed_by_one_executor_goes_to_the_entry_queued_first() -> None:
    """Under max_in_flight, the executors' queues are served in the order entries were queued
    (here alternately), not one executor's backlog first; and max_in_flight bounds the calls of
    every executor together."""
    store = MemoryStore()
    await backlog(store, "both", 200)
    order: list[int] = []

    async def record(action: Call | Ping, ctx: ActionContext) -> Done:
        order.append(ctx.action_id)
        await anyio.lowlevel.checkpoint()
        return Done()

    async with runtime(store, {Call: record, Ping: record}, max_in_flight=1) as rt:
        with anyio.fail_after(30):
            await rt.wait_idle()
    assert order == list(range(200))
    await backlog(store, "both", 2_000)
    running = [0]
    calls, pings = Recorder(running), Recorder(running)
    async with runtime(store, {Call: Executor(calls, concurrency=None),
                               Ping: Executor(pings, concurrency=None)}, max_in_flight=3) as rt:
        with anyio.fail_after(30):
            await rt.wait_idle()
    assert max(calls.most_total, pings.most_total) == 3
    assert len(calls.started) == len(pings.started) == 1_000


async def test_a_stop_with_a_large_queue_keeps_every_action_for_restore() -> None:
    """A stop drops queue entries, never actions: they stay in flight in the state, and the
    next start runs each exactly once."""
    store = MemoryStore()
    await backlog(store, "call", 5_000)
    gate = anyio.Event()
    seen: list[int] = []

    async def slow(action: Call, ctx: ActionContext) -> Done:
        seen.append(ctx.action_id)
        await gate.wait()
        return Done()

    async with runtime(store, {Call: Executor(slow, concurrency=8), Ping: never}) as rt:
        await anyio.wait_all_tasks_blocked()
        assert len(seen) == 8 and len(rt.in_flight) == 5_000
    # Cancelled at stop (grace 0): nothing more started, nothing lost.
    assert len(seen) == 8 and len(rt.in_flight) == 5_000
    rec = Recorder()
    async with runtime(store, {Call: Executor(rec, concurrency=16), Ping: never}) as again:
        with anyio.fail_after(60):
            await again.wait_idle()
        assert sorted(again.state.done) == list(range(5_000))
    assert rec.most_mine == 16 and sorted(rec.started) == list(range(5_000))


async def test_20000_restored_timers_wait_in_one_task_and_fire_in_deadline_order() -> None:
    store = MemoryStore()
    await backlog(store, "timer", N, at=1_000.0, spread=100.0)
    clock = ManualClock()
    async with runtime(store, {Call: never, Ping: never}, clock=clock) as rt:
        await anyio.wait_all_tasks_blocked()
        assert live_tasks() < TASKS
        assert clock.sleepers == 1 and clock.next_deadline == 1_000.0
        assert len(rt.in_flight) == N
        due = sum(1 for at in rt.state.timers.values() if at <= 1_050.0)
        clock.advance_to(1_050.0)
        with anyio.fail_after(60):
            while len(rt.state.fired) < due:
                await anyio.wait_all_tasks_blocked()
                await anyio.sleep(0.01)
        await anyio.wait_all_tasks_blocked()
        assert len(rt.state.fired) == due
        assert clock.sleepers == 1 and 1_050.0 < clock.next_deadline <= 1_050.01
        clock.advance_to(1_100.0)
        with anyio.fail_after(60):
            await rt.wait_idle(include_timers=True)
        fired = rt.state.fired
        assert len(fired) == N and not rt.in_flight
        deadlines = [at for _, at, _ in fired]
        assert deadlines == sorted(deadlines)
        assert all(now >= at for _, at, now in fired)
        assert [now for _, _, now in fired[:due]] == [1_050.0] * due
        # Nothing lingers on the clock once every timer fired.
        await anyio.wait_all_tasks_blocked()
        assert clock.sleepers == 0


async def test_an_earlier_timer_wakes_the_heap_and_a_jumping_clock_fires_each_in_turn() -> None:
    clock = ManualClock()
    async with runtime(MemoryStore(), {Call: never, Ping: never}, clock=clock) as rt:
        await rt.submit(Emit("timer", 1, at=100.0))
        await anyio.wait_all_tasks_blocked()
        assert clock.next_deadline == 100.0
        await rt.submit(Emit("timer", 1, at=5.0))  # earlier than what the heap sleeps until
        await anyio.wait_all_tasks_blocked()
        assert clock.next_deadline == 5.0 and clock.sleepers == 1
        clock.advance_to(5.0)
        with anyio.fail_after(10):
            while not rt.state.fired:
                await anyio.wait_all_tasks_blocked()
        assert rt.state.fired == [(1, 5.0, 5.0)] and clock.next_deadline == 100.0
        clock.advance_to(200.0)
        with anyio.fail_after(10):
            await rt.wait_idle(include_timers=True)
        assert rt.state.fired == [(1, 5.0, 5.0), (0, 100.0, 200.0)]
    jumping = JumpingClock()
    async with runtime(MemoryStore(), {Call: never, Ping: never}, clock=jumping) as rt:
        await rt.submit(Emit("timer", 50, at=10.0, spread=5.0))
        with anyio.fail_after(10):
            await rt.wait_idle(include_timers=True)
        fired = rt.state.fired
        assert len(fired) == 50 and [at for _, at, _ in fired] == sorted(at for _, at, _ in fired)
        assert all(now == at for _, at, now in fired)  # the clock jumped to each deadline


async def test_an_executor_of_your_own_for_timers_runs_outside_max_in_flight() -> None:
    """A Timer executor given by the user (no heap then) still fires every timer, retried like
    any executor, while max_in_flight is taken by calls that never finish."""
    attempts: list[int] = []

    async def wake(action: Timer, ctx: ActionContext) -> TimerFired:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("once")
        return TimerFired(at=action.at, now=action.at)

    async with runtime(MemoryStore(), {Call: never, Ping: never, Timer: wake},
                       clock=JumpingClock(), max_in_flight=1) as rt:
        await rt.submit(Emit("call", 2))
        await rt.submit(Emit("timer", 3, at=7.0))
        with anyio.fail_after(10):
            while len(rt.state.fired) < 3:
                await anyio.wait_all_tasks_blocked()
        assert sorted(i for i, _, _ in rt.state.fired) == [2, 3, 4]
        assert attempts.count(1) == 3 and attempts.count(2) == 3
        assert set(rt.in_flight) == {0, 1}
