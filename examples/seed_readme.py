"""The Rust crate's README example (PaymentSystem), in fasm, almost line for line.

Run it: ``python examples/seed_readme.py``. tests/core/test_seed_readme.py runs it too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum

from fasm import (
    ActionsContainer,
    Input,
    Normal,
    Rejected,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
)
from fasm.runtime import ActionContext, Runtime


class Status(Enum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    FAILED = "failed"


@dataclass
class Payment:
    amount: int
    user: str
    status: Status


@dataclass
class PaymentSystem:
    balance: int
    pending: dict[int, Payment] = field(default_factory=dict)
    next_id: int = 0


@dataclass(frozen=True)
class Process:
    amount: int
    user: str


PaymentInput = Process


@dataclass(frozen=True)
class Charge:
    amount: int


@dataclass(frozen=True)
class CheckStatus:
    id: int


PaymentRequest = Charge | CheckStatus


@dataclass(frozen=True)
class Success:
    pass


@dataclass(frozen=True)
class Failed:
    reason: str


PaymentResult = Success | Failed


@dataclass(frozen=True)
class Notification:
    user: str
    message: str


class InsufficientFunds(Rejected):
    pass


class NotFound(Rejected):
    pass


Actions = ActionsContainer[int, PaymentRequest, Notification]


class PaymentMachine(
    StateMachine[PaymentSystem, PaymentInput, int, PaymentRequest, PaymentResult, Notification]
):
    async def stf(
        self, state: PaymentSystem, input: Input[PaymentInput, int, PaymentResult],
        actions: Actions,
    ) -> None:
        match input:
            case Normal(Process(amount=amount, user=user)):
                # 1. Validate
                if state.balance < amount:
                    raise InsufficientFunds(f"balance {state.balance} < {amount}")

                # 2. Prepare (no mutation yet)
                id = state.next_id

                # 3. Fallible operations first
                actions.add(Tracked(id, Charge(amount)))

                # 4. Mutate state (point of no return)
                state.next_id += 1
                state.pending[id] = Payment(amount, user, Status.PENDING)

            case TrackedActionCompleted(id=id, result=result):
                payment = state.pending.get(id)
                if payment is None:
                    raise NotFound(f"no payment {id}")

                match result:
                    case Success():
                        state.balance -= payment.amount
                        payment.status = Status.CONFIRMED
                    case Failed(reason=_):
                        payment.status = Status.FAILED

    async def restore(self, state: PaymentSystem, actions: Actions) -> None:
        for id, payment in state.pending.items():
            if payment.status == Status.PENDING:
                actions.add(Tracked(id, CheckStatus(id)))


async def main() -> PaymentSystem:
    """Drive the machine through the Runtime with a real (in-process) card executor."""

    async def charge(action: Charge, ctx: ActionContext) -> PaymentResult:
        return Success() if action.amount <= 500 else Failed("card declined")

    async def check(action: CheckStatus, ctx: ActionContext) -> PaymentResult:
        return Success()

    async def notify(n: Notification) -> None:
        print(f"notify {n.user}: {n.message}")

    runtime = Runtime(
        PaymentMachine(),
        initial_state=PaymentSystem(balance=1_000),
        executors={Charge: charge, CheckStatus: check},
        handlers={Notification: notify},
    )
    async with runtime as rt:
        for amount in (100, 700, 5_000):
            try:
                committed = await rt.submit(Process(amount=amount, user="ada"))
                print(f"process {amount}: committed at seq {committed.seq}")
            except InsufficientFunds as e:
                print(f"process {amount}: rejected ({e})")
        await rt.wait_idle()
        print(f"balance {rt.state.balance}, payments "
              f"{ {i: p.status.value for i, p in rt.state.pending.items()} }")
        return rt.state


if __name__ == "__main__":
    asyncio.run(main())
