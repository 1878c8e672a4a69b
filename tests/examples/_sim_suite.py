"""Running an example's simulation suite: seeds and budget from the fasm pytest options, a failure
reported with the command that replays it, and the domain counts the suite prints.

Why not ``fasm_sim.check``: a suite reports what happened in the domain (bookings, conflicts,
payment failures), which needs each seed's final state and, for refusals (which are not state),
its trace; :class:`~fasm.testing.SimReport` adds up the toolkit's counts only. So the suite runs
its seeds one at a time with ``Simulation.run_seed`` (whose :class:`~fasm.testing.SeedResult`
has both) and reads the same ``--fasm-*`` options the plugin defines:

    pytest tests/examples/test_dentist_simulation.py                      # short budgets (CI)
    pytest tests/examples/test_dentist_simulation.py --fasm-budget 600 -s # ten minutes a suite
    pytest 'tests/examples/test_dentist_simulation.py::test_x' --fasm-seed 17   # replay one seed
"""

from __future__ import annotations

import itertools
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from fasm.testing import SeedResult, Simulation

S = TypeVar("S")


@dataclass
class SuiteReport:
    name: str
    seeds: list[int]
    steps: int
    full: bool  # at least the suite's default seeds ran (its domain expectations apply)
    counts: dict[str, int]  # the toolkit's totals (inputs, crashes, ...)
    domain: dict[str, int]  # the suite's own totals (bookings, conflicts, ...)
    elapsed: float

    def __getitem__(self, name: str) -> int:
        return self.domain.get(name, self.counts.get(name, 0))

    def line(self, fields: Iterable[str]) -> str:
        parts = [f"{len(self.seeds)} seeds x {self.steps} steps",
                 f"{self['inputs']:,} operations"]
        parts += [f"{self[f]:,} {f}" for f in fields]
        parts.append(f"{self['crashes']:,} crashes")
        return f"{self.name}: {', '.join(parts)} ({self.elapsed:.1f}s)"


def count_lines(result: SeedResult, *needles: str) -> int:
    """How many trace lines contain one of ``needles`` (the run must keep its whole trace)."""
    return sum(1 for line in result.trace if any(n in line for n in needles))


def run_suite(
    request: pytest.FixtureRequest,
    sim: Simulation[S, Any],
    tally: Callable[[S, SeedResult], Mapping[str, int]],
    *,
    name: str,
    seeds: int,
    budget: float | None = None,
    steps: int | None = None,
    keep_trace: bool = False,
) -> SuiteReport:
    """Run ``sim`` over many seeds and add up ``tally(final_state, seed_result)``.

    Defaults: ``seeds`` seeds (or fewer if ``budget`` seconds run out first; the suites here give
    no budget, so that CI runs the same seeds every time). ``--fasm-seed N`` runs
    only seed N; ``--fasm-budget S`` runs seeds until S seconds are spent (at most
    ``--fasm-seeds`` when given); ``--fasm-seeds N`` alone runs N seeds; ``--fasm-steps`` and
    ``--fasm-base-seed`` set the steps per seed and the first seed. A seed is never cut short.

    Raises:
        pytest.fail.Exception: a seed failed; the message is the failure and its replay command.
    """
    option = request.config.getoption
    one, many, cli_budget = option("--fasm-seed"), option("--fasm-seeds"), option("--fasm-budget")
    cli_steps, base = option("--fasm-steps"), option("--fasm-base-seed") or 0
    default_steps = steps or sim.steps
    steps = cli_steps or default_steps
    chosen: Iterable[int]
    limit: float | None
    if one is not None:
        chosen, limit = [one], None
    elif cli_budget is not None:
        chosen = range(base, base + many) if many else itertools.count(base)
        limit = cli_budget
    elif many is not None:
        chosen, limit = range(base, base + many), None
    else:
        chosen, limit = range(base, base + seeds), budget

    counts: dict[str, int] = {}
    domain: dict[str, int] = {}
    done: list[int] = []
    started = time.perf_counter()
    for seed in chosen:
        if limit is not None and done and time.perf_counter() - started >= limit:
            break
        result = sim.run_seed(seed, steps=steps, trace_limit=None if keep_trace else 0)
        if result.failure is not None:
            # Run it again with a short trace: the failure then shows the last events only.
            failure = sim.run_seed(seed, steps=steps, trace_limit=400).failure or result.failure
            command = ["pytest", request.node.nodeid, f"--fasm-seed={seed}"]
            if cli_steps is not None:
                command.append(f"--fasm-steps={steps}")
            pytest.fail(f"{name}: seed {seed} failed\n"
                        f"{failure.with_replay(shlex.join(command))}", pytrace=False)
        done.append(seed)
        for key, n in result.counts.items():
            counts[key] = counts.get(key, 0) + n
        for key, n in tally(result.state, result).items():
            domain[key] = domain.get(key, 0) + n
    full = len(done) >= seeds and steps >= default_steps
    return SuiteReport(name, done, steps, full, counts, domain, time.perf_counter() - started)
