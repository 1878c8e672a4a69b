"""What a simulation hands back: per-seed results, the report over many seeds, and a failure
written as a reproduction (seed, step, check, faults, the inputs that led there, the replay
line)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._inputs import Normal
from ..errors import FasmError
from ._checks import short

__all__ = ("Effects", "Failure", "Progress", "SeedResult", "SimReport", "SimulationFailed",
           "format_trace")

_COUNT_ORDER = (
    "steps", "inputs", "transitions", "commits", "rejections", "errors", "duplicate submits",
    "resent", "crashes", "store failures", "starts", "reloads", "dispatched", "retries",
    "untracked",
)
_CRASH_PREFIX = "crash:"
_RESULT_PREFIX = "results:"


def format_trace(entries: Iterable[tuple[int, float, str, Any, Any]]) -> list[str]:
    """Trace entries as lines: ``step  time  event``. Pure formatting of recorded values, so
    the same run gives the same text, byte for byte."""
    return [f"{step:>6} {t:>10.3f}  {_event(kind, a, b)}" for step, t, kind, a, b in entries]


def _event(kind: str, a: Any, b: Any) -> str:
    if kind == "input":
        if isinstance(a, Normal):
            text = f"submit #{b.n} {short(a.value, 120)}"
            if b.key is not None:
                text += f" key={b.key!r}"
        else:
            text = f"result {a.id!r}: {short(a.result, 120)}"
        text += f" ({b.tag})" if b.tag else ""
        return f"[{b.target}] {text}" if b.target else text
    if kind == "accepted":
        return f"  -> seq {a}" + (f": {short(list(b), 160)}" if b else "")
    if kind == "failed":
        return f"  -> refused: {short(a, 140)}"
    if kind == "duplicate":
        return f"  -> duplicate of seq {a} (idempotency key)"
    if kind == "commit":
        text = f"commit seq {a[0]} -> {a[1]}" + (" (checkpoint)" if b else "")
        return f"[{a[2]}] {text}" if a[2] else text
    if kind == "crash":
        return f"CRASH ({a})"
    if kind == "start":
        restored = ", ".join(f"{t.id!r}: {short(t.action, 60)}" for t in b)
        if len(restored) > 140:
            restored = restored[:137] + "..."
        seq, key = a
        text = f"start at seq {seq}; restore re-emitted [{restored}]"
        return f"[{key}] {text}" if key else text
    if kind == "retry":
        attempt, outcome, delay = b
        return f"action {a!r} attempt {attempt}: {outcome}; retry in {delay:.3f}s"
    if kind == "raised":
        return f"action {a!r}: the simulated executor raised {short(b, 120)}"
    if kind == "exhausted":
        return f"action {a!r}: attempts exhausted; on_exhausted -> {short(b, 100)}"
    if kind == "drain":
        return f"liveness phase: faults off, no new inputs, {a} tracked action(s) pending"
    return f"{kind} {a!r} {b!r}"


def format_counts(counts: Mapping[str, int]) -> list[str]:
    """Counts as a few readable lines."""
    main = [f"{name} {counts[name]}" for name in _COUNT_ORDER if counts.get(name)]
    main += [f"{k} {v}" for k, v in sorted(counts.items())
             if k not in _COUNT_ORDER and ":" not in k and k != "seeds"]
    crashes = [f"{k[len(_CRASH_PREFIX):]} {v}" for k, v in sorted(counts.items())
               if k.startswith(_CRASH_PREFIX)]
    results = [f"{k[len(_RESULT_PREFIX):]} {v}" for k, v in sorted(counts.items())
               if k.startswith(_RESULT_PREFIX)]
    lines = ["  ".join(main)]
    if crashes:
        lines.append("crashes at: " + ", ".join(crashes))
    if results:
        lines.append("executor outcomes: " + ", ".join(results))
    return lines


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed check, written as a reproduction.

    Attributes:
        seed: the seed of the run (None for a hypothesis-driven run).
        step: the transition count when the check failed.
        time: the simulated clock then.
        check: which check failed (``invariant``, ``atomicity``, ``determinism``, ``restore``,
            ``absorbed``, ``duplicates``, ``liveness``, ``idempotency``, ``errors``,
            ``encodable``, ``ids``, ``effects``, ``input``, ``executor``).
        message: why.
        faults: the faults injected up to then, as ``(step, time, what)``.
        trace: the last events before the failure, formatted.
        replay: the one line that replays exactly this run.
        counts: what had happened by then.
    """

    seed: int | None
    step: int
    time: float
    check: str
    message: str
    faults: tuple[tuple[int, float, str], ...]
    trace: tuple[str, ...]
    replay: str
    counts: Mapping[str, int] = field(default_factory=dict)

    def with_replay(self, replay: str) -> Failure:
        """The same failure with another replay line (the pytest plugin gives a command)."""
        return Failure(self.seed, self.step, self.time, self.check, self.message, self.faults,
                       self.trace, replay, self.counts)

    def __str__(self) -> str:
        where = f"seed {self.seed}, " if self.seed is not None else ""
        lines = [f"check '{self.check}' failed at {where}step {self.step} (t={self.time:.3f}s)"]
        lines += ["  " + line for line in self.message.splitlines()]
        lines.append(f"replay: {self.replay}")
        if self.faults:
            lines.append(f"faults injected ({len(self.faults)}):")
            shown = self.faults[-12:]
            if len(self.faults) > len(shown):
                lines.append(f"  ... {len(self.faults) - len(shown)} earlier")
            lines += [f"  step {s:>5} t={t:>9.3f}  {what}" for s, t, what in shown]
        else:
            lines.append("faults injected: none")
        lines.append(f"last {len(self.trace)} events (step, time, event):")
        lines += ["  " + line for line in self.trace]
        if self.counts:
            lines.append("counts: " + "\n        ".join(format_counts(self.counts)))
        return "\n".join(lines)


class SimulationFailed(FasmError, AssertionError):
    """A simulation found a bug. ``failure`` is the reproduction; ``str()`` is the full report.

    An ``AssertionError`` too, so test runners show it as a failed test, not an error.
    """

    def __init__(self, failure: Failure, header: str = "") -> None:
        text = str(failure)
        super().__init__(f"{header}\n{text}" if header else text)
        self.failure = failure


@dataclass(frozen=True, slots=True)
class SeedResult:
    """One seed's run.

    Attributes:
        seed: the seed.
        steps: transitions run (``Engine.step`` calls, the liveness phase included).
        counts: what happened.
        elapsed: real seconds it took.
        failure: the failed check, or None.
        trace: the run's events, formatted (the last ``trace_limit`` of them).
        state: the machine's state when the run ended, for domain counts and assertions of
            your own; read it, do not keep simulating with it. With the liveness check on, the
            state after the liveness phase, which runs until every tracked action has completed
            (those emitted during the phase too, within a bound: a timer re-armed for ever never
            settles), so a correct machine holds no pending work; with it off, the state where
            the main phase stopped; after a failure, the state at the failure.
    """

    seed: int | None
    steps: int
    counts: Mapping[str, int]
    elapsed: float
    failure: Failure | None
    trace: tuple[str, ...]
    state: Any = None

    @property
    def ok(self) -> bool:
        """True when every check held."""
        return self.failure is None

    @property
    def trace_text(self) -> str:
        """The trace as one string (what the determinism test compares byte for byte)."""
        return "\n".join(self.trace) + "\n"


@dataclass(frozen=True, slots=True)
class Effects:
    """The untracked actions of a run so far, given to the ``effects`` checks of a
    :class:`~fasm.testing.Simulation`.

    An untracked action is fire-and-forget: its handler runs after the commit, and a crash
    between the commit and the handler loses it (the simulation crashes there at the
    ``after-commit`` point). Nothing in the state says it was lost, so no invariant over state
    can see it; an effects check can, e.g. "no refund is lost"::

        def no_lost_refunds(fx: Effects) -> object:
            return not [a for _, a in fx.lost if isinstance(a, Refund)] or "a refund was lost"

    Attributes:
        emitted: ``(seq, action)`` of every untracked action of a committed transition.
        handled: those whose handler ran (released after their commit).
        lost: those a crash between the commit and the handler lost.
        state: the machine's state now (read it, do not change it).
    """

    emitted: tuple[tuple[int, Any], ...]
    handled: tuple[tuple[int, Any], ...]
    lost: tuple[tuple[int, Any], ...]
    state: Any


@dataclass(frozen=True, slots=True)
class Progress:
    """A long run's progress, given to a ``progress`` callback every few seconds."""

    seeds_done: int
    seeds_total: int | None
    steps: int
    elapsed: float
    budget: float | None
    failures: int

    def __str__(self) -> str:
        total = f"/{self.seeds_total}" if self.seeds_total is not None else ""
        budget = f" of {self.budget:.0f}s" if self.budget is not None else ""
        rate = self.steps / self.elapsed if self.elapsed > 0 else 0.0
        return (f"fasm: {self.seeds_done}{total} seeds, {self.steps} steps, {rate:,.0f} "
                f"steps/s, {self.elapsed:.1f}s{budget}, {self.failures} failure(s)")


@dataclass(frozen=True, slots=True)
class SimReport:
    """The outcome of a run over many seeds.

    Attributes:
        name: what was simulated (the machine's class name unless given).
        seeds: the seeds run, in order.
        steps_per_seed: the main-phase steps of each seed.
        counts: totals over all seeds (``seeds`` included).
        elapsed: real seconds.
        failures: the failed seeds' reproductions (one, unless ``stop_on_failure=False``).
        checks: which checks ran, as text.
        stopped: why the run ended (``seeds``, ``budget``, ``failure``).
    """

    name: str
    seeds: tuple[int, ...]
    steps_per_seed: int
    counts: Mapping[str, int]
    elapsed: float
    failures: tuple[Failure, ...]
    checks: str
    stopped: str

    @property
    def ok(self) -> bool:
        """True when no seed failed."""
        return not self.failures

    @property
    def steps_per_second(self) -> float:
        """Simulated transitions per real second."""
        return self.counts.get("steps", 0) / self.elapsed if self.elapsed > 0 else 0.0

    def raise_for_failure(self) -> None:
        """Raise the first failure.

        Raises:
            SimulationFailed: some seed failed.
        """
        if self.failures:
            raise SimulationFailed(self.failures[0], self.summary())

    def summary(self) -> str:
        """One line: what ran, how fast, and the verdict."""
        verdict = "OK" if self.ok else f"FAILED ({len(self.failures)} seed(s))"
        return (f"fasm simulation of {self.name}: {len(self.seeds)} seed(s) x "
                f"{self.steps_per_seed} steps, {self.elapsed:.2f}s "
                f"({self.steps_per_second:,.0f} steps/s), checks: {self.checks}: {verdict}")

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += ["  " + line for line in format_counts(self.counts)]
        for failure in self.failures:
            lines.append("")
            lines.append(str(failure))
        return "\n".join(lines)
