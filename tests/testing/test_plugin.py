"""The pytest plugin, through the installed entry point: options, fixture, decorator, and a
failure message that names the seed and the command replaying it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SIMS = '''
from fasm.testing import simulation_test
from tests.testing.machines import MutatesThenRaises, desk_sim


@simulation_test(seeds=3, steps=60)
def test_desk():
    return desk_sim()


@simulation_test(seeds=20)
def test_broken():
    return desk_sim(MutatesThenRaises())


def test_fixture(fasm_sim):
    report = fasm_sim.check(desk_sim(), seeds=2, steps=30)
    print("RAN", report.seeds[0], len(report.seeds), report.steps_per_seed)
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "test_sims.py", "-p", "no:cacheprovider", "-q", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True)


@pytest.fixture
def sims(tmp_path: Path) -> Path:
    (tmp_path / "test_sims.py").write_text(SIMS)
    return tmp_path


def test_defaults_then_replay_the_failing_seed(sims: Path) -> None:
    run = _pytest(sims, "-s")
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert "2 passed" in out and "1 failed" in out
    assert "RAN 0 2 30" in out
    found = re.search(r"check 'atomicity' failed at seed (\d+), step (\d+)", out)
    assert found, out
    seed, step = found.groups()
    assert f"replay: pytest test_sims.py::test_broken --fasm-seed={seed}" in out
    again = _pytest(sims, "test_sims.py::test_broken", f"--fasm-seed={seed}")
    assert f"failed at seed {seed}, step {step} " in again.stdout, again.stdout
    assert "1 seed(s) x 200 steps" in again.stdout


def test_replay_line_works_from_the_directory_pytest_ran_in(tmp_path: Path) -> None:
    # rootdir is tmp_path (its pytest.ini); pytest runs in tmp_path/sub, where node ids still
    # start with "sub/".
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "test_sims.py").write_text(SIMS)
    run = _pytest(sub, "test_sims.py::test_broken")
    found = re.search(r"replay: (pytest (\S+) --fasm-seed=(\d+))", run.stdout)
    assert found, run.stdout
    assert found.group(2) == "test_sims.py::test_broken"
    args = found.group(1).split()[1:]
    again = _pytest(sub, *args)
    assert f"failed at seed {found.group(3)}, " in again.stdout, again.stdout


class _Config:
    """Just enough of pytest.Config for SimRunner: the options and no terminal reporter."""

    def __init__(self, **options: object) -> None:
        self.options = {f"--fasm-{k.replace('_', '-')}": v for k, v in options.items()}
        self.pluginmanager = self

    def getoption(self, name: str) -> object:
        return self.options.get(name)

    def get_plugin(self, name: str) -> None:
        return None


def test_command_line_sets_seeds_steps_and_budget() -> None:
    from fasm.testing._pytest_plugin import SimRunner
    from tests.testing.machines import desk_sim

    def runner(**options: object) -> SimRunner:
        return SimRunner(_Config(**options), "t.py::t")  # type: ignore[arg-type]

    report = runner(budget=0.2, base_seed=100, steps=20).check(desk_sim(), seeds=2, steps=30)
    assert report.seeds[0] == 100 and len(report.seeds) > 2 and report.steps_per_seed == 20
    report = runner(seeds=3).check(desk_sim(), seeds=2, steps=30)
    assert report.seeds == (0, 1, 2) and report.steps_per_seed == 30
    report = runner(seed=7, seeds=3).check(desk_sim(), seeds=2, steps=30)
    assert report.seeds == (7,)
    report = runner().check(desk_sim(), seeds=2, steps=30, budget=60.0)
    assert report.seeds == (0, 1)
