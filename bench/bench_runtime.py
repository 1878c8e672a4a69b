"""In-memory transitions per second: the Runtime (MemoryStore) vs the same stf in a plain loop.

    python bench/bench_runtime.py [--quick] [--backend asyncio|trio]

Prints one table. Every figure comes from this run; the ratio column compares with the plain
loop measured a moment earlier in the same process. The plain loop settles pending payments the
way the runtime would not (it never completes them), so state grows the same way in both.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._ledger import Charge, Charged, LedgerMachine, Pay, new_ledger
from fasm import ActionList, Normal
from fasm.persistence import Journal, MemoryStore, Snapshot
from fasm.runtime import ActionContext, Runtime


async def plain_loop(accounts: int, n: int) -> float:
    machine, state, actions = LedgerMachine(), new_ledger(accounts), ActionList()
    inputs = [Normal(Pay(i % accounts, 1)) for i in range(n)]
    start = time.perf_counter()
    for inp in inputs:
        actions.clear()
        await machine.stf(state, inp, actions)
    return n / (time.perf_counter() - start)


async def charge(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


async def through_runtime(accounts: int, n: int, submitters: int, durability: Any,
                          track: bool = False) -> tuple[float, float]:
    rt = Runtime(LedgerMachine(), initial_state=lambda: new_ledger(accounts),
                 store=MemoryStore(), durability=durability,
                 executors={Charge: charge}, queue_size=4096)
    per = n // submitters
    async with rt:
        await rt.submit(Pay(0, 1))  # the first commit writes the initial checkpoint; not timed
        start = time.perf_counter()
        if submitters == 1:
            for i in range(n):
                await rt.submit(Pay(i % accounts, 1, track))
        else:
            async def one(k: int) -> None:
                for i in range(per):
                    await rt.submit(Pay((k * per + i) % accounts, 1, track))

            async with anyio.create_task_group() as tg:
                for k in range(submitters):
                    tg.start_soon(one, k)
        if track:
            await rt.wait_idle()
        elapsed = time.perf_counter() - start
    done = per * submitters
    return done / elapsed, elapsed / done * 1e6


def best(runs: int, fn: Callable[[], Coroutine[Any, Any, Any]], backend: str) -> list[Any]:
    out = []
    for _ in range(runs):
        gc.collect()
        out.append(anyio.run(fn, backend=backend))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, one run each")
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = ap.parse_args()
    n = 20_000 if args.quick else 200_000
    runs = 1 if args.quick else 3
    print(f"fasm runtime benchmark: backend={args.backend}, {n:,} transitions per run, "
          f"median of {runs} run(s), MemoryStore\n")
    header = (f"{'state':>8} {'mode':<34} {'transitions/s':>14} {'us/transition':>14} "
              f"{'vs plain loop':>14}")
    print(header)
    print("-" * len(header))
    for accounts in (1_000, 100_000):
        plain = statistics.median(best(runs, lambda a=accounts: plain_loop(a, n), args.backend))
        print(f"{accounts:>8,} {'plain loop (stf only)':<34} {plain:>14,.0f} {1e6 / plain:>14.2f} "
              f"{'1.00':>14}")
        cases: list[tuple[str, int, Any, bool]] = [
            ("runtime, journal, 1 submitter", 1, Journal(), False),
            ("runtime, journal, 64 submitters", 64, Journal(), False),
            ("runtime, snapshot, 64 submitters", 64, Snapshot(), False),
            ("runtime, journal, 64 sub., tracked", 64, Journal(), True),
        ]
        for label, subs, durability, track in cases:
            if isinstance(durability, Snapshot) and accounts > 1_000:
                label += " *"
            count = n // 10 if isinstance(durability, Snapshot) else n
            if track:
                count = n // 2
            results = best(runs, lambda a=accounts, s=subs, d=durability, c=count, t=track:
                           through_runtime(a, c, s, d, t), args.backend)
            rate = statistics.median(r[0] for r in results)
            us = statistics.median(r[1] for r in results)
            print(f"{accounts:>8,} {label:<34} {rate:>14,.0f} {us:>14.2f} "
                  f"{rate / plain:>14.2f}")
    print("\n* snapshot writes the whole state per group commit (O(state)); journal appends the"
          "\n  input (O(input)) and checkpoints when the journal outgrows the last checkpoint."
          "\n  'tracked' adds a charge per input: an executor call and a second transition for its"
          "\n  result (counted once per input).")
    print("target (issue 2): runtime with 64 submitters >= 0.25 of the plain loop, at both sizes")


if __name__ == "__main__":
    main()
