"""Simulation: the one object a user builds to simulation-test a machine.

Give it the machine, its initial state, an input source, simulated executors, invariants and a
fault plan; then ``run`` many seeds for a number of steps or a time budget, ``replay`` one seed
exactly, or ``shrink`` a failure with hypothesis. See docs/04_testing.md.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from .._machine import StateMachine
from .._send import declares_send
from ..errors import DefinitionError
from ..persistence._durability import Durability, Journal
from ..runtime._engine import Rollback
from ._checks import Violation
from ._sim_config import Checks, ExecutorSpec, FaultPlan, executor_table
from ._sim_report import Effects, Failure, Progress, SeedResult, SimReport, format_trace
from ._sim_setup import Setup
from ._sim_world import Run

if TYPE_CHECKING:
    import hypothesis
    from hypothesis.strategies import SearchStrategy

__all__ = ("InputSource", "Simulation", "simulate")

S = TypeVar("S")
I = TypeVar("I")

InputSource: TypeAlias = Callable[[random.Random, S], "I | None"]
"""``fn(rng, state) -> input`` (or None for "nothing this time"): the next input, chosen with
``rng`` (and only ``rng``) from the current state, which it must not change."""

_FAILURE_TRACE = 30  # events shown before a failure in multi-seed runs
# The production journal, but checkpointing from 1 KiB of journal on (not 64 KiB), so that a run
# of a few hundred steps recovers through checkpoints and journal replays both.
_DURABILITY = Journal(min_checkpoint_bytes=1024)
_PROGRESS_EVERY = 2.0  # seconds between progress reports


class Simulation(Generic[S, I]):
    """A deterministic simulation of a machine under the real engine, with crashes and faults.

    Args:
        machine: the machine instance (the same object the Runtime would host).
        initial_state: the state of a machine the store has never seen, or a factory of it.
        inputs: the input source: ``fn(rng, state) -> value or None``, or a hypothesis strategy
            of input values.
        executors: tracked-action class -> a function of the action (or of the action and the
            RNG), a :class:`Weighted` distribution of results, or a :class:`SimExecutor` (with a
            retry policy). ``Timer`` needs none: it fires from the simulated clock.
        invariants: functions of state that raise, or return False or a message, when the state
            is wrong.
        effects: functions of the run's untracked actions (an :class:`Effects`: emitted,
            handled, and lost by a crash between commit and handler) that judge them the way
            invariants judge state; run after every restart and at the end of the run. Use them
            for fire-and-forget work that must not be lost (a refund sent as an untracked
            action, say).
        faults: what goes wrong (default :class:`FaultPlan()`: crashes at every boundary, store
            failures, executor failures and timeouts).
        checks: which checks run (default: all of them).
        durability: how commits are written (default: the production journal, checkpointed
            from 1 KiB of journal on, so short runs recover through checkpoints and journal
            replays both).
        rollback: the engine's rollback policy (default ``"trust"``). The atomicity check runs
            under every policy, and a machine that passes it behaves the same under all of them;
            ``"trust"`` skips the store reload and replay that ``"reload"`` pays after every
            refused input (the Runtime's default, ``"trust-rejected"``, after every error that
            is not a ``Rejected``). Pass your production policy to run its exact code path.
        steps: transitions per seed when ``run`` is not told otherwise.
        key: the machine key in the simulated store.
        idempotency_window: as the Runtime's.
        name: the name reports use (default: the machine's class name).

    Raises:
        DefinitionError: the machine is still generic, an executor is missing or given for a
            type the machine does not declare, or an option is out of range.
    """

    _run_type: type[Run] = Run

    def __init__(
        self,
        machine: StateMachine[S, I, Any, Any, Any, Any],
        *,
        initial_state: S | Callable[[], S],
        inputs: InputSource[S, I] | SearchStrategy[I],
        executors: Mapping[type[Any], ExecutorSpec] | None = None,
        invariants: Sequence[Callable[[S], object]] = (),
        effects: Sequence[Callable[[Effects], object]] = (),
        faults: FaultPlan | None = None,
        checks: Checks | None = None,
        durability: Durability | None = None,
        rollback: Rollback = "trust",
        steps: int = 200,
        key: str = "sim",
        idempotency_window: int = 1000,
        name: str | None = None,
    ) -> None:
        types = type(machine).machine_types()
        if steps < 1:
            raise DefinitionError(f"steps must be >= 1, got {steps}")
        if declares_send(types.tracked_action) and self._run_type is Run:
            raise DefinitionError(f"{type(machine).__qualname__} sends messages between keys "
                                  "(Send): simulate it with KeyedSimulation")
        self.machine = machine
        self.name = name or type(machine).__qualname__
        self.inputs = inputs
        self.steps = steps
        self.faults = faults if faults is not None else FaultPlan()
        self.checks = checks if checks is not None else Checks()
        init = initial_state

        def initial(key: str) -> Any:
            return init() if callable(init) else copy.deepcopy(init)

        self._setup = Setup(
            machine=machine,
            initial=initial,
            executors=executor_table(type(machine).__qualname__, types.tracked_action,
                                     dict(executors or {})),
            invariants=tuple(invariants),
            effects=tuple(effects),
            plan=self.faults,
            checks=self.checks,
            durability=durability if durability is not None else _DURABILITY,
            rollback=rollback,
            key=key,
            idempotency_window=idempotency_window,
        )
        self._strategy = _is_strategy(inputs)
        self._setups: dict[Checks, Setup] = {}

    # -- one seed ---------------------------------------------------------------------------------

    def run_seed(self, seed: int, *, steps: int | None = None,
                 trace_limit: int | None = 400) -> SeedResult:
        """Run one seed and keep its trace (the last ``trace_limit`` events; None: all).

        The same seed, machine and code give the same run, and the same trace byte for byte.

        Raises:
            SuspendedError: the stf or restore awaited real I/O (the simulator cannot drive it).
            Exception: whatever the input source, an executor function or ``initial_state``
                raised, with a note naming the seed and step.
        """
        return self._run_seed(seed, steps or self.steps, trace_limit, keep_trace=True)

    def replay(self, seed: int, *, steps: int | None = None) -> SeedResult:
        """Run ``seed`` again exactly, keeping the whole trace: what a failure's replay line
        calls. Print ``result.failure`` or ``result.trace_text`` to read it.

        Raises:
            Exception: as :meth:`run_seed`.
        """
        return self._run_seed(seed, steps or self.steps, None, keep_trace=True)

    def _setup_for(self, checks: Checks | None) -> Setup:
        """The setup, or a copy with other checks (made once per set of checks)."""
        if checks is None or checks == self.checks:
            return self._setup
        found = self._setups.get(checks)
        if found is None:
            found = self._setups[checks] = dataclasses.replace(self._setup, checks=checks)
        return found

    def _rngs(self, seed: int) -> tuple[random.Random, random.Random, random.Random]:
        # Separate streams, so that changing the input source does not move the fault schedule.
        # String seeds go through SHA-512: the same in every process, whatever PYTHONHASHSEED.
        return (random.Random(f"fasm/{seed}/inputs"), random.Random(f"fasm/{seed}/faults"),
                random.Random(f"fasm/{seed}/executors"))

    def _draw(self, rng: random.Random) -> Callable[[Any], Any]:
        if self._strategy:
            from ._hypothesis import strategy_sampler

            return strategy_sampler(self.inputs, rng)
        source: Callable[[random.Random, Any], Any] = self.inputs  # type: ignore[assignment]
        return lambda state: source(rng, state)

    def _run_seed(self, seed: int, steps: int, trace_limit: int | None, *,
                  keep_trace: bool) -> SeedResult:
        rngs = self._rngs(seed)
        return self.execute(rngs, self._draw(rngs[0]), steps, seed=seed,
                            trace_limit=trace_limit, keep_trace=keep_trace)

    def execute(
        self,
        rngs: tuple[random.Random, random.Random, random.Random],
        draw_input: Callable[[Any], Any],
        steps: int,
        *,
        seed: int | None,
        trace_limit: int | None,
        keep_trace: bool,
        skip: float = 0.0,
        max_arrivals: int | None = None,
        replay: str | None = None,
        dropped: frozenset[int] = frozenset(),
        checks: Checks | None = None,
    ) -> SeedResult:
        """Run one simulation with the given random streams and input drawer (the seeded and the
        hypothesis drivers both come here). Most users want :meth:`run` or :meth:`run_seed`.
        ``checks``, when given, replaces the simulation's checks for this run.

        Raises:
            Exception: as :meth:`run_seed`.
        """
        run = self._run_type(self._setup_for(checks), rngs, draw_input, steps,
                             trace_limit=trace_limit, skip=skip, max_arrivals=max_arrivals,
                             dropped=dropped)
        started = time.perf_counter()
        failure = None
        try:
            run.run()
        except Violation as v:
            shown = list(run.trace) if trace_limit is None else list(run.trace)[-_FAILURE_TRACE:]
            failure = Failure(
                seed=seed, step=run.step, time=run.now, check=v.check, message=v.message,
                faults=tuple(run.faults), trace=tuple(format_trace(shown)),
                replay=replay or f"sim.replay({seed}, steps={steps})", counts=dict(run.counts))
        except Exception as e:
            where = f"seed {seed}, " if seed is not None else ""
            e.add_note(f"fasm simulation of {self.name}: raised at {where}step {run.step} "
                       f"(t={run.now:.3f}s); replay: sim.replay({seed}, steps={steps})")
            raise
        elapsed = time.perf_counter() - started
        trace = tuple(format_trace(run.trace)) if keep_trace else ()
        return SeedResult(seed, run.step, dict(run.counts), elapsed, failure, trace,
                          run.final_state())

    # -- many seeds -------------------------------------------------------------------------------

    def run(
        self,
        *,
        seeds: int | Iterable[int] | None = None,
        steps: int | None = None,
        budget: float | None = None,
        base_seed: int = 0,
        stop_on_failure: bool = True,
        progress: Callable[[Progress], None] | bool | None = None,
        replay: Callable[[int, int], str] | None = None,
    ) -> SimReport:
        """Run many seeds and report.

        Args:
            seeds: how many seeds (``base_seed``, ``base_seed + 1``, ...), or which. Default: 20,
                or, with a ``budget``, as many as fit in it.
            steps: transitions per seed (default: the simulation's ``steps``).
            budget: stop starting new seeds after this many real seconds. A seed is never cut
                short, so every seed in the report is reproducible.
            base_seed: the first seed when ``seeds`` is a count or None.
            stop_on_failure: stop at the first failing seed (default) or keep going.
            progress: a callback given a :class:`Progress` every few seconds, or True to print
                it to stderr.
            replay: ``fn(seed, steps) -> str``, the replay line to put in failures (the pytest
                plugin gives its command line).

        Returns:
            The report; ``report.raise_for_failure()`` turns a failure into an exception.

        Raises:
            Exception: as :meth:`run_seed`.
        """
        steps = steps or self.steps
        seed_iter: Iterable[int]
        total: int | None
        if isinstance(seeds, int):
            seed_iter, total = range(base_seed, base_seed + seeds), seeds
        elif seeds is None:
            if budget is None:
                seed_iter, total = range(base_seed, base_seed + 20), 20
            else:
                seed_iter, total = itertools.count(base_seed), None
        else:
            # Any iterable, even an endless one (with a budget): counted only when it can be.
            seed_iter = seeds
            total = len(seeds) if isinstance(seeds, Sized) else None
        report_to = _progress_printer if progress is True else progress or None
        started = time.perf_counter()
        next_report = started + _PROGRESS_EVERY
        totals: dict[str, int] = {}
        done: list[int] = []
        failures: list[Failure] = []
        stopped = "seeds"
        for seed in seed_iter:
            if budget is not None and done and time.perf_counter() - started >= budget:
                stopped = "budget"
                break
            result = self._run_seed(seed, steps, 400, keep_trace=False)
            done.append(seed)
            for name, n in result.counts.items():
                totals[name] = totals.get(name, 0) + n
            if result.failure is not None:
                failure = result.failure
                if replay is not None:
                    failure = failure.with_replay(replay(seed, steps))
                failures.append(failure)
                if stop_on_failure:
                    stopped = "failure"
                    break
            now = time.perf_counter()
            if report_to is not None and now >= next_report:
                next_report = now + _PROGRESS_EVERY
                report_to(Progress(len(done), total, totals.get("steps", 0), now - started,
                                   budget, len(failures)))
        totals["seeds"] = len(done)
        return SimReport(
            name=self.name, seeds=tuple(done), steps_per_seed=steps, counts=totals,
            elapsed=time.perf_counter() - started, failures=tuple(failures),
            checks=_describe_checks(self.checks), stopped=stopped)

    def check(self, **options: Any) -> SimReport:
        """:meth:`run` with the same options, raising on a failure.

        Raises:
            SimulationFailed: a seed failed; its message is the full report.
        """
        report = self.run(**options)
        report.raise_for_failure()
        return report

    # -- hypothesis -------------------------------------------------------------------------------

    def hypothesis_test(
        self, *, steps: int = 30, settings: hypothesis.settings | None = None
    ) -> Callable[[], None]:
        """A hypothesis test of this simulation: every random choice (inputs, faults, timing)
        is drawn by hypothesis, so a failure shrinks to a short run, reported as a script.

        Use it as a test: ``test_shrunk = sim.hypothesis_test()``. ``settings`` are hypothesis's
        (``max_examples``, ``derandomize``, ``database`` ...); ``steps`` bounds the inputs per
        example (short runs shrink fast).

        Raises:
            SimulationFailed: (when the test runs) the shrunk failure.
        """
        from ._hypothesis import hypothesis_test

        return hypothesis_test(self, steps=steps, settings=settings)

    def shrink_seed(self, seed: int, *, steps: int | None = None, budget: float = 10.0,
                    max_runs: int = 2000) -> Failure | None:
        """Shrink the failure of one seeded run: the same check failing in a run with as few
        inputs, faults and executor surprises as this search finds, or None if the seed passes.

        The seed's run is recorded (every random choice of its three streams, the inputs'
        choices grouped by arrival), then replayed with arrivals dropped and choices set to 0
        ("no fault", "the shortest latency", "the first outcome") for as long as the same check
        still fails. No hypothesis, no hashing, no clock in the search: the result is the same in
        every process, as long as the search ends within ``budget`` seconds and ``max_runs``
        runs (the failure says when it did not). A failure found at any step shrinks.

        Raises:
            Exception: as :meth:`run_seed`.
        """
        from ._sim_shrink import shrink_seed

        return shrink_seed(self, seed, steps=steps or self.steps, budget=budget,
                           max_runs=max_runs)

    def shrink(self, *, steps: int = 30, max_examples: int = 200,
               derandomize: bool = True) -> Failure | None:
        """Search with hypothesis and return the shrunk failure, or None if none was found.
        Runs are at most ``steps`` inputs long, so a failure that needs more is not found: to
        shrink a failure a seeded run found, use :meth:`shrink_seed`.

        Raises:
            Exception: an error that is not a check failure (from the input source, say).
        """
        from ._hypothesis import shrink

        return shrink(self, steps=steps, max_examples=max_examples, derandomize=derandomize)


def simulate(
    machine: StateMachine[S, I, Any, Any, Any, Any],
    *,
    initial_state: S | Callable[[], S],
    inputs: InputSource[S, I] | SearchStrategy[I],
    executors: Mapping[type[Any], ExecutorSpec] | None = None,
    invariants: Sequence[Callable[[S], object]] = (),
    faults: FaultPlan | None = None,
    checks: Checks | None = None,
    seeds: int | Iterable[int] | None = None,
    steps: int = 200,
    budget: float | None = None,
    base_seed: int = 0,
) -> SimReport:
    """Build a :class:`Simulation` and :meth:`~Simulation.run` it: one call, one report.

    Raises:
        DefinitionError: as :class:`Simulation`.
        Exception: as :meth:`Simulation.run_seed`.
    """
    sim = Simulation(machine, initial_state=initial_state, inputs=inputs, executors=executors,
                     invariants=invariants, faults=faults, checks=checks, steps=steps)
    return sim.run(seeds=seeds, budget=budget, base_seed=base_seed)


def _describe_checks(checks: Checks) -> str:
    on = [name for name in Checks.__dataclass_fields__ if getattr(checks, name)]
    if len(on) == len(Checks.__dataclass_fields__):
        return "all"
    return "+".join(on) if on else "none"


def _progress_printer(p: Progress) -> None:
    print(p, file=sys.stderr, flush=True)


def _is_strategy(obj: object) -> bool:
    module = sys.modules.get("hypothesis.strategies")
    return module is not None and isinstance(obj, module.SearchStrategy)
