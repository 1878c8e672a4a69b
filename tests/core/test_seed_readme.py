"""The seed README's PaymentSystem example runs as written."""

from __future__ import annotations

import pytest

from examples.seed_readme import (
    Charge,
    InsufficientFunds,
    PaymentMachine,
    PaymentSystem,
    Process,
    Status,
)
from examples.seed_readme import main as seed_main
from fasm import ActionList, Normal, Tracked


@pytest.mark.anyio
async def test_seed_example_through_the_runtime() -> None:
    state = await seed_main()
    assert state.balance == 900
    assert {i: p.status for i, p in state.pending.items()} == {
        0: Status.CONFIRMED, 1: Status.FAILED}


@pytest.mark.anyio
async def test_seed_example_stf_called_directly() -> None:
    machine, state, actions = PaymentMachine(), PaymentSystem(balance=50), ActionList()
    await machine.stf(state, Normal(Process(20, "ada")), actions)
    assert list(actions) == [Tracked(0, Charge(20))]
    with pytest.raises(InsufficientFunds):
        await machine.stf(state, Normal(Process(80, "ada")), actions)
    assert state.next_id == 1 and state.balance == 50
