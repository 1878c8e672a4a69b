"""A restart with a large backlog: N tracked actions pending in the store (a provider was down),
then a restart on SQLite. How long until the runtime answers, how many tasks and how much memory
the re-emitted actions take, and how long until the backlog is settled.

    python bench/bench_restore.py [--quick] [--pending 10000,70000] [--backends asyncio,trio]

For each N a first runtime (whose executor never answers) takes N payments and stops, leaving N
charges in flight. Then, for each backend, a fresh process opens a copy of that store and prints
one table row:

* ``start s``: ``async with Runtime(...)`` entered (load, replay, restore, dispatch);
* ``ready s``: from the start until a first submit (one that emits no action) is answered, that
  is until the event loop serves requests again (``max_pending_actions=None`` here, so that the
  submit measures dispatch, not admission);
* ``tasks``: tasks alive on the event loop at that moment (the runtime's, the executor calls
  running, this script's);
* ``RSS MB``: the process's resident memory growth from before the start to that moment;
* ``settle s``: until every pending charge is settled (an executor that answers at once, 64
  calls at a time).

Before the dispatch queue (fasm/runtime/_dispatch.py) each pending action was a task waiting for
a slot; run this script on an older checkout to compare. Every figure comes from this run, on
this machine's shared cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._ledger import Charge, Charged, LedgerMachine, Pay, new_ledger
from fasm.persistence import SQLiteStore
from fasm.runtime import ActionContext, Executor, Runtime


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tasks() -> int:
    if "trio" in sys.modules:
        import trio

        try:
            root: Any = trio.lowlevel.current_root_task()
        except RuntimeError:
            root = None
        if root is not None:
            def count(task: Any) -> int:
                return 1 + sum(count(child) for nursery in task.child_nurseries
                               for child in nursery.child_tasks)
            return count(root)
    return len(asyncio.all_tasks())


async def never(action: Charge, ctx: ActionContext) -> Charged:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def at_once(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


def runtime(path: Path, executor: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
    return Runtime(LedgerMachine(), initial_state=lambda: new_ledger(100),
                   store=SQLiteStore(path), executors={Charge: executor},
                   max_pending_actions=None, shutdown_grace=0.0, slow_action_after=None)


async def prefill(path: Path, pending: int) -> None:
    """N payments whose charges never complete: 256 submitters, so commits are grouped."""
    async with runtime(path, Executor(never)) as rt:
        async def submitter(k: int) -> None:
            for i in range(k, pending, 256):
                await rt.submit(Pay(i % 100, 1, track=True))

        async with anyio.create_task_group() as tg:
            for k in range(min(256, pending)):
                tg.start_soon(submitter, k)
    assert len(rt.in_flight) == pending


async def restart(path: Path, pending: int) -> dict[str, float]:
    base = rss_mb()
    start = time.perf_counter()
    async with runtime(path, Executor(at_once)) as rt:
        entered = time.perf_counter() - start
        restored = len(rt.in_flight)
        await rt.submit(Pay(0, 1))  # emits no action
        ready = time.perf_counter() - start
        tasks = live_tasks()
        grown = rss_mb() - base
        await rt.wait_idle()
        settled = time.perf_counter() - start
        assert restored == pending and not rt.in_flight
    return {"start": entered, "ready": ready, "tasks": tasks, "rss": grown, "settle": settled}


def child(args: argparse.Namespace) -> None:
    path = Path(args.store)
    if args.prefill:
        anyio.run(prefill, path, args.pending)
        return
    print(json.dumps(anyio.run(restart, path, args.pending, backend=args.backend)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 2,000 and 10,000 only")
    ap.add_argument("--pending", default="10000,70000")
    ap.add_argument("--backends", default="asyncio,trio")
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--prefill", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--n", dest="child_pending", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.store:
        args.pending = args.child_pending
        child(args)
        return
    counts = [2_000, 10_000] if args.quick else [int(n) for n in args.pending.split(",")]
    backends = args.backends.split(",")
    me = [sys.executable, __file__]
    print("restart with N tracked actions pending (SQLite, Journal; executor concurrency 64)")
    print(f"{'N':>7} {'backend':>8} {'start s':>8} {'ready s':>8} {'tasks':>7} {'RSS MB':>8} "
          f"{'settle s':>9}")
    with tempfile.TemporaryDirectory(prefix="fasm-bench-restore-") as tmp:
        for n in counts:
            filled = Path(tmp) / f"filled-{n}"
            filled.mkdir()
            subprocess.run([*me, "--store", str(filled / "db.sqlite"), "--prefill",
                            "--n", str(n)], check=True)
            for backend in backends:
                copy = Path(tmp) / f"run-{n}-{backend}"
                shutil.copytree(filled, copy)
                out = subprocess.run([*me, "--store", str(copy / "db.sqlite"), "--backend",
                                      backend, "--n", str(n)], check=True, capture_output=True,
                                     text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                print(f"{n:>7,} {backend:>8} {row['start']:>8.2f} {row['ready']:>8.2f} "
                      f"{int(row['tasks']):>7,} {row['rss']:>8.1f} {row['settle']:>9.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
