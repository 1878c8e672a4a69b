"""The bank example (examples/bank): one keyed instance per account, transfers between keys by
message, cash by a tracked action. Money is conserved at every step and exactly once idle; a
restart in the middle of transfers finishes them all. On asyncio and trio, SQLite."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from examples.bank.machine import (
    Account,
    Bank,
    Deposit,
    Dispense,
    Dispensed,
    Freeze,
    money,
    open_account,
)
from fasm.persistence import SQLiteStore
from fasm.runtime import ActionContext, Runtime
from tests.examples.bank_traffic import traffic

pytestmark = pytest.mark.anyio

KEYS = [f"acct-{n}" for n in range(30)]


def bank(path: Path, dispense_gate: anyio.Event | None = None) -> Runtime[
        Account, object, str, object, object, object]:
    async def dispense(action: Dispense, ctx: ActionContext) -> Dispensed:
        if dispense_gate is not None:
            await dispense_gate.wait()
        return Dispensed(action.id)

    return Runtime(Bank(), initial_state=open_account, keyed=True,
                   store=SQLiteStore(path), executors={Dispense: dispense}, max_active=8)


async def accounts(rt: Runtime[Account, object, str, object, object, object]) -> list[Account]:
    return [await rt.read(lambda s: s, key=k) for k in KEYS]


async def test_money_is_conserved_and_a_restart_finishes_every_transfer(
        tmp_path: Path) -> None:
    path = tmp_path / "bank.db"
    gate = anyio.Event()  # cash is not dispensed before the restart: withdrawals stay in flight
    async with bank(path, gate) as rt:
        for k in KEYS:
            await rt.submit(Deposit(100), key=k)
        await rt.submit(Freeze(), key="acct-29")  # credits to it are refunded
        refused = await traffic(rt, KEYS, seed=7, n=300)
        assert refused < 300
        state = money(await accounts(rt))
        assert state.conserved(), state
        assert state.deposited == 100 * len(KEYS)
        pending = sum(len(a.dispensing) for a in await accounts(rt))
        assert pending > 0  # the restart has work to finish
    async with bank(path) as rt:
        assert rt.active_keys >= 1  # the keys with cash in flight, restored
        await rt.wait_idle()
        after = await accounts(rt)
        assert all(not a.sending and not a.dispensing for a in after)
        state = money(after)
        assert state.held == state.deposited == 100 * len(KEYS), state
        assert sum(a.refunded for a in after) > 0  # transfers to the frozen account came back
        assert after[-1].received == 0
