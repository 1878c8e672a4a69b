"""The payments machine: the seed's PaymentSystem grown into a small service.

Accounts have credit; ``Pay`` reserves the amount, records a pending payment under an id from the
counter, and emits a tracked ``Charge`` to the card provider. The result confirms the payment or,
when declined, releases the reservation. After a crash, ``restore`` asks the provider about every
pending payment (``CheckStatus``) instead of charging again, as in the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fasm import (
    ActionsContainer,
    Input,
    Normal,
    Rejected,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
    Untracked,
)

Status = Literal["pending", "confirmed", "declined"]


@dataclass
class Payment:
    account: str
    amount: int
    status: Status = "pending"
    txn: str | None = None


@dataclass
class Payments:
    credit: dict[str, int] = field(default_factory=dict)
    payments: dict[int, Payment] = field(default_factory=dict)
    next_id: int = 0


@dataclass(frozen=True)
class OpenAccount:
    account: str
    credit: int


@dataclass(frozen=True)
class Pay:
    account: str
    amount: int


PaymentInput = OpenAccount | Pay


@dataclass(frozen=True)
class Charge:
    account: str
    amount: int


@dataclass(frozen=True)
class CheckStatus:
    """Ask the provider what became of a charge sent before a crash (charge it if it never
    arrived). Same action id, so the same idempotency key as the original charge."""

    account: str
    amount: int


PaymentRequest = Charge | CheckStatus


@dataclass(frozen=True)
class Charged:
    txn: str


@dataclass(frozen=True)
class Declined:
    reason: str


PaymentResult = Charged | Declined


@dataclass(frozen=True)
class Notify:
    account: str
    message: str


class UnknownAccount(Rejected):
    pass


class InsufficientCredit(Rejected):
    pass


class AccountExists(Rejected):
    pass


Actions = ActionsContainer[int, PaymentRequest, Notify]


class PaymentsMachine(
    StateMachine[Payments, PaymentInput, int, PaymentRequest, PaymentResult, Notify]
):
    """Validate, reserve, charge; confirm or release."""

    machine_name = "examples.payments"

    async def stf(
        self, state: Payments, input: Input[PaymentInput, int, PaymentResult], actions: Actions
    ) -> None:
        match input:
            case Normal(OpenAccount(account, credit)):
                if account in state.credit:
                    raise AccountExists(account)
                state.credit[account] = credit
            case Normal(Pay(account, amount)):
                available = state.credit.get(account)
                if available is None:
                    raise UnknownAccount(account)
                if amount <= 0 or amount > available:
                    raise InsufficientCredit(f"{account}: {amount} requested, {available} left")
                pid = state.next_id
                actions.add(Tracked(pid, Charge(account, amount)))
                actions.add(Untracked(Notify(account, f"payment {pid} of {amount} processing")))
                state.next_id += 1
                state.credit[account] = available - amount
                state.payments[pid] = Payment(account, amount)
            case TrackedActionCompleted(pid, result):
                payment = state.payments.get(pid)
                if payment is None or payment.status != "pending":
                    raise Rejected(f"no pending payment {pid}")  # a late duplicate: ignore
                match result:
                    case Charged(txn):
                        payment.status, payment.txn = "confirmed", txn
                        actions.add(Untracked(Notify(payment.account,
                                                     f"payment {pid} confirmed ({txn})")))
                    case Declined(reason):
                        payment.status = "declined"
                        state.credit[payment.account] += payment.amount
                        actions.add(Untracked(Notify(payment.account,
                                                     f"payment {pid} declined: {reason}")))

    async def restore(self, state: Payments, actions: Actions) -> None:
        for pid, payment in state.payments.items():
            if payment.status == "pending":
                actions.add(Tracked(pid, CheckStatus(payment.account, payment.amount)))


def check_invariants(state: Payments, opened: dict[str, int]) -> None:
    """Credit left plus what is pending or confirmed equals what each account opened with."""
    for account, initial in opened.items():
        used = sum(p.amount for p in state.payments.values()
                   if p.account == account and p.status != "declined")
        assert state.credit[account] + used == initial, f"{account}: credit does not add up"
    assert all(pid < state.next_id for pid in state.payments), "an id ahead of the counter"
