"""Keyed instances with state in a database (``Runtime(keyed=True, database=...)``), on real
SQLite and real PostgreSQL, on asyncio and trio: the stf gets its key as
``Transaction.machine_key``, a group spanning keys is one transaction (each refused input undone
alone), money is conserved across accounts under concurrent transfers, a start restores exactly
the keys with actions in flight (found through the in-flight index, the others not read), and one
runtime holds all the keys of its machine."""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import anyio
import pytest

from examples.bank.machine import Deposit, Dispense, Dispensed, Freeze, Withdraw
from examples.bank.sql_machine import SqlBank, create_tables, sql_money
from fasm import Rejected
from fasm.errors import StoreConflict
from fasm.persistence import Database, Transaction
from fasm.runtime import ActionContext, Runtime, RuntimeEvent, TransitionCommitted
from tests.examples.bank_traffic import traffic
from tests.persistence.txn_ledger import DatabaseFactory, make_db

__all__ = ("make_db",)  # the fixture, imported so that pytest finds it here

pytestmark = pytest.mark.anyio

KEYS = [f"acct-{n:02d}" for n in range(20)]


class CountingBank(SqlBank):
    """Records the keys restore ran for."""

    restored: ClassVar[list[str]] = []

    @staticmethod
    async def restore(txn: Transaction, actions: Any) -> None:
        assert txn.machine_key is not None and txn.readonly
        CountingBank.restored.append(txn.machine_key)
        await SqlBank.restore(txn, actions)


def bank(database: Database, gate: anyio.Event | None = None, machine: SqlBank | None = None,
         **options: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
    async def dispense(action: Dispense, ctx: ActionContext) -> Dispensed:
        assert ctx.machine_key == action.account
        if gate is not None:
            await gate.wait()
        return Dispensed(action.id)

    return Runtime(machine or SqlBank(), keyed=True, database=database,
                   executors={Dispense: dispense}, **options)


async def test_money_is_conserved_across_keys_in_one_database(
        make_db: DatabaseFactory) -> None:
    events: list[RuntimeEvent] = []
    db = make_db()
    async with bank(db, listeners=[events.append]) as rt:
        await create_tables(db)
        for k in KEYS:
            await rt.submit(Deposit(100), key=k)
        await rt.submit(Freeze(), key=KEYS[-1])  # credits to it are refused, then refunded
        refused = await traffic(rt, KEYS, 1, 400)
        await rt.wait_idle()
        money, pending = await sql_money(db)
        async with db.transaction(readonly=True) as txn:
            refunded = await txn.fetchval("SELECT SUM(refunded) FROM bank_accounts")
            in_flight = await txn.fetchall('SELECT key FROM "fasm_in_flight"')
    assert pending == 0
    assert money.held == money.deposited == 100 * len(KEYS), money
    assert 0 < refused < 400
    commits = [e for e in events if isinstance(e, TransitionCommitted)]
    # Groups spanning several keys were committed as one transaction.
    spanning, i = 0, 0
    while i < len(commits):
        group = commits[i:i + commits[i].group]
        spanning += len({e.key for e in group}) > 1
        i += len(group)
    assert spanning > 0, "no group spanned keys"
    assert refunded > 0 and in_flight == []


async def test_a_refused_input_is_undone_alone_in_a_group_of_keys(
        make_db: DatabaseFactory) -> None:
    db = make_db()
    async with bank(db) as rt:
        await create_tables(db)
        outcomes: dict[int, bool] = {}

        async def one(i: int) -> None:
            key = KEYS[i % 5]
            value = Deposit(10) if i % 3 else Withdraw(f"w{i}", 1_000)  # refused: no money
            try:
                await rt.submit(value, key=key)
                outcomes[i] = True
            except Rejected:
                outcomes[i] = False

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(one, i)
        expected = Counter[str]()
        for i, ok in outcomes.items():
            assert ok == bool(i % 3)
            if ok:
                expected[KEYS[i % 5]] += 10
        async with db.transaction(readonly=True) as txn:
            rows = dict(await txn.fetchall("SELECT key, balance FROM bank_accounts"))
    assert rows == dict(expected)


async def test_a_start_restores_exactly_the_keys_with_actions_in_flight(
        make_db: DatabaseFactory) -> None:
    gate = anyio.Event()  # cash is not dispensed before the stop: withdrawals stay in flight
    db = make_db()
    async with bank(db, gate, shutdown_grace=0.1) as rt:
        await create_tables(db)
        for k in KEYS:
            await rt.submit(Deposit(50), key=k)
        for k in KEYS[:3]:
            await rt.submit(Withdraw(f"cash-{k}", 20), key=k)
        assert set(rt.in_flight_by_key) == set(KEYS[:3])
    async with db, db.transaction(readonly=True) as txn:
        marked = [r[0] for r in await txn.fetchall('SELECT key FROM "fasm_in_flight"')]
    assert marked == KEYS[:3]

    CountingBank.restored = []
    db = make_db()
    async with bank(db, machine=CountingBank()) as rt:
        assert sorted(CountingBank.restored) == KEYS[:3]  # the 17 idle keys were not read
        await rt.wait_idle()
        assert rt.in_flight_by_key == {}
        money, pending = await sql_money(db)
        async with db.transaction(readonly=True) as txn:
            paid = await txn.fetchall("SELECT key, paid_out FROM bank_accounts "
                                      "WHERE paid_out > 0 ORDER BY key")
            marked = await txn.fetchall('SELECT key FROM "fasm_in_flight"')
    assert pending == 0 and money.held == money.deposited == 50 * len(KEYS)
    assert paid == [(k, 20) for k in KEYS[:3]] and marked == []


async def test_a_restart_in_the_middle_of_transfers_finishes_them(
        make_db: DatabaseFactory) -> None:
    gate = anyio.Event()
    db = make_db()
    async with bank(db, gate, shutdown_grace=0.1) as rt:
        await create_tables(db)
        for k in KEYS:
            await rt.submit(Deposit(100), key=k)
        await traffic(rt, KEYS, 2, 200)
        in_flight = sum(len(a) for a in rt.in_flight_by_key.values())
    assert in_flight > 0  # withdrawals wait for the gate; transfers may be mid-delivery
    db = make_db()
    async with bank(db) as rt:
        await rt.wait_idle()
        money, pending = await sql_money(db)
    assert pending == 0 and money.held == money.deposited == 100 * len(KEYS)


async def test_one_runtime_holds_all_the_keys_of_its_machine(make_db: DatabaseFactory) -> None:
    async with bank(make_db()):
        with pytest.raises(StoreConflict):
            async with bank(make_db()):
                pass  # pragma: no cover
