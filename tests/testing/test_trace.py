"""Determinism of the simulation itself: a seed is a run, byte for byte (as trio tests its
scheduler), in this process and in others with another PYTHONHASHSEED; and the simulation drives
the production engine, not a model of it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fasm.runtime._engine import Engine
from fasm.testing import FaultPlan
from tests.testing.machines import MutatesThenRaises, desk_sim, stock_is_conserved

ROOT = Path(__file__).resolve().parents[2]

PLAN = FaultPlan(crash=0.05, late=0.2, duplicate=0.05)

DIGEST_SCRIPT = """
import hashlib
from fasm.testing import FaultPlan
from tests.testing.machines import desk_sim, stock_is_conserved
sim = desk_sim(invariants=[stock_is_conserved], faults=FaultPlan(crash=0.05, late=0.2,
               duplicate=0.05))
result = sim.run_seed(11, trace_limit=None)
assert result.ok, result.failure
print(hashlib.sha256(result.trace_text.encode()).hexdigest())
"""


def _trace(seed: int) -> str:
    sim = desk_sim(invariants=[stock_is_conserved], faults=PLAN)
    result = sim.run_seed(seed, trace_limit=None)
    assert result.ok, result.failure
    return result.trace_text


def test_same_seed_same_trace_byte_for_byte() -> None:
    first, second = _trace(11), _trace(11)
    assert first.encode() == second.encode()
    assert "CRASH" in first and "start at seq" in first  # the trace covers crashes and restarts
    assert _trace(12) != first


def test_same_seed_same_trace_in_other_processes() -> None:
    # The desk's state holds a set of strings, whose order differs between these processes.
    digests = set()
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        digests.add(out.strip())
    digests.add(hashlib.sha256(_trace(11).encode()).hexdigest())
    assert len(digests) == 1, digests


def test_failure_replays_exactly_from_its_seed() -> None:
    report = desk_sim(MutatesThenRaises(), faults=PLAN).run(seeds=20)
    failure = report.failures[0]
    assert failure.replay == f"sim.replay({failure.seed}, steps=200)"
    again = desk_sim(MutatesThenRaises(), faults=PLAN).replay(failure.seed or 0)
    assert again.failure is not None
    assert again.failure.trace[-len(failure.trace):] == failure.trace
    assert again.failure.faults == failure.faults
    assert again.failure.counts == failure.counts


def test_the_simulation_drives_the_production_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"step": 0, "committed": 0, "restore": 0, "replay": 0, "reset": 0}
    for name in calls:
        original = getattr(Engine, name)

        def counting(self: Engine, *args: object, _name: str = name,
                     _original: object = original, **kwargs: object) -> object:
            calls[_name] += 1
            return _original(self, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(Engine, name, counting)
    report = desk_sim(faults=FaultPlan(crash=0.1), rollback="reload").run(seeds=3)
    assert report.ok, str(report)
    assert calls["step"] == report.counts["steps"]
    assert calls["restore"] == report.counts["starts"]
    assert calls["committed"] == report.counts["commits"] - report.counts.get("crash:after-commit",
                                                                                0)
    assert calls["replay"] > 0
    assert calls["reset"] == report.counts.get("reloads", 0) > 0
