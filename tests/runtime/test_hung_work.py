"""Hung and failing work stays visible and bounded: a slow executor attempt is reported
(``ActionSlow`` and a WARNING, doubling), stop honours its grace period even when an executor or
handler is stuck in a thread that ignores cancellation, and retries that never stop never
overflow their backoff. On asyncio and trio."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time

import anyio
import anyio.to_thread
import pytest

from fasm.errors import DefinitionError
from fasm.persistence import MemoryStore
from fasm.runtime import (
    ActionCompleted,
    ActionContext,
    ActionRetried,
    ActionSlow,
    Executor,
    ManualClock,
    RetryPolicy,
    RuntimeEvent,
)
from tests._ledger import Charge, Charged, Note, Pay
from tests.runtime.conftest import JumpingClock, make, run_clock

pytestmark = pytest.mark.anyio


# -- slow attempts ------------------------------------------------------------------------------


async def test_a_slow_attempt_is_reported_then_again_each_time_its_time_doubles(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    events: list[RuntimeEvent] = []
    hang = anyio.Event()

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        if ctx.attempt == 1:
            await clock.sleep_until(15.0)  # slow (reported once, at 10 s), then fails
            raise ConnectionError("provider reset the connection")
        await hang.wait()  # slow for as long as the test says
        return Charged(True)

    executor = Executor(charge, retry=RetryPolicy(initial_backoff=1.0, jitter=0.0))
    caplog.set_level(logging.WARNING, logger="fasm.runtime")
    async with make(executors={Charge: executor}, clock=clock, slow_action_after=10.0,
                    listeners=[events.append]) as rt:
        await rt.submit(Pay("a", 10))

        def slow() -> list[ActionSlow]:
            return [e for e in events if isinstance(e, ActionSlow)]

        await run_clock(clock, lambda: len(slow()) == 4)
        # Attempt 1 started at 0: 10 s. Attempt 2 started at 16 (15 + 1 s backoff): 10, 20, 40.
        assert [(e.action_id, e.attempt, e.elapsed) for e in slow()] == [
            (0, 1, 10.0), (0, 2, 10.0), (0, 2, 20.0), (0, 2, 40.0)]
        assert clock.now() == 56.0 and rt.in_flight == {0: Charge("a", 10)}
        hang.set()
        await rt.wait_idle()
        assert rt.state.applied == {0: 1}
        # Nothing of the watchdog lingers on the clock once the attempt returned.
        assert clock.next_deadline == math.inf and clock.sleepers == 0
    warnings = [r for r in caplog.records if "has been running for" in r.getMessage()]
    assert len(warnings) == 4 and all(r.levelno == logging.WARNING for r in warnings)
    assert getattr(warnings[0], "fasm_action_id", None) == 0


async def test_slow_reports_can_be_turned_off_and_the_option_is_checked() -> None:
    clock = ManualClock()
    events: list[RuntimeEvent] = []
    hang = anyio.Event()

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        await hang.wait()
        return Charged(True)

    async with make(executors={Charge: charge}, clock=clock, slow_action_after=None,
                    listeners=[events.append]) as rt:
        await rt.submit(Pay("a", 10))
        await anyio.wait_all_tasks_blocked()
        assert clock.next_deadline == math.inf  # no watchdog: nothing to wake for
        clock.advance(10_000)
        hang.set()
        await rt.wait_idle()
    assert not [e for e in events if isinstance(e, ActionSlow)]
    for bad in (0, -1.0):
        with pytest.raises(DefinitionError, match="slow_action_after"):
            make(slow_action_after=bad)


# -- stop honours its grace period -------------------------------------------------------------


class Crash(Exception):
    pass


@pytest.mark.parametrize("how", ["stop", "crash", "handler"])
async def test_stop_returns_within_its_grace_when_work_is_stuck_in_a_thread(
        how: str, caplog: pytest.LogCaptureFixture) -> None:
    """Real time: a call blocked for 3 s in a worker thread, which cancellation cannot reach.
    Stop (grace 0.2 s) must return long before the thread does; the action stays in flight."""
    release = threading.Event()  # the stuck thread waits at most 3 s for it
    entered = anyio.Event()
    finished = anyio.Event()
    events: list[RuntimeEvent] = []

    async def stuck() -> None:
        entered.set()
        try:
            await anyio.to_thread.run_sync(release.wait, 3.0)
        finally:
            finished.set()

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        if how != "handler":
            await stuck()
        return Charged(True)

    async def note(action: Note) -> None:
        if how == "handler":
            await stuck()

    store = MemoryStore()
    caplog.set_level(logging.WARNING, logger="fasm.runtime")
    rt = make(store, executors={Charge: charge}, handlers={Note: note}, shutdown_grace=0.2,
              listeners=[events.append])
    started = math.inf
    with contextlib.suppress(Crash):
        async with rt:
            await rt.submit(Pay("a", 10))
            await entered.wait()
            started = time.monotonic()
            if how == "crash":
                raise Crash  # leaving the block with an exception: no grace at all
            await rt.stop()
    took = time.monotonic() - started
    # A correctness bound, not a benchmark: the grace (0.2 s) plus the abandon bound (0.5 s),
    # far from the 3 s the thread is stuck for.
    assert took < 2.0, f"stop took {took:.2f}s"
    assert not finished.is_set()
    abandoned = [r for r in caplog.records if "abandoned" in r.getMessage()]
    assert len(abandoned) == 1 and abandoned[0].levelno == logging.WARNING
    release.set()  # let the thread go, and the abandoned task end, before the test does
    with anyio.fail_after(5):
        await finished.wait()
    with anyio.fail_after(5):
        await rt._work_done.wait()  # type: ignore[union-attr]  # the abandoned task unwound
    if how != "handler":
        # The late result was not committed, nor reported as completed: restore re-emits it.
        assert rt.in_flight == {0: Charge("a", 10)} and rt.state.applied == {}
        assert not [e for e in events if isinstance(e, ActionCompleted)]
    async with make(store) as again:
        await again.wait_idle()
        assert again.state.applied == {0: 1} and again.state.balances == {"a": 90}


# -- retrying forever ---------------------------------------------------------------------------


def test_backoff_stays_capped_for_any_attempt_number() -> None:
    rng = random.Random(7)
    for policy in (RetryPolicy(), RetryPolicy(multiplier=10.0, max_backoff=5.0, jitter=0.5),
                   RetryPolicy(initial_backoff=0.01, multiplier=1.01, jitter=0.0)):
        cap, jitter = policy.max_backoff, policy.jitter
        low, high = cap * (1 - jitter), cap * (1 + jitter)
        for attempt in (1024, 1025, 1100, 10**6, 10**9, 10**400):
            delay = policy.delay(attempt, rng)
            assert low <= delay <= high, (policy, attempt, delay)
        for attempt in range(1, 40):  # below the cap: the documented formula, jittered
            base = min(policy.max_backoff,
                       policy.initial_backoff * policy.multiplier ** (attempt - 1))
            delay = policy.delay(attempt, rng)
            assert base * (1 - policy.jitter) <= delay <= base * (1 + policy.jitter)
    assert RetryPolicy(initial_backoff=0.0, max_backoff=0.0).delay(10**9, rng) == 0.0
    exact = RetryPolicy(jitter=0.0)
    assert exact.delay(10**9, rng) == exact.max_backoff == 30.0


async def test_a_runtime_keeps_retrying_past_1024_failures(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = JumpingClock()
    calls = 0
    retried: list[float] = []

    async def flaky(action: Charge, ctx: ActionContext) -> Charged:
        nonlocal calls
        calls += 1
        if calls <= 1100:
            raise ConnectionError("provider down")
        return Charged(True)

    def listen(event: RuntimeEvent) -> None:
        if isinstance(event, ActionRetried):
            retried.append(event.delay)

    caplog.set_level(logging.ERROR, logger="fasm.runtime")  # not 1,100 retry warnings
    # No slow watchdog: its sleep would make this clock jump too.
    async with make(executors={Charge: flaky}, clock=clock, listeners=[listen],
                    slow_action_after=None) as rt:
        await rt.submit(Pay("a", 10))
        with anyio.fail_after(60):
            await rt.wait_idle()
        assert rt.state.applied == {0: 1}
    assert calls == 1101 and len(retried) == 1100
    assert all(27.0 <= d <= 33.0 for d in retried[20:])  # 30 s, jitter 10%
    assert clock.now() >= sum(retried)  # virtual: about nine hours of outage
