"""Outages are ridden out, not fatal: a PostgreSQL server that goes away and comes back (a restart,
simulated by a TCP proxy that cuts every connection and refuses new ones for a while; the real
server is never touched), a connection cut around COMMIT while the server is away, an SQLite
write lock held by another connection; and a DSN's password, which never shows in any message.

Each outage runs under a live runtime, on PostgresStore and PostgresDatabase alike.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from fasm import Normal, StateMachine
from fasm.errors import RuntimeClosed, StoreConflict, StoreUnavailable
from fasm.persistence import SQLiteDatabase, SQLiteStore, Store
from fasm.runtime import Runtime

KEY = "order/42"


@dataclass
class Tally:
    total: int = 0


class Counter(StateMachine[Tally, int]):
    machine_name = "tests.outages.counter"

    async def stf(self, state: Tally, input: Any, actions: Any) -> None:
        match input:
            case Normal(int(amount)):
                state.total += amount

    async def restore(self, state: Tally, actions: Any) -> None:
        pass


def counter(store: Store) -> Runtime[Any, Any, Any, Any, Any, Any]:
    return Runtime(Counter(), initial_state=Tally, key=KEY, store=store)


async def committed_total(store: Store) -> tuple[int, int]:
    """Reopen and load: the total and seq every acknowledged transition must be in."""
    async with counter(store) as rt:
        return rt.state.total, rt.seq


# -- PostgreSQL: a server restart, through a proxy ------------------------------------------

psycopg = pytest.importorskip("psycopg")

from fasm.persistence import PostgresDatabase, PostgresStore  # noqa: E402
from tests.persistence.test_postgres_store import CommitCutter  # noqa: E402
from tests.persistence.test_txn_postgres import scoped  # noqa: E402
from tests.persistence.test_txn_runtime import runtime as ledger  # noqa: E402
from tests.persistence.txn_ledger import Deposit, balances, create_schema  # noqa: E402


class Target:
    """One kind of PostgreSQL state under test: a runtime to submit amounts to, and what the
    database holds afterwards, read without the proxy."""

    def __init__(self, kind: str, pg_dsn: str, schema: str) -> None:
        self.kind, self.pg_dsn, self.schema = kind, pg_dsn, schema

    def runtime(self, dsn: str, **options: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
        if self.kind == "store":
            return counter(PostgresStore(dsn, schema=self.schema, **options))
        return ledger(self.database(dsn, **options))

    def database(self, dsn: str, **options: Any) -> PostgresDatabase:
        return PostgresDatabase(scoped(dsn, self.schema), schema=self.schema, **options)

    def input(self, amount: int) -> Any:
        return amount if self.kind == "store" else Deposit("ada", amount)

    async def total(self) -> int:
        if self.kind == "store":
            total, _ = await committed_total(PostgresStore(self.pg_dsn, schema=self.schema))
            return total
        return (await balances(self.database(self.pg_dsn)))["ada"] - 10

    async def prepare(self) -> None:
        if self.kind == "database":
            await create_schema(self.database(self.pg_dsn))
            async with self.database(self.pg_dsn) as db, db.transaction() as tx:
                await tx.execute("INSERT INTO accounts VALUES ('ada', 10)")


@pytest.fixture(params=["store", "database"])
async def target(request: pytest.FixtureRequest, pg_dsn: str, pg_schema: str) -> Target:
    made = Target(request.param, pg_dsn, pg_schema)
    await made.prepare()
    return made


@pytest.fixture
def proxy(pg_dsn: str) -> Iterator[CommitCutter]:
    made = CommitCutter(pg_dsn)
    yield made
    made.close()


def restart(proxy: CommitCutter, seconds: float) -> None:
    """A server restart as clients see it: every connection cut now, new ones refused for
    ``seconds`` (from a thread, so the test does not wait for it)."""
    proxy.refuse = True
    proxy.cut_all()
    threading.Timer(seconds, setattr, (proxy, "refuse", False)).start()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_a_server_restart_while_idle_is_ridden_out(
        target: Target, proxy: CommitCutter, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "fasm.persistence")
    async with target.runtime(proxy.dsn) as rt:
        await rt.submit(target.input(1))
        restart(proxy, 2.0)
        # The runtime is idle; the next submit meets dead sessions and a refusing server, waits
        # in the queue while the store or driver reconnects, and is committed.
        assert (await rt.submit(target.input(2))).seq == 2
        assert rt.running
        assert (await rt.submit(target.input(4))).seq == 3
    assert await target.total() == 7
    assert any("reconnect" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
@pytest.mark.postgres
async def test_a_start_during_an_outage_waits_for_the_server(target: Target,
                                                             proxy: CommitCutter) -> None:
    restart(proxy, 1.5)  # open, acquire and load meet a server that refuses connections
    async with target.runtime(proxy.dsn) as rt:
        assert (await rt.submit(target.input(2))).seq == 1
    assert await target.total() == 2


@pytest.mark.anyio
@pytest.mark.postgres
async def test_an_outage_longer_than_the_budget_is_unavailable(
        target: Target, proxy: CommitCutter) -> None:
    with pytest.raises(StoreUnavailable, match="whole reconnect budget"):
        async with target.runtime(proxy.dsn, reconnect_budget=1) as rt:
            await rt.submit(target.input(1))
            proxy.refuse = True
            proxy.cut_all()
            with pytest.raises(StoreUnavailable, match=r"whole reconnect budget \(1s\)"):
                await rt.submit(target.input(2))
            assert not rt.running
            with pytest.raises(RuntimeClosed):
                await rt.submit(target.input(4))
    proxy.refuse = False
    assert await target.total() == 1


@pytest.mark.anyio
@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["before", "after"])
async def test_a_commit_cut_while_the_server_is_away_is_resolved(
        target: Target, proxy: CommitCutter, mode: str) -> None:
    """The connection is cut around COMMIT (before the server sees it, or after it committed and
    answered) and the server refuses connections for a while: the commit's outcome is looked up
    once it is back, and the input is committed exactly once."""
    async with target.runtime(proxy.dsn) as rt:
        await rt.submit(target.input(1))
        proxy.mode, proxy.refuse = mode, True

        def reopen_later() -> None:
            proxy.cut.wait(10)
            time.sleep(1.5)  # the server stays away after the cut
            proxy.refuse = False

        threading.Thread(target=reopen_later, daemon=True).start()
        assert (await rt.submit(target.input(2))).seq == 2
        assert proxy.cut.is_set() and rt.running
        assert (await rt.submit(target.input(4))).seq == 3
    assert await target.total() == 7


@pytest.mark.anyio
@pytest.mark.postgres
async def test_the_key_taken_during_an_outage_is_a_conflict_not_a_second_writer(
        pg_dsn: str, pg_schema: str, proxy: CommitCutter) -> None:
    store = PostgresStore(proxy.dsn, schema=pg_schema)
    await store.open()
    await store.acquire(KEY)
    await store.commit(KEY, expected_seq=0, seq=1, entries=[b"one"])
    proxy.cut_all()  # the server ends the session, and its advisory lock with it
    other = PostgresStore(pg_dsn, schema=pg_schema)
    await other.open()
    for _ in range(100):  # until the server has noticed the dead session
        try:
            await other.acquire(KEY)
            break
        except StoreConflict:
            await anyio.sleep(0.05)
    with pytest.raises(StoreConflict, match="lost the key's lock"):
        await store.commit(KEY, expected_seq=1, seq=2, entries=[b"two"])
    await other.commit(KEY, expected_seq=1, seq=2, entries=[b"other"])
    got = await other.load(KEY)
    assert got is not None and got.journal == ((1, b"one"), (2, b"other"))
    await other.close()
    await store.close()


# -- the password never shows --------------------------------------------------------------

SECRET = "Zq8-s3cret-pw"


def texts(error: BaseException) -> list[str]:
    """The str and repr of an error and of everything a traceback would show with it."""
    out: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        out += [str(seen), repr(seen)]
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return out


def dsns(pg_dsn: str, port: int) -> list[str]:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    host, user = params.get("host", "127.0.0.1"), params.get("user", "postgres")
    return [
        f"postgresql://{user}:{SECRET}@{host}:{port}/test",
        f"host={host} port={port} user={user} password={SECRET} dbname=test",
        f"host={host} port={port} user={user} password='{SECRET}' dbname=test",
        f"postgresql://{user}@{host}:{port}/test?password={SECRET}",
        f"host={host} port={port} user={user} sslpassword={SECRET} dbname=test",
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["store", "database"])
@pytest.mark.parametrize("where", ["closed port", "wrong database"])
async def test_the_password_never_appears(pg_dsn: str, kind: str, where: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = 1 if where == "closed port" else int(
        psycopg.conninfo.conninfo_to_dict(pg_dsn).get("port", 5432))
    for dsn in dsns(pg_dsn, port):
        if where == "wrong database":
            dsn = psycopg.conninfo.make_conninfo(dsn, dbname="fasm_no_such_database")
        made: PostgresStore | PostgresDatabase
        if kind == "store":
            made = PostgresStore(dsn, connect_timeout=2, reconnect_budget=0.3)
        else:
            made = PostgresDatabase(dsn, connect_timeout=2, reconnect_budget=0.3)
        with pytest.raises(StoreUnavailable) as caught:
            await made.open()
        await made.close()
        shown = [*texts(caught.value), made.description, repr(made)]
        assert "cannot connect" in shown[0]
        assert not [t for t in shown if SECRET in t or "s3cret" in t]
    logged = [r.getMessage() for r in caplog.records]
    assert bool(logged) == (where == "closed port")  # a wrong database is not retried
    assert not [t for t in logged if "s3cret" in t]


@pytest.mark.parametrize("dsn", [f"host=127.0.0.1 password={SECRET} oops",
                                 f"host=127.0.0.1 password='{SECRET} oops"])
@pytest.mark.parametrize("kind", [PostgresStore, PostgresDatabase])
def test_a_dsn_that_cannot_be_parsed_is_refused_without_quoting_it(
        dsn: str, kind: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match="not a valid libpq connection string") as caught:
        kind(dsn)
    assert not [t for t in texts(caught.value) if "s3cret" in t or "oops" in t]


# -- SQLite: the write lock held by another connection ---------------------------------------


class Holder:
    """Another connection (a backup, an open ``sqlite3`` shell) holding the write lock."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["store", "database"])
async def test_a_write_lock_held_longer_than_busy_timeout_is_waited_out(tmp_path: Path,
                                                                        kind: str) -> None:
    """SQLiteStore waits as SQLiteDatabase does: ``max_attempts`` attempts (5 by default) of
    ``busy_timeout`` each."""
    path = tmp_path / "s.db"
    if kind == "database":
        await create_schema(SQLiteDatabase(path))
        async with SQLiteDatabase(path) as db, db.transaction() as tx:
            await tx.execute("INSERT INTO accounts VALUES ('ada', 10)")
        rt = ledger(SQLiteDatabase(path, busy_timeout=0.5))
    else:
        rt = counter(SQLiteStore(path, busy_timeout=0.5))
    amount: Callable[[int], Any] = (lambda n: n) if kind == "store" else (
        lambda n: Deposit("ada", n))
    async with rt:
        await rt.submit(amount(1))
        holder = Holder(path)
        threading.Timer(1.2, holder.release).start()  # more than one busy_timeout
        assert (await rt.submit(amount(2))).seq == 2
        assert rt.running
    if kind == "store":
        assert await committed_total(SQLiteStore(path)) == (3, 2)
    else:
        assert (await balances(SQLiteDatabase(path)))["ada"] == 13


@pytest.mark.anyio
async def test_a_write_lock_held_past_the_budget_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, busy_timeout=0.2, max_attempts=2)
    holder: Holder | None = None
    try:
        with pytest.raises(StoreUnavailable, match="locked by another process"):
            async with counter(store) as rt:
                await rt.submit(1)
                holder = Holder(path)
                with pytest.raises(StoreUnavailable,
                                   match=r"locked by another process \(waited 0.4s"):
                    await rt.submit(2)
                assert not rt.running
    finally:
        if holder is not None:
            holder.release()
    assert await committed_total(SQLiteStore(path)) == (1, 1)


def test_sqlite_store_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        SQLiteStore(tmp_path / "s.db", max_attempts=0)
    with pytest.raises(ValueError, match="busy_timeout"):
        SQLiteStore(tmp_path / "s.db", busy_timeout=-1)
