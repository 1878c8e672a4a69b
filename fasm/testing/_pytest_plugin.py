"""The fasm pytest plugin: command-line options for simulations and the ``fasm_sim`` fixture.

Registered as the ``pytest11`` entry point ``fasm``, so installing fasm is enough::

    pytest                                   # each simulation test's own defaults (CI)
    pytest --fasm-seeds 2000 --fasm-budget 600   # nightly: more seeds, up to 10 minutes each
    pytest tests/test_x.py::test_y --fasm-seed 1234   # replay the seed a failure named
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pytest

from ._sim import Simulation
from ._sim_report import Progress, SimReport

__all__ = ("SimRunner", "fasm_sim", "pytest_addoption")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fasm", "fasm simulation testing")
    group.addoption("--fasm-seed", type=int, default=None, metavar="N",
                    help="run only this seed in every fasm simulation (replays a failure)")
    group.addoption("--fasm-seeds", type=int, default=None, metavar="N",
                    help="seeds per fasm simulation (default: each test's own)")
    group.addoption("--fasm-budget", type=float, default=None, metavar="SECONDS",
                    help="time budget per fasm simulation; with no --fasm-seeds, run seeds "
                         "until it is spent")
    group.addoption("--fasm-steps", type=int, default=None, metavar="N",
                    help="transitions per seed (default: each test's own)")
    group.addoption("--fasm-base-seed", type=int, default=None, metavar="N",
                    help="first seed (default 0); a nightly job can pass a new one each night")


class SimRunner:
    """Runs a :class:`Simulation` with the command line's seed, seeds, steps and budget, and
    fails the test with the report and the replay command."""

    def __init__(self, config: pytest.Config, nodeid: str, path: Path | None = None) -> None:
        self.config = config
        self.nodeid = nodeid
        self.target = _target(config, nodeid, path)
        self.seed: int | None = config.getoption("--fasm-seed")
        self.seeds: int | None = config.getoption("--fasm-seeds")
        self.budget: float | None = config.getoption("--fasm-budget")
        self.steps: int | None = config.getoption("--fasm-steps")
        self.base_seed: int = config.getoption("--fasm-base-seed") or 0

    def check(self, sim: Simulation[Any, Any], *, seeds: int = 20, steps: int | None = None,
              budget: float | None = None) -> SimReport:
        """Run ``sim``; the command-line options override these defaults.

        Returns:
            The report (the run passed).

        Raises:
            pytest.fail.Exception: a seed failed; the message is the report, with the command
                that replays the failing seed.
        """
        steps = self.steps or steps or sim.steps
        chosen: int | list[int] | None
        if self.seed is not None:
            chosen, run_budget = [self.seed], None
        elif self.budget is not None:
            chosen, run_budget = self.seeds, self.budget
        else:
            chosen, run_budget = self.seeds or seeds, budget
        report = sim.run(seeds=chosen, steps=steps, budget=run_budget, base_seed=self.base_seed,
                         progress=self._progress, replay=self._replay)
        if not report.ok:
            pytest.fail(str(report), pytrace=False)
        return report

    __call__ = check

    def _replay(self, seed: int, steps: int) -> str:
        command = ["pytest", self.target, f"--fasm-seed={seed}"]
        if self.steps is not None:
            command.append(f"--fasm-steps={steps}")
        return shlex.join(command)

    def _progress(self, progress: Progress) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"{self.nodeid}: {progress}")


def _target(config: pytest.Config, nodeid: str, path: Path | None) -> str:
    """The test as the replay command names it: its node id with the file relative to the
    directory pytest was run from (a node id is relative to the rootdir, which may differ)."""
    params = getattr(config, "invocation_params", None)
    if path is None or params is None:
        return nodeid
    _, sep, rest = nodeid.partition("::")
    return os.path.relpath(path, params.dir) + sep + rest


@pytest.fixture
def fasm_sim(request: pytest.FixtureRequest) -> SimRunner:
    """Runs simulations with the ``--fasm-*`` options: ``fasm_sim.check(sim, seeds=20)``."""
    return SimRunner(request.config, request.node.nodeid, request.node.path)
