"""Transactional state on PostgreSQL under faults, with real concurrent sessions: a serialization
failure and a deadlock rerun the group on a fresh transaction, a session killed mid-transition is
replaced and the group rerun, a connection cut around COMMIT is resolved by the commit token, and
an exclusion-free unique constraint still turns a race into a rejection."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import psycopg.conninfo
import pytest

from fasm.errors import StoreUnavailable, TransactionConflict
from fasm.persistence import PostgresDatabase
from fasm.runtime import Committed, RuntimeEvent, TransactionRetried
from tests.persistence.test_postgres_store import CommitCutter
from tests.persistence.test_txn_runtime import runtime
from tests.persistence.txn_ledger import Deposit, Open, UnknownAccount, balances, create_schema

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def scoped(dsn: str, schema: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")


@pytest.fixture
async def db_at(pg_dsn: str, pg_schema: str) -> Callable[..., PostgresDatabase]:
    def make(dsn: str = pg_dsn, **options: Any) -> PostgresDatabase:
        return PostgresDatabase(scoped(dsn, pg_schema), schema=pg_schema, **options)

    await create_schema(make())
    async with make() as db, db.transaction() as tx:
        await tx.execute("INSERT INTO accounts VALUES ('ada', 10), ('bob', 10)")
    return make


@pytest.fixture
def raw(pg_dsn: str, pg_schema: str) -> Iterator[psycopg.Connection[Any]]:
    """Another session, as another service writing the same tables would be."""
    with psycopg.connect(scoped(pg_dsn, pg_schema)) as conn:
        yield conn


async def waiting_on_a_lock(dsn: str, pid: int | None) -> None:
    """Return once session ``pid`` waits for a lock."""
    assert pid is not None
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(1000):
            row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                               (pid,)).fetchone()
            if row is not None and row[0] == "Lock":
                return
            await anyio.sleep(0.01)
    raise AssertionError(f"session {pid} never waited for a lock")


async def test_a_serialization_failure_reruns_the_group(
        pg_dsn: str, db_at: Callable[..., PostgresDatabase], raw: psycopg.Connection[Any]) -> None:
    events: list[RuntimeEvent] = []
    db = db_at()
    async with runtime(db, listeners=[events.append]) as rt:
        raw.execute("UPDATE accounts SET balance = balance + 1 WHERE name = 'ada'")  # uncommitted
        done: list[Committed[Any, Any, Any]] = []

        async def deposit() -> None:
            done.append(await rt.submit(Deposit("ada", 5)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(deposit)
            # The runtime's transaction has its snapshot and waits for the row...
            await waiting_on_a_lock(pg_dsn, db.backend_pid)
            raw.commit()  # ...which changes under it: SERIALIZABLE aborts it (40001)
    assert [c.seq for c in done] == [1]
    retried = [e for e in events if isinstance(e, TransactionRetried)]
    assert len(retried) == 1 and isinstance(retried[0].error, TransactionConflict)
    assert retried[0].error.__cause__.sqlstate == "40001"  # type: ignore[union-attr]
    assert (await balances(db_at()))["ada"] == 16  # both deposits, once each


async def test_a_deadlock_reruns_the_group(
        pg_dsn: str, db_at: Callable[..., PostgresDatabase], raw: psycopg.Connection[Any]) -> None:
    events: list[RuntimeEvent] = []
    # More attempts than the default 5: on a loaded machine a rerun can take ada before the raw
    # session, woken by the abort, does, and deadlock again; the growing backoff ends that.
    db = db_at(max_attempts=20)
    raw.execute("SET deadlock_timeout = '30s'")  # the runtime's session detects it, not this one
    async with runtime(db, listeners=[events.append]) as rt:
        raw.execute("UPDATE accounts SET balance = balance + 1 WHERE name = 'bob'")
        async def refused(value: Any) -> None:
            with pytest.raises(UnknownAccount):
                await rt.submit(value)

        async with anyio.create_task_group() as tg:
            # Both deposits in one transaction, ada's row first: while the lock is held, the
            # driver takes a first group (a refused input) and waits; the two queue behind it.
            async with db.lock():
                for submit in (partial(refused, Deposit("nobody", 1)),
                               partial(rt.submit, Deposit("ada", 5)),
                               partial(rt.submit, Deposit("bob", 5))):
                    tg.start_soon(submit)
                    await anyio.wait_all_tasks_blocked()
            await waiting_on_a_lock(pg_dsn, db.backend_pid)  # holds ada, waits for bob

            def raw_takes_ada_then_commits() -> None:
                raw.execute("UPDATE accounts SET balance = balance + 1 WHERE name = 'ada'")
                raw.commit()

            await anyio.to_thread.run_sync(raw_takes_ada_then_commits)
    retried = [e for e in events if isinstance(e, TransactionRetried)]
    assert retried and retried[0].error.__cause__.sqlstate == "40P01"  # type: ignore[union-attr]
    assert await balances(db_at()) == {"ada": 16, "bob": 16}


async def test_a_session_killed_mid_transition_is_replaced(
        pg_dsn: str, db_at: Callable[..., PostgresDatabase], raw: psycopg.Connection[Any]) -> None:
    events: list[RuntimeEvent] = []
    db = db_at()
    async with runtime(db, listeners=[events.append]) as rt:
        await rt.submit(Deposit("bob", 1))
        raw.execute("SELECT 1 FROM accounts WHERE name = 'ada' FOR UPDATE")
        done: list[Committed[Any, Any, Any]] = []

        async def deposit() -> None:
            done.append(await rt.submit(Deposit("ada", 5)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(deposit)
            first = db.backend_pid
            await waiting_on_a_lock(pg_dsn, first)  # mid-transition, statements sent
            with psycopg.connect(pg_dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (first,))
            for _ in range(1000):  # the group runs again on a new session
                if db.backend_pid not in (first, None):
                    break
                await anyio.sleep(0.01)
            await waiting_on_a_lock(pg_dsn, db.backend_pid)
            raw.commit()
        assert [c.seq for c in done] == [2]
        await rt.submit(Deposit("bob", 1))  # and it goes on
    retried = [e for e in events if isinstance(e, TransactionRetried)]
    assert len(retried) == 1 and isinstance(retried[0].error, StoreUnavailable)
    assert await balances(db_at()) == {"ada": 15, "bob": 12}


@pytest.fixture
def cutter(pg_dsn: str) -> Iterator[CommitCutter]:
    proxy = CommitCutter(pg_dsn)
    yield proxy
    proxy.close()


async def test_commit_answer_lost_after_the_server_committed(
        db_at: Callable[..., PostgresDatabase], cutter: CommitCutter) -> None:
    events: list[RuntimeEvent] = []
    async with runtime(db_at(cutter.dsn), listeners=[events.append]) as rt:
        await rt.submit(Deposit("ada", 1))
        cutter.mode = "after"
        assert (await rt.submit(Deposit("ada", 5))).seq == 2  # found by its token: committed
        assert cutter.cut.is_set()
        assert (await rt.submit(Deposit("ada", 1))).seq == 3
    assert not [e for e in events if isinstance(e, TransactionRetried)]
    assert (await balances(db_at()))["ada"] == 17  # each deposit once


async def test_commit_cut_before_the_server_saw_it_is_run_again(
        db_at: Callable[..., PostgresDatabase], cutter: CommitCutter) -> None:
    events: list[RuntimeEvent] = []
    async with runtime(db_at(cutter.dsn), listeners=[events.append]) as rt:
        await rt.submit(Deposit("ada", 1))
        cutter.mode = "before"
        assert (await rt.submit(Deposit("ada", 5))).seq == 2  # not committed: run again
        assert cutter.cut.is_set()
    assert len([e for e in events if isinstance(e, TransactionRetried)]) == 1
    assert (await balances(db_at()))["ada"] == 16


async def test_commit_outcome_unknown_stops_the_runtime_without_acknowledging(
        db_at: Callable[..., PostgresDatabase], cutter: CommitCutter) -> None:
    with pytest.raises(StoreUnavailable, match="outcome cannot be checked"):
        async with runtime(db_at(cutter.dsn, reconnect_budget=1)) as rt:
            await rt.submit(Deposit("ada", 1))
            cutter.mode, cutter.refuse = "after", True
            with pytest.raises(StoreUnavailable, match="outcome cannot be checked"):
                await rt.submit(Deposit("ada", 5))
            assert not rt.running
    cutter.refuse = False
    async with runtime(db_at()) as rt:  # it had committed; the restart resumes from there
        assert rt.seq == 2
    assert (await balances(db_at()))["ada"] == 16


async def test_two_runtimes_share_tables_under_serializable(
        db_at: Callable[..., PostgresDatabase]) -> None:
    """Two machine keys, two processes' worth of sessions, one contended row: every deposit
    lands exactly once, whatever the database aborted along the way."""
    events: list[RuntimeEvent] = []
    async with (runtime(db_at(), key="east", listeners=[events.append]) as east,
                runtime(db_at(), key="west", listeners=[events.append]) as west):
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon((east if i % 2 else west).submit, Deposit("ada", 1))
        assert east.seq + west.seq == 40
    assert (await balances(db_at()))["ada"] == 50


async def test_an_account_opened_twice_concurrently_is_refused_once(
        db_at: Callable[..., PostgresDatabase]) -> None:
    from fasm import ConstraintViolation

    outcomes: list[str] = []

    async def open_carol(rt: Any) -> None:
        try:
            await rt.submit(Open("carol", 1))
            outcomes.append("opened")
        except (ConstraintViolation, TransactionConflict) as e:
            outcomes.append(type(e).__name__)

    async with (runtime(db_at(), key="east") as east, runtime(db_at(), key="west") as west,
                anyio.create_task_group() as tg):
        tg.start_soon(open_carol, east)
        tg.start_soon(open_carol, west)
    assert sorted(outcomes) == ["ConstraintViolation", "opened"]
