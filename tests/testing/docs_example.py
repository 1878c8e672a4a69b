"""The code that docs/04_testing.md quotes, and the runs whose output it shows.

tests/testing/test_docs.py checks that every quoted block is in this file and that every output
block in the page is what these functions print today. Run it to see them:
``python -m tests.testing.docs_example``.
"""

from __future__ import annotations

import dataclasses
import random

from examples.seed_readme import (
    Actions,
    Charge,
    CheckStatus,
    Failed,
    NotFound,
    PaymentMachine,
    PaymentSystem,
    Process,
    Status,
    Success,
)
from fasm import Input, Normal, TrackedActionCompleted
from fasm.runtime import RetryPolicy
from fasm.testing import FaultPlan, SimExecutor, Simulation, Weighted, simulation_test

# -- a first simulation: the seed README's machine -------------------------------------------------


def payments(rng: random.Random, state: PaymentSystem) -> Process:
    return Process(amount=rng.randint(1, 300), user=rng.choice(["ada", "bo", "cy"]))


def no_overdraft(state: PaymentSystem) -> str | None:
    if state.balance < 0:
        return f"balance is {state.balance}"
    return None


sim = Simulation(
    PaymentMachine(),
    initial_state=PaymentSystem(balance=5_000),
    inputs=payments,
    executors={
        Charge: Weighted((Success(), 9), (Failed("card declined"), 1)),
        CheckStatus: lambda action: Success(),
    },
    invariants=[no_overdraft],
)

# -- the fix: reserve the money when the payment starts -------------------------------------------


class ReservingPaymentMachine(PaymentMachine):
    async def stf(self, state: PaymentSystem, input: Input[Process, int, Success | Failed],
                  actions: Actions) -> None:
        match input:
            case Normal(Process(amount=amount)):
                await super().stf(state, input, actions)  # validates, emits, records
                state.balance -= amount  # reserved now, not when the card says yes
            case TrackedActionCompleted(id=id, result=result):
                payment = state.pending.get(id)
                if payment is None or payment.status is not Status.PENDING:
                    raise NotFound(f"no pending payment {id}")  # a late duplicate, say
                match result:
                    case Success():
                        payment.status = Status.CONFIRMED
                    case Failed():
                        payment.status = Status.FAILED
                        state.balance += payment.amount  # released


def balance_adds_up(state: PaymentSystem) -> str | None:
    held = sum(p.amount for p in state.pending.values() if p.status is not Status.FAILED)
    if state.balance + held != 5_000:
        return f"balance {state.balance} + held {held} != 5000"
    return None


def fixed_simulation(faults: FaultPlan | None = None) -> Simulation[PaymentSystem, Process]:
    return Simulation(
        ReservingPaymentMachine(),
        initial_state=PaymentSystem(balance=5_000),
        inputs=payments,
        executors={
            Charge: SimExecutor(
                Weighted((Success(), 9), (Failed("card declined"), 1)),
                retry=RetryPolicy(max_attempts=3, timeout=5.0),
                on_exhausted=lambda action, error: Failed(f"gave up: {error}"),
            ),
            CheckStatus: lambda action: Success(),
        },
        invariants=[no_overdraft, balance_adds_up],
        faults=faults,
    )


# -- pytest ---------------------------------------------------------------------------------------


@simulation_test(seeds=20, steps=200)
def test_payments_simulation() -> Simulation[PaymentSystem, Process]:
    return fixed_simulation(FaultPlan.at_least_once())


# -- the outputs the page shows -------------------------------------------------------------------


def first_failure() -> str:
    report = sim.run(seeds=20, steps=200)
    assert report.failures
    return str(report.failures[0])


def fixed_counts() -> str:
    report = fixed_simulation().run(seeds=10, steps=200)
    assert report.ok, str(report)
    return "\n".join(str(report).splitlines()[1:])  # the first line has timings


def duplicated_results() -> Simulation[PaymentSystem, Process]:
    return Simulation(
        PaymentMachine(),
        initial_state=PaymentSystem(balance=5_000),
        inputs=payments,
        executors={Charge: lambda action: Success(), CheckStatus: lambda action: Success()},
        faults=dataclasses.replace(FaultPlan.none(), duplicate=0.5),
    )


def shrunk_failure() -> str:
    failure = duplicated_results().shrink(steps=10, max_examples=50)
    assert failure is not None
    return str(failure)


OUTPUTS = {
    "first_failure": first_failure,
    "fixed_counts": fixed_counts,
    "shrunk_failure": shrunk_failure,
}

if __name__ == "__main__":
    for name, make in OUTPUTS.items():
        print(f"== {name}\n{make()}\n")
