"""Thousands of kill -9s: a Runtime under load on FileStore and SQLiteStore, killed at random
moments and restarted; prints what was acknowledged, recovered and restored.

    python bench/bench_kill9.py [--kills 1000] [--kinds sqlite,file]

It uses the harness of tests/persistence/test_kill9.py (which CI runs with 50 kills per backend)
and checks the same things: every acknowledged transition is recovered, no record is torn, and
after the last restart every tracked action completed exactly once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.persistence.test_kill9 import drain, run_kills


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=1000, help="kills per backend")
    ap.add_argument("--kinds", default="sqlite,file",
                    help="comma-separated: sqlite, file, sqlite-snapshot, file-snapshot")
    args = ap.parse_args()
    header = (f"{'store':<16} {'kills':>7} {'acknowledged':>13} {'recovered':>10} "
              f"{'lost':>5} {'restored':>9} {'done once':>10} {'seconds':>8}")
    print(header)
    print("-" * len(header))
    failed = False
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            tally = run_kills(kind, Path(tmp), args.kills, seed=7)
            state = drain(kind, Path(tmp))
            refs = {int(k) for k in state["refs"]}
            done = {int(k): v for k, v in state["done"].items()}
            lost = len(set(tally.acked) - refs)
            once = sum(1 for v in done.values() if v == 1)
            ok = lost == 0 and state["pending"] == {} and once == len(refs)
            failed |= not ok
            print(f"{kind:<16} {tally.kills:>7,} {len(tally.acked):>13,} {len(refs):>10,} "
                  f"{lost:>5} {tally.restored_pending:>9,} {once:>10,} "
                  f"{time.perf_counter() - start:>8.0f}" + ("" if ok else "   FAILED"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
