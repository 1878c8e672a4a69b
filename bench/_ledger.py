"""The benchmark workload: a payments ledger (accounts with balances, pending payments, a counter).

Each ``Pay`` validates the balance, records a pending payment under an id taken from the counter,
and (with ``track=True``) emits a tracked charge whose result settles the payment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fasm import (
    ActionsContainer,
    Input,
    Normal,
    Rejected,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
)


@dataclass
class Ledger:
    balances: dict[int, int]
    pending: dict[int, int] = field(default_factory=dict)  # payment id -> amount
    next_id: int = 0


@dataclass(frozen=True)
class Pay:
    account: int
    amount: int
    track: bool = False


@dataclass(frozen=True)
class Charge:
    account: int
    amount: int


@dataclass(frozen=True)
class Charged:
    ok: bool


class Insufficient(Rejected):
    pass


Actions = ActionsContainer[int, Charge, None]


class LedgerMachine(StateMachine[Ledger, Pay, int, Charge, Charged]):
    async def stf(self, state: Ledger, input: Input[Pay, int, Charged], actions: Actions) -> None:
        match input:
            case Normal(Pay(account, amount, track)):
                balance = state.balances.get(account)
                if balance is None or balance < amount:
                    raise Insufficient(f"account {account}")
                pid = state.next_id
                if track:
                    actions.add(Tracked(pid, Charge(account, amount)))
                state.next_id = pid + 1
                state.balances[account] = balance - amount
                state.pending[pid] = amount
            case TrackedActionCompleted(pid, Charged(ok)):
                amount = state.pending.pop(pid)
                if not ok:
                    state.balances[pid % len(state.balances)] += amount

    async def restore(self, state: Ledger, actions: Actions) -> None:
        for pid, amount in state.pending.items():
            actions.add(Tracked(pid, Charge(pid, amount)))


def new_ledger(accounts: int) -> Ledger:
    return Ledger(balances=dict.fromkeys(range(accounts), 10**12))
