"""The bank machine: one instance per account key, transfers between keys by message.

Each account (key ``acct-42``) has a balance. ``Deposit`` adds to it. ``Transfer`` debits now and
emits a tracked :class:`~fasm.Send` that credits the other account; the receiver answers
:class:`~fasm.Delivered` once its credit is durable, or :class:`~fasm.Refused` when it refused
it (a frozen account), and the sender refunds. ``Withdraw`` debits now and emits a tracked
``Dispense`` to the cash machine (an executor, the outside world); the result records the cash as
paid out. Every send and dispense is kept in the state while in flight, so ``restore`` emits them
again after a crash: the receiver deduplicates the message durably, the cash machine by the
action's idempotency key.

Money is conserved at every committed step, across all accounts (:func:`money`): what the
accounts hold (balances, cash being dispensed or paid out) is never more than was deposited, and
never less than that minus the transfers in transit; with nothing in transit, it is exactly what
was deposited. (A transfer in transit may or may not be credited yet: the sender learns it from
``Delivered``. Keeping the state small, no account remembers each message it applied: the
runtime does that, bounded, in its idempotency keys.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Never

from fasm import (
    ActionsContainer,
    Delivered,
    Input,
    Refused,
    Rejected,
    Send,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
)


@dataclass(frozen=True)
class Deposit:
    amount: int


@dataclass(frozen=True)
class Transfer:
    """Move ``amount`` to account ``to``; ``id`` is unique per sending account."""

    id: str
    to: str
    amount: int


@dataclass(frozen=True)
class Withdraw:
    """Pay ``amount`` out in cash; ``id`` is unique per account."""

    id: str
    amount: int


@dataclass(frozen=True)
class Freeze:
    """From now on the account refuses credits (transfers to it are refunded)."""


@dataclass(frozen=True)
class Credit:
    """The message a transfer sends: ``amount`` from account ``source`` (transfer ``id``)."""

    id: str
    source: str
    amount: int


BankInput = Deposit | Transfer | Withdraw | Freeze | Credit


@dataclass(frozen=True)
class Dispense:
    """Tracked: the cash machine pays ``amount`` out of account ``account``."""

    id: str
    account: str
    amount: int


@dataclass(frozen=True)
class Dispensed:
    id: str


BankAction = Send[Credit] | Dispense
BankResult = Delivered | Refused | Dispensed


@dataclass
class Account:
    key: str
    balance: int = 0
    frozen: bool = False
    deposited: int = 0
    sending: dict[str, Send[Credit]] = field(default_factory=dict)  # transfer id -> in flight
    dispensing: dict[str, Dispense] = field(default_factory=dict)  # withdrawal id -> in flight
    paid_out: int = 0
    received: int = 0  # credits applied (each message once)
    refunded: int = 0


def open_account(key: str) -> Account:
    """The initial-state factory: every key starts as an empty account of that name."""
    return Account(key)


class Bank(StateMachine[Account, BankInput, str, BankAction, BankResult, Never]):
    """Accounts with deposits, transfers between keys and cash withdrawals."""

    @staticmethod
    async def stf(state: Account, input: Input[BankInput, str, BankResult],
                  actions: ActionsContainer[str, BankAction, Never]) -> None:
        if isinstance(input, TrackedActionCompleted):
            result = input.result
            if isinstance(result, Dispensed):
                done = state.dispensing.pop(input.id, None)
                if done is not None:
                    state.paid_out += done.amount
                return
            send = state.sending.pop(input.id, None)
            if send is not None and isinstance(result, Refused):
                state.balance += send.input.amount
                state.refunded += send.input.amount
            return
        value = input.value
        if isinstance(value, Deposit):
            if value.amount <= 0:
                raise Rejected(f"deposit of {value.amount}: must be positive")
            state.balance += value.amount
            state.deposited += value.amount
        elif isinstance(value, Credit):
            if state.frozen:
                raise Rejected(f"{state.key} is frozen")
            state.balance += value.amount
            state.received += value.amount
        elif isinstance(value, Freeze):
            state.frozen = True
        else:
            if value.amount <= 0:
                raise Rejected(f"amount {value.amount}: must be positive")
            if value.amount > state.balance:
                raise Rejected(f"{state.key} has {state.balance}, not {value.amount}")
            if value.id in state.sending or value.id in state.dispensing:
                raise Rejected(f"{value.id} is already in flight")
            state.balance -= value.amount
            if isinstance(value, Transfer):
                send = Send(value.to, Credit(value.id, state.key, value.amount))
                state.sending[value.id] = send
                actions.add(Tracked(value.id, send))
            else:
                dispense = Dispense(value.id, state.key, value.amount)
                state.dispensing[value.id] = dispense
                actions.add(Tracked(value.id, dispense))

    @staticmethod
    async def restore(state: Account, actions: ActionsContainer[str, BankAction, Never]) -> None:
        for id, send in state.sending.items():
            actions.add(Tracked(id, send))
        for id, dispense in state.dispensing.items():
            actions.add(Tracked(id, dispense))


class Money(NamedTuple):
    """Money across a set of accounts (see :func:`money`)."""

    held: int
    """Balances, plus cash being dispensed or paid out."""
    in_transit: int
    """Transfers debited at the sender and not yet confirmed ``Delivered`` to it: each is
    either still to be credited or credited already (the sender does not know yet)."""
    deposited: int

    def conserved(self) -> bool:
        """No money was made or lost: ``held <= deposited <= held + in_transit``, so with
        nothing in transit, ``held == deposited``."""
        return self.held <= self.deposited <= self.held + self.in_transit


def money(accounts: Iterable[Account]) -> Money:
    """The :class:`Money` of ``accounts``, which must include every key that took part."""
    held = in_transit = deposited = 0
    for a in accounts:
        held += a.balance + sum(d.amount for d in a.dispensing.values()) + a.paid_out
        in_transit += sum(s.input.amount for s in a.sending.values())
        deposited += a.deposited
    return Money(held, in_transit, deposited)
