"""A small ledger machine used across the runtime tests: charges (tracked), timers (tracked,
built-in), notes (untracked), an input that mutates and then raises, and one that re-emits a
pending id."""

from __future__ import annotations

from dataclasses import dataclass, field

from fasm import (
    ActionsContainer,
    Input,
    Normal,
    Rejected,
    StateMachine,
    Timer,
    TimerFired,
    Tracked,
    TrackedActionCompleted,
    Untracked,
)


@dataclass
class Pending:
    account: str
    amount: int


@dataclass
class Ledger:
    balances: dict[str, int] = field(default_factory=dict)
    pending: dict[int, Pending] = field(default_factory=dict)
    applied: dict[int, int] = field(default_factory=dict)  # id -> how often a result was applied
    timers: dict[int, float] = field(default_factory=dict)
    woke: list[int] = field(default_factory=list)
    next_id: int = 0


@dataclass(frozen=True)
class Deposit:
    account: str
    amount: int


@dataclass(frozen=True)
class Pay:
    account: str
    amount: int


@dataclass(frozen=True)
class Explode:
    """Mutates state, then raises: the runtime must roll it back."""

    account: str


@dataclass(frozen=True)
class SetTimer:
    at: float


@dataclass(frozen=True)
class Reemit:
    """Emits a pending charge again under the same id (must not dispatch twice)."""

    id: int


@dataclass(frozen=True)
class Shout:
    text: str


LedgerInput = Deposit | Pay | Explode | SetTimer | Reemit | Shout


@dataclass(frozen=True)
class Charge:
    account: str
    amount: int


@dataclass(frozen=True)
class Charged:
    ok: bool


@dataclass(frozen=True)
class Note:
    text: str


class Insufficient(Rejected):
    pass


class UnknownId(Rejected):
    pass


Actions = ActionsContainer[int, Charge | Timer, Note]


class LedgerMachine(StateMachine[Ledger, LedgerInput, int, Charge | Timer, Charged | TimerFired,
                                 Note]):
    async def stf(self, state: Ledger, input: Input[LedgerInput, int, Charged | TimerFired],
                  actions: Actions) -> None:
        match input:
            case Normal(Deposit(account, amount)):
                state.balances[account] = state.balances.get(account, 0) + amount
            case Normal(Pay(account, amount)):
                if state.balances.get(account, 0) < amount:
                    raise Insufficient(f"{account} has {state.balances.get(account, 0)}")
                pid = state.next_id
                actions.add(Tracked(pid, Charge(account, amount)))
                actions.add(Untracked(Note(f"paying {amount} from {account}")))
                state.next_id += 1
                state.balances[account] -= amount
                state.pending[pid] = Pending(account, amount)
            case Normal(Explode(account)):
                state.balances[account] = -10**9
                state.next_id += 1000
                raise RuntimeError("boom after mutating")
            case Normal(SetTimer(at)):
                tid = state.next_id
                state.next_id += 1
                state.timers[tid] = at
                actions.add(Tracked(tid, Timer(at)))
            case Normal(Reemit(pid)):
                p = state.pending[pid]
                actions.add(Tracked(pid, Charge(p.account, p.amount)))
            case Normal(Shout(text)):
                actions.add(Untracked(Note(text)))
            case TrackedActionCompleted(id, Charged(ok)):
                p = state.pending.pop(id, None)
                if p is None:
                    raise UnknownId(f"no pending charge {id}")
                if not ok:
                    state.balances[p.account] += p.amount
                state.applied[id] = state.applied.get(id, 0) + 1
            case TrackedActionCompleted(id, TimerFired()):
                if state.timers.pop(id, None) is None:
                    raise UnknownId(f"no timer {id}")
                state.woke.append(id)

    async def restore(self, state: Ledger, actions: Actions) -> None:
        for pid, p in state.pending.items():
            actions.add(Tracked(pid, Charge(p.account, p.amount)))
        for tid, at in state.timers.items():
            actions.add(Tracked(tid, Timer(at)))
