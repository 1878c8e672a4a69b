"""The bank with its accounts in SQL tables: the same bank as ``machine.py``, one keyed instance
per account, with state kept in a database (``Runtime(keyed=True, database=...)``).

Each stf gets a :class:`~fasm.persistence.Transaction` whose ``machine_key`` is the account's
key, and scopes every statement by it. A transfer debits the account and records the send in
``bank_pending`` in the same transaction as the runtime's bookkeeping; ``restore`` re-emits the
key's pending rows. A group of inputs of many accounts is one database transaction, so a transfer
from A to B and the credit of an earlier transfer to A may commit together; each input is undone
alone (its savepoint) when it is refused.

    rt = Runtime(SqlBank(), keyed=True, database=SQLiteDatabase("bank.db"),
                 executors={Dispense: dispense})
    await create_tables(rt.database)  # or before the runtime starts, on its own
"""

from __future__ import annotations

from typing import Any, Never

from fasm import (
    ActionsContainer,
    Input,
    Refused,
    Rejected,
    Send,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
)
from fasm.persistence import Database, Transaction

from .machine import (
    BankAction,
    BankInput,
    BankResult,
    Credit,
    Deposit,
    Dispense,
    Dispensed,
    Freeze,
    Money,
    Transfer,
)

TABLES = (
    "CREATE TABLE IF NOT EXISTS bank_accounts (key TEXT PRIMARY KEY, "
    "balance BIGINT NOT NULL CHECK (balance >= 0), deposited BIGINT NOT NULL DEFAULT 0, "
    "frozen BOOLEAN NOT NULL DEFAULT FALSE, paid_out BIGINT NOT NULL DEFAULT 0, "
    "received BIGINT NOT NULL DEFAULT 0, refunded BIGINT NOT NULL DEFAULT 0)",
    # Transfers and cash withdrawals in flight: what restore re-emits.
    "CREATE TABLE IF NOT EXISTS bank_pending (key TEXT NOT NULL, id TEXT NOT NULL, "
    "kind TEXT NOT NULL, peer TEXT NOT NULL, amount BIGINT NOT NULL, PRIMARY KEY (key, id))",
)


async def create_tables(database: Database) -> None:
    """Create the bank's tables if they are missing."""
    async with database.transaction() as txn:
        for sql in TABLES:
            await txn.execute(sql)


class SqlBank(StateMachine[Transaction, BankInput, str, BankAction, BankResult, Never]):
    """Accounts in SQL, one keyed instance per account (see the module docstring)."""

    machine_name = "examples.bank.sql"

    @staticmethod
    async def stf(txn: Transaction, input: Input[BankInput, str, BankResult],
                  actions: ActionsContainer[str, BankAction, Never]) -> None:
        key = txn.machine_key
        assert key is not None
        if isinstance(input, TrackedActionCompleted):
            row = await txn.fetchone("SELECT kind, amount FROM bank_pending "
                                     "WHERE key = ? AND id = ?", (key, input.id))
            if row is None:
                return  # not pending (a duplicate delivery): nothing to do
            kind, amount = row
            await txn.execute("DELETE FROM bank_pending WHERE key = ? AND id = ?",
                              (key, input.id))
            if isinstance(input.result, Dispensed):
                await txn.execute("UPDATE bank_accounts SET paid_out = paid_out + ? "
                                  "WHERE key = ?", (amount, key))
            elif kind == "send" and isinstance(input.result, Refused):
                await txn.execute("UPDATE bank_accounts SET balance = balance + ?, "
                                  "refunded = refunded + ? WHERE key = ?", (amount, amount, key))
            return
        value = input.value
        await txn.execute("INSERT INTO bank_accounts (key, balance) VALUES (?, 0) "
                          "ON CONFLICT (key) DO NOTHING", (key,))
        if isinstance(value, Deposit):
            if value.amount <= 0:
                raise Rejected(f"deposit of {value.amount}: must be positive")
            await txn.execute("UPDATE bank_accounts SET balance = balance + ?, "
                              "deposited = deposited + ? WHERE key = ?",
                              (value.amount, value.amount, key))
            return
        if isinstance(value, Freeze):
            await txn.execute("UPDATE bank_accounts SET frozen = TRUE WHERE key = ?", (key,))
            return
        balance, frozen = await txn.fetchone(  # type: ignore[misc]
            "SELECT balance, frozen FROM bank_accounts WHERE key = ?", (key,))
        if isinstance(value, Credit):
            if frozen:
                raise Rejected(f"{key} is frozen")
            await txn.execute("UPDATE bank_accounts SET balance = balance + ?, "
                              "received = received + ? WHERE key = ?",
                              (value.amount, value.amount, key))
            return
        if value.amount <= 0:
            raise Rejected(f"amount {value.amount}: must be positive")
        if value.amount > balance:
            raise Rejected(f"{key} has {balance}, not {value.amount}")
        if await txn.fetchval("SELECT 1 FROM bank_pending WHERE key = ? AND id = ?",
                              (key, value.id)):
            raise Rejected(f"{value.id} is already in flight")
        await txn.execute("UPDATE bank_accounts SET balance = balance - ? WHERE key = ?",
                          (value.amount, key))
        if isinstance(value, Transfer):
            await txn.execute("INSERT INTO bank_pending VALUES (?, ?, 'send', ?, ?)",
                              (key, value.id, value.to, value.amount))
            actions.add(Tracked(value.id, Send(value.to, Credit(value.id, key, value.amount))))
        else:
            await txn.execute("INSERT INTO bank_pending VALUES (?, ?, 'dispense', ?, ?)",
                              (key, value.id, key, value.amount))
            actions.add(Tracked(value.id, Dispense(value.id, key, value.amount)))

    @staticmethod
    async def restore(txn: Transaction, actions: ActionsContainer[str, BankAction, Never]) -> None:
        key = txn.machine_key
        assert key is not None
        for ident, kind, peer, amount in await txn.fetchall(
                "SELECT id, kind, peer, amount FROM bank_pending WHERE key = ? ORDER BY id",
                (key,)):
            action: Any = (Send(peer, Credit(ident, key, amount)) if kind == "send"
                           else Dispense(ident, key, amount))
            actions.add(Tracked(ident, action))


async def sql_money(database: Database) -> tuple[Money, int]:
    """The :class:`~examples.bank.machine.Money` of every account, and how many rows are
    pending (transfers and withdrawals in flight)."""
    async with database.transaction(readonly=True) as txn:
        held, deposited = await txn.fetchone(  # type: ignore[misc]
            "SELECT COALESCE(SUM(balance + paid_out), 0), COALESCE(SUM(deposited), 0) "
            "FROM bank_accounts")
        cash = await txn.fetchval("SELECT COALESCE(SUM(amount), 0) FROM bank_pending "
                                  "WHERE kind = 'dispense'")
        transit = await txn.fetchval("SELECT COALESCE(SUM(amount), 0) FROM bank_pending "
                                     "WHERE kind = 'send'")
        pending = await txn.fetchval("SELECT COUNT(*) FROM bank_pending")
    return Money(int(held) + int(cash), int(transit), int(deposited)), int(pending)
