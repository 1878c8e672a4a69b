"""What runtime events carry for listeners that trace (fasm.otel): the machine, when an input was
queued and in which context, the queue depth, which transition emitted an action, when an
attempt began."""

from __future__ import annotations

import contextvars
import time

import anyio
import pytest

from fasm.runtime import (
    ActionCompleted,
    ActionContext,
    ActionDispatched,
    ActionRetried,
    Executor,
    RetryPolicy,
    RuntimeEvent,
    TransitionCommitted,
    TransitionRejected,
)
from tests._ledger import Charge, Charged, LedgerMachine, Pay
from tests.runtime.conftest import make

pytestmark = pytest.mark.anyio

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_events_carry_machine_times_context_and_emitting_seq() -> None:
    async def flaky(action: Charge, ctx: ActionContext) -> Charged:
        if ctx.attempt == 1:
            raise ConnectionError("down")
        return Charged(True)

    events: list[RuntimeEvent] = []
    policy = RetryPolicy(initial_backoff=0.0, max_backoff=0.0, jitter=0.0)
    before = time.time_ns()
    async with make(executors={Charge: Executor(flaky, retry=policy)},
                    listeners=[events.append]) as rt:
        request_id.set("req-7")
        await rt.submit(Pay("a", 10))
        with pytest.raises(Exception, match="has 90"):
            await rt.submit(Pay("a", 1000))
        await rt.wait_idle()
    name = LedgerMachine.machine_name
    pay, result = [e for e in events if isinstance(e, TransitionCommitted)]
    assert pay.machine == name and before <= pay.submitted_ns <= time.time_ns()
    assert pay.context is not None and pay.context.run(request_id.get) == "req-7"
    assert pay.queued == 0
    assert result.action_id == 0 and result.context is None and result.submitted_ns > 0
    (dispatched,) = [e for e in events if isinstance(e, ActionDispatched)]
    assert dispatched.seq == pay.seq and dispatched.machine == name
    (retried,) = [e for e in events if isinstance(e, ActionRetried)]
    (completed,) = [e for e in events if isinstance(e, ActionCompleted)]
    assert 0 < retried.started_ns <= completed.started_ns
    (rejected,) = [e for e in events if isinstance(e, TransitionRejected)]
    assert rejected.machine == name and rejected.submitted_ns > 0
    assert rejected.context is not None and rejected.action_id is None


async def test_restore_dispatches_with_no_emitting_seq() -> None:
    from fasm.persistence import MemoryStore

    store = MemoryStore()
    hung = anyio.Event()

    async def hang(action: Charge, ctx: ActionContext) -> Charged:
        hung.set()
        await anyio.sleep_forever()
        raise AssertionError

    async with make(store, executors={Charge: hang}, shutdown_grace=0.0) as rt:
        await rt.submit(Pay("a", 10))
        await hung.wait()
    events: list[RuntimeEvent] = []
    async with make(store, listeners=[events.append]) as rt:
        await rt.wait_idle()
    (dispatched,) = [e for e in events if isinstance(e, ActionDispatched)]
    assert dispatched.seq is None and dispatched.action_id == 0
