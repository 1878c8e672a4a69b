"""fasm beside the tools users would pick instead (eventsourcing, DBOS Transact) and the disk.

Set up once (a separate venv, so the peers never touch the main venv's dependencies)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -e '.[bench]'

Then, from the repository root::

    .venv-bench/bin/python bench/bench_peers.py            # full run: docs/bench_peers.md + .png
    .venv-bench/bin/python bench/bench_peers.py --quick    # smoke run, under two minutes

The workload is the payments ledger of ``bench/_ledger.py``: a ledger of 1,000 (and 100,000)
accounts, the pending payments and a counter; each input "pay X from account A" validates the
balance, records a pending payment under an id taken from the counter, and emits a tracked charge.
Durable means fsync'd before the caller is answered: every SQLite database here runs with
``synchronous=FULL`` (read back from each system's own connection and printed).

In one process tree, one after another, the same number of times each, on the disk holding
``--dir``, rounds of:

1. the limits: ``os.fsync`` after a small append, and raw ``sqlite3`` single-row commits (WAL,
   ``synchronous=FULL``);
2. fasm: SQLiteStore and FileStore, journal and snapshot, one submitter and 64 concurrent
   submitters, 1,000 and 100,000 accounts; the charge executor returns at once and its result is
   committed as a second transition before the clock stops;
3. eventsourcing (SQLite infrastructure, one aggregate per ledger): its defaults, the aggregate
   cache, the cache without deep copies, and the cache without copies nor fast-forwarding (the
   fastest setting its documentation gives, for a single application instance);
4. DBOS Transact (SQLite system and application databases): a workflow per input running one
   transaction (optionally followed by the charge as a step), as DBOS leaves SQLite and with both
   files preset to WAL; sequential, and 64 threads for the two settings of the 1-transaction
   shape.

Each round runs every case once, each system in a child process of its own (DBOS: one per case,
as it is a process-wide singleton), so rounds interleave and a noisy minute on a shared machine
spreads over all systems instead of landing on one. The report gives min / median / max over the
rounds, every fasm figure as a ratio to the raw limit and to each peer from the same run, and the
issue's targets beside the measured ratios (printed, never asserted). Nothing here is a test of
speed: CI runs ``--quick`` only to check that the script still works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _peers_common as common
from bench._ledger import Charge, Charged, LedgerMachine, Pay, new_ledger
from bench._peers_common import Case, Meter, Result, timed_loop
from fasm.persistence import FileStore, Journal, Snapshot, SQLiteStore, Store
from fasm.runtime import ActionContext, Runtime

ROOT = Path(__file__).resolve().parent.parent
SETUP_HINT = ("the peers are not installed in this python. Create the bench venv:\n"
              "    python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'\n"
              "and run: .venv-bench/bin/python bench/bench_peers.py")

SIZES = (1_000, 100_000)
SUBMITTERS = 64


# -- the cases ------------------------------------------------------------------------------------

def plan() -> list[Case]:
    """Every figure of the report, in the order a round measures them."""
    cases = [
        Case("limit.fsync", "limit", "os.fsync after a 200-byte append",
             "one file, append + flush + os.fsync", 0, unit="fsyncs/s"),
        Case("limit.sqlite", "limit", "raw sqlite3 single-row commit",
             "WAL, synchronous=FULL, BEGIN; INSERT; COMMIT", 0, unit="commits/s"),
    ]
    for accounts in SIZES:
        for store in ("sqlite", "file"):
            for strategy in ("journal", "snapshot"):
                for subs in (1, SUBMITTERS):
                    cases.append(Case(
                        f"fasm.{store}.{strategy}.{accounts}.{subs}", "fasm",
                        common.fasm_label(store, strategy, subs),
                        common.FASM_SETTINGS[(store, strategy)], accounts, subs))
    for accounts in SIZES:
        for setting, text in common.ES_SETTINGS.items():
            cases.append(Case(f"es.{setting}.{accounts}", "eventsourcing",
                              f"eventsourcing, {setting}", text, accounts))
    for accounts in SIZES:
        for shape in ("tx", "tx+step"):
            for setting, text in common.DBOS_SETTINGS.items():
                cases.append(Case(f"dbos.{shape}.{setting}.{accounts}.1", "dbos",
                                  f"DBOS, {common.DBOS_SHAPES[shape]}, {setting}", text,
                                  accounts))
    for setting, text in common.DBOS_SETTINGS.items():
        cases.append(Case(f"dbos.tx.{setting}.1000.{SUBMITTERS}", "dbos",
                          f"DBOS, {common.DBOS_SHAPES['tx']}, {setting}, {SUBMITTERS} threads",
                          text, 1_000, SUBMITTERS))
    return cases


def child_groups(cases: list[Case]) -> list[list[Case]]:
    """How a round splits into child processes: one per system, one per case for DBOS."""
    groups: list[list[Case]] = []
    for system in ("limit", "fasm", "eventsourcing"):
        groups.append([c for c in cases if c.system == system])
    groups.extend([c] for c in cases if c.system == "dbos")
    return [g for g in groups if g]


# -- the limits -----------------------------------------------------------------------------------

def fsync_limit(case: Case, duration: float, where: Path) -> Result:
    payload = b"x" * 200
    with (where / "appends").open("ab") as f:
        def one(_: int) -> None:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

        one(0)
        return timed_loop(duration, one).result(case.id)


def sqlite_limit(case: Case, duration: float, where: Path) -> Result:
    conn = sqlite3.connect(where / "raw.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        payload = b"x" * 200

        def one(_: int) -> None:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t (v) VALUES (?)", (payload,))
            conn.execute("COMMIT")

        one(0)
        timed = timed_loop(duration, one)
        checked = {"journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                   "synchronous": _SYNC[conn.execute("PRAGMA synchronous").fetchone()[0]]}
    finally:
        conn.close()
    return timed.result(case.id, checked)


_SYNC = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


# -- fasm -----------------------------------------------------------------------------------------

async def charge(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)  # the provider answers at once: the benchmark measures fasm, not it


async def fasm_run(case: Case, duration: float, where: Path) -> Result:
    """Payments with tracked charges through a Runtime on a real store.

    The clock stops when the last submit has returned and every charge it emitted has completed
    and been committed (``wait_idle``), so each payment costs its own transition and its charge
    result's; only the payments are counted.
    """
    _, store_kind, strategy, _, _ = case.id.split(".")
    store: Store
    if store_kind == "sqlite":
        store = SQLiteStore(where / "ledger.db")
    else:
        store = FileStore(where / "files")
    commits, waited = 0, 0.0
    commit = store.commit

    async def counting_commit(*args: Any, **kwargs: Any) -> Any:
        # Diagnostics for the report: how many store writes, and how long the driver waited on
        # them (the rest of its time is CPU: stf, codec, engine, executors, the event loop).
        nonlocal commits, waited
        commits += 1
        began = time.perf_counter()
        try:
            return await commit(*args, **kwargs)
        finally:
            waited += time.perf_counter() - began

    store.commit = counting_commit  # type: ignore[method-assign]  # diagnostics only
    accounts, submitters = case.accounts, case.submitters
    durability = Journal() if strategy == "journal" else Snapshot()
    rt = Runtime(LedgerMachine(), initial_state=lambda: new_ledger(accounts), store=store,
                 durability=durability, executors={Charge: charge}, queue_size=4096)
    async with rt:
        await rt.submit(Pay(0, 1, True))  # untimed: writes the initial checkpoint
        await rt.wait_idle()
        commits, waited, seq0 = 0, 0.0, rt.seq
        meter = Meter()
        deadline = meter.start + duration
        counts = [0] * submitters

        async def submitter(k: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                await rt.submit(Pay((k * 7919 + i) % accounts, 1, True))
                i += 1
            counts[k] = i

        if submitters == 1:
            await submitter(0)
        else:
            async with anyio.create_task_group() as tg:
                for k in range(submitters):
                    tg.start_soon(submitter, k)
        await rt.wait_idle()
        timed = meter.stop(sum(counts))
        transitions = rt.seq - seq0
        used, in_commit = commits, waited
    checked: dict[str, str] = {}
    if store_kind == "sqlite":
        conn = sqlite3.connect(where / "ledger.db")
        try:
            checked["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            conn.close()
        checked["synchronous"] = str(getattr(store, "_synchronous", "?"))
    return timed.result(case.id, checked, {"commits": used, "transitions": transitions,
                                           "commit_seconds": in_commit})


# -- one child process: some cases, once each -----------------------------------------------------

def run_child(ids: list[str], duration: float, base: Path) -> None:
    """Measure the given cases once each and print one ``RESULT {json}`` line per case."""
    by_id = {c.id: c for c in plan()}
    for case_id in ids:
        case = by_id[case_id]
        where = Path(tempfile.mkdtemp(dir=base, prefix=case_id.replace("+", "_") + "-"))
        try:
            result = measure(case, duration, where)
        finally:
            shutil.rmtree(where, ignore_errors=True)
        print("RESULT " + json.dumps(result.to_json()), flush=True)


def measure(case: Case, duration: float, where: Path) -> Result:
    if case.id == "limit.fsync":
        return fsync_limit(case, duration, where)
    if case.id == "limit.sqlite":
        return sqlite_limit(case, duration, where)
    if case.system == "fasm":
        return anyio.run(fasm_run, case, duration, where)
    if case.system == "eventsourcing":
        from bench import _peers_es

        setting = case.id.split(".")[1]
        return _peers_es.run(case.id, setting, case.accounts, duration, where)
    from bench import _peers_dbos

    _, shape, setting, _, _ = case.id.split(".")
    return _peers_dbos.run(case.id, shape, setting, case.accounts, case.submitters, duration,
                           where)


# -- the parent: rounds of children, then the report ----------------------------------------------

def peers_missing() -> str | None:
    """None when eventsourcing, dbos and matplotlib import; otherwise what is missing."""
    missing = []
    for name in ("eventsourcing", "dbos", "matplotlib"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return ", ".join(missing) or None


def run_rounds(cases: list[Case], runs: int, duration: float, base: Path) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {c.id: [] for c in cases}
    groups = child_groups(cases)
    for r in range(runs):
        for group in groups:
            ids = [c.id for c in group]
            what = group[0].system if len(group) > 1 else group[0].id
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(ids),
                   "--duration", str(duration), "--dir", str(base)]
            began = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, check=False)
            print(f"round {r + 1}/{runs}: {what} ({time.perf_counter() - began:.1f} s)",
                  flush=True)
            for line in proc.stdout.splitlines():
                if line.startswith("RESULT "):
                    data = json.loads(line[len("RESULT "):])
                    results[data["case"]].append(Result(**data))
            if proc.returncode != 0:
                raise SystemExit(f"child for {what} failed with exit code {proc.returncode}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one short round (CI smoke test: checks it works, not how fast)")
    ap.add_argument("--runs", type=int, help="rounds (default 5; 1 with --quick)")
    ap.add_argument("--duration", type=float,
                    help="seconds of timed load per case and round (default 2; 0.25 with --quick)")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-data",
                    help="where the databases go (the disk measured); default ./bench-data")
    ap.add_argument("--out", type=Path,
                    help="the Markdown report (default docs/bench_peers.md; with --quick, "
                         "bench_peers_quick.md under --dir); the chart goes beside it as .png, "
                         "the raw results under --dir as bench_peers-<time>.json")
    ap.add_argument("--report-from", type=Path, metavar="JSON",
                    help="write the report and chart again from a saved run's results; runs "
                         "nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 5)
    duration = args.duration or (0.25 if args.quick else 2.0)
    if args.child:
        run_child(args.child.split(","), duration, args.dir)
        return
    missing = peers_missing()
    if missing:
        raise SystemExit(f"bench_peers: {missing} missing: {SETUP_HINT}")
    from bench import _peers_report as report

    out = args.out or (args.dir / "bench_peers_quick.md" if args.quick
                       else ROOT / "docs" / "bench_peers.md")
    cases = plan()
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        context = saved["context"]
        results = {cid: [Result(**r) for r in runs_] for cid, runs_ in saved["results"].items()}
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(dir=args.dir, prefix="peers-"))
        context = report.context(base, runs, duration, args.quick)
        began = time.perf_counter()
        try:
            results = run_rounds(cases, runs, duration, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        context["elapsed"] = time.perf_counter() - began
        context["load_after"] = os.getloadavg()
        saved_to = args.dir / f"bench_peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
        saved_to.write_text(json.dumps({"context": context, "results": {
            cid: [r.to_json() for r in rs] for cid, rs in results.items()}}, indent=1))
        print(f"results saved to {saved_to}")
    text = report.markdown(cases, results, context, chart=out.with_suffix(".png").name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    report.chart(cases, results, context, out.with_suffix(".png"))
    print()
    print(text)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
