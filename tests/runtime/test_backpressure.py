"""Bounded work: submits wait while too many tracked actions are in flight (overall, and per
executor), results are never held back by it, an admission timeout answers ``Overloaded`` at
once with nothing queued, a restart with a large backlog dispatches within the concurrency
limits, and executor retries log proportionately. On asyncio and trio."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from fasm import web
from fasm.errors import DefinitionError, Overloaded, RuntimeClosed
from fasm.persistence import MemoryStore
from fasm.runtime import (
    ActionContext,
    ActionRetried,
    Executor,
    ManualClock,
    Runtime,
    RuntimeEvent,
)
from tests._ledger import Charge, Charged, Ledger, LedgerMachine, Note, Pay
from tests.runtime.conftest import JumpingClock

pytestmark = pytest.mark.anyio


async def quiet(note: Note) -> None:
    pass


class Held:
    """An executor whose calls wait until the test lets them return, one by one."""

    def __init__(self) -> None:
        self.waiting: list[anyio.Event] = []
        self.running = 0
        self.most = 0
        self.calls = 0

    async def __call__(self, action: Charge, ctx: ActionContext) -> Charged:
        gate = anyio.Event()
        self.waiting.append(gate)
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await gate.wait()
        finally:
            self.running -= 1
        return Charged(True)

    async def release(self, n: int = 1) -> None:
        await wait_all_tasks_blocked()  # the calls dispatched so far have started
        for _ in range(n):
            self.waiting.pop(0).set()


def make(store: MemoryStore | None = None, balance: int = 10_000,
         **kw: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
    kw.setdefault("handlers", {Note: quiet})
    kw.setdefault("clock", ManualClock())
    return Runtime(LedgerMachine(), initial_state=lambda: Ledger(balances={"a": balance}),
                   store=store or MemoryStore(), **kw)


async def test_submitters_wait_at_the_overall_limit_and_resume_when_results_commit() -> None:
    held = Held()
    done: list[int] = []
    async with make(executors={Charge: held}, max_pending_actions=2) as rt:
        await rt.submit(Pay("a", 1))
        await rt.submit(Pay("a", 1))
        assert len(rt.in_flight) == 2
        async with anyio.create_task_group() as tg:
            async def pay() -> None:
                done.append((await rt.submit(Pay("a", 1))).seq)

            tg.start_soon(pay)
            tg.start_soon(pay)
            await wait_all_tasks_blocked()
            assert done == [] and rt.seq == 2  # waiting before the queue: nothing ran
            await held.release()  # one result commits: room for one submit
            await wait_all_tasks_blocked()
            assert len(done) == 1 and len(rt.in_flight) == 2
            await held.release()
        assert len(done) == 2
        await held.release(2)
        await rt.wait_idle()
        assert rt.state.balances["a"] == 10_000 - 4


async def test_a_per_executor_limit_makes_submits_wait() -> None:
    held = Held()
    async with make(executors={Charge: Executor(held, max_pending=1)},
                    max_pending_actions=None) as rt:
        await rt.submit(Pay("a", 1))
        with pytest.raises(Overloaded) as info:
            await rt.submit(Pay("a", 1), admission_timeout=0)
        assert info.value.limit == "Charge.max_pending" and info.value.pending == 1
        assert rt.seq == 1
        await held.release()
        await rt.wait_idle()
        await rt.submit(Pay("a", 1), admission_timeout=0)  # room again
        await held.release()
        await rt.wait_idle()


async def test_admission_timeout_raises_overloaded_with_nothing_queued() -> None:
    held = Held()
    clock = ManualClock()
    async with make(executors={Charge: held}, max_pending_actions=1, admission_timeout=5.0,
                    clock=clock) as rt:
        await rt.submit(Pay("a", 1))
        outcome: list[BaseException] = []

        async def pay() -> None:
            try:
                await rt.submit(Pay("a", 1))
            except Overloaded as e:
                outcome.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pay)
            await wait_all_tasks_blocked()
            clock.advance(4.9)
            await wait_all_tasks_blocked()
            assert outcome == []
            clock.advance(0.1)
        assert len(outcome) == 1 and rt.seq == 1 and rt.state.balances["a"] == 9_999
        answer = web.http_error(outcome[0])
        assert answer is not None and answer.status == 503 and "Retry-After" in answer.headers
        await held.release()
        await rt.wait_idle()


async def test_results_are_never_held_back_by_waiting_submits() -> None:
    # A queue of one and a limit of one: the waiting submits hold no queue slot, so each
    # result still gets in, commits, and makes room for the next submit.
    held = Held()
    done = 0
    async with make(executors={Charge: held}, max_pending_actions=1, queue_size=1) as rt:
        async def pay() -> None:
            nonlocal done
            await rt.submit(Pay("a", 1))
            done += 1

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(pay)
            for n in range(1, 6):
                await wait_all_tasks_blocked()
                assert done == n and len(rt.in_flight) == 1
                await held.release()
        await rt.wait_idle()
        assert rt.state.applied == {i: 1 for i in range(5)}


async def test_a_stop_refuses_submits_waiting_for_room() -> None:
    held = Held()
    refused: list[BaseException] = []
    async with make(executors={Charge: held}, max_pending_actions=1, shutdown_grace=0) as rt:
        await rt.submit(Pay("a", 1))

        async def pay() -> None:
            try:
                await rt.submit(Pay("a", 1))
            except RuntimeClosed as e:
                refused.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pay)
            await wait_all_tasks_blocked()
            await rt.stop()
    assert len(refused) == 1


async def test_a_restart_with_a_large_backlog_dispatches_within_the_limits() -> None:
    store = MemoryStore()
    stuck = Held()
    async with make(store, executors={Charge: stuck}, max_pending_actions=None,
                    shutdown_grace=0) as rt:
        for _ in range(120):
            await rt.submit(Pay("a", 1))
        assert len(rt.in_flight) == 120
        # The process dies with 120 charges pending (a stop cancels them; restore re-emits).
    held = Held()
    async with make(store, executors={Charge: Executor(held, concurrency=7)},
                    max_in_flight=20, max_pending_actions=50) as rt:
        assert len(rt.in_flight) == 120
        await wait_all_tasks_blocked()
        assert held.running == 7
        with pytest.raises(Overloaded):  # the restored backlog is over the limit
            await rt.submit(Pay("a", 1), admission_timeout=0)
        while held.waiting:
            await held.release(len(held.waiting))
            await wait_all_tasks_blocked()
        await rt.wait_idle()
        assert held.calls == 120 and held.most == 7
        assert rt.state.applied == {i: 1 for i in range(120)}
        await rt.submit(Pay("a", 1), admission_timeout=0)
        await held.release()
        await rt.wait_idle()


async def test_options_are_checked() -> None:
    with pytest.raises(DefinitionError):
        make(executors={Charge: Held()}, max_pending_actions=0)
    with pytest.raises(DefinitionError):
        make(executors={Charge: Held()}, admission_timeout=-1)
    with pytest.raises(DefinitionError):
        Executor(Held(), max_pending=0)


async def test_retries_log_a_warning_at_attempts_1_10_100_and_every_one_to_listeners(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = 0
    retried: list[int] = []

    async def flaky(action: Charge, ctx: ActionContext) -> Charged:
        nonlocal calls
        calls += 1
        if calls <= 120:
            raise ConnectionError("provider down")
        return Charged(True)

    def listen(event: RuntimeEvent) -> None:
        if isinstance(event, ActionRetried):
            retried.append(event.attempt)

    caplog.set_level(logging.DEBUG, logger="fasm.runtime")
    async with make(executors={Charge: flaky}, clock=JumpingClock(), listeners=[listen],
                    slow_action_after=None) as rt:
        await rt.submit(Pay("a", 10))
        with anyio.fail_after(60):
            await rt.wait_idle()
    failed = [r for r in caplog.records if "failed: ConnectionError" in r.getMessage()]
    assert len(failed) == 120 and retried == list(range(1, 121))
    loud = [r.getMessage().split(" attempt ")[1].split()[0] for r in failed
            if r.levelno == logging.WARNING]
    assert loud == ["1", "10", "100"]
    assert all(r.levelno == logging.DEBUG for r in failed if r.levelno != logging.WARNING)
