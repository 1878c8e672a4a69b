"""The gaps of issue 16, each shown by a broken machine of tests/testing/gap_machines.py (or a
broken configuration of the correct one) that the toolkit must flag, clearly, with a replay line."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fasm.runtime import ActionContext, RetryPolicy
from fasm.testing import Checks, Effects, FaultPlan, SimExecutor, Simulation, Weighted
from tests.testing.gap_machines import (
    Beats,
    Charge,
    Charged,
    Declined,
    DeclineKeepsPending,
    ForgetsCharges,
    ForgetsTimers,
    HeartbeatMachine,
    RareDoubleRefund,
    RetriesDeclines,
    ReusesIds,
    SendRefund,
    Wallet,
    WalletMachine,
    beat_inputs,
    books_balance,
    wallet_inputs,
)

NO_RESTORE_CHECK = Checks(restore=False)


def wallet_sim(machine: WalletMachine | None = None, **options: Any) -> Simulation[Any, Any]:
    options.setdefault("executors", {Charge: Weighted((Charged(), 3), (Declined(), 1))})
    return Simulation(machine or WalletMachine(), initial_state=Wallet, inputs=wallet_inputs,
                      **options)


def test_correct_wallet_passes() -> None:
    assert wallet_sim(steps=150).run(seeds=10).ok
    assert wallet_sim(steps=150, faults=FaultPlan.at_least_once()).run(seeds=5).ok


# -- 1. liveness never crashes, and sees what restore forgot -----------------------------------


def test_attempt_timeout_shorter_than_latency_is_a_liveness_failure_not_a_crash() -> None:
    slow = SimExecutor(Weighted((Charged(), 1)), retry=RetryPolicy(timeout=0.05),
                       latency=(0.5, 1.0))
    sim = wallet_sim(executors={Charge: slow}, steps=40)
    failure = sim.run(seeds=1).failures[0]
    assert failure.check == "liveness"
    assert "work never finishes" in failure.message
    assert "attempts in a row failed" in failure.message
    assert failure.replay == "sim.replay(0, steps=40)"
    again = sim.replay(0, steps=40).failure
    assert again is not None and again.message == failure.message


def test_an_executor_that_always_raises_is_work_that_never_finishes() -> None:
    def broken(action: Charge, rng: random.Random, ctx: ActionContext) -> Charged:
        raise RuntimeError("provider down")

    failure = wallet_sim(executors={Charge: broken}, steps=30).run(seeds=1).failures[0]
    assert failure.check == "liveness"
    assert "provider down" in failure.message


@pytest.mark.parametrize("machine", [ForgetsCharges, ForgetsTimers])
def test_restore_that_forgets_work_is_a_liveness_failure_with_the_restore_check_off(
        machine: type[WalletMachine]) -> None:
    assert wallet_sim(machine(), steps=150).run(seeds=5).failures[0].check == "restore"
    failure = wallet_sim(machine(), steps=150, checks=NO_RESTORE_CHECK).run(seeds=5).failures[0]
    assert failure.check == "liveness"
    assert "restore did not re-emit it" in failure.message


def test_a_failure_result_that_leaves_work_pending_is_a_liveness_failure() -> None:
    # One decline, no crash: the first (and only) delivery leaves the charge pending for ever.
    sim = wallet_sim(DeclineKeepsPending(), steps=20, checks=NO_RESTORE_CHECK,
                     faults=FaultPlan.none())
    failure = sim.run(seeds=5).failures[0]
    assert failure.check == "liveness"
    assert "its result was committed at step" in failure.message
    assert "still holds it as pending" in failure.message


def test_state_after_the_liveness_phase_is_settled() -> None:
    # Declines are charged again under a new id: work emitted during the liveness phase.
    sim = wallet_sim(RetriesDeclines(), steps=100)
    for seed in range(10):
        result = sim.run_seed(seed)
        assert result.ok
        assert result.state.charging == {} and result.state.holds == {}


# -- 2. id collisions ---------------------------------------------------------------------------


def test_an_id_already_in_flight_is_reported_as_a_collision() -> None:
    failure = wallet_sim(ReusesIds(), steps=100).run(seeds=5).failures[0]
    assert failure.check == "ids"
    assert failure.message.startswith("id collision:")
    assert "already in flight" in failure.message


# -- 3. simulated executors get the action context and may raise --------------------------------


def test_simulated_executors_get_the_action_context_and_raising_is_a_failed_attempt() -> None:
    seen: list[ActionContext] = []
    provider: dict[str, int] = {}  # an idempotent provider: one charge per key

    def charge(action: Charge, rng: random.Random, ctx: ActionContext) -> Charged:
        seen.append(ctx)
        if ctx.attempt == 1 and rng.random() < 0.5:
            raise ConnectionError("provider timed out")
        provider.setdefault(ctx.idempotency_key, action.amount)
        return Charged()

    sim = wallet_sim(executors={Charge: SimExecutor(charge, retry=RetryPolicy(timeout=5.0))},
                     steps=100, faults=FaultPlan(crash=0.0, store_failure=0.0))
    result = sim.run_seed(0, trace_limit=None)
    assert result.ok, result.failure
    assert result.counts["results:raised"] > 0 and result.counts["retries"] > 0
    assert any("the simulated executor raised ConnectionError('provider timed out')" in line
               for line in result.trace)
    assert {c.attempt for c in seen} >= {1, 2}
    first = seen[0]
    assert first.machine_key == "sim"
    assert first.idempotency_key == f"sim/{WalletMachine.machine_name}/sim/{first.action_id}"
    assert first.deadline is not None
    # Exactly-once effects: each charge id charged once at the provider, retries included.
    assert len(provider) == len({c.action_id for c in seen})


# -- 4. untracked actions lost by a crash -------------------------------------------------------


def no_lost_refunds(fx: Effects) -> object:
    lost = [a for _, a in fx.lost if isinstance(a, SendRefund)]
    return not lost or f"{len(lost)} refund(s) lost by a crash: {lost}"


def test_a_refund_lost_by_a_crash_is_flagged_by_an_effects_check() -> None:
    sim = wallet_sim(steps=200, effects=[no_lost_refunds],
                     faults=FaultPlan(crash=0.1, crash_points=("after-commit",)))
    failure = sim.run(seeds=10).failures[0]
    assert failure.check == "effects"
    assert "refund(s) lost by a crash" in failure.message
    assert any("untracked action(s) lost" in what for _, _, what in failure.faults)


def test_effects_see_every_handled_untracked_action_without_crashes() -> None:
    seen: list[Effects] = []

    def record(fx: Effects) -> None:
        seen.append(fx)

    result = wallet_sim(steps=100, effects=[record], faults=FaultPlan.none()).run_seed(0)
    assert result.ok
    final = seen[-1]
    assert final.lost == () and final.handled == final.emitted
    assert sum(a.amount for _, a in final.handled) == result.state.refunded > 0


# -- 6. shrinking a given seeded failure -------------------------------------------------------


def rare_sim() -> Simulation[Any, Any]:
    return wallet_sim(RareDoubleRefund(), invariants=[books_balance], steps=200)


def test_shrink_seed_shrinks_a_failure_found_late_in_the_run() -> None:
    sim = rare_sim()
    late = next(s for s in range(40)
                if (f := sim.run_seed(s, trace_limit=0).failure) is not None and f.step >= 150)
    shrunk = sim.shrink_seed(late, budget=30.0)
    assert shrunk is not None and shrunk.check == "invariant"
    assert shrunk.step <= 10
    assert shrunk.replay.startswith(f"sim.shrink_seed({late}, steps=200) (shrunk from step ")
    assert "budget" not in shrunk.replay
    # The shrunk run is a script: every event from the start.
    assert shrunk.trace[0].split()[2] == "start"
    assert sim.shrink_seed(late, budget=30.0) == shrunk


def test_shrink_seed_lifts_small_inputs_that_must_add_up() -> None:
    # Taking more stock than there is needs Place orders that add up to STOCK (1,000, at most 40
    # each): dropping and zeroing choices alone left 96 steps; raising each Place's quantity to
    # the largest drawn lets most of them go.
    from tests.testing.machines import MutatesThenRaises, desk_sim

    sim = desk_sim(MutatesThenRaises(), steps=200)
    shrunk = sim.shrink_seed(0, budget=60.0)
    assert shrunk is not None and shrunk.check == "atomicity"
    assert "budget" not in shrunk.replay
    assert shrunk.step <= 60, shrunk.replay


def test_shrink_seed_of_a_passing_seed_is_none() -> None:
    assert wallet_sim(steps=50).shrink_seed(0) is None


SHRINK_SCRIPT = """
from tests.testing.test_gaps import rare_sim
print(rare_sim().shrink_seed(0, budget=60.0))
"""


def test_shrink_seed_gives_the_same_result_in_every_process() -> None:
    root = Path(__file__).resolve().parents[2]
    outputs = set()
    for hash_seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", SHRINK_SCRIPT], env=env, cwd=root,
                             capture_output=True, text=True, check=True)
        outputs.add(run.stdout)
    assert len(outputs) == 1
    assert "shrunk from step" in outputs.pop()


def test_a_timer_re_armed_under_its_own_id_for_ever_passes_liveness() -> None:
    sim = Simulation(HeartbeatMachine(), initial_state=Beats, inputs=beat_inputs, steps=100)
    report = sim.run(seeds=5)
    assert report.ok, str(report)
    assert sim.run_seed(0).state.beats > 0
