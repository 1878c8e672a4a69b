"""Proof that the simulation finds the bugs the rules of docs/02_invariants.md forbid: each broken
machine is flagged, by the check meant for it, within a small default budget, and the correct
machines pass."""

from __future__ import annotations

import pytest

from examples.seed_readme import (
    Charge,
    CheckStatus,
    Failed,
    PaymentMachine,
    PaymentSystem,
    Process,
    Status,
    Success,
)
from fasm import StateMachine
from fasm.runtime import Rollback
from fasm.testing import Checks, FaultPlan, Simulation, Weighted
from tests.testing.machines import (
    CallsInSetOrder,
    ClockIds,
    CountsDuplicates,
    DeskMachine,
    EmitsWithoutStoring,
    IgnoresLost,
    MutatesThenRaises,
    RaisesKeyError,
    RandomIds,
    ReminderMachine,
    Reminders,
    RestoreForgets,
    RestoreInvents,
    desk_sim,
    fired_on_time,
    ids_below_counter,
    reminder_inputs,
    stock_is_conserved,
)

DEFAULT_SEEDS = 20  # the "small default budget": Simulation.run's default seed count

BROKEN = [
    (MutatesThenRaises, "atomicity", FaultPlan()),
    (EmitsWithoutStoring, "restore", FaultPlan()),
    (RandomIds, "determinism", FaultPlan()),
    (ClockIds, "determinism", FaultPlan()),
    (RestoreForgets, "restore", FaultPlan()),
    (RestoreInvents, "restore", FaultPlan()),
    (IgnoresLost, "absorbed", FaultPlan()),
    (CallsInSetOrder, "determinism", FaultPlan()),
    (CountsDuplicates, "duplicates", FaultPlan.at_least_once()),
    (RaisesKeyError, "errors", FaultPlan.at_least_once()),
]


@pytest.mark.parametrize(("machine", "check", "faults"), BROKEN,
                         ids=[m.__name__ for m, _, _ in BROKEN])
def test_broken_machine_is_flagged(machine: type[DeskMachine], check: str,
                                   faults: FaultPlan) -> None:
    report = desk_sim(machine(), faults=faults).run()
    assert not report.ok, f"{machine.__name__} passed:\n{report}"
    failure = report.failures[0]
    assert failure.check == check, str(failure)
    assert report.counts["seeds"] <= DEFAULT_SEEDS
    # The reproduction names the seed and step and replays exactly.
    assert failure.seed is not None
    again = desk_sim(machine(), faults=faults).replay(failure.seed)
    assert again.failure is not None
    assert (again.failure.check, again.failure.step) == (failure.check, failure.step)
    if machine not in (RandomIds, ClockIds):  # their ids differ from run to run, by design
        assert again.failure.message == failure.message


def test_broken_machine_is_flagged_with_user_invariants_too() -> None:
    # With the user's invariants on, the unstored action breaks stock accounting at once.
    report = desk_sim(EmitsWithoutStoring(), invariants=[stock_is_conserved]).run(seeds=3)
    assert report.failures[0].check == "invariant"
    assert "stock_is_conserved" in report.failures[0].message


@pytest.mark.parametrize("faults", [FaultPlan(), FaultPlan.at_least_once(), FaultPlan.none()],
                         ids=["default", "at-least-once", "none"])
def test_correct_desk_passes(faults: FaultPlan) -> None:
    report = desk_sim(invariants=[stock_is_conserved, ids_below_counter],
                      faults=faults).run(seeds=8)
    assert report.ok, str(report)
    assert report.counts["steps"] >= 8 * 200


def test_every_crash_point_is_exercised_and_survived() -> None:
    report = desk_sim(invariants=[stock_is_conserved],
                      faults=FaultPlan(crash=0.1, late=0.3, duplicate=0.1)).run(seeds=5)
    assert report.ok, str(report)
    for point in ("before-commit", "after-commit", "in-flight", "result-uncommitted",
                  "store-failure"):
        assert report.counts.get(f"crash:{point}", 0) > 0, point
    assert report.counts["results:late"] > 0
    assert report.counts["results:duplicate"] > 0
    assert report.counts["duplicate submits"] > 0
    assert report.counts["starts"] == report.counts["crashes"] + report.counts["seeds"]


def test_invariants_only_misses_what_the_framework_checks_catch() -> None:
    # The Runtime's rollback hides a non-atomic stf; only the atomicity check reports it.
    report = desk_sim(MutatesThenRaises(), invariants=[stock_is_conserved],
                      checks=Checks.invariants_only(), rollback="reload").run(seeds=5)
    assert report.ok, str(report)
    assert report.checks == "invariants"


@pytest.mark.parametrize("rollback", ["trust", "reload", "trust-rejected"])
@pytest.mark.parametrize("determinism", [True, False])
def test_atomicity_is_checked_under_rollback(rollback: Rollback, determinism: bool) -> None:
    # Without the determinism check there is no cached pre-state: "trust" rebuilds the last
    # accepted state from the store to compare, "reload" compares with what the reload gave.
    report = desk_sim(MutatesThenRaises(), rollback=rollback,
                      checks=Checks(determinism=determinism)).run()
    assert report.failures[0].check == "atomicity"
    # At the first refusal that mutated, whatever the policy ("trust-rejected" trusts a
    # Rejected, so the check must not compare with what the engine kept).
    first = desk_sim(MutatesThenRaises(), rollback="trust",
                     checks=Checks(determinism=determinism)).run().failures[0]
    assert report.failures[0].step == first.step
    assert report.counts.get("reloads", 0) == (1 if rollback == "reload" else 0)


@pytest.mark.parametrize("rollback", ["reload", "copy"])
def test_correct_desk_passes_under_the_other_rollbacks(rollback: Rollback) -> None:
    report = desk_sim(invariants=[stock_is_conserved], rollback=rollback).run(seeds=4)
    assert report.ok, str(report)
    if rollback == "reload":
        assert report.counts["reloads"] == report.counts["rejections"] > 0


def test_refused_result_is_a_liveness_failure_when_absorbed_is_off() -> None:
    class RefusesLost(DeskMachine):
        def complete(self, state, order_id, result, actions):  # type: ignore[no-untyped-def]
            from tests.testing.machines import Lost, UnknownOrder

            if isinstance(result, Lost):
                raise UnknownOrder("lost shipments are not my problem")
            super().complete(state, order_id, result, actions)

    report = desk_sim(RefusesLost(), checks=Checks(absorbed=False, restore=False)).run()
    failure = report.failures[0]
    assert failure.check == "liveness", str(failure)
    assert "refused at step" in failure.message
    report = desk_sim(RefusesLost()).run()
    assert report.failures[0].check == "absorbed"


# -- the seed's README machine -------------------------------------------------------------------

BALANCE = 10_000


def payment_inputs(rng: object, state: PaymentSystem) -> Process:
    import random

    assert isinstance(rng, random.Random)
    return Process(amount=rng.randint(1, 300), user=rng.choice(["ada", "bo", "cy"]))


def balance_matches_confirmed(state: PaymentSystem) -> str | None:
    confirmed = sum(p.amount for p in state.pending.values() if p.status is Status.CONFIRMED)
    if state.balance != BALANCE - confirmed:
        return f"balance {state.balance} != {BALANCE} - confirmed {confirmed}"
    return None


def ids_from_counter(state: PaymentSystem) -> bool:
    return all(0 <= i < state.next_id for i in state.pending)


def no_overdraft(state: PaymentSystem) -> str | None:
    return f"balance {state.balance} < 0" if state.balance < 0 else None


def payment_sim(**options: object) -> Simulation[PaymentSystem, Process]:
    return Simulation(
        PaymentMachine(),
        initial_state=PaymentSystem(balance=BALANCE),
        inputs=payment_inputs,  # type: ignore[arg-type]
        executors={Charge: Weighted((Success(), 9), (Failed("card declined"), 1)),
                   CheckStatus: lambda action: Success()},
        **options,  # type: ignore[arg-type]
    )


def test_seed_payment_machine_passes() -> None:
    report = payment_sim(invariants=[balance_matches_confirmed, ids_from_counter]).run(seeds=10)
    assert report.ok, str(report)


def test_seed_payment_machine_overdraws_and_the_simulation_says_so() -> None:
    # The seed checks the balance when a payment starts but takes the money when it succeeds,
    # so concurrent payments overdraw (in Rust, u64 underflow). Kept as a documented finding.
    report = payment_sim(invariants=[no_overdraft]).run()
    assert report.failures[0].check == "invariant"
    assert "no_overdraft: balance -" in report.failures[0].message


def test_seed_payment_machine_is_not_idempotent_for_duplicated_results() -> None:
    # Completed payments stay in ``pending`` and a second Success debits again: harmless in the
    # fasm Runtime (in-process executors never deliver twice), a bug under at-least-once delivery.
    report = payment_sim(faults=FaultPlan.at_least_once()).run()
    assert report.failures[0].check == "duplicates"
    assert "balance" in report.failures[0].message


# -- durable timers and the coffee shop ----------------------------------------------------------


def test_durable_timers_fire_from_the_simulated_clock_and_survive_crashes() -> None:
    sim = Simulation(ReminderMachine(), initial_state=Reminders, inputs=reminder_inputs,
                     invariants=[fired_on_time], faults=FaultPlan(crash=0.1))
    report = sim.run(seeds=5)
    assert report.ok, str(report)
    assert report.counts["results:timer"] > 0
    assert report.counts["crashes"] > 0


def test_coffee_shop_careless_gift_is_caught() -> None:
    coffee = pytest.importorskip("examples.coffee_shop")
    names = ["ada", "bo", "cy"]

    def inputs(rng: object, state: object) -> object:
        import random

        assert isinstance(rng, random.Random)
        r = rng.random()
        if r < 0.6:
            return coffee.BuyCoffee(rng.choice(names))
        if r < 0.85:
            return coffee.RedeemFreeCoffee(rng.choice(names))
        return coffee.GiftPoints(rng.choice(names), rng.choice([*names, "zoe"]), 10)

    sim = Simulation(
        coffee.LoyaltyMachine(), initial_state=coffee.LoyaltyApp, inputs=inputs,
        executors={coffee.Redeem: Weighted((coffee.Approved("FREE-1"), 9),
                                           (coffee.Declined("out of beans"), 1))})
    report = sim.run()
    assert report.failures[0].check == "atomicity", str(report)
    assert "GiftPoints" in report.failures[0].message


def test_a_machine_class_is_what_the_runtime_hosts() -> None:
    # The simulation accepts exactly the machine objects the Runtime does.
    assert isinstance(DeskMachine(), StateMachine)
