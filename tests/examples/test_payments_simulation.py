"""Simulation suites for the payments demo's machine (examples/payments/machine.py), the one the
README's kill demo runs.

The invariants: credit left plus what is pending or confirmed equals what each account opened
with (the example's own ``check_invariants``), and no payment is confirmed twice (every confirmed
payment carries the transaction id of exactly one charge, and no transaction id is shared). The
at-least-once suite delivers results twice and late, which is how a second confirmation would
happen; the toolkit's *duplicates* check also holds every result for a payment that is no longer
pending to "refused or changes nothing".

    pytest tests/examples/test_payments_simulation.py -s                       # counts
    pytest tests/examples/test_payments_simulation.py -s --fasm-budget 300     # long
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from examples.payments.machine import (
    Actions,
    Charge,
    Charged,
    CheckStatus,
    Declined,
    InsufficientCredit,
    OpenAccount,
    Pay,
    PaymentInput,
    PaymentResult,
    Payments,
    PaymentsMachine,
    check_invariants,
)
from fasm import Input, Normal, Rejected, TrackedActionCompleted
from fasm.runtime import RetryPolicy
from fasm.testing import FaultPlan, SeedResult, SimExecutor, Simulation
from tests.examples._sim_suite import SuiteReport, count_lines, run_suite

OPENING = {"ada": 5_000, "bob": 3_000, "cyd": 4_000, "dee": 800}


def customers(rng: random.Random, state: Payments) -> PaymentInput:
    """Open the accounts (again, sometimes: refused), then pay from them, some beyond credit."""
    unopened = [a for a in OPENING if a not in state.credit]
    if (unopened and rng.random() < 0.5) or rng.random() < 0.02:
        account = rng.choice(unopened or list(OPENING))
        return OpenAccount(account, OPENING[account])
    return Pay(rng.choice(list(OPENING)), rng.randint(1, 150))


def credit_adds_up(state: Payments) -> None:
    check_invariants(state, {a: OPENING[a] for a in state.credit})


def no_overdraft(state: Payments) -> str | None:
    overdrawn = {a: c for a, c in state.credit.items() if c < 0}
    return f"overdrawn: {overdrawn}" if overdrawn else None


def no_payment_confirmed_twice(state: Payments) -> str | None:
    seen: dict[str, int] = {}
    for pid, p in state.payments.items():
        if (p.status == "confirmed") != (p.txn is not None):
            return f"payment {pid} is {p.status} with txn {p.txn!r}"
        if p.txn is not None:
            if p.txn in seen:
                return f"payments {seen[p.txn]} and {pid} were confirmed by one charge {p.txn}"
            seen[p.txn] = pid
    return None


def provider(decline: float) -> SimExecutor[Charge | CheckStatus, PaymentResult]:
    """The simulated card provider, with the demo's retry policy (retries without end, each
    attempt bounded by a timeout). Every successful charge gets its own transaction id."""

    def answer(action: Charge | CheckStatus, rng: random.Random) -> PaymentResult:
        if rng.random() < decline:
            return Declined("card declined")
        return Charged(f"txn-{rng.getrandbits(48):012x}")

    return SimExecutor(answer, retry=RetryPolicy(initial_backoff=0.05, max_backoff=1.0,
                                                 timeout=5.0))


def payments_sim(*, decline: float = 0.05, faults: FaultPlan | None = None,
                 machine: PaymentsMachine | None = None,
                 steps: int = 300) -> Simulation[Payments, PaymentInput]:
    charge = provider(decline)
    return Simulation(
        machine or PaymentsMachine(),
        initial_state=Payments,
        inputs=customers,
        executors={Charge: charge, CheckStatus: charge},
        invariants=[credit_adds_up, no_overdraft, no_payment_confirmed_twice],
        faults=faults,
        steps=steps,
    )


def tally(state: Payments, result: SeedResult) -> Mapping[str, int]:
    statuses = [p.status for p in state.payments.values()]
    return {
        "payments": len(statuses),
        "confirmed": statuses.count("confirmed"),
        "declined": statuses.count("declined"),
        "pending": statuses.count("pending"),
        "over credit": count_lines(result, "refused: InsufficientCredit("),
        "duplicate results refused": count_lines(result, "refused: Rejected('no pending payment"),
    }


FIELDS = ("payments", "confirmed", "declined", "over credit", "duplicate results refused")


def suite(request: pytest.FixtureRequest, name: str, *, seeds: int, decline: float = 0.05,
          faults: FaultPlan | None = None) -> SuiteReport:
    report = run_suite(request, payments_sim(decline=decline, faults=faults), tally,
                       name=name, seeds=seeds, keep_trace=True)
    print("\n" + report.line(FIELDS))
    # Liveness: the simulation ends with faults off and runs every pending charge to its end.
    assert report["pending"] == 0
    return report


def test_default_faults(request: pytest.FixtureRequest) -> None:
    r = suite(request, "payments, default faults", seeds=15)
    if r.full:
        assert r["confirmed"] > r["declined"] > 0 and r["over credit"] and r["crashes"]


def test_results_delivered_twice_and_late(request: pytest.FixtureRequest) -> None:
    """At-least-once delivery: a charge's result arrives twice, or after a restart that already
    re-sent it as CheckStatus. The second one must be refused, never confirm again."""
    r = suite(request, "payments, at-least-once results", seeds=15,
              faults=FaultPlan.at_least_once())
    if r.full:
        assert r["duplicate results refused"] > 0 and r["confirmed"]


def test_flaky_provider(request: pytest.FixtureRequest) -> None:
    """A third of the attempts fail and one in ten hangs to its timeout: retries, forever."""
    r = suite(request, "payments, flaky provider", seeds=10,
              faults=FaultPlan(fail=0.3, timeout=0.1))
    if r.full:
        assert r["retries"] > r["payments"] / 4


def test_crashes_throughout(request: pytest.FixtureRequest) -> None:
    r = suite(request, "payments, crashes throughout", seeds=10,
              faults=FaultPlan(crash=0.12, store_failure=0.02))
    if r.full:
        assert r["crashes"] > r["confirmed"] / 4 and r["resent"]


def test_half_the_cards_declined(request: pytest.FixtureRequest) -> None:
    """Declines release the reserved credit: with half declined, credit must still add up."""
    r = suite(request, "payments, 50% declined", seeds=10, decline=0.5)
    if r.full:
        assert 0.35 < r["declined"] / (r["declined"] + r["confirmed"]) < 0.65


# -- the checks find the bug they are for ---------------------------------------------------------


class ConfirmsAnyResult(PaymentsMachine):
    """Applies a result even when the payment is no longer pending: a duplicated Declined after
    a Charged releases the credit of a confirmed payment; a second Charged confirms again."""

    async def stf(self, state: Payments, input: Input[PaymentInput, int, PaymentResult],
                  actions: Actions) -> None:
        match input:
            case TrackedActionCompleted(id=pid, result=result) if pid in state.payments:
                payment = state.payments[pid]
                match result:
                    case Charged(txn):
                        payment.status, payment.txn = "confirmed", txn
                    case Declined():
                        if payment.status != "declined":
                            state.credit[payment.account] += payment.amount
                        payment.status, payment.txn = "declined", None
            case _:
                await super().stf(state, input, actions)


class OverdrawsALittle(PaymentsMachine):
    """Lets a payment go up to 50 over the credit left (a "grace" nobody asked for)."""

    async def stf(self, state: Payments, input: Input[PaymentInput, int, PaymentResult],
                  actions: Actions) -> None:
        match input:
            case Normal(Pay(account, amount)) if 0 < amount - state.credit.get(account, amount) \
                    <= 50:
                state.credit[account] += 50  # let the real stf accept it ...
                await super().stf(state, input, actions)
                state.credit[account] -= 50  # ... and take the grace back: the account is short
            case _:
                await super().stf(state, input, actions)


@pytest.mark.parametrize(
    ("machine", "faults", "check"),
    [
        (ConfirmsAnyResult(), FaultPlan.at_least_once(), "duplicates"),
        (OverdrawsALittle(), FaultPlan(), "invariant"),
    ],
    ids=["confirms-any-result", "overdraws"],
)
def test_the_simulation_finds_the_bug(machine: PaymentsMachine, faults: FaultPlan,
                                      check: str) -> None:
    report = payments_sim(machine=machine, faults=faults).run(seeds=40)
    assert report.failures, "no seed found the bug"
    assert report.failures[0].check == check, str(report.failures[0])


def test_insufficient_credit_is_a_refusal_not_a_bug() -> None:
    """The errors check would fail the suites if the machine raised anything but Rejected."""
    assert issubclass(InsufficientCredit, Rejected)
