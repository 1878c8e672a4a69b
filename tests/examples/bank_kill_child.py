"""Child process for the bank kill -9 test: a keyed Runtime of 10,000 accounts on SQLite under
load from 64 submitters (deposits, transfers between random accounts, cash withdrawals), which
reports every acknowledged submit on stdout. The parent kills it at random moments.

    python tests/examples/bank_kill_child.py DIR SEED [--open | --drain] [--sql]

Prints ``READY <keys in flight at start> <actions in flight at start>`` once started, then
``ACK D <key> <amount>`` after each committed deposit and ``ACK T|W <key> <id>`` after each
committed transfer or withdrawal. ``--open`` deposits 100 into every account and exits;
``--drain`` waits until nothing is in flight, reads every account and prints ``STATE <json>``.
``--sql`` keeps the accounts in SQL tables (examples/bank/sql_machine.py: ``database=``) instead
of state objects in a SQLiteStore.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.bank.machine import (
    Bank,
    Deposit,
    Dispense,
    Dispensed,
    Transfer,
    Withdraw,
    money,
    open_account,
)
from examples.bank.sql_machine import SqlBank, create_tables, sql_money
from fasm import Rejected
from fasm.persistence import SQLiteDatabase, SQLiteStore
from fasm.runtime import ActionContext, Runtime

KEYS = [f"acct-{n:05d}" for n in range(10_000)]
SUBMITTERS = 64


async def drain_sql(rt: Runtime[Any, Any, Any, Any, Any, Any]) -> None:
    await rt.wait_idle()
    assert rt.database is not None
    total, pending = await sql_money(rt.database)
    async with rt.database.transaction(readonly=True) as txn:
        rows = await txn.fetchall("SELECT key, deposited, balance, received, paid_out "
                                  "FROM bank_accounts ORDER BY key")
    print("STATE " + json.dumps({
        "deposited": {k: d for k, d, *_ in rows}, "sending": pending, "dispensing": 0,
        "held": total.held, "total_deposited": total.deposited, "in_transit": total.in_transit,
        "received": sum(r[3] for r in rows), "paid_out": sum(r[4] for r in rows),
        "negative": sum(r[2] < 0 for r in rows), "in_flight": len(rt.in_flight_by_key)}),
        flush=True)


async def main(data: Path, seed: int, mode: str, sql: bool) -> None:
    rng = random.Random(seed)

    async def dispense(action: Dispense, ctx: ActionContext) -> Dispensed:
        await anyio.sleep(rng.uniform(0.0, 0.05))  # the cash machine is slow: work in flight
        return Dispensed(action.id)

    rt: Runtime[Any, Any, Any, Any, Any, Any]
    if sql:
        rt = Runtime(SqlBank(), keyed=True, max_active=2_000,
                     database=SQLiteDatabase(data / "bank-sql.db"),
                     executors={Dispense: dispense}, seed=seed)
    else:
        rt = Runtime(Bank(), initial_state=open_account, keyed=True, max_active=2_000,
                     store=SQLiteStore(data / "bank.db"), executors={Dispense: dispense},
                     seed=seed)
    async with rt:
        if sql and mode == "--open":
            assert rt.database is not None
            await create_tables(rt.database)
        pending = rt.in_flight_by_key
        print(f"READY {len(pending)} {sum(len(a) for a in pending.values())}", flush=True)
        if mode == "--open":
            async def opener(part: list[str]) -> None:
                for key in part:
                    await rt.submit(Deposit(100), key=key)
                    print(f"ACK D {key} 100", flush=True)

            async with anyio.create_task_group() as tg:
                for s in range(SUBMITTERS):
                    tg.start_soon(opener, KEYS[s::SUBMITTERS])
            return
        if mode == "--drain" and sql:
            await drain_sql(rt)
            return
        if mode == "--drain":
            await rt.wait_idle()
            accounts = [await rt.read(lambda a: a, key=k) for k in KEYS]
            total = money(accounts)
            print("STATE " + json.dumps({
                "deposited": {a.key: a.deposited for a in accounts},
                "sending": sum(len(a.sending) for a in accounts),
                "dispensing": sum(len(a.dispensing) for a in accounts),
                "held": total.held, "total_deposited": total.deposited,
                "in_transit": total.in_transit, "received": sum(a.received for a in accounts),
                "paid_out": sum(a.paid_out for a in accounts),
                "negative": sum(a.balance < 0 for a in accounts),
                "in_flight": len(rt.in_flight_by_key)}), flush=True)
            return

        async def submitter(s: int) -> None:
            n = 0
            while True:
                n += 1
                key = rng.choice(KEYS)
                roll = rng.random()
                try:
                    if roll < 0.4:
                        amount = rng.randint(1, 50)
                        await rt.submit(Deposit(amount), key=key)
                        print(f"ACK D {key} {amount}", flush=True)
                    elif roll < 0.85:
                        ident = f"t{seed}-{s}-{n}"
                        await rt.submit(Transfer(ident, rng.choice(KEYS), rng.randint(1, 80)),
                                        key=key)
                        print(f"ACK T {key} {ident}", flush=True)
                    else:
                        ident = f"w{seed}-{s}-{n}"
                        await rt.submit(Withdraw(ident, rng.randint(1, 30)), key=key)
                        print(f"ACK W {key} {ident}", flush=True)
                except Rejected:
                    pass  # not enough money: refused, nothing to check

        async with anyio.create_task_group() as tg:
            for s in range(SUBMITTERS):
                tg.start_soon(submitter, s)


if __name__ == "__main__":
    flags = [a for a in sys.argv[3:] if a in ("--open", "--drain")]
    anyio.run(main, Path(sys.argv[1]), int(sys.argv[2]), flags[0] if flags else "",
              "--sql" in sys.argv)
