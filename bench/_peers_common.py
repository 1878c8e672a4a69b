"""What every part of ``bench_peers.py`` shares: the cases, their results, and the timing rule.

A *case* is one figure of the report (a system, its settings, a state size and a number of
submitters). A child process measures some cases once and prints one :class:`Result` per case
as a JSON line; the parent gathers the runs of each case and reports min / median / max.

The timing rule is the same for every system: after an untimed first input (which opens the
database, writes the initial state and warms caches), inputs are submitted for ``duration``
seconds; the clock stops once the last of them is durable (for fasm: once its tracked charge has
also completed and been committed). The rate is inputs answered / seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

INITIAL_BALANCE = 10**12  # as bench/_ledger.py: no payment is ever refused for lack of funds

FASM_SETTINGS = {
    ("sqlite", "journal"): "SQLiteStore: WAL, synchronous=FULL (its default); Journal() "
                           "(the default strategy): appends the inputs, checkpoints by growth",
    ("sqlite", "snapshot"): "SQLiteStore: WAL, synchronous=FULL; Snapshot(): whole state per "
                            "commit",
    ("file", "journal"): "FileStore: append + fsync per commit; checkpoints written, fsync'd, "
                         "renamed, directory fsync'd; Journal()",
    ("file", "snapshot"): "FileStore: whole state per commit (write, fsync, rename, fsync "
                          "directory); Snapshot()",
}
ES_SETTINGS = {
    "default": "defaults: no aggregate cache, each command replays the ledger's events",
    "cache": "AGGREGATE_CACHE_MAXSIZE=100 (deep copy of the cached ledger per command)",
    "cache-nocopy": "cache + DEEPCOPY_FROM_AGGREGATE_CACHE=n",
    "fastest": "cache + DEEPCOPY_FROM_AGGREGATE_CACHE=n + AGGREGATE_CACHE_FASTFORWARD=n "
               "(the docs' fastest, for a single application instance)",
}
DBOS_SETTINGS = {
    "default": "SQLite as DBOS opens it (rollback journal)",
    "wal": "system and ledger databases preset to journal_mode=WAL",
}
DBOS_SHAPES = {
    "tx": "1 transaction",
    "tx+step": "1 transaction + charge step",
}


def fasm_label(store: str, strategy: str, submitters: int) -> str:
    who = "sequential" if submitters == 1 else f"{submitters} submitters"
    return f"fasm, {'SQLite' if store == 'sqlite' else 'File'}, {strategy}, {who}"


@dataclass(frozen=True)
class Case:
    """One figure: which system, how it is set up, and the load it gets.

    Attributes:
        id: a stable key (used to match runs and to look figures up for ratios and targets).
        system: ``"limit"``, ``"fasm"``, ``"eventsourcing"`` or ``"dbos"``.
        label: what the figure is, in a few words.
        settings: the durability-relevant settings, as reported in the tables.
        accounts: state size (accounts in the ledger); 0 for the limits.
        submitters: concurrent submitters (1: each input durable before the next is sent).
        unit: what the rate counts.
    """

    id: str
    system: str
    label: str
    settings: str
    accounts: int
    submitters: int = 1
    unit: str = "payments/s"


@dataclass
class Result:
    """One run of one case, as a child process reports it.

    Attributes:
        case: the case id.
        rate: inputs per second (unit as the case says).
        count: inputs answered in the timed phase.
        seconds: length of the timed phase.
        checked: settings read back from the system's own connection after the run (e.g. the
            ``PRAGMA synchronous`` SQLite reports), to show what was really in force.
        extra: diagnostics (e.g. fasm's store commits in the timed phase).
    """

    case: str
    rate: float
    count: int
    seconds: float
    checked: dict[str, str] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def written() -> int:
    """Bytes this process has handed to write calls so far (Linux ``/proc/self/io`` ``wchar``;
    0 elsewhere). SQLite's WAL and journal writes and fasm's file writes all count."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Meter:
    """Wall time, CPU time (the whole process, all threads) and bytes written over a phase."""

    def __init__(self) -> None:
        self.cpu = time.process_time()
        self.bytes = written()
        self.start = time.perf_counter()

    def stop(self, count: int) -> Timed:
        return Timed(count, time.perf_counter() - self.start, time.process_time() - self.cpu,
                     written() - self.bytes)


class Timed(NamedTuple):
    """What a timed phase did: inputs answered, wall seconds, CPU seconds of the whole process,
    and bytes written."""

    count: int
    seconds: float
    cpu: float
    written: int

    def result(self, case: str, checked: dict[str, str] | None = None,
               extra: dict[str, float] | None = None) -> Result:
        return Result(case, self.count / self.seconds, self.count, self.seconds, checked or {},
                      {"cpu_seconds": self.cpu, "bytes_written": self.written, **(extra or {})})


def timed_loop(duration: float, one: Callable[[int], None]) -> Timed:
    """Call ``one(i)`` for i = 0, 1, ... until ``duration`` seconds have passed."""
    meter = Meter()
    deadline = meter.start + duration
    i = 0
    while time.perf_counter() < deadline:
        one(i)
        i += 1
    return meter.stop(i)
