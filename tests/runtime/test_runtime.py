"""The Runtime: submit, rollback, validation, backpressure, executors, handlers, start/stop,
crash and restart, timers, observability. Every test runs on asyncio and trio."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from fasm import InvalidInput, Tracked, TransitionFailed, Untracked
from fasm.errors import DefinitionError, RuntimeClosed, StoreUnavailable
from fasm.persistence import Journal, MemoryStore, Snapshot
from fasm.runtime import (
    ActionCompleted,
    ActionContext,
    ActionDispatched,
    ActionFailed,
    ActionRetried,
    Committed,
    Executor,
    HandlerFailed,
    ManualClock,
    RetryPolicy,
    Runtime,
    RuntimeEvent,
    TransitionCommitted,
    TransitionRejected,
)
from tests._ledger import (
    Charge,
    Charged,
    Deposit,
    Explode,
    Insufficient,
    Ledger,
    LedgerMachine,
    Note,
    Pay,
    Reemit,
    SetTimer,
    Shout,
)
from tests.runtime.conftest import make, ok_charge, quiet, run_clock

pytestmark = pytest.mark.anyio


# -- submit and atomicity ----------------------------------------------------------------------


async def test_submit_returns_committed_outcome() -> None:
    async with make() as rt:
        c = await rt.submit(Deposit("a", 5))
        assert c == Committed(seq=1, actions=(), duplicate=False)
        c = await rt.submit(Pay("a", 30))
        assert c.seq == 2 and c.actions[0] == Tracked(0, Charge("a", 30))
        assert rt.state.balances["a"] == 75
        await rt.wait_idle()
        assert rt.state.applied == {0: 1} and rt.seq == 3


async def test_rejection_is_raised_and_state_unchanged() -> None:
    async with make() as rt:
        with pytest.raises(Insufficient):
            await rt.submit(Pay("a", 500))
        assert rt.state.balances == {"a": 100} and rt.seq == 0
        assert (await rt.submit(Deposit("a", 1))).seq == 1  # still serving


@pytest.mark.parametrize("durability", [Journal(), Snapshot()], ids=["journal", "snapshot"])
@pytest.mark.parametrize("rollback", ["reload", "copy", "trust-rejected"])
async def test_stf_that_mutates_then_raises_leaves_state_unchanged(
    durability: Any, rollback: str
) -> None:
    async with make(durability=durability, rollback=rollback) as rt:
        await rt.submit(Deposit("a", 5))
        with pytest.raises(TransitionFailed, match="boom after mutating") as info:
            await rt.submit(Explode("a"))
        assert isinstance(info.value.__cause__, RuntimeError)
        assert rt.state.balances == {"a": 105} and rt.state.next_id == 0
        assert (await rt.submit(Pay("a", 5))).actions[0] == Tracked(0, Charge("a", 5))


async def test_failure_inside_a_commit_group_keeps_the_others() -> None:
    """Concurrent submits share a group; one exploding in the middle rolls back only itself."""
    async with make(durability=Snapshot()) as rt:
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            try:
                results[i] = await rt.submit(Explode("a") if i == 5 else Deposit("a", 1))
            except TransitionFailed as e:
                results[i] = e

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
        assert isinstance(results[5], TransitionFailed)
        assert rt.state.balances == {"a": 109} and rt.seq == 9
    async with make(store=rt.store) as again:  # what was committed is what the state says
        assert again.state.balances == {"a": 109}


async def test_invalid_input_is_refused_before_stf_and_runtime_keeps_serving() -> None:
    async with make() as rt:
        with pytest.raises(InvalidInput, match="expected"):
            await rt.submit({"account": "a", "amount": 1})
        with pytest.raises(InvalidInput):
            await rt.submit(Deposit("a", "lots"))  # type: ignore[arg-type]
        assert (await rt.submit(Deposit("a", 1))).seq == 1


async def test_idempotent_submit_survives_restart() -> None:
    store = MemoryStore()
    async with make(store) as rt:
        first = await rt.submit(Deposit("a", 10), idempotency_key="req-1")
        again = await rt.submit(Deposit("a", 10), idempotency_key="req-1")
        assert (first.seq, first.duplicate, again.seq, again.duplicate) == (1, False, 1, True)
    async with make(store) as rt:
        replay = await rt.submit(Deposit("a", 10), idempotency_key="req-1")
        assert replay.duplicate and replay.seq == 1 and rt.state.balances["a"] == 110


async def test_transitions_run_one_at_a_time_with_backpressure() -> None:
    gate = anyio.Event()
    running = 0
    most = 0

    class Slow(LedgerMachine):
        async def stf(self, state: Ledger, input: Any, actions: Any) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await gate.wait()
            running -= 1
            await super().stf(state, input, actions)

    rt = Runtime(Slow(), initial_state=Ledger(), executors={Charge: ok_charge},
                 handlers={Note: quiet}, queue_size=2, max_group=1, clock=ManualClock())
    async with rt, anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(rt.submit, Deposit("a", 1))
        await anyio.wait_all_tasks_blocked()
        stats = rt._receive.statistics()  # type: ignore[union-attr]
        # one input in stf, two queued, three submitters held back by the bounded queue
        assert (stats.current_buffer_used, stats.tasks_waiting_send) == (2, 3)
        gate.set()
    assert most == 1 and rt.state.balances == {"a": 6}


async def test_group_commit_shares_store_writes() -> None:
    events: list[RuntimeEvent] = []
    store = MemoryStore()
    commits = 0
    real_commit = store.commit

    async def counting_commit(*a: Any, **kw: Any) -> None:
        nonlocal commits
        commits += 1
        await real_commit(*a, **kw)

    store.commit = counting_commit  # type: ignore[method-assign]
    async with make(store, listeners=[events.append]) as rt, anyio.create_task_group() as tg:
        for _ in range(64):
            tg.start_soon(rt.submit, Deposit("a", 1))
    groups = [e.group for e in events if isinstance(e, TransitionCommitted)]
    assert len(groups) == 64 and max(groups) > 1 and commits < 64


# -- executors -------------------------------------------------------------------------------


async def test_executor_context_and_results_fed_back() -> None:
    seen: list[ActionContext] = []

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        seen.append(ctx)
        return Charged(action.amount < 50)

    async with make(executors={Charge: charge}, key="shop-1") as rt:
        await rt.submit(Pay("a", 10))
        await rt.submit(Pay("a", 60))
        await rt.wait_idle()
        assert rt.state.balances == {"a": 90}  # the failed charge was refunded
        assert rt.state.applied == {0: 1, 1: 1}
        assert rt.store is not None
        identity = rt.store.identity
    ctx = seen[0]
    assert (ctx.machine_key, ctx.action_id, ctx.attempt, ctx.deadline) == ("shop-1", 0, 1, None)
    # unique across stores: the store's identity first, so a fresh store never reuses a key
    assert ctx.idempotency_key == f"{identity}/{LedgerMachine.machine_name}/shop-1/0"


async def test_retries_with_backoff_then_success() -> None:
    clock = ManualClock()
    calls: list[tuple[int, float]] = []

    async def flaky(action: Charge, ctx: ActionContext) -> Charged:
        calls.append((ctx.attempt, clock.now()))
        if ctx.attempt < 4:
            raise ConnectionError("provider down")
        return Charged(True)

    events: list[RuntimeEvent] = []
    policy = RetryPolicy(initial_backoff=1.0, multiplier=2.0, max_backoff=3.0, jitter=0.0)
    async with make(clock=clock, executors={Charge: Executor(flaky, retry=policy)},
                    listeners=[events.append]) as rt:
        await rt.submit(Pay("a", 10))
        await run_clock(clock, lambda: not rt.in_flight)
        assert rt.state.applied == {0: 1}
    assert calls == [(1, 0.0), (2, 1.0), (3, 3.0), (4, 6.0)]  # 1, 2, then capped at 3
    assert [e.delay for e in events if isinstance(e, ActionRetried)] == [1.0, 2.0, 3.0]
    assert any(isinstance(e, ActionCompleted) and e.attempts == 4 for e in events)


async def test_attempt_timeout_uses_the_clock() -> None:
    clock = ManualClock()

    async def slow_then_fast(action: Charge, ctx: ActionContext) -> Charged:
        if ctx.attempt == 1:
            assert ctx.deadline == clock.now() + 5
            await clock.sleep_until(clock.now() + 100)
        return Charged(True)

    events: list[RuntimeEvent] = []
    policy = RetryPolicy(timeout=5, initial_backoff=0.5, jitter=0)
    async with make(clock=clock, executors={Charge: Executor(slow_then_fast, retry=policy)},
                    listeners=[events.append]) as rt:
        await rt.submit(Pay("a", 10))
        await run_clock(clock, lambda: not rt.in_flight)
    retried = [e for e in events if isinstance(e, ActionRetried)]
    assert len(retried) == 1 and isinstance(retried[0].error, TimeoutError)
    assert clock.now() == 5.5


async def test_exhausted_retries_become_a_result_via_on_exhausted() -> None:
    clock = ManualClock()

    async def down(action: Charge, ctx: ActionContext) -> Charged:
        raise ConnectionError("down")

    events: list[RuntimeEvent] = []
    spec = Executor(down, retry=RetryPolicy(max_attempts=3, jitter=0),
                    on_exhausted=lambda action, error: Charged(False))
    async with make(clock=clock, executors={Charge: spec}, listeners=[events.append]) as rt:
        await rt.submit(Pay("a", 10))
        await run_clock(clock, lambda: not rt.in_flight)
        assert rt.state.balances == {"a": 100} and rt.state.applied == {0: 1}
    failed = [e for e in events if isinstance(e, ActionFailed)]
    assert len(failed) == 1 and failed[0].attempts == 3 and failed[0].result == Charged(False)


async def test_without_on_exhausted_retries_never_stop() -> None:
    clock = ManualClock()
    attempts = 0

    async def down(action: Charge, ctx: ActionContext) -> Charged:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("down")

    policy = RetryPolicy(initial_backoff=1, max_backoff=10, jitter=0)
    async with make(clock=clock, executors={Charge: Executor(down, retry=policy)},
                    shutdown_grace=0) as rt:
        await rt.submit(Pay("a", 10))
        await run_clock(clock, lambda: attempts >= 30)
        assert set(rt.in_flight) == {0}  # still pending, never dropped
    with pytest.raises(DefinitionError, match="needs on_exhausted"):
        Executor(down, retry=RetryPolicy(max_attempts=2))


async def test_executor_returning_the_wrong_type_is_retried() -> None:
    clock = ManualClock()

    async def sloppy(action: Charge, ctx: ActionContext) -> Any:
        return "ok" if ctx.attempt == 1 else Charged(True)

    events: list[RuntimeEvent] = []
    async with make(clock=clock, executors={Charge: Executor(sloppy, retry=RetryPolicy(jitter=0))},
                    listeners=[events.append]) as rt:
        await rt.submit(Pay("a", 10))
        await run_clock(clock, lambda: not rt.in_flight)
        assert rt.state.applied == {0: 1}
    retried = [e for e in events if isinstance(e, ActionRetried)]
    assert "tracked result type" in str(retried[0].error)


async def test_concurrency_limit_bounds_executor_calls() -> None:
    running = most = 0
    release = anyio.Event()

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return Charged(True)

    async with make(executors={Charge: charge}, max_in_flight=2) as rt:
        for _ in range(5):
            await rt.submit(Pay("a", 1))
        await anyio.wait_all_tasks_blocked()
        assert running == 2
        release.set()
        await rt.wait_idle()
    assert most == 2

    most = 0
    release = anyio.Event()
    async with make(executors={Charge: Executor(charge, concurrency=1)}) as rt:
        for _ in range(3):
            await rt.submit(Pay("a", 1))
        await anyio.wait_all_tasks_blocked()
        release.set()
        await rt.wait_idle()
    assert most == 1


async def test_an_id_in_flight_is_not_dispatched_twice() -> None:
    calls = 0
    release = anyio.Event()

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        nonlocal calls
        calls += 1
        await release.wait()
        return Charged(True)

    async with make(executors={Charge: charge}) as rt:
        await rt.submit(Pay("a", 1))
        await rt.submit(Reemit(0))
        await anyio.wait_all_tasks_blocked()
        release.set()
        await rt.wait_idle()
        assert rt.state.applied == {0: 1}
    assert calls == 1


async def test_missing_or_stray_executors_are_definition_errors() -> None:
    with pytest.raises(DefinitionError, match="no executor for tracked action type"):
        make(executors={})
    with pytest.raises(DefinitionError, match="no handler for untracked"):
        make(handlers={})
    with pytest.raises(DefinitionError, match="not in LedgerMachine's tracked-action type"):
        make(executors={Charge: ok_charge, str: ok_charge})
    with pytest.raises(DefinitionError):
        make(queue_size=0)


async def test_result_the_stf_refuses_is_logged_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = anyio.Event()

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        await release.wait()
        return Charged(True)

    class Forgetful(LedgerMachine):
        async def stf(self, state: Ledger, input: Any, actions: Any) -> None:
            if isinstance(input.__class__, type) and input.__class__.__name__ == "Normal" and \
                    isinstance(input.value, Shout):
                state.pending.clear()  # the result that comes later will be unknown
                return
            await super().stf(state, input, actions)

    rt = Runtime(Forgetful(), initial_state=Ledger(balances={"a": 5}),
                 executors={Charge: charge}, handlers={Note: quiet}, clock=ManualClock())
    with caplog.at_level(logging.ERROR, logger="fasm.runtime"):
        async with rt:
            await rt.submit(Pay("a", 5))
            await rt.submit(Shout("forget"))
            release.set()
            await rt.wait_idle()
            assert (await rt.submit(Deposit("a", 1))).seq == 3  # still serving
    assert any("refused the result of tracked action 0" in r.getMessage() for r in caplog.records)


# -- handlers --------------------------------------------------------------------------------


async def test_failing_and_hanging_handlers_never_stall_transitions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    events: list[RuntimeEvent] = []
    got: list[str] = []

    async def handler(note: Note) -> None:
        if note.text == "raise":
            raise ValueError("handler bug")
        if note.text == "hang":
            await anyio.sleep_forever()
        got.append(note.text)

    with caplog.at_level(logging.ERROR, logger="fasm.runtime"):
        async with make(clock=clock, handlers={Note: handler}, listeners=[events.append],
                        handler_timeout=10) as rt:
            await rt.submit(Shout("hang"))
            await rt.submit(Shout("raise"))
            for i in range(20):
                await rt.submit(Deposit("a", i))
            await rt.submit(Shout("fine"))
            await run_clock(clock, lambda: len([e for e in events
                                                if isinstance(e, HandlerFailed)]) == 2)
            assert rt.seq == 23
    failures = {type(e.error) for e in events if isinstance(e, HandlerFailed)}
    assert failures == {ValueError, TimeoutError} and got == ["fine"]
    assert any(getattr(r, "fasm_seq", None) == 2 for r in caplog.records)


# -- start, stop, crash, restart ---------------------------------------------------------------


async def test_stop_refuses_input_and_waits_for_in_flight_work() -> None:
    release = anyio.Event()

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        await release.wait()
        return Charged(True)

    store = MemoryStore()
    rt = make(store, executors={Charge: charge})
    async with rt:
        await rt.submit(Pay("a", 10))

        async def finish_soon() -> None:
            await anyio.wait_all_tasks_blocked()
            release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_soon)
            await rt.stop()
    assert rt.state.applied == {0: 1} and not rt.running
    with pytest.raises(RuntimeClosed):
        await rt.submit(Deposit("a", 1))


async def test_stop_cancels_work_after_the_grace_period_and_next_start_resumes() -> None:
    async def never(action: Charge, ctx: ActionContext) -> Charged:
        await anyio.sleep_forever()
        raise AssertionError

    store = MemoryStore()
    async with make(store, executors={Charge: never}, shutdown_grace=0.05) as rt:
        await rt.submit(Pay("a", 10))
    assert set(rt.in_flight) == {0}
    async with make(store) as rt2:  # restore re-dispatches charge 0 to a working executor
        await rt2.wait_idle()
        assert rt2.state.applied == {0: 1} and rt2.state.balances == {"a": 90}


async def test_crash_with_actions_in_flight_then_restart_applies_each_result_once() -> None:
    calls: dict[int, int] = {}
    stuck = anyio.Event()

    async def hanging(action: Charge, ctx: ActionContext) -> Charged:
        calls[ctx.action_id] = calls.get(ctx.action_id, 0) + 1
        await stuck.wait()
        return Charged(True)

    store = MemoryStore()
    with anyio.CancelScope() as crash:
        async with make(store, executors={Charge: hanging}) as rt:
            for _ in range(5):
                await rt.submit(Pay("a", 10))
            await anyio.wait_all_tasks_blocked()
            assert set(rt.in_flight) == set(range(5))
            crash.cancel()  # kill: no drain, no grace
            await anyio.sleep_forever()
    assert crash.cancelled_caught and calls == dict.fromkeys(range(5), 1)

    done: list[int] = []

    async def working(action: Charge, ctx: ActionContext) -> Charged:
        done.append(ctx.action_id)
        return Charged(True)

    async with make(store, executors={Charge: working}) as rt:
        await rt.wait_idle()
        assert sorted(done) == list(range(5))
        assert rt.state.applied == dict.fromkeys(range(5), 1)
        assert rt.state.balances == {"a": 50} and rt.state.pending == {}
    async with make(store, executors={Charge: working}) as rt:  # nothing left to restore
        await rt.wait_idle()
        assert sorted(done) == list(range(5))


async def test_handler_still_running_after_grace_is_cancelled_and_reported() -> None:
    events: list[RuntimeEvent] = []

    async def stuck(note: Note) -> None:
        await anyio.sleep_forever()

    async with make(handlers={Note: stuck}, shutdown_grace=0.05, listeners=[events.append]) as rt:
        await rt.submit(Shout("hello"))
    failed = [e for e in events if isinstance(e, HandlerFailed)]
    assert len(failed) == 1 and isinstance(failed[0].error, RuntimeClosed)
    assert failed[0].action == Note("hello")


async def test_a_runtime_starts_once() -> None:
    rt = make()
    async with rt:
        pass
    with pytest.raises(RuntimeClosed, match="starts once"):
        async with rt:
            pass


async def test_store_failure_mid_commit_stops_the_runtime_without_acknowledging() -> None:
    store = MemoryStore()
    with pytest.raises(StoreUnavailable):
        async with make(store) as rt:
            await rt.submit(Deposit("a", 1))
            store.fail_next_commits = 1
            with pytest.raises(StoreUnavailable, match="injected"):
                await rt.submit(Deposit("a", 1000))
            with pytest.raises(RuntimeClosed) as closed:
                await rt.submit(Deposit("a", 1))
            assert isinstance(closed.value.__cause__, StoreUnavailable)
    async with make(store) as again:
        assert again.state.balances == {"a": 101} and again.seq == 1


# -- timers ------------------------------------------------------------------------------------


async def test_durable_timer_fires_and_survives_restart() -> None:
    clock = ManualClock(start=100.0)
    store = MemoryStore()
    async with make(store, clock=clock, shutdown_grace=0) as rt:
        await rt.submit(SetTimer(at=160.0))
        clock.advance(30)
        await anyio.wait_all_tasks_blocked()
        assert rt.state.woke == [] and set(rt.in_flight) == {0}
    async with make(store, clock=clock) as rt:  # restore re-arms it
        await run_clock(clock, lambda: rt.state.woke == [0])
        assert clock.now() == 160.0 and rt.state.timers == {}


# -- observability -----------------------------------------------------------------------------


async def test_listeners_see_the_lifecycle_and_a_broken_listener_is_harmless(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[RuntimeEvent] = []

    def broken(event: RuntimeEvent) -> None:
        raise RuntimeError("listener bug")

    with caplog.at_level(logging.ERROR, logger="fasm.runtime"):
        async with make(listeners=[broken, events.append]) as rt:
            await rt.submit(Pay("a", 10))
            with pytest.raises(Insufficient):
                await rt.submit(Pay("a", 1000))
            await rt.wait_idle()
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["TransitionCommitted", "ActionDispatched"]
    assert "TransitionRejected" in kinds and "ActionCompleted" in kinds
    rejected = next(e for e in events if isinstance(e, TransitionRejected))
    assert rejected.expected and rejected.input_kind == "Pay"
    dispatched = next(e for e in events if isinstance(e, ActionDispatched))
    assert dispatched.action == Charge("a", 10)
    committed = [e for e in events if isinstance(e, TransitionCommitted)]
    assert [c.input_kind for c in committed] == ["Pay", "TrackedActionCompleted"]
    assert any("listener" in r.getMessage() for r in caplog.records)


async def test_untracked_actions_reach_handlers_in_order() -> None:
    got: list[str] = []

    async def handler(note: Note) -> None:
        got.append(note.text)

    async with make(handlers={Note: handler}) as rt:
        for word in ("one", "two", "three"):
            c = await rt.submit(Shout(word))
            assert c.actions == (Untracked(Note(word)),)
        await anyio.wait_all_tasks_blocked()
    assert got == ["one", "two", "three"]



async def test_real_store_locked_mid_run_stops_without_acknowledging(tmp_path: Any) -> None:
    """SQLite locked by another process's connection: the commit fails, the runtime stops, and
    what was acknowledged before is intact."""
    import sqlite3

    from fasm.persistence import SQLiteStore

    path = tmp_path / "locked.db"
    with pytest.raises(StoreUnavailable, match="locked"):
        async with make(SQLiteStore(path, busy_timeout=0.1)) as rt:
            await rt.submit(Deposit("a", 1))
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(StoreUnavailable, match="locked"):
                    await rt.submit(Deposit("a", 1000))
                with pytest.raises(RuntimeClosed):
                    await rt.submit(Deposit("a", 1))
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
    async with make(SQLiteStore(path)) as again:
        assert again.state.balances == {"a": 101}
        assert again.seq == 1
