"""What a refused input costs, by rollback policy and state size: milliseconds per refusal, and
the latency of a good request queued behind a burst of refusals.

    python bench/bench_refusals.py [--quick] [--backend asyncio|trio]

The state is the benchmark ledger with N accounts (the payments service of issue 11 had 74,000
payments). Every refusal is an ``Insufficient`` (a ``Rejected`` raised while validating, before
any mutation). ``"reload"`` reloads the committed state after it (decode the checkpoint, replay
the journal tail, or rebuild the initial state and replay: O(state)); ``"trust-rejected"``, the
default, trusts it (O(input)). Store: MemoryStore, default Journal. Every figure comes from this
run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._ledger import Charge, Charged, Insufficient, LedgerMachine, Pay, new_ledger
from fasm.persistence import Journal, MemoryStore
from fasm.runtime import ActionContext, Runtime


async def charge(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


async def measure(accounts: int, rollback: Any, refusals: int, burst: int) -> tuple[float, float]:
    rt = Runtime(LedgerMachine(), initial_state=lambda: new_ledger(accounts), store=MemoryStore(),
                 durability=Journal(), executors={Charge: charge},
                 rollback=rollback)
    async with rt:
        await rt.submit(Pay(0, 1))
        start = time.perf_counter()
        for _ in range(refusals):
            try:
                await rt.submit(Pay(0, 10**15))
            except Insufficient:
                pass
        per_refusal = (time.perf_counter() - start) / refusals * 1000
        # A good request queued behind a burst of refusals: its latency.
        latencies: list[float] = []

        async def refuse() -> None:
            try:
                await rt.submit(Pay(0, 10**15))
            except Insufficient:
                pass

        async def good() -> None:
            t = time.perf_counter()
            await rt.submit(Pay(1, 1))
            latencies.append(time.perf_counter() - t)

        async with anyio.create_task_group() as tg:
            for _ in range(burst):
                tg.start_soon(refuse)
            tg.start_soon(good)
        return per_refusal, statistics.median(latencies) * 1000


async def main(quick: bool) -> None:
    sizes = (1_000, 74_000)
    refusals = 5 if quick else 20
    burst = 10 if quick else 50
    print(f"{'accounts':>9} {'rollback':>15} {'ms/refusal':>11} "
          f"{'good request behind ' + str(burst) + ' refusals (ms)':>40}")
    for accounts in sizes:
        for rollback in ("reload", "trust-rejected"):
            per, behind = await measure(accounts, rollback, refusals, burst)
            print(f"{accounts:>9,} {rollback:>15} {per:>11.3f} {behind:>40.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    args = parser.parse_args()
    anyio.run(main, args.quick, backend=args.backend)
