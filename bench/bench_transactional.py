"""Durable transitions per second with transactional state, beside raw commits on the same database.

    python bench/bench_transactional.py [--quick] [--seconds S] [--rounds N] [--dir DIR]
                                        [--postgres DSN | --no-postgres]

For each database (SQLite on the disk holding DIR, default ./bench-data; PostgreSQL at
FASM_PG_DSN or 127.0.0.1:5432/test when reachable), in the same run and interleaved round by round
(the disk's fsync rate drifts; medians of the rounds are printed):

* raw: single-statement commits, ``UPDATE counters SET n = n + 1 WHERE id = ?`` in autocommit,
  from plain Python; sequential (one connection) and 64 concurrent (64 threads, one connection
  each). This is the database's own limit for a durable one-row write.
* by hand: the transition's own work in plain Python, no fasm, on one connection: a transaction
  that reads the counter and writes it back (``BEGIN``, ``SELECT``, ``UPDATE``, ``COMMIT``; on
  PostgreSQL each ``UPDATE`` is pipelined with the next ``SELECT`` or with the ``COMMIT``, one
  round trip per read), one per transition for the sequential row,
  and 64 reads and writes per transaction for the 64 row (group commit written by hand). It is
  what a read-then-write transition can cost at best on one connection, so ``by hand / raw``
  bounds what any library can reach against the raw rate, and ``fasm / by hand`` is fasm's own
  share.
* fasm SQL: a Runtime on a ``database=`` whose stf does one read and one write
  (``SELECT n ...`` then ``UPDATE counters SET n = ? ...``); one submitter awaiting each submit,
  and 64 concurrent submitters (group commit: one transaction, one fsync, per group).
* fasm KV: the same transition through the key-value layer (``kv.get`` then ``kv.set``).

SQLite runs twice: with the default worker thread per group, and with ``inline=True`` (the group
runs on the event loop's thread: no thread hop, the loop blocked for each transaction).

Both SQLite and PostgreSQL run with full durability (synchronous=FULL; synchronous_commit as the
server is configured). The target of issue 5 is fasm >= 70% of the raw rate; printed, never
asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Never

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fasm import ActionsContainer, Input, Normal, StateMachine
from fasm.persistence import Database, Keyspace, SQLiteDatabase, Transaction
from fasm.runtime import Runtime

ROWS = 1_000
COUNTS: Keyspace[int] = Keyspace("bench-counters", int)


class SqlCounter(StateMachine[Transaction, int]):
    """One read, one write, through SQL."""

    machine_name = "bench.sql-counter"

    async def stf(self, db: Transaction, input: Input[int, Never, Never],
                  actions: ActionsContainer[Never, Never, Never]) -> None:
        assert isinstance(input, Normal)
        n = await db.fetchval("SELECT n FROM counters WHERE id = ?", (input.value,))
        await db.execute("UPDATE counters SET n = ? WHERE id = ?", (n + 1, input.value))

    async def restore(self, db: Transaction,
                      actions: ActionsContainer[Never, Never, Never]) -> None:
        return None


class KvCounter(SqlCounter):
    """One read, one write, through the key-value layer."""

    machine_name = "bench.kv-counter"

    async def stf(self, db: Transaction, input: Input[int, Never, Never],
                  actions: ActionsContainer[Never, Never, Never]) -> None:
        assert isinstance(input, Normal)
        key = f"c/{input.value:04d}"
        await db.kv.set(COUNTS, key, await db.kv.get(COUNTS, key, 0) + 1)


# -- the databases --------------------------------------------------------------------------------


class Backend:
    """How to reach one database: raw connections and fasm Database objects on one location."""

    name = ""

    def raw(self) -> Any:
        raise NotImplementedError

    def database(self) -> Database:
        raise NotImplementedError

    def prepare(self) -> None:
        conn = self.raw()
        conn.execute("DROP TABLE IF EXISTS counters")
        conn.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, n BIGINT NOT NULL)")
        for i in range(ROWS):
            conn.execute(f"INSERT INTO counters VALUES ({i}, 0)")
        conn.close()


class SQLite(Backend):
    name = "sqlite"

    def __init__(self, where: Path) -> None:
        self.path = where / "bench.db"

    def raw(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def database(self) -> Database:
        return SQLiteDatabase(self.path, busy_timeout=30)


class SQLiteInline(SQLite):
    """The same, with ``SQLiteDatabase(inline=True)``: each group runs on the event loop's thread
    (no thread hop; the loop is blocked for the transaction, fsync included)."""

    name = "sqlite inline"

    def __init__(self, where: Path) -> None:
        super().__init__(where)
        self.path = where / "bench-inline.db"

    def database(self) -> Database:
        return SQLiteDatabase(self.path, busy_timeout=30, inline=True)


class Postgres(Backend):
    name = "postgres"

    def __init__(self, dsn: str) -> None:
        import psycopg.conninfo

        self.schema = f"fasm_bench_{os.getpid()}"
        self.dsn = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={self.schema}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
            conn.execute(f"CREATE SCHEMA {self.schema}")
        self.admin = dsn

    def raw(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def database(self) -> Database:
        from fasm.persistence import PostgresDatabase

        return PostgresDatabase(self.dsn, schema=self.schema)

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


# -- measurements ---------------------------------------------------------------------------------


def by_hand_rate(backend: Backend, per_transaction: int, seconds: float) -> float:
    """Read-then-write transitions per second in plain Python on one connection, committing
    every ``per_transaction`` of them together."""
    postgres = isinstance(backend, Postgres)
    conn = backend.raw()
    p = "%s" if postgres else "?"
    select, update = (f"SELECT n FROM counters WHERE id = {p}",
                      f"UPDATE counters SET n = {p} WHERE id = {p}")
    begin = "BEGIN ISOLATION LEVEL SERIALIZABLE" if postgres else "BEGIN IMMEDIATE"
    done, i = 0, 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        unsent: tuple[int, int] | None = None  # PostgreSQL: a write goes with the next read
        for k in range(per_transaction):
            row = i % ROWS
            if postgres:
                with conn.pipeline():
                    if k == 0:
                        conn.execute(begin)
                    if unsent is not None:
                        conn.execute(update, unsent)
                    cur = conn.execute(select, (row,))
                unsent = (cur.fetchone()[0] + 1, row)
                if k == per_transaction - 1:
                    with conn.pipeline():
                        conn.execute(update, unsent)
                        conn.execute("COMMIT")
            else:
                if k == 0:
                    conn.execute(begin)
                n = conn.execute(select, (row,)).fetchone()[0]
                conn.execute(update, (n + 1, row))
                if k == per_transaction - 1:
                    conn.execute("COMMIT")
            i += 1
        done += per_transaction
    rate = done / (time.perf_counter() - start)
    conn.close()
    return rate


def raw_rate(backend: Backend, writers: int, seconds: float) -> float:
    """Single-statement autocommit updates per second, from ``writers`` threads."""
    done = [0] * writers
    deadline = time.perf_counter() + seconds
    sql = "UPDATE counters SET n = n + 1 WHERE id = " + ("%s" if isinstance(backend, Postgres)
                                                         else "?")

    def writer(w: int) -> None:
        conn = backend.raw()
        i = w
        while time.perf_counter() < deadline:
            conn.execute(sql, (i % ROWS,))
            done[w] += 1
            i += writers
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


async def fasm_rate(backend: Backend, machine: SqlCounter, submitters: int,
                    seconds: float) -> float:
    """Durable transitions per second with ``submitters`` concurrent submitters."""
    done = [0] * submitters
    async with Runtime(machine, database=backend.database(), key=machine.machine_name) as rt:
        await rt.submit(0)  # warm up: connection, prepared statements
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()

        async def submitter(s: int) -> None:
            i = s
            while time.perf_counter() < deadline:
                await rt.submit(i % ROWS)
                done[s] += 1
                i += submitters

        async with anyio.create_task_group() as tg:
            for s in range(submitters):
                tg.start_soon(submitter, s)
        return sum(done) / (time.perf_counter() - start)


# -- the table ------------------------------------------------------------------------------------


def measure(backend: Backend, rounds: int,
            seconds: float) -> dict[tuple[str, int], tuple[float, float]]:
    """Median rate of each kind, and the median over rounds of its ratio to the raw rate
    measured next to it in the same round (paired, so that a drifting disk cancels out)."""
    backend.prepare()
    rates: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for submitters in (1, 64):
            runs: list[tuple[str, Callable[[], float]]] = [
                ("raw", lambda s=submitters: raw_rate(backend, s, seconds)),
                ("hand", lambda s=submitters: by_hand_rate(backend, s, seconds)),
                ("sql", lambda s=submitters: anyio.run(fasm_rate, backend, SqlCounter(), s,
                                                       seconds)),
                ("kv", lambda s=submitters: anyio.run(fasm_rate, backend, KvCounter(), s,
                                                      seconds)),
            ]
            if r % 2:
                runs.reverse()  # neither side always runs on the warmer disk
            for what, fn in runs:
                rates.setdefault((what, submitters), []).append(fn())
        print(f"   {backend.name}: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    out: dict[tuple[str, int], tuple[float, float]] = {}
    for (what, submitters), values in rates.items():
        for base in ("raw", "hand"):
            ratios = [v / w for v, w in zip(values, rates[(base, submitters)], strict=True)]
            out[(f"{what}/{base}", submitters)] = (statistics.median(values),
                                                   statistics.median(ratios))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short round (CI smoke)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("bench-data"))
    ap.add_argument("--postgres", default=os.environ.get(
        "FASM_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    rounds, seconds = (1, 0.5) if args.quick else (args.rounds, args.seconds)
    args.dir.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(dir=args.dir))
    backends: list[Backend] = [SQLite(where), SQLiteInline(where)]
    if not args.no_postgres:
        try:
            backends.append(Postgres(args.postgres))
        except Exception as e:
            print(f"PostgreSQL skipped: {e}", file=sys.stderr)
    table: list[tuple[str, int, dict[tuple[str, int], tuple[float, float]]]] = []
    try:
        for backend in backends:
            medians = measure(backend, rounds, seconds)
            for submitters in (1, 64):
                table.append((backend.name, submitters, medians))
    finally:
        shutil.rmtree(where, ignore_errors=True)
        for backend in backends:
            if isinstance(backend, Postgres):
                backend.drop()
    print(f"\ndurable transitions/s: one read + one write per transition; medians of {rounds} "
          f"round(s) of {seconds:g} s; each ratio is the median of per-round ratios to the raw "
          "rate measured in the same round\n")
    print(f"{'database':<14} {'submitters':>10} {'raw/s':>7} {'by hand/s':>9} {'hand/raw':>8} "
          f"{'fasm SQL/s':>10} {'SQL/raw':>7} {'SQL/hand':>8} {'fasm KV/s':>9} {'KV/raw':>6} "
          f"{'KV/hand':>7}")
    for name, n, m in table:
        raw, hand = m[("raw/raw", n)], m[("hand/raw", n)]
        sql, sql_h = m[("sql/raw", n)], m[("sql/hand", n)]
        kv, kv_h = m[("kv/raw", n)], m[("kv/hand", n)]
        print(f"{name:<14} {n:>10} {raw[0]:>7,.0f} {hand[0]:>9,.0f} {hand[1]:>8.2f} "
              f"{sql[0]:>10,.0f} {sql[1]:>7.2f} {sql_h[1]:>8.2f} {kv[0]:>9,.0f} {kv[1]:>6.2f} "
              f"{kv_h[1]:>7.2f}")
    print("\nby hand: the same read and write in plain Python on one connection, one transaction "
          "per transition (1) or per 64 (64)")
    print("target (issue 5): fasm >= 0.70 x raw; printed, not asserted")


if __name__ == "__main__":
    main()
