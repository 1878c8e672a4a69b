"""Hypothesis integration: a failing run shrinks to a short script; strategies work as input
sources, in seeded runs too."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fasm.testing import FaultPlan, SimulationFailed
from tests.testing.machines import (
    CUSTOMERS,
    CountsDuplicates,
    IgnoresLost,
    Place,
    RestoreForgets,
    Wait,
    desk_sim,
)

FAST = dict(max_examples=40, steps=12)
# Only duplicated deliveries: fewer random choices per step, so shrinking is quick.
DUPLICATES_ONLY = FaultPlan(crash=0, store_failure=0, fail=0, timeout=0, keyed=0, resubmit=0,
                            duplicate=0.5)


def test_shrinks_to_the_one_input_that_matters() -> None:
    failure = desk_sim(RestoreForgets(), faults=FaultPlan.none()).shrink(**FAST)
    assert failure is not None
    assert failure.check == "restore"
    assert failure.step == 1
    assert failure.faults == ()
    script = "\n".join(failure.trace)
    assert "submit #1 Place(qty=31, customer='ada')" in script  # the smallest order it forgets


def test_shrinks_inputs_and_faults_to_a_readable_script() -> None:
    failure = desk_sim(CountsDuplicates(), faults=DUPLICATES_ONLY).shrink(**FAST)
    assert failure is not None
    assert failure.check == "duplicates"
    assert failure.step <= 5
    assert any("delivered twice" in what for _, _, what in failure.faults)
    text = str(failure)
    assert "(duplicate)" in text and "submit #1" in text
    assert failure.seed is None and failure.replay.startswith("sim.shrink(steps=12")


def test_correct_machine_survives_hypothesis() -> None:
    assert desk_sim(faults=FaultPlan.none()).shrink(max_examples=15, steps=10) is None


def test_hypothesis_test_is_a_test_function() -> None:
    test = desk_sim(IgnoresLost(), faults=FaultPlan.none()).hypothesis_test(
        steps=10, settings=settings(max_examples=30, database=None, derandomize=True,
                                    deadline=None, suppress_health_check=list(HealthCheck)))
    assert test.__name__ == "test_IgnoresLost_hypothesis"
    with pytest.raises(SimulationFailed, match="shrunk to this run") as caught:
        test()
    assert caught.value.failure.check == "absorbed"


ORDERS = st.one_of(
    st.builds(Place, qty=st.integers(1, 40), customer=st.sampled_from(CUSTOMERS)),
    st.builds(Wait, customer=st.sampled_from(CUSTOMERS)),
)


def test_strategy_input_source_in_seeded_runs_is_deterministic() -> None:
    sim = desk_sim(inputs=ORDERS)
    report = sim.run(seeds=3, steps=60)
    assert report.ok, str(report)
    first = sim.run_seed(5, steps=60, trace_limit=None).trace_text
    assert sim.run_seed(5, steps=60, trace_limit=None).trace_text == first
    assert "submit #1 " in first


def test_strategy_input_source_under_hypothesis() -> None:
    # Every order here is one that RestoreForgets forgets, so the search is short.
    places = st.builds(Place, qty=st.integers(31, 40), customer=st.sampled_from(CUSTOMERS))
    failure = desk_sim(RestoreForgets(), inputs=places, faults=FaultPlan.none()).shrink(**FAST)
    assert failure is not None and failure.check == "restore"
    assert failure.step == 1
