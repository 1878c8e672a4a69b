"""The payments machine of examples/payments, adapted for HTTP: each payment remembers the
request that made it.

The machine is the same (reserve the amount, record a pending payment, emit a tracked ``Charge``;
the result confirms it or releases the credit; ``restore`` re-sends a ``CheckStatus`` under the
same action id for every pending payment), and it reuses that example's actions, results and
refusals. What HTTP adds is the client's ``Idempotency-Key``: ``Pay`` carries it, the state maps
it to the payment id, so a retried POST learns the id of the payment its first attempt made,
however long ago that was (the runtime's own submit window remembers a bounded number of keys;
this map is part of the state and never forgets). There are no untracked actions: the service
answers the client itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Never

from examples.payments.machine import (
    AccountExists,
    Charge,
    Charged,
    CheckStatus,
    Declined,
    InsufficientCredit,
    Payment,
    PaymentRequest,
    PaymentResult,
    UnknownAccount,
)
from fasm import (
    ActionsContainer,
    Input,
    Normal,
    Rejected,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
)

__all__ = (
    "AccountExists", "Charge", "Charged", "CheckStatus", "Declined", "InsufficientCredit",
    "KeyReused", "OpenAccount", "Pay", "Payment", "PaymentRequest", "PaymentResult", "Payments",
    "PaymentsMachine", "UnknownAccount",
)


@dataclass
class Payments:
    credit: dict[str, int] = field(default_factory=dict)
    payments: dict[int, Payment] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)  # Idempotency-Key -> payment id
    next_id: int = 0


@dataclass(frozen=True)
class OpenAccount:
    account: str
    credit: int


@dataclass(frozen=True)
class Pay:
    account: str
    amount: int
    request: str  # the client's Idempotency-Key


PaymentInput = OpenAccount | Pay


class KeyReused(Rejected):
    """An Idempotency-Key already used for a different payment."""


Actions = ActionsContainer[int, PaymentRequest, Never]


class PaymentsMachine(StateMachine[Payments, PaymentInput, int, PaymentRequest, PaymentResult]):
    """Validate, reserve, charge; confirm or release. A request key seen before is a no-op."""

    machine_name = "examples.payments_http"

    async def stf(
        self, state: Payments, input: Input[PaymentInput, int, PaymentResult], actions: Actions
    ) -> None:
        match input:
            case Normal(OpenAccount(account, credit)):
                if account in state.credit:
                    raise AccountExists(account)
                state.credit[account] = credit
            case Normal(Pay(account, amount, request)):
                if request in state.requests:  # a retry the runtime's window has forgotten
                    first = state.payments[state.requests[request]]
                    if (first.account, first.amount) != (account, amount):
                        raise KeyReused(f"Idempotency-Key {request!r} was used for another "
                                        "payment")
                    return
                available = state.credit.get(account)
                if available is None:
                    raise UnknownAccount(account)
                if amount <= 0 or amount > available:
                    raise InsufficientCredit(f"{account}: {amount} requested, {available} left")
                pid = state.next_id
                actions.add(Tracked(pid, Charge(account, amount)))
                state.next_id += 1
                state.credit[account] = available - amount
                state.payments[pid] = Payment(account, amount)
                state.requests[request] = pid
            case TrackedActionCompleted(pid, result):
                payment = state.payments.get(pid)
                if payment is None or payment.status != "pending":
                    raise Rejected(f"no pending payment {pid}")  # a late duplicate: ignore
                match result:
                    case Charged(txn):
                        payment.status, payment.txn = "confirmed", txn
                    case Declined():
                        payment.status = "declined"
                        state.credit[payment.account] += payment.amount

    async def restore(self, state: Payments, actions: Actions) -> None:
        for pid, payment in state.payments.items():
            if payment.status == "pending":
                actions.add(Tracked(pid, CheckStatus(payment.account, payment.amount)))
