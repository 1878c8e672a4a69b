"""What the replay check and kept history cost: replay speed, and recovery with history kept.

    python bench/bench_replay.py [--quick]

For N committed deposits on one key (SQLite, synchronous=OFF so that writing the data is quick;
the figures read it back), with ``Journal(checkpoint_every=N // 10)``:

* replay: seconds for :func:`fasm.runtime.replay` over the whole kept history (from seq 0, the
  state compared at the last checkpoint), and inputs per second;
* recovery: seconds for a Runtime to start on the key, with the history kept and without
  (recovery reads only the checkpoint and the journal after it in both cases);
* rows: journal rows the store holds;
* bounded: the same with ``keep_history=N // 5`` (a bounded history): rows kept and replay
  seconds (from the history base).

Best of 3 per figure. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fasm.persistence import Journal, SQLiteStore
from fasm.runtime import Runtime, replay
from tests._ledger import Charge, Deposit, Ledger, LedgerMachine, Note
from tests.runtime.conftest import ok_charge, quiet


def initial() -> Ledger:
    return Ledger(balances={"a": 0})


async def write(path: Path, n: int, keep: bool | int) -> None:
    durability = Journal(checkpoint_every=max(1, n // 10), keep_history=keep)
    store = SQLiteStore(path, synchronous="OFF")
    async with Runtime(LedgerMachine(), initial_state=initial, store=store,
                       durability=durability, executors={Charge: ok_charge},
                       handlers={Note: quiet}) as rt:
        for i in range(n):
            await rt.submit(Deposit(f"acct{i % 100}", 1))


async def time_replay(path: Path) -> tuple[float, int]:
    store = SQLiteStore(path)
    await store.open()
    try:
        start = time.perf_counter()
        report = await replay(LedgerMachine(), store, initial_state=initial)
        elapsed = time.perf_counter() - start
        assert report.ok, report
        rows = len(await store.history("default"))
        return elapsed, rows
    finally:
        await store.close()


async def time_recovery(path: Path) -> float:
    start = time.perf_counter()
    async with Runtime(LedgerMachine(), initial_state=initial, store=SQLiteStore(path),
                       executors={Charge: ok_charge}, handlers={Note: quiet}):
        pass
    return time.perf_counter() - start


async def main(sizes: list[int]) -> None:
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            kept = Path(tmp) / f"kept-{n}.db"
            plain = Path(tmp) / f"plain-{n}.db"
            await write(kept, n, True)
            await write(plain, n, False)
            bounded = Path(tmp) / f"bounded-{n}.db"
            await write(bounded, n, n // 5)
            replay_s, held = min([await time_replay(kept) for _ in range(3)])
            bounded_s, bounded_rows = min([await time_replay(bounded) for _ in range(3)])
            rec_kept = min([await time_recovery(kept) for _ in range(3)])
            rec_plain = min([await time_recovery(plain) for _ in range(3)])
            rows.append([n, held, f"{replay_s:.3f}", f"{n / replay_s:,.0f}", f"{rec_kept:.3f}",
                         f"{rec_plain:.3f}", bounded_rows, f"{bounded_s:.3f}"])
    head = ["inputs", "rows kept", "replay s", "replayed/s", "start (kept) s", "start (plain) s",
            "rows (bounded)", "replay (bounded) s"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    anyio.run(main, [1_000] if args.quick else [1_000, 10_000])
