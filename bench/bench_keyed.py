"""The keyed runtime end to end: throughput across many keys against one instance, memory that
follows the active set, and a start-up that does not grow with the idle keys.

    python bench/bench_keyed.py [--quick] [--dir DIR]

Stores are SQLiteStores with their default, durable settings, under DIR (default: a
temporary directory), removed at the end, except the one MemoryStore pair of section 1. The
machine is the bank example (examples/bank).

1. Durable transitions/s with 64 concurrent submitters, in rounds that alternate the runtimes
   (medians, and the median of the ratios within a round): a keyed runtime over 100,000 stored
   accounts (quick: 5,000), each submit a ``Deposit(1)`` to a random key (the default
   ``max_active``, so most keys are loaded from the store when used), beside a single-instance
   runtime (one account). For reference: a keyed runtime on 1,000 hot keys (all active: no
   loads from the store, still 64 keys per group commit); the hot keys and one instance again
   on a MemoryStore (no I/O: what keys cost on the event loop); and the store alone, a
   ``commit_many`` of 64 keys that have a history against one key's 64 entries.
2. Memory: in a fresh process each, a keyed runtime with ``max_active=10,000`` takes a
   ``Deposit(1)`` on each of N distinct keys (1,000,000; quick: 50,000), 64 submitters at a
   time, all through the runtime; the process's own peak (``VmHWM``) and current RSS beside a
   process that touches 10,000 keys the same way.
3. Start-up of the Runtime (open, in-flight keys loaded and restored, executors started: from
   making the Runtime to the ``async with`` body): a store of 1,000,000 accounts (quick:
   20,000) of which 1,000 have a cash withdrawal in flight, beside one of 10,000 accounts with
   the same 1,000 in flight. The accounts are written by direct SQL in one transaction (a
   bench-only bulk path) in the store's format: each checkpoint encoded by the machine's codec
   (byte for byte what the runtime writes; checked against a real key's row), and the
   in-flight withdrawal a journal row copied from a key the runtime wrote itself.

Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.bank.machine import (
    Account,
    Bank,
    Deposit,
    Dispense,
    Dispensed,
    Withdraw,
    open_account,
)
from fasm.persistence import MemoryStore, SQLiteStore
from fasm.persistence._codec import Codec
from fasm.runtime import ActionContext, Runtime

SUBMITTERS = 64
IN_FLIGHT = 1_000
MAX_ACTIVE = 10_000
BASELINE_KEYS = 10_000
HOT = 1_000


def _name(i: int) -> str:
    return f"acct-{i:08d}"


async def _never_dispense(action: Dispense, ctx: ActionContext) -> Dispensed:
    """The cash machine of section 3: never answers, so withdrawals stay in flight."""
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def _dispense(action: Dispense, ctx: ActionContext) -> Dispensed:
    return Dispensed(action.id)


# -- the bulk path ---------------------------------------------------------------------------


async def _template(path: Path) -> bytes:
    """The journal row of a ``Withdraw`` in flight, written by a real keyed runtime (and a check
    that the codec encodes a checkpoint byte for byte as the runtime wrote it)."""
    rt = Runtime(Bank(), initial_state=open_account, keyed=True, store=SQLiteStore(path),
                 executors={Dispense: _never_dispense}, shutdown_grace=0)
    async with rt:
        await rt.submit(Deposit(1), key="tpl")
        await rt.submit(Withdraw("w-1", 1), key="tpl")
    db = sqlite3.connect(path)
    try:
        (data,), = db.execute("SELECT data FROM fasm_checkpoints WHERE key = 'tpl'")
        (entry,), = db.execute("SELECT entry FROM fasm_journal WHERE key = 'tpl' AND seq = 2")
        (in_flight,), = db.execute("SELECT count(*) FROM fasm_in_flight WHERE key = 'tpl'")
    finally:
        db.close()
    expected = Codec(Bank).encode_checkpoint(1, Account("tpl", balance=1, deposited=1), {})
    assert bytes(data) == expected, "the codec's checkpoint differs from the runtime's"
    assert in_flight == 1 and b"tpl" not in bytes(entry), "unexpected journal row format"
    return bytes(entry)


def _populate(path: Path, keys: int, in_flight: int, withdraw: bytes) -> None:
    """``keys`` accounts holding 1 (a checkpoint at seq 1, as the runtime writes after a first
    Deposit(1)); ``in_flight`` of them, spread evenly, also have the Withdraw journal row at seq
    2 and the in-flight mark. The store's tables must exist (open it once first)."""
    codec = Codec(Bank)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    db.executemany("INSERT INTO fasm_keys VALUES (?, 1, 1)", ((_name(i),) for i in range(keys)))

    def checkpoints() -> Any:
        for i in range(keys):
            k = _name(i)
            data = codec.encode_checkpoint(1, Account(k, balance=1, deposited=1), {})
            yield k, data, zlib.crc32(data) & 0xFFFFFFFF

    db.executemany("INSERT INTO fasm_checkpoints VALUES (?, ?, ?)", checkpoints())
    if in_flight:
        crc = zlib.crc32(withdraw) & 0xFFFFFFFF
        busy = [_name(i) for i in range(0, keys, max(1, keys // in_flight))][:in_flight]
        db.executemany("INSERT INTO fasm_journal VALUES (?, 2, ?, ?)",
                       ((k, withdraw, crc) for k in busy))
        db.executemany("INSERT INTO fasm_in_flight VALUES (?)", ((k,) for k in busy))
    db.execute("COMMIT")
    # As a store's last connection leaves it at close: the rows in the database, not the WAL.
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


async def _populated(path: Path, keys: int, in_flight: int, withdraw: bytes) -> float:
    """Make the store (its tables, in its format) and fill it; seconds taken."""
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    t = time.perf_counter()
    _populate(path, keys, in_flight, withdraw)
    return time.perf_counter() - t


# -- 1. throughput ----------------------------------------------------------------------------


async def _hammer(rt: Runtime[Any, Any, Any, Any, Any, Any], keys: int | None,
                  seconds: float) -> float:
    """Transitions/s of SUBMITTERS submitters for ``seconds`` (keys None: a single instance)."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def one(c: int) -> None:
        nonlocal done
        rng = random.Random(c)
        while time.perf_counter() < deadline:
            if keys is None:
                await rt.submit(Deposit(1))
            else:
                await rt.submit(Deposit(1), key=_name(rng.randrange(keys)))
            done += 1

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for c in range(SUBMITTERS):
            tg.start_soon(one, c)
    return done / (time.perf_counter() - start)


async def _throughput(base: Path, keys: int, seconds: float, rounds: int,
                      withdraw: bytes) -> None:
    print(f"1. durable transitions/s, SQLiteStore (journal), {SUBMITTERS} submitters, "
          f"{rounds} rounds of {seconds:g} s each, alternating; medians")
    path = base / "keyed.db"
    populate = await _populated(path, keys, 0, withdraw)
    keyed_rt = Runtime(Bank(), initial_state=open_account, keyed=True, store=SQLiteStore(path),
                       executors={Dispense: _dispense})
    hot_rt = Runtime(Bank(), initial_state=open_account, keyed=True,
                     store=SQLiteStore(base / "hot.db"), executors={Dispense: _dispense})
    single_rt = Runtime(Bank(), initial_state=open_account("one"),
                        store=SQLiteStore(base / "single.db"), executors={Dispense: _dispense})
    # The same two on a MemoryStore: what the keys cost without any I/O.
    hot_mem = Runtime(Bank(), initial_state=open_account, keyed=True, store=MemoryStore(),
                      executors={Dispense: _dispense})
    single_mem = Runtime(Bank(), initial_state=open_account("one"), store=MemoryStore(),
                         executors={Dispense: _dispense})
    got: dict[str, list[float]] = {k: [] for k in ("keyed", "hot", "single", "hot_mem",
                                                   "single_mem")}
    async with keyed_rt, hot_rt, single_rt, hot_mem, single_mem:
        for i in range(HOT):  # the hot keys exist and are active: no loads while timed
            await hot_rt.submit(Deposit(1), key=_name(i))
            await hot_mem.submit(Deposit(1), key=_name(i))
        await single_rt.submit(Deposit(1))  # the first commit writes the checkpoint
        await single_mem.submit(Deposit(1))
        for _ in range(rounds):
            got["keyed"].append(await _hammer(keyed_rt, keys, seconds))
            got["hot"].append(await _hammer(hot_rt, HOT, seconds))
            got["single"].append(await _hammer(single_rt, None, seconds))
            got["hot_mem"].append(await _hammer(hot_mem, HOT, seconds))
            got["single_mem"].append(await _hammer(single_mem, None, seconds))
        active = keyed_rt.active_keys
    keyed, hot, single = (statistics.median(got[k]) for k in ("keyed", "hot", "single"))
    ratio = statistics.median(k / s for k, s in zip(got["keyed"], got["single"], strict=True))
    hot_ratio = statistics.median(h / s for h, s in zip(got["hot"], got["single"], strict=True))
    mem_ratio = statistics.median(h / s for h, s in zip(got["hot_mem"], got["single_mem"],
                                                        strict=True))
    print(f"{'runtime':<44} {'transitions/s':>14}")
    print(f"{f'keyed, {keys:,} accounts stored, random keys':<44} {keyed:>14,.0f}")
    print(f"{f'keyed, {HOT:,} hot keys (all active)':<44} {hot:>14,.0f}")
    print(f"{'single instance, one account':<44} {single:>14,.0f}")
    print(f"keyed / single-instance: {ratio:.2f}x, hot keys {hot_ratio:.2f}x (median of the "
          f"ratios within a round; bulk populate {populate:.1f} s; {active:,} keys active "
          f"after the random runs, max_active {MAX_ACTIVE:,})")
    print("target (issue 12): keyed >= single-instance")
    print(f"no I/O (MemoryStore): {HOT:,} hot keys {statistics.median(got['hot_mem']):,.0f}/s, "
          f"single instance {statistics.median(got['single_mem']):,.0f}/s: {mem_ratio:.2f}x "
          "(what the keys cost on the event loop alone)")
    many, one = await _store_floor(base / "floor.db", 10 if seconds < 2 else 40)
    print(f"the store alone: commit_many of {SUBMITTERS} of {HOT:,} keys with a history, one "
          f"entry each, {many:.2f} ms; one key with {SUBMITTERS} entries {one:.2f} ms "
          f"({many / one:.1f}x: the rows of many keys land on many pages)")


async def _store_floor(path: Path, rounds: int) -> tuple[float, float]:
    """Median ms of a durable commit_many of SUBMITTERS keys with one entry each, chosen at
    random among HOT keys that already have 50 journal entries, and of one commit of one key
    with SUBMITTERS entries, alternating (what a keyed and a one-key group write)."""
    from fasm.persistence import KeyCommit

    store = SQLiteStore(path)
    await store.open()
    try:
        await store.acquire_all()
        keys = [_name(i) for i in range(HOT)]
        seq = dict.fromkeys(keys, 0)
        entry = b"e" * 90
        for _ in range(50):
            await store.commit_many([KeyCommit(k, seq[k], seq[k] + 1, [entry]) for k in keys])
            for k in keys:
                seq[k] += 1
        await store.commit("one", expected_seq=0, seq=1, entries=[entry])
        one = 1
        rng = random.Random(1)
        many_ms: list[float] = []
        one_ms: list[float] = []
        for _ in range(rounds):
            group = rng.sample(keys, SUBMITTERS)
            t = time.perf_counter()
            await store.commit_many([KeyCommit(k, seq[k], seq[k] + 1, [entry]) for k in group])
            many_ms.append((time.perf_counter() - t) * 1000)
            for k in group:
                seq[k] += 1
            t = time.perf_counter()
            await store.commit("one", expected_seq=one, seq=one + SUBMITTERS,
                               entries=[entry] * SUBMITTERS)
            one_ms.append((time.perf_counter() - t) * 1000)
            one += SUBMITTERS
        return statistics.median(many_ms), statistics.median(one_ms)
    finally:
        await store.close()


# -- 2. memory --------------------------------------------------------------------------------


def _rss_kib() -> tuple[int, int]:
    """(peak, current) resident set size of this process, KiB (Linux): VmHWM and VmRSS, which
    start again at exec (``ru_maxrss`` does not: it would report the parent's size)."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                found[name] = int(value.split()[0])
    return found["VmHWM"], found["VmRSS"]


async def _child_mem(keys: int, where: Path) -> None:
    """The child of section 2: a Deposit(1) on each of ``keys`` distinct keys; prints JSON."""
    before = _rss_kib()[1]
    rt = Runtime(Bank(), initial_state=open_account, keyed=True,
                 store=SQLiteStore(where / f"mem-{keys}.db"), max_active=MAX_ACTIVE,
                 executors={Dispense: _dispense})
    start = time.perf_counter()
    async with rt:
        async def one(c: int) -> None:
            for i in range(c, keys, SUBMITTERS):
                await rt.submit(Deposit(1), key=_name(i))

        async with anyio.create_task_group() as tg:
            for c in range(SUBMITTERS):
                tg.start_soon(one, c)
        elapsed = time.perf_counter() - start
        active = rt.active_keys
        peak, current = _rss_kib()
    print(json.dumps({"before": before, "peak": peak, "current": current, "active": active,
                      "seconds": elapsed}))


def _run_child(keys: int, where: Path) -> dict[str, Any]:
    result = subprocess.run([sys.executable, __file__, "--child-mem", str(keys), "--dir",
                             str(where)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory child ({keys:,} keys) failed:\n{result.stderr[-4000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _memory(base: Path, keys: int) -> None:
    print(f"2. memory, keyed runtime, max_active={MAX_ACTIVE:,}, SQLiteStore: a Deposit(1) on "
          f"each of N distinct keys through the runtime ({SUBMITTERS} submitters), fresh "
          "process each")
    print(f"{'keys touched':>13} {'seconds':>8} {'keys/s':>8} {'active':>7} "
          f"{'RSS start MiB':>14} {'peak MiB':>9} {'current MiB':>12}")
    rows = []
    for n in (BASELINE_KEYS, keys):
        where = base / f"mem-{n}"
        where.mkdir()
        r = _run_child(n, where)
        rows.append(r)
        print(f"{n:>13,} {r['seconds']:>8.1f} {n / r['seconds']:>8,.0f} {r['active']:>7,} "
              f"{r['before'] / 1024:>14.1f} {r['peak'] / 1024:>9.1f} "
              f"{r['current'] / 1024:>12.1f}")
        shutil.rmtree(where, ignore_errors=True)
    small, large = rows
    print(f"peak RSS at {keys:,} keys / at {BASELINE_KEYS:,}: {large['peak'] / small['peak']:.2f}x"
          f", current {large['current'] / small['current']:.2f}x (target: within 2x)")


# -- 3. start-up ------------------------------------------------------------------------------


async def _startup(path: Path) -> tuple[float, int, int]:
    """Ms from making the Runtime to inside ``async with``; keys restored, actions dispatched."""
    t = time.perf_counter()
    rt = Runtime(Bank(), initial_state=open_account, keyed=True, store=SQLiteStore(path),
                 executors={Dispense: _never_dispense}, shutdown_grace=0)
    async with rt:
        ms = (time.perf_counter() - t) * 1000
        by_key = rt.in_flight_by_key
        return ms, len(by_key), sum(len(a) for a in by_key.values())


async def _startups(base: Path, keys: int, withdraw: bytes, rounds: int) -> None:
    print(f"3. Runtime start-up (make it, enter async with), SQLiteStore, {IN_FLIGHT:,} keys "
          f"with a withdrawal in flight, median of {rounds} rounds alternating the stores")
    print(f"{'keys stored':>12} {'populate s':>11} {'start-up ms':>12} {'restored':>9} "
          f"{'dispatched':>11}")
    small = min(keys, BASELINE_KEYS)
    sizes = (small, keys)
    paths = {n: base / f"startup-{n}.db" for n in sizes}
    populate = {n: await _populated(paths[n], n, IN_FLIGHT, withdraw) for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    found: dict[int, tuple[int, int]] = {}
    for r in range(rounds):
        for n in sizes if r % 2 == 0 else reversed(sizes):
            ms, restored, actions = await _startup(paths[n])
            times[n].append(ms)
            found[n] = (restored, actions)
    for n in sizes:
        print(f"{n:>12,} {populate[n]:>11.1f} {statistics.median(times[n]):>12.1f} "
              f"{found[n][0]:>9,} {found[n][1]:>11,}")
    ratio = statistics.median(times[keys]) / statistics.median(times[small])
    print(f"start-up at {keys:,} keys / at {small:,}: {ratio:.2f}x "
          "(target: under 2 s, flat in the idle keys)")


async def main(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-keyed-", dir=args.dir))
    try:
        withdraw = await _template(base / "template.db")
        await _throughput(base, 5_000 if args.quick else 100_000, 1.0 if args.quick else 3.0,
                          2 if args.quick else 3, withdraw)
        print()
        _memory(base, 50_000 if args.quick else 1_000_000)
        print()
        await _startups(base, 20_000 if args.quick else 1_000_000, withdraw,
                        3 if args.quick else 5)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--dir", default=None, help="where the stores live (a temporary dir)")
    parser.add_argument("--child-mem", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_mem:
        anyio.run(_child_mem, args.child_mem, Path(args.dir))
    else:
        anyio.run(main, args)
