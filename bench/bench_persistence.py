"""Durable transitions per second on real storage, beside the physical limits of the same disk.

    python bench/bench_persistence.py [--quick] [--dir DIR]

In one run, on the disk holding DIR (default: a temporary directory under ./bench-data):

1. limits: os.fsync after a small append; raw sqlite3 single-row commits (WAL,
   synchronous=FULL, and NORMAL for reference); the same raw commit made from an event loop
   through a worker thread (the price of keeping the disk off the loop, with no fasm in it),
   once through fasm's worker and once through anyio.to_thread;
2. durable transitions/s for every store and strategy, sequential (one submitter awaiting each
   submit) and with 64 concurrent submitters (group commit), 1,000 accounts; the sequential
   journal rows also with ``inline=True`` (the store on the event loop's thread);
3. per-transition cost at 1,000 vs 1,000,000 accounts, snapshot vs journal (SQLite);
4. recovery time vs journal length and state size (SQLite, journal).

Sections 1 and 2 run in rounds, every measurement once per round in a rotating order, and each
ratio printed is the median over rounds of the ratio between two figures of the same round (the
disk's fsync rate drifts by half within minutes on a shared machine; pairing cancels it out).
Nothing here is a pass/fail test.
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
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._ledger import Charge, Charged, LedgerMachine, Pay, new_ledger
from fasm.persistence import FileStore, Journal, Snapshot, SQLiteStore, Store
from fasm.persistence._worker import Worker
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


def _raw_sqlite(path: Path, synchronous: str) -> tuple[sqlite3.Connection, Callable[[], None]]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
    payload = b"x" * 200

    def commit() -> None:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t (v) VALUES (?)", (payload,))
        conn.execute("COMMIT")

    return conn, commit


def sqlite_rate(path: Path, n: int, synchronous: str) -> float:
    conn, commit = _raw_sqlite(path, synchronous)
    start = time.perf_counter()
    for _ in range(n):
        commit()
    rate = n / (time.perf_counter() - start)
    conn.close()
    return rate


async def sqlite_offloop_rate(path: Path, n: int, via: str) -> float:
    """The raw commit of ``sqlite_rate``, awaited from an event loop that keeps the disk off
    itself: each commit is handed to a thread and the loop woken when it is done."""
    conn, commit = _raw_sqlite(path, "FULL")
    worker = Worker("bench-raw")
    start = time.perf_counter()
    for _ in range(n):
        if via == "worker":
            await worker.run(commit)
        else:
            await anyio.to_thread.run_sync(commit)
    rate = n / (time.perf_counter() - start)
    worker.stop()
    conn.close()
    return rate


def make_store(kind: str, where: Path, inline: bool = False) -> Store:
    if kind == "file":
        return FileStore(where / "files", inline=inline)
    return SQLiteStore(where / "ledger.db", inline=inline)


async def durable_rate(kind: str, durability: Any, where: Path, accounts: int, n: int,
                       submitters: int, inline: bool = False) -> float:
    init = new_ledger(accounts)  # fresh for every run: each Pay adds a pending payment
    rt = Runtime(LedgerMachine(), initial_state=lambda: init,
                 store=make_store(kind, where, inline), durability=durability,
                 queue_size=4096, executors=EXECUTORS)
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


LIMITS = (
    ("fsync", "os.fsync after a 200-byte append"),
    ("full", "sqlite3 WAL synchronous=FULL single-row commit"),
    ("normal", "sqlite3 WAL synchronous=NORMAL (not durable)"),
    ("worker", "the same FULL commit awaited via fasm's worker thread"),
    ("to_thread", "the same FULL commit awaited via anyio.to_thread"),
)
FASM = [(kind, dname, subs, inline)
        for kind in ("sqlite", "file")
        for dname, subs, inline in (("journal", 1, False), ("journal", 1, True),
                                    ("journal", 64, False), ("snapshot", 1, False),
                                    ("snapshot", 64, False))]


def row_name(kind: str, dname: str, subs: int, inline: bool) -> str:
    return f"{kind}/{dname}/{subs}/{'inline' if inline else 'worker'}"


def rounds(base: Path, runs: int, seq_n: int,
           con_n: int) -> tuple[dict[str, list[float]], Callable[[str, str], float]]:
    """Every limit and every durable rate once per round, in an order that rotates from round
    to round; returns the rates and a function giving the median per-round ratio of two."""
    jobs: list[tuple[str, Callable[[], float]]] = [
        ("fsync", lambda: fsync_rate(fresh(base) / "f", seq_n)),
        ("full", lambda: sqlite_rate(fresh(base) / "s.db", seq_n, "FULL")),
        ("normal", lambda: sqlite_rate(fresh(base) / "s.db", seq_n * 5, "NORMAL")),
        ("worker", lambda: anyio.run(sqlite_offloop_rate, fresh(base) / "s.db", seq_n,
                                     "worker")),
        ("to_thread", lambda: anyio.run(sqlite_offloop_rate, fresh(base) / "s.db", seq_n,
                                        "to_thread")),
    ]
    for kind, dname, subs, inline in FASM:
        durability = Journal() if dname == "journal" else Snapshot()
        jobs.append((row_name(kind, dname, subs, inline),
                     lambda k=kind, d=durability, s=subs, i=inline: anyio.run(
                         durable_rate, k, d, fresh(base), 1_000, seq_n if s == 1 else con_n, s,
                         i)))
    rates: dict[str, list[float]] = {name: [] for name, _ in jobs}
    for r in range(runs):
        shift = (r * 7) % len(jobs)
        for name, job in jobs[shift:] + jobs[:shift]:
            rates[name].append(job())
        print(f"   round {r + 1}/{runs} done", file=sys.stderr, flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

    return rates, ratio


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


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
    ap.add_argument("--rounds", type=int, default=5, help="rounds of sections 1 and 2")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=args.dir))
    runs = 1 if args.quick else args.rounds
    seq_n = 300 if args.quick else 3_000
    con_n = 2_000 if args.quick else 30_000
    try:
        print(f"fasm persistence benchmark on {base.resolve()} (min / median / max of {runs}; "
              "ratios: median of per-round ratios)\n")
        rates, ratio = rounds(base, runs, seq_n, con_n)

        print("1. physical limits")
        for name, label in LIMITS:
            print(f"   {label:<52} {fmt(spread(rates[name]))} /s")
        hop = statistics.median(1e6 / w - 1e6 / f for w, f in zip(rates["worker"], rates["full"],
                                                                    strict=True))
        print(f"   {'(what the hand-off to the worker adds, per commit)':<52} {hop:>9.0f} us\n")

        print("2. durable transitions/s, 1,000 accounts (vs the raw limit of that store)")
        for kind, dname, subs, inline in FASM:
            limit = "full" if kind == "sqlite" else "fsync"
            name = row_name(kind, dname, subs, inline)
            label = (f"{kind}, {dname}, {'sequential' if subs == 1 else '64 submitters'}"
                     f"{', inline' if inline else ''}")
            print(f"   {label:<52} {fmt(spread(rates[name]))} /s   {ratio(name, limit):6.2f}x raw")
        print()
        print("3. per-transition cost vs state size (sqlite, 64 submitters, us per transition)")
        sizes = (1_000, 100_000) if args.quick else (1_000, 1_000_000)
        cost: dict[tuple[str, int], float] = {}
        for dname, durability in (("journal", Journal()), ("snapshot", Snapshot())):
            for accounts in sizes:
                n = con_n if dname == "journal" else max(200, con_n // 50)
                r = median_of(1 if accounts > 1_000 else runs,
                              lambda d=durability, a=accounts, n=n: anyio.run(
                                  durable_rate, "sqlite", d, fresh(base), a, n, 64))
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
        seq = row_name("sqlite", "journal", 1, False)
        print("targets (issue 3), the default store being SQLite:")
        inline = row_name("sqlite", "journal", 1, True)
        print(f"   sequential, sqlite journal / raw commit: {ratio(seq, 'full'):.2f} "
              f"(target >= 0.75); with inline=True: {ratio(inline, 'full'):.2f}")
        print(f"   sequential, sqlite journal / raw commit through a worker thread: "
              f"{ratio(seq, 'worker'):.2f}")
        print(f"   64 submitters / sequential (group commit): "
              f"{ratio(row_name('sqlite', 'journal', 64, False), seq):.1f}x (target >= 10x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:>9,.0f} / {r[1]:>9,.0f} / {r[2]:>9,.0f}"


if __name__ == "__main__":
    main()
