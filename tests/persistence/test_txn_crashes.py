"""Seeded crash runs of a machine whose state is a real database (SQLite, and PostgreSQL where it
runs), driven synchronously through the runtime's own database host, as the simulator drives the
engine: no event loop, every choice from one seeded RNG, crashes right after a commit (before
anything is dispatched) and with actions in flight. After every group the tables must balance,
every paid payout must match the provider's ledger, and at the end every payout must be paid; the
same seed must give the same trace and the same tables."""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fasm import Normal, TrackedActionCompleted
from fasm.persistence import Database, SQLiteDatabase
from fasm.runtime._engine import Accepted, Duplicate, Failed, Release
from fasm.runtime._state_database import DatabaseHost
from tests.persistence.txn_ledger import (
    SCHEMA,
    Careless,
    Deposit,
    LedgerMachine,
    Open,
    Overdraw,
    Paid,
    Payout,
    Withdraw,
)

NAMES = ("ana", "ben", "cy", "dee")


class Place:
    """Where one run keeps its tables, reached both through fasm and directly (to check them)."""

    def database(self) -> Database:
        raise NotImplementedError

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError


class SQLitePlace(Place):
    def __init__(self, path: Path) -> None:
        self.path = path

    def database(self) -> Database:
        return SQLiteDatabase(self.path, synchronous="OFF")  # crashes here are simulated

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            return conn.execute(statement).fetchall()
        finally:
            conn.close()


class PostgresPlace(Place):
    def __init__(self, dsn: str, schema: str) -> None:
        import psycopg.conninfo

        self.schema = schema
        self.dsn = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")
        self.sql(f'CREATE SCHEMA "{schema}"')

    def database(self) -> Database:
        from fasm.persistence import PostgresDatabase

        return PostgresDatabase(self.dsn, schema=self.schema)

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(statement)
            return [tuple(row) for row in cur.fetchall()] if cur.description else []


PlaceFactory = Callable[[], Place]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def places(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PlaceFactory]:
    """Makes a fresh place per call: a SQLite file, or a PostgreSQL schema (dropped after)."""
    made: list[PostgresPlace] = []
    if request.param == "sqlite":
        yield lambda: SQLitePlace(tmp_path / f"run-{uuid.uuid4().hex[:8]}.db")
        return
    dsn: str = request.getfixturevalue("pg_dsn")

    def postgres() -> Place:
        made.append(PostgresPlace(dsn, f"fasm_crash_{uuid.uuid4().hex[:12]}"))
        return made[-1]

    yield postgres
    for place in made:
        place.sql(f'DROP SCHEMA IF EXISTS "{place.schema}" CASCADE')


class World:
    def __init__(self, place: Place, seed: int) -> None:
        self.place = place
        self.rng = random.Random(seed)
        self.provider: dict[int, str] = {}  # payout id -> reference: the provider's ledger
        self.in_flight: dict[int, Payout] = {}
        self.results: deque[tuple[int, Paid]] = deque()
        self.trace: list[Any] = []
        self.paid_in = 0  # money opened and deposited by committed transitions
        self.crashes = 0
        for statement in SCHEMA:
            place.sql(statement)
        self.start()

    # -- the process ------------------------------------------------------------------------

    def start(self) -> None:
        database = self.place.database()
        self.host = DatabaseHost(LedgerMachine(), key="sim", database=database,
                                 idempotency_window=50, seed=0)
        self.engine = self.host.open_sync()
        self.dispatch(self.host.restore_sync(self.engine), "restore")

    def crash(self, where: str) -> None:
        """The process dies: its connection, its executors and its queue go with it."""
        self.trace.append(("crash", where))
        self.crashes += 1
        self.host.close_sync()
        self.in_flight.clear()
        self.results.clear()
        self.start()

    def dispatch(self, release: Release, why: str) -> None:
        for tracked in release.tracked:
            self.in_flight[tracked.id] = tracked.action
        if release.tracked:
            self.trace.append((why, [t.id for t in release.tracked]))

    def execute(self, everything: bool = False) -> None:
        """The provider pays some in-flight payouts, idempotently (by payout id)."""
        for payout_id in sorted(self.in_flight):
            if everything or self.rng.random() < 0.5:
                del self.in_flight[payout_id]
                ref = self.provider.setdefault(payout_id, f"ref-{payout_id}")
                self.results.append((payout_id, Paid(ref)))

    # -- one group --------------------------------------------------------------------------

    def value(self) -> Any:
        name, r = self.rng.choice(NAMES), self.rng.random()
        if r < 0.15:
            return Open(name, self.rng.randint(10, 100))
        if r < 0.45:
            return Deposit(name, self.rng.randint(1, 20))
        if r < 0.8:
            return Withdraw(name, self.rng.randint(1, 40))
        if r < 0.9:
            return Careless(name, 5)
        return Overdraw(name, self.rng.randint(1, 200))

    def group(self, *, new_inputs: bool = True) -> None:
        inputs: list[Any] = []
        for _ in range(self.rng.randint(1, 6)):
            if self.results and (not new_inputs or self.rng.random() < 0.5):
                payout_id, result = self.results.popleft()
                inputs.append((TrackedActionCompleted(payout_id, result), None))
            elif new_inputs:
                key = f"k{self.rng.randint(0, 400)}" if self.rng.random() < 0.2 else None
                inputs.append((Normal(self.value()), key))
        if not inputs:
            return
        result = self.host.run_sync(self.engine, inputs)
        self.trace.append(tuple(_describe(s) for s in result.steps))
        accepted = [s for s in result.steps if isinstance(s, Accepted)]
        for step in accepted:
            match step.input:
                case Normal(Open(balance=amount)) | Normal(Deposit(amount=amount)):
                    self.paid_in += amount
                case Normal(Overdraw(amount=amount)):  # within the balance: money leaves
                    self.paid_in -= amount
        self.check()  # what committed is in the tables, whatever happens next
        if self.rng.random() < 0.12:
            self.crash("after the commit, before dispatch")
            return
        self.dispatch(self.engine.committed(accepted), "dispatch")
        for step in result.steps:
            if isinstance(step, Failed) and isinstance(step.input, TrackedActionCompleted):
                self.engine.forget(step.input.id)  # as the Runtime does with a refused result
        if self.in_flight and self.rng.random() < 0.05:
            self.crash("actions in flight")

    # -- checks -----------------------------------------------------------------------------

    def tables(self) -> tuple[list[Any], list[Any]]:
        accounts = self.place.sql("SELECT name, balance FROM accounts ORDER BY name")
        payouts = self.place.sql("SELECT id, name, amount, status, ref FROM payouts ORDER BY id")
        return accounts, payouts

    def check(self) -> None:
        accounts, payouts = self.tables()
        held = sum(b for _, b in accounts) + sum(p[2] for p in payouts)
        assert held == self.paid_in, f"money not conserved: {held} != {self.paid_in}"
        for payout_id, _, _, status, ref in payouts:
            if status == "paid":
                assert self.provider.get(payout_id) == ref, f"payout {payout_id} paid as {ref}"

    def drain(self) -> None:
        for _ in range(200):
            self.execute(everything=True)
            if not self.results and not self.in_flight:
                break
            self.group(new_inputs=False)
        _, payouts = self.tables()
        assert all(p[3] == "paid" for p in payouts), f"left unpaid: {payouts}"


def _describe(step: Any) -> Any:
    if isinstance(step, Accepted):
        return ("accepted", step.seq, len(step.actions))
    if isinstance(step, Duplicate):
        return ("duplicate", step.seq)
    if isinstance(step, Failed):
        return ("failed", type(step.error).__name__)
    return ("error", type(step).__name__)


def run(place: Place, seed: int, groups: int = 120) -> World:
    world = World(place, seed)
    for _ in range(groups):
        world.execute()
        world.group()
    world.drain()
    world.host.close_sync()
    return world


@pytest.mark.parametrize("seed", range(12))
def test_crashes_between_commit_and_dispatch_lose_nothing(places: PlaceFactory,
                                                          seed: int) -> None:
    world = run(places(), seed)
    assert world.crashes > 0
    assert any(t[0] == "restore" for t in world.trace if isinstance(t[0], str))


def test_the_same_seed_gives_the_same_trace_and_tables(places: PlaceFactory) -> None:
    first, second = run(places(), 99), run(places(), 99)
    assert first.trace == second.trace
    assert first.tables() == second.tables()
    assert first.provider == second.provider
