"""What remembered idempotency keys cost: checkpoint size and encode/decode time by the number of
keys held (each with its outcome: the actions of its transition), and the throughput of keyed
submits against unkeyed ones through a durable SQLite runtime.

    python bench/bench_idempotency.py [--quick] [--dir DIR]

A key is held for ``idempotency_ttl`` (default 600 s) or until ``idempotency_window`` (default
100,000) newer keys push it out, so a service at R requests/s holds min(R x ttl, window) keys in
every checkpoint. Every figure comes from this run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._ledger import Charge, Charged, LedgerMachine, Pay, new_ledger
from fasm import Tracked
from fasm._remembered import Remembered
from fasm.persistence import Codec, Journal, SQLiteStore
from fasm.runtime import ActionContext, Runtime


async def charge(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


def checkpoint_costs(counts: list[int]) -> None:
    codec = Codec(LedgerMachine)
    state = new_ledger(100)
    print("1. checkpoint with N keys (each with a one-action outcome), best of 3")
    print(f"{'keys':>9} {'bytes':>12} {'bytes/key':>10} {'encode ms':>10} {'decode ms':>10} "
          f"{'first encode ms':>16}")
    for n in counts:
        keys = {f"pay-{i:08d}": Remembered(i + 1, 1.7e9 + i / 400,
                                           (Tracked(i, Charge(i % 100, 5)),))
                for i in range(n)}
        start = time.perf_counter()
        data = codec.encode_checkpoint(n, state, keys)  # encodes every outcome once
        first = (time.perf_counter() - start) * 1000
        encode = decode = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            data = codec.encode_checkpoint(n, state, keys)
            encode = min(encode, (time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            codec.decode_checkpoint(data, n)
            decode = min(decode, (time.perf_counter() - start) * 1000)
        empty = len(codec.encode_checkpoint(n, state, {}))
        print(f"{n:>9,} {len(data):>12,} {(len(data) - empty) / max(n, 1):>10.1f} "
              f"{encode:>10.1f} {decode:>10.1f} {first:>16.1f}")


async def throughput(root: Path, submits: int, submitters: int) -> None:
    print(f"\n2. {submits:,} submits by {submitters} submitters, SQLiteStore, Journal, durable "
          "(tracked charges; alternating runs, best of 2 each)")
    print(f"{'':>10} {'submits/s':>10} {'ratio':>6}")
    rates: dict[str, float] = {}
    for run, label in enumerate(("unkeyed", "keyed") * 2):
        path = root / f"{label}-{run}.sqlite"
        rt = Runtime(LedgerMachine(), initial_state=lambda: new_ledger(100),
                     store=SQLiteStore(path), durability=Journal(),
                     executors={Charge: charge})
        async with rt:
            per = submits // submitters

            async def one(worker: int, rt: Any = rt, per: int = per, label: str = label) -> None:
                for n in range(per):
                    key = f"{label}-{worker}-{n}" if label == "keyed" else None
                    await rt.submit(Pay(n % 100, 1, True), idempotency_key=key)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for w in range(submitters):
                    tg.start_soon(one, w)
            rate = per * submitters / (time.perf_counter() - start)
            rates[label] = max(rates.get(label, 0.0), rate)
    for label in ("unkeyed", "keyed"):
        print(f"{label:>10} {rates[label]:>10,.0f} {rates[label] / rates['unkeyed']:>6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--dir", type=Path, default=None, help="where the SQLite files go")
    args = ap.parse_args()
    counts = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    checkpoint_costs(counts)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-idem-"))
    try:
        anyio.run(throughput, root, 2_000 if args.quick else 40_000, 64)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
