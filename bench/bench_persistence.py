"""Durable transitions per second on real storage, beside the physical limits of the same disk.

    python bench/bench_persistence.py [--quick] [--dir DIR]

In one run, on the disk holding DIR (default: a temporary directory under ./bench-data):

1. limits: os.fsync after a small append; raw sqlite3 single-row commits (WAL,
   synchronous=FULL, and NORMAL for reference);
2. durable transitions/s for every store and strategy, sequential (one submitter awaiting each
   submit) and with 64 concurrent submitters (group commit), 1,000 accounts;
3. per-transition cost at 1,000 vs 1,000,000 accounts, snapshot vs journal (SQLite);
4. recovery time vs journal length and state size (SQLite, journal).

Every ratio compares figures measured in this run. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._ledger import Charge, Charged, Ledger, LedgerMachine, Pay, new_ledger
from fasm.persistence import FileStore, Journal, Snapshot, SQLiteStore, Store
from fasm.runtime import ActionContext, Runtime


async def charge(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


EXECUTORS: dict[type[Any], Any] = {Charge: charge}


def fsync_rate(path: Path, n: int) -> float:
    with path.open("ab") as f:
        start = time.perf_counter()
        for _ in range(n):
            f.write(b"x" * 200)
            f.flush()
            os.fsync(f.fileno())
        return n / (time.perf_counter() - start)


def sqlite_rate(path: Path, n: int, synchronous: str) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
    payload = b"x" * 200
    start = time.perf_counter()
    for _ in range(n):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t (v) VALUES (?)", (payload,))
        conn.execute("COMMIT")
    rate = n / (time.perf_counter() - start)
    conn.close()
    return rate


def make_store(kind: str, where: Path) -> Store:
    return FileStore(where / "files") if kind == "file" else SQLiteStore(where / "ledger.db")


async def durable_rate(kind: str, durability: Any, where: Path, accounts: int, n: int,
                       submitters: int, state: Ledger | None = None) -> float:
    init = state if state is not None else new_ledger(accounts)
    rt = Runtime(LedgerMachine(), initial_state=lambda: init, store=make_store(kind, where),
                 durability=durability, queue_size=4096, executors=EXECUTORS)
    async with rt:
        await rt.submit(Pay(0, 1))  # the first commit writes the initial checkpoint; not timed
        per = max(1, n // submitters)
        start = time.perf_counter()
        if submitters == 1:
            for i in range(n):
                await rt.submit(Pay(i % accounts, 1))
        else:
            async def one(k: int) -> None:
                for i in range(per):
                    await rt.submit(Pay((k * per + i) % accounts, 1))

            async with anyio.create_task_group() as tg:
                for k in range(submitters):
                    tg.start_soon(one, k)
        elapsed = time.perf_counter() - start
    return (per * submitters if submitters > 1 else n) / elapsed


async def recovery_time(where: Path, accounts: int, journal_len: int) -> float:
    """Write a checkpoint and then ``journal_len`` journal entries; time a fresh start."""
    checkpoint_every = journal_len + 10
    rt = Runtime(LedgerMachine(), initial_state=lambda: new_ledger(accounts),
                 store=make_store("sqlite", where), executors=EXECUTORS,
                 durability=Journal(checkpoint_every=checkpoint_every))
    async with rt, anyio.create_task_group() as tg:
        await rt.submit(Pay(0, 1))  # checkpoint of the initial state

        async def one(k: int) -> None:
            for i in range(journal_len // 16):
                await rt.submit(Pay((k + i) % accounts, 1))

        for k in range(16):
            tg.start_soon(one, k)
    start = time.perf_counter()
    again = Runtime(LedgerMachine(), initial_state=lambda: new_ledger(accounts),
                    store=make_store("sqlite", where), durability=Journal(),
                    executors=EXECUTORS)
    async with again:
        elapsed = time.perf_counter() - start
        assert again.seq == 1 + (journal_len // 16) * 16
    return elapsed


def median_of(runs: int, fn: Callable[[], float]) -> tuple[float, float, float]:
    values = [fn() for _ in range(runs)]
    return min(values), statistics.median(values), max(values)


def fresh(base: Path) -> Path:
    path = Path(tempfile.mkdtemp(dir=base))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, one run each (CI smoke)")
    ap.add_argument("--dir", type=Path, default=Path("bench-data"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=args.dir))
    runs = 1 if args.quick else 3
    seq_n = 300 if args.quick else 3_000
    con_n = 2_000 if args.quick else 30_000
    try:
        print(f"fasm persistence benchmark on {base.resolve()} (min / median / max of {runs})\n")
        print("1. physical limits")
        fs = median_of(runs, lambda: fsync_rate(fresh(base) / "f", seq_n))
        full = median_of(runs, lambda: sqlite_rate(fresh(base) / "s.db", seq_n, "FULL"))
        normal = median_of(runs, lambda: sqlite_rate(fresh(base) / "s.db", seq_n * 5, "NORMAL"))
        print(f"   {'os.fsync after a 200-byte append':<48} {fmt(fs)} /s")
        print(f"   {'sqlite3 WAL synchronous=FULL single-row commit':<48} {fmt(full)} /s")
        print(f"   {'sqlite3 WAL synchronous=NORMAL (not durable)':<48} {fmt(normal)} /s\n")

        print("2. durable transitions/s, 1,000 accounts (vs the raw limit of that store)")
        rows: dict[tuple[str, str, int], float] = {}
        for kind, limit in (("sqlite", full[1]), ("file", fs[1])):
            for dname, durability in (("journal", Journal()), ("snapshot", Snapshot())):
                for subs, n in ((1, seq_n), (64, con_n)):
                    r = median_of(runs, lambda k=kind, d=durability, s=subs, n=n: anyio.run(
                        durable_rate, k, d, fresh(base), 1_000, n, s))
                    rows[(kind, dname, subs)] = r[1]
                    label = f"{kind}, {dname}, {'sequential' if subs == 1 else '64 submitters'}"
                    print(f"   {label:<48} {fmt(r)} /s   {r[1] / limit:6.2f}x raw")
        print()
        print("3. per-transition cost vs state size (sqlite, 64 submitters, us per transition)")
        sizes = (1_000, 100_000) if args.quick else (1_000, 1_000_000)
        cost: dict[tuple[str, int], float] = {}
        for dname, durability in (("journal", Journal()), ("snapshot", Snapshot())):
            for accounts in sizes:
                n = con_n if dname == "journal" else max(200, con_n // 50)
                state = new_ledger(accounts)
                r = median_of(1 if accounts > 1_000 else runs,
                              lambda d=durability, a=accounts, n=n, s=state: anyio.run(
                                  durable_rate, "sqlite", d, fresh(base), a, n, 64, s))
                cost[(dname, accounts)] = 1e6 / r[1]
                print(f"   {dname:<9} {accounts:>10,} accounts {1e6 / r[1]:>12.1f} us "
                      f"({r[1]:,.0f} /s)")
        big = sizes[1]
        print(f"   journal cost at {big:,} / at 1,000: "
              f"{cost[('journal', big)] / cost[('journal', 1_000)]:.2f}x (target <= 1.5x)\n")

        print("4. recovery time (sqlite, journal): checkpoint + replay of the tail")
        lengths = (1_000,) if args.quick else (1_000, 10_000, 50_000)
        for accounts in (1_000, 100_000):
            for length in lengths:
                t = anyio.run(recovery_time, fresh(base), accounts, length)
                print(f"   {accounts:>8,} accounts, {length:>6,} journal entries: "
                      f"{t * 1000:8.1f} ms")
        print()
        seq_ratio = rows[("sqlite", "journal", 1)] / full[1]
        group = rows[("sqlite", "journal", 64)] / rows[("sqlite", "journal", 1)]
        print("targets (issue 3):")
        print(f"   sequential on the default store (sqlite, journal) / raw commit: {seq_ratio:.2f}"
              f" (target >= 0.75)")
        print(f"   64 submitters / sequential (group commit): {group:.1f}x (target >= 10x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:>9,.0f} / {r[1]:>9,.0f} / {r[2]:>9,.0f}"


if __name__ == "__main__":
    main()
