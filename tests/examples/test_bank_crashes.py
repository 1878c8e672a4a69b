"""The bank under seeded crashes at the multi-key commit: the store goes down just before a
group's write (nothing of it is durable) or just after it (durable, never acknowledged, so
every send of the group is sent again after the restart). After each crash a fresh runtime on
the same store finishes what was in flight; then no acknowledged deposit is lost, nothing is
left in flight on any key, and money is conserved exactly (a credit applied twice, or a refund
of a delivered transfer, would make money). On asyncio and trio, over many seeds."""

from __future__ import annotations

import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from examples.bank.machine import (
    Bank,
    Deposit,
    Dispense,
    Dispensed,
    Freeze,
    Transfer,
    Withdraw,
    money,
    open_account,
)
from fasm import Rejected
from fasm.errors import RuntimeClosed, StoreUnavailable
from fasm.persistence import MemoryStore
from fasm.runtime import ActionContext, Runtime

pytestmark = pytest.mark.anyio

KEYS = [f"acct-{n}" for n in range(12)]


class CrashingStore(MemoryStore):
    """A real MemoryStore whose ``fail_at``-th write fails, before or after writing."""

    def __init__(self, fail_at: int, after: bool) -> None:
        super().__init__()
        self.fail_at, self.after = fail_at, after
        self.writes = 0
        self.crashed = False

    async def _write(self, write: Any) -> None:
        self.writes += 1
        if self.writes != self.fail_at or self.crashed:
            await write
            return
        self.crashed = True
        if self.after:
            await write
        else:
            write.close()
        raise StoreUnavailable("disk gone", store=self.description)

    async def commit(self, key: str, **kw: Any) -> None:
        await self._write(super().commit(key, **kw))

    async def commit_many(self, commits: Any) -> None:
        await self._write(super().commit_many(commits))


async def dispense(action: Dispense, ctx: ActionContext) -> Dispensed:
    await anyio.lowlevel.checkpoint()
    return Dispensed(action.id)


def bank(store: MemoryStore) -> Runtime[Any, Any, Any, Any, Any, Any]:
    return Runtime(Bank(), initial_state=open_account, keyed=True, store=store,
                   executors={Dispense: dispense}, max_active=5)


@pytest.mark.parametrize("seed", range(16))
async def test_money_survives_a_crash_at_any_group_commit(seed: int) -> None:
    rng = random.Random(seed)
    store = CrashingStore(fail_at=rng.randint(3, 40), after=seed % 2 == 1)
    acked_deposits = 0
    tried_deposits = 0

    async def client(c: int) -> None:
        nonlocal acked_deposits, tried_deposits
        for i in range(60):
            src, dst = rng.choice(KEYS), rng.choice(KEYS)
            roll = rng.random()
            value: Any
            if roll < 0.3:
                value = Deposit(rng.randint(1, 50))
                tried_deposits += value.amount
            elif roll < 0.85:
                value = Transfer(f"t{c}-{i}", dst, rng.randint(1, 40))
            else:
                value = Withdraw(f"w{c}-{i}", rng.randint(1, 20))
            try:
                await rt.submit(value, key=src)
            except Rejected:
                continue
            except (RuntimeClosed, StoreUnavailable):
                return
            if isinstance(value, Deposit):
                acked_deposits += value.amount

    rt = bank(store)
    try:
        async with rt:
            await rt.submit(Freeze(), key="acct-11")
            async with anyio.create_task_group() as tg:
                for c in range(6):
                    tg.start_soon(client, c)
            await rt.wait_idle()
    except (StoreUnavailable, RuntimeClosed):
        pass  # the crash: the body's wait saw it, or leaving the runtime raised it
    assert store.crashed, f"seed {seed}: the store never failed ({store.writes} writes)"
    async with bank(store) as rt:
        await rt.wait_idle()
        accounts = [await rt.read(lambda s: s, key=k) for k in KEYS]
    assert all(not a.sending and not a.dispensing for a in accounts), accounts
    state = money(accounts)
    assert state.held == state.deposited, (seed, state)
    assert acked_deposits <= state.deposited <= tried_deposits, (seed, state, acked_deposits)
