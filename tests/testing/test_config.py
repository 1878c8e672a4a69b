"""The simulation's configuration, its errors, and its reporting."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import pytest

import fasm.testing
from fasm import DefinitionError, FasmError
from fasm.runtime import ActionContext, RetryPolicy
from fasm.testing import (
    Checks,
    FaultPlan,
    Progress,
    SimExecutor,
    SimulationFailed,
    SuspendedError,
    Weighted,
    simulate,
)
from tests.testing.machines import (
    Call,
    Desk,
    DeskMachine,
    Lost,
    MutatesThenRaises,
    Place,
    Ship,
    Shipped,
    desk_inputs,
    desk_sim,
    stock_is_conserved,
)

CTX = ActionContext(machine_key="sim", action_id=1, idempotency_key="sim/m/sim/1", attempt=1,
                    deadline=None)


def test_public_names_are_exported_with_public_modules() -> None:
    for name in fasm.testing.__all__:
        obj = getattr(fasm.testing, name)
        if isinstance(obj, type):
            assert obj.__module__ == "fasm.testing", name


@pytest.mark.parametrize("options", [
    {"crash": 1.5}, {"fail": -0.1}, {"crash_points": ("sometimes",)}, {"latency": (2.0, 1.0)},
    {"max_batch": 0}, {"hang": 0.0},
])
def test_fault_plan_refuses_nonsense(options: dict[str, Any]) -> None:
    with pytest.raises(DefinitionError):
        FaultPlan(**options)


def test_weighted_samples_in_proportion() -> None:
    dist = Weighted((Shipped(), 9), (Lost("x"), 1))
    rng = random.Random(1)
    draws = [dist.sample(rng) for _ in range(2000)]
    assert 100 < sum(isinstance(d, Lost) for d in draws) < 300
    assert "Weighted((Shipped(), 9)" in repr(dist)
    with pytest.raises(DefinitionError):
        Weighted()
    with pytest.raises(DefinitionError):
        Weighted((Shipped(), 0))


def test_sim_executor_options() -> None:
    with pytest.raises(DefinitionError, match="on_exhausted"):
        SimExecutor(lambda a: Shipped(), retry=RetryPolicy(max_attempts=2))
    seen: list[float] = []

    def with_rng(action: Ship, rng: random.Random) -> Shipped:
        seen.append(rng.random())
        return Shipped()

    assert SimExecutor(with_rng).produce(Ship(1), random.Random(0), CTX) == Shipped()
    lost = SimExecutor(lambda a: Lost("y"))
    assert seen and lost.produce(Ship(1), random.Random(0), CTX) == Lost("y")


def test_executor_table_is_checked_like_the_runtimes() -> None:
    with pytest.raises(DefinitionError, match="no simulated executor for tracked action type"):
        desk_sim(executors={Ship: lambda a: Shipped()})
    with pytest.raises(DefinitionError, match="not in DeskMachine's tracked-action type"):
        desk_sim(executors={Ship: lambda a: Shipped(), Call: lambda a: Shipped(),
                            int: lambda a: Shipped()})
    with pytest.raises(DefinitionError, match="steps"):
        desk_sim(steps=0)


def test_invalid_input_from_the_source_is_reported() -> None:
    report = desk_sim(inputs=lambda rng, state: Place(qty="lots", customer="ada")).run(seeds=1)
    failure = report.failures[0]
    assert failure.check == "input"
    assert "does not accept" in failure.message


def test_input_that_cannot_be_written_is_reported_like_the_runtime_refuses_it() -> None:
    report = desk_sim(inputs=lambda rng, state: Place(qty=2**64, customer="ada")).run(seeds=1)
    assert report.failures[0].check == "input"
    assert "cannot be encoded" in report.failures[0].message
    report = desk_sim(inputs=lambda rng, state: Place(qty=1, customer="\ud800")).run(seeds=1)
    assert report.failures[0].check == "input"
    assert "input at customer cannot be encoded" in report.failures[0].message


def test_executor_result_that_cannot_be_written_is_reported() -> None:
    report = desk_sim(executors={Ship: lambda a: Lost("\ud800"),
                                 Call: lambda a: Shipped()}).run(seeds=1)
    assert report.failures[0].check == "executor"
    assert "cannot be committed" in report.failures[0].message


def test_wrong_executor_result_type_is_reported() -> None:
    report = desk_sim(executors={Ship: lambda a: "shipped", Call: lambda a: Shipped()}).run(
        seeds=1)
    assert report.failures[0].check == "executor"
    assert "not the machine's tracked result type" in report.failures[0].message


def test_an_stf_that_suspends_cannot_be_simulated() -> None:
    class Sleepy(DeskMachine):
        async def stf(self, state: Desk, input: Any, actions: Any) -> None:
            await asyncio.sleep(0)

    with pytest.raises(SuspendedError, match="suspended") as caught:
        desk_sim(Sleepy()).run(seeds=1)
    assert any("seed 0" in note for note in caught.value.__notes__)


def test_retries_timeouts_and_exhaustion() -> None:
    ship = SimExecutor(
        Weighted((Shipped(), 1)),
        retry=RetryPolicy(max_attempts=2, initial_backoff=0.5, timeout=1.0),
        on_exhausted=lambda action, error: Lost(f"gave up: {error}"),
        latency=(0.1, 1.5),
    )
    report = desk_sim(executors={Ship: ship, Call: lambda a: Shipped()},
                      invariants=[stock_is_conserved], faults=FaultPlan(fail=0.3)).run(seeds=4)
    assert report.ok, str(report)
    for outcome in ("timeout", "fail", "exhausted", "ok"):
        assert report.counts[f"results:{outcome}"] > 0, outcome
    assert report.counts["retries"] > 0


def test_budget_stops_starting_seeds() -> None:
    report = desk_sim().run(budget=0.05)
    assert report.stopped == "budget"
    assert 1 <= len(report.seeds) < 1000
    assert report.seeds == tuple(range(len(report.seeds)))
    endless = desk_sim().run(seeds=itertools.count(50), budget=0.05, steps=20)
    assert endless.seeds[:2] == (50, 51) and endless.stopped == "budget"


def test_progress_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fasm.testing._sim._PROGRESS_EVERY", 0.0)
    seen: list[Progress] = []
    desk_sim().run(seeds=3, steps=20, progress=seen.append)
    assert [p.seeds_done for p in seen] == [1, 2, 3]
    assert "3/3 seeds" in str(seen[-1])


def test_keep_going_collects_every_failing_seed() -> None:
    report = desk_sim(MutatesThenRaises()).run(seeds=6, stop_on_failure=False)
    assert len(report.seeds) == 6
    assert len(report.failures) >= 3  # a seed whose stock never runs out has no rejection
    assert report.stopped == "seeds"
    assert {f.check for f in report.failures} == {"atomicity"}


def test_an_exhausted_input_source_ends_the_run() -> None:
    orders = iter([Place(5, "ada"), Place(7, "bo")])
    report = desk_sim(inputs=lambda rng, state: next(orders, None)).run(seeds=1)
    assert report.ok, str(report)
    assert report.counts["inputs"] == 2


def test_invariant_verdicts() -> None:
    def false(state: Desk) -> bool:
        return False

    def raises(state: Desk) -> None:
        assert state.stock < 0, "stock is not negative"

    assert "false returned False" in desk_sim(invariants=[false]).run(seeds=1).failures[0].message
    message = desk_sim(invariants=[raises]).run(seeds=1).failures[0].message
    assert "raises raised AssertionError" in message


def test_simulate_and_check() -> None:
    report = simulate(DeskMachine(), initial_state=Desk, inputs=desk_inputs,
                      executors={Ship: lambda a: Shipped(), Call: lambda a: Shipped()},
                      checks=Checks.invariants_only(), seeds=2, steps=50)
    assert report.ok and report.checks == "invariants"
    assert "2 seed(s) x 50 steps" in report.summary()
    with pytest.raises(SimulationFailed) as caught:
        desk_sim(MutatesThenRaises()).check(seeds=3)
    assert isinstance(caught.value, AssertionError) and isinstance(caught.value, FasmError)
    assert "check 'atomicity' failed at seed" in str(caught.value)
    assert "replay: sim.replay(" in str(caught.value)
