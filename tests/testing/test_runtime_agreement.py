"""The machines the simulation checks are the ones the Runtime hosts: the same objects run in
production on asyncio and trio, and a fault-free simulation of the same inputs ends in the same
state."""

from __future__ import annotations

import pytest

from fasm.runtime import ActionContext, Runtime
from fasm.testing import FaultPlan
from tests.testing.machines import (
    Call,
    Desk,
    DeskMachine,
    Note,
    Place,
    Ship,
    Shipped,
    Wait,
    desk_sim,
    stock_is_conserved,
)

ORDERS = [Place(5, "ada"), Wait("bo"), Place(12, "cy"), Wait("ada"), Place(3, "bo")]


async def _ship(action: Ship, ctx: ActionContext) -> Shipped:
    return Shipped()


async def _call(action: Call, ctx: ActionContext) -> Shipped:
    return Shipped()


async def _note(note: Note) -> None:
    return None


@pytest.mark.anyio
async def test_simulated_machine_runs_under_the_runtime() -> None:
    async with Runtime(DeskMachine(), initial_state=Desk,
                       executors={Ship: _ship, Call: _call}, handlers={Note: _note}) as rt:
        for order in ORDERS:
            await rt.submit(order)
        await rt.wait_idle()
        state = rt.state
    assert stock_is_conserved(state) is None
    assert not state.pending and state.shipped_total == 20 and state.waiting == {"ada", "bo"}

    # The same inputs through the simulation (no faults): the same transitions, the same state.
    orders = iter(ORDERS)
    sim = desk_sim(inputs=lambda rng, s: next(orders, None), faults=FaultPlan.none(),
                   executors={Ship: lambda a: Shipped(), Call: lambda a: Shipped()})
    result = sim.run_seed(0, trace_limit=None)
    assert result.ok, result.failure
    assert result.counts["transitions"] == len(ORDERS) + 3  # three shipments came back
    assert result.state == state
