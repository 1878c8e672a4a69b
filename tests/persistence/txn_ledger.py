"""A small machine whose state is a database transaction, for the transactional-state tests.

Accounts and payouts live in SQL tables with constraints (a balance never below zero, one
account per name); a withdrawal records a pending payout row and emits it as a tracked action;
restore re-emits the pending rows. Some inputs misbehave on purpose: ``Careless`` writes and then
raises, ``Overdraw`` leaves the balance check to the database, ``Swallow`` catches a constraint
violation and returns as if nothing happened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fasm import ConstraintViolation, Normal, Rejected, StateMachine, Tracked, Untracked
from fasm import TrackedActionCompleted as Done
from fasm.persistence import Database, Keyspace, SQLiteDatabase, Transaction

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS accounts (name TEXT PRIMARY KEY, "
    "balance BIGINT NOT NULL CHECK (balance >= 0))",
    "CREATE TABLE IF NOT EXISTS payouts (id BIGINT PRIMARY KEY, name TEXT NOT NULL, "
    "amount BIGINT NOT NULL, status TEXT NOT NULL, ref TEXT)",
)


@dataclass(frozen=True)
class Open:
    name: str
    balance: int


@dataclass(frozen=True)
class Deposit:
    name: str
    amount: int


@dataclass(frozen=True)
class Withdraw:
    name: str
    amount: int


@dataclass(frozen=True)
class Careless:
    """Debits, then raises a bug: the debit must be rolled back."""

    name: str
    amount: int


@dataclass(frozen=True)
class Overdraw:
    """Debits without checking: the database's CHECK refuses it."""

    name: str
    amount: int


@dataclass(frozen=True)
class Swallow:
    """Opens an account that exists and hides the constraint violation: still rejected."""

    name: str


@dataclass(frozen=True)
class Note:
    """Keeps a note in the key-value layer; ``fail`` raises after writing it."""

    name: str
    text: str
    fail: bool = False


@dataclass(frozen=True)
class Stamp:
    """Reads the note (the key-value layer), adds 1 to the balance in SQL and a "!" to the note;
    ``fail`` raises after both writes. Run in a group after a ``Note``, it reads a write that is
    still buffered, and its SQL makes the buffer go out ahead of its own savepoint."""

    name: str
    fail: bool = False


LedgerInput = Open | Deposit | Withdraw | Careless | Overdraw | Swallow | Note | Stamp


@dataclass(frozen=True)
class Payout:
    payout_id: int
    name: str
    amount: int


@dataclass(frozen=True)
class Paid:
    ref: str


@dataclass(frozen=True)
class Notice:
    text: str


class UnknownAccount(Rejected):
    pass


class InsufficientFunds(Rejected):
    pass


NOTES: Keyspace[str] = Keyspace("notes", str)


class LedgerMachine(StateMachine[Transaction, LedgerInput, int, Payout, Paid, Notice]):
    machine_name = "tests.ledger"

    async def stf(self, db, input, actions):  # type: ignore[no-untyped-def]
        match input:
            case Normal(Open(name=name, balance=balance)):
                await db.execute("INSERT INTO accounts (name, balance) VALUES (?, ?)",
                                 (name, balance))
            case Normal(Deposit(name=name, amount=amount)):
                if await db.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?",
                                    (amount, name)) == 0:
                    raise UnknownAccount(name)
            case Normal(Withdraw(name=name, amount=amount)):
                balance = await db.fetchval("SELECT balance FROM accounts WHERE name = ?", (name,))
                if balance is None:
                    raise UnknownAccount(name)
                if balance < amount:
                    raise InsufficientFunds(f"{name} has {balance}")
                payout = await db.fetchval("SELECT COALESCE(MAX(id), 0) + 1 FROM payouts")
                await db.execute("UPDATE accounts SET balance = balance - ? WHERE name = ?",
                                 (amount, name))
                await db.execute("INSERT INTO payouts (id, name, amount, status) "
                                 "VALUES (?, ?, ?, 'pending')", (payout, name, amount))
                actions.add(Tracked(payout, Payout(payout, name, amount)))
                actions.add(Untracked(Notice(f"payout {payout} pending")))
            case Normal(Careless(name=name, amount=amount)):
                await db.execute("UPDATE accounts SET balance = balance - ? WHERE name = ?",
                                 (amount, name))
                raise RuntimeError("a bug after a write")
            case Normal(Overdraw(name=name, amount=amount)):
                if await db.execute("UPDATE accounts SET balance = balance - ? WHERE name = ?",
                                    (amount, name)) == 0:
                    raise UnknownAccount(name)
            case Normal(Swallow(name=name)):
                try:
                    await db.execute("INSERT INTO accounts (name, balance) VALUES (?, 0)", (name,))
                except ConstraintViolation:
                    pass  # wrong: the transition cannot go on after a database error
            case Normal(Note(name=name, text=text, fail=fail)):
                await db.kv.set(NOTES, name, text)
                if fail:
                    raise UnknownAccount(f"after writing a note for {name}")
            case Normal(Stamp(name=name, fail=fail)):
                note = await db.kv.get(NOTES, name)
                if note is None:
                    raise UnknownAccount(f"no note for {name}")
                if await db.execute("UPDATE accounts SET balance = balance + 1 WHERE name = ?",
                                    (name,)) == 0:
                    raise UnknownAccount(name)
                await db.kv.set(NOTES, name, note + "!")
                if fail:
                    raise UnknownAccount(f"after stamping {name}")
            case Done(id=payout, result=Paid(ref=ref)):
                if await db.execute("UPDATE payouts SET status = 'paid', ref = ? "
                                    "WHERE id = ? AND status = 'pending'", (ref, payout)) == 0:
                    raise Rejected(f"payout {payout} is not pending")
            case _:
                raise TypeError(f"unexpected input {input!r}")

    async def restore(self, db, actions):  # type: ignore[no-untyped-def]
        for payout, name, amount in await db.fetchall(
                "SELECT id, name, amount FROM payouts WHERE status = 'pending' ORDER BY id"):
            actions.add(Tracked(payout, Payout(payout, name, amount)))


async def create_schema(database: Database) -> None:
    async with database, database.transaction() as tx:
        for statement in SCHEMA:
            await tx.execute(statement)


async def balances(database: Database) -> dict[str, int]:
    async with database, database.transaction(readonly=True) as tx:
        return {name: int(b) for name, b in
                await tx.fetchall("SELECT name, balance FROM accounts ORDER BY name")}


async def payouts(database: Database) -> list[tuple[int, str, int, str, str | None]]:
    async with database, database.transaction(readonly=True) as tx:
        return [(int(i), n, int(a), s, r) for i, n, a, s, r in
                await tx.fetchall("SELECT id, name, amount, status, ref FROM payouts ORDER BY id")]


DatabaseFactory = Callable[..., Database]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def make_db(request: pytest.FixtureRequest, tmp_path: Path) -> DatabaseFactory:
    """Makes database objects on one location per test: a SQLite file, or a PostgreSQL schema
    (the connection's search_path points at it, so the machine's SQL needs no schema name)."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.db"

        def sqlite(**options: Any) -> Database:
            return SQLiteDatabase(path, **options)

        return sqlite
    import psycopg.conninfo

    from fasm.persistence import PostgresDatabase

    dsn: str = request.getfixturevalue("pg_dsn")
    schema: str = request.getfixturevalue("pg_schema")
    scoped = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")

    def postgres(**options: Any) -> Database:
        return PostgresDatabase(scoped, schema=schema, **options)

    return postgres
