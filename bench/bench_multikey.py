"""The store layer of keyed instances: a group commit across keys against one commit per key,
and finding the keys in flight among many idle ones.

    python bench/bench_multikey.py [--quick] [--dir DIR] [--postgres DSN] [--keys N]

1. ``commit_many`` of 64 keys (one journal entry each, durable) against 64 sequential
   ``commit`` calls on the same keys, for every store (PostgreSQL with ``--postgres``). Rounds
   alternate the two, and the ratio printed is the median over rounds of the ratio within a
   round (the disk's fsync rate drifts on a shared machine; pairing cancels it).
2. ``open`` + ``keys_in_flight`` of a fresh SQLiteStore with N keys stored (1,000,000 by
   default) of which 1,000 are in flight, beside the same with N/100 keys: the time should not
   grow with the idle keys. The keys are written by direct SQL in one transaction (a bench-only
   bulk path), in the store's own format.

Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fasm.persistence import FileStore, KeyCommit, MemoryStore, SQLiteStore, Store

GROUP = 64
IN_FLIGHT = 1_000


async def _group_vs_singles(store: Store, rounds: int) -> tuple[float, float, float]:
    """Median ms of one commit_many of 64 keys, of 64 single commits, and of their ratio."""
    keys = [f"acct-{i}" for i in range(GROUP)]
    await store.open()
    try:
        await store.acquire_all()
        seq = {k: 0 for k in keys}

        async def group() -> None:
            await store.commit_many([KeyCommit(k, seq[k], seq[k] + 1, [b"x" * 100])
                                     for k in keys])
            for k in keys:
                seq[k] += 1

        async def singles() -> None:
            for k in keys:
                await store.commit(k, expected_seq=seq[k], seq=seq[k] + 1,
                                   entries=[b"x" * 100])
                seq[k] += 1

        await group()  # first records of every key, directories, tables warmed
        await singles()
        g: list[float] = []
        s: list[float] = []
        for r in range(rounds):
            pair: list[tuple[list[float], Callable[[], Awaitable[None]]]] = [(g, group),
                                                                             (s, singles)]
            for into, fn in pair if r % 2 == 0 else reversed(pair):
                t = time.perf_counter()
                await fn()
                into.append((time.perf_counter() - t) * 1000)
        ratio = statistics.median(b / a for a, b in zip(g, s, strict=True))
        return statistics.median(g), statistics.median(s), ratio
    finally:
        await store.close()


def _populate(path: Path, keys: int) -> None:
    """N keys at seq 1 (one journal entry each), the first IN_FLIGHT marked in flight."""
    entry = b"e" * 32
    crc = zlib.crc32(entry) & 0xFFFFFFFF
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    names = (f"acct-{i:08d}" for i in range(keys))
    db.executemany("INSERT INTO fasm_keys VALUES (?, 0, 0)", ((k,) for k in names))
    db.executemany("INSERT INTO fasm_journal VALUES (?, 1, ?, ?)",
                   ((f"acct-{i:08d}", entry, crc) for i in range(keys)))
    step = max(1, keys // IN_FLIGHT)
    db.executemany("INSERT INTO fasm_in_flight VALUES (?)",
                   ((f"acct-{i:08d}",) for i in range(0, keys, step)))
    db.execute("COMMIT")
    # As a store's last connection leaves it at close: the rows in the database, not the WAL
    # (an open would otherwise index a WAL of the whole population).
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


async def _startup(path: Path, repeat: int) -> tuple[float, int]:
    """Median ms of open + keys_in_flight on a fresh store object, and how many it found."""
    times = []
    found = 0
    for _ in range(repeat):
        t = time.perf_counter()
        store = SQLiteStore(path)
        await store.open()
        found = len(await store.keys_in_flight())
        times.append((time.perf_counter() - t) * 1000)
        await store.close()
    return statistics.median(times), found


async def main(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-multikey-", dir=args.dir))
    rounds = 5 if args.quick else 20
    keys = args.keys or (20_000 if args.quick else 1_000_000)
    try:
        print(f"1. commit_many of {GROUP} keys vs {GROUP} single commits (durable, "
              f"{rounds} rounds, medians)")
        print(f"{'store':<10} {'group ms':>10} {'64 single ms':>13} {'singles/group':>14}")
        makers: list[tuple[str, Callable[[], Store]]] = [
            ("memory", MemoryStore),
            ("file", lambda: FileStore(base / "files")),
            ("sqlite", lambda: SQLiteStore(base / "group.db")),
        ]
        if args.postgres:
            from fasm.persistence import PostgresStore

            schema = f"bench_multikey_{int(time.time())}"
            makers.append(("postgres", lambda: PostgresStore(args.postgres, schema=schema)))
        for name, make in makers:
            g, s, ratio = await _group_vs_singles(make(), rounds)
            print(f"{name:<10} {g:>10.2f} {s:>13.2f} {ratio:>13.1f}x")
        if args.postgres:
            import psycopg

            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        print()
        print(f"2. start-up: open + keys_in_flight, SQLite, {IN_FLIGHT:,} keys in flight")
        print(f"{'keys stored':>12} {'populate s':>11} {'start-up ms':>12} {'found':>7}")
        results = []
        for n in (max(IN_FLIGHT, keys // 100), keys):
            path = base / f"startup-{n}.db"
            store = SQLiteStore(path)
            await store.open()  # the tables, in the store's format
            await store.close()
            t = time.perf_counter()
            _populate(path, n)
            populate = time.perf_counter() - t
            ms, found = await _startup(path, 5)
            results.append(ms)
            print(f"{n:>12,} {populate:>11.1f} {ms:>12.1f} {found:>7,}")
        print(f"start-up at {keys:,} keys / at {max(IN_FLIGHT, keys // 100):,}: "
              f"{results[1] / results[0]:.2f}x (target: under 2 s, flat in the idle keys)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, 20,000 keys")
    parser.add_argument("--dir", default=None, help="where the stores live (a temporary dir)")
    parser.add_argument("--postgres", default=None, help="a DSN: also measure PostgresStore")
    parser.add_argument("--keys", type=int, default=0, help="keys stored for section 2")
    anyio.run(main, parser.parse_args())
