"""Machines for the gaps of issue 16: a small wallet that charges a card (tracked), holds funds
until an expiry timer (tracked) and sends refunds (untracked), and broken versions of it, each
with the one bug a check must flag. Written apart from tests/testing/machines.py, so that the
toolkit is tried on machines it was not tuned on."""

from __future__ import annotations

import random
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
class Wallet:
    next_id: int = 1
    charging: dict[int, int] = field(default_factory=dict)  # charge id -> amount
    holds: dict[int, float] = field(default_factory=dict)  # hold id -> expiry time
    balance: int = 0
    charged: int = 0
    declined: int = 0
    refunded: int = 0


@dataclass(frozen=True)
class Pay:
    amount: int


@dataclass(frozen=True)
class Hold:
    seconds: float


@dataclass(frozen=True)
class Refund:
    amount: int


WalletInput = Pay | Hold | Refund


@dataclass(frozen=True)
class Charge:
    amount: int


WalletAction = Charge | Timer


@dataclass(frozen=True)
class Charged:
    pass


@dataclass(frozen=True)
class Declined:
    pass


WalletResult = Charged | Declined | TimerFired


@dataclass(frozen=True)
class SendRefund:
    amount: int


class NoFunds(Rejected):
    pass


Actions = ActionsContainer[int, WalletAction, SendRefund]
WalletIn = Input[WalletInput, int, WalletResult]


class WalletMachine(StateMachine[Wallet, WalletInput, int, WalletAction, WalletResult,
                                 SendRefund]):
    """Correct: every charge and hold gets a fresh id; results and expiries remove them."""

    machine_name = "tests.testing.WalletMachine"

    async def stf(self, state: Wallet, input: WalletIn, actions: Actions) -> None:
        match input:
            case Normal(Pay(amount=amount)):
                charge_id = self.new_id(state)
                state.charging[charge_id] = amount
                actions.add(Tracked(charge_id, Charge(amount)))
            case Normal(Hold(seconds=seconds)):
                hold_id = self.new_id(state)
                at = round(seconds, 3)
                state.holds[hold_id] = at
                actions.add(Tracked(hold_id, Timer(at=at)))
            case Normal(Refund(amount=amount)):
                if amount > state.balance:
                    raise NoFunds(f"{amount} > {state.balance}")
                self.refund(state, amount)
                # Fire-and-forget: a crash between the commit and the handler loses it.
                actions.add(Untracked(SendRefund(amount)))
            case TrackedActionCompleted(id=done_id, result=TimerFired()):
                state.holds.pop(done_id, None)
            case TrackedActionCompleted(id=done_id, result=Charged()):
                if done_id in state.charging:
                    amount = state.charging.pop(done_id)
                    state.balance += amount
                    state.charged += amount
            case TrackedActionCompleted(id=done_id, result=Declined()):
                self.declined(state, done_id, actions)

    def refund(self, state: Wallet, amount: int) -> None:
        state.balance -= amount
        state.refunded += amount

    def new_id(self, state: Wallet) -> int:
        new = state.next_id
        state.next_id += 1
        return new

    def declined(self, state: Wallet, charge_id: int, actions: Actions) -> None:
        if state.charging.pop(charge_id, None) is not None:
            state.declined += 1

    async def restore(self, state: Wallet, actions: Actions) -> None:
        for charge_id, amount in state.charging.items():
            actions.add(Tracked(charge_id, Charge(amount)))
        for hold_id, at in state.holds.items():
            actions.add(Tracked(hold_id, Timer(at=at)))


class ForgetsCharges(WalletMachine):
    """restore forgets pending charges: liveness catches it with the restore check off."""

    async def restore(self, state: Wallet, actions: Actions) -> None:
        for hold_id, at in state.holds.items():
            actions.add(Tracked(hold_id, Timer(at=at)))


class ForgetsTimers(WalletMachine):
    """restore forgets the expiry timers: liveness catches it with the restore check off."""

    async def restore(self, state: Wallet, actions: Actions) -> None:
        for charge_id, amount in state.charging.items():
            actions.add(Tracked(charge_id, Charge(amount)))


class DeclineKeepsPending(WalletMachine):
    """A declined charge is counted but stays in ``charging``: pending forever (restore re-sends
    it after every restart). State changes, so ``absorbed`` holds; liveness must flag it at
    the first decline."""

    def declined(self, state: Wallet, charge_id: int, actions: Actions) -> None:
        state.declined += 1


class ReusesIds(WalletMachine):
    """Ids from the number of pending charges: a new charge can take the id of one in flight."""

    def refund(self, state: Wallet, amount: int) -> None:
        state.balance -= amount
        state.refunded += amount

    def new_id(self, state: Wallet) -> int:
        return len(state.charging) + len(state.holds) + 1


class RareDoubleRefund(WalletMachine):
    """A refund of exactly 7 after a decline is taken from the balance twice: rare, so found
    late in a run, but three inputs and two results reproduce it (a shrinking benchmark)."""

    def refund(self, state: Wallet, amount: int) -> None:
        super().refund(state, amount)
        if amount == 7 and state.declined:
            state.balance -= amount


def books_balance(state: Wallet) -> object:
    """The invariant: what was charged and not refunded is the balance."""
    return state.balance == state.charged - state.refunded or (
        f"balance {state.balance} != charged {state.charged} - refunded {state.refunded}")


def wallet_inputs(rng: random.Random, state: Wallet) -> WalletInput:
    roll = rng.random()
    if roll < 0.5:
        return Pay(rng.randint(1, 20))
    if roll < 0.7:
        return Hold(rng.uniform(1.0, 30.0))
    return Refund(rng.randint(1, 10))


class RetriesDeclines(WalletMachine):
    """Correct too: a declined charge is tried again under a new id, so a result emits new work
    (during the liveness phase as well)."""

    def declined(self, state: Wallet, charge_id: int, actions: Actions) -> None:
        amount = state.charging.pop(charge_id, None)
        if amount is not None:
            state.declined += 1
            again = self.new_id(state)
            state.charging[again] = amount
            actions.add(Tracked(again, Charge(amount)))


# -- a heartbeat that re-arms its timer under the same id, for ever (correct) ---------------------


@dataclass
class Beats:
    armed_at: float | None = None
    beats: int = 0
    pokes: int = 0


@dataclass(frozen=True)
class Arm:
    pass


@dataclass(frozen=True)
class Poke:
    pass


BeatInput = Arm | Poke
BeatActions = ActionsContainer[str, Timer, None]


class HeartbeatMachine(StateMachine[Beats, BeatInput, str, Timer, TimerFired]):
    """Correct: one timer, id ``"beat"``, re-armed every 10 s when it fires, so there is always
    work pending and it always completes."""

    machine_name = "tests.testing.HeartbeatMachine"

    async def stf(self, state: Beats, input: Input[BeatInput, str, TimerFired],
                  actions: BeatActions) -> None:
        match input:
            case Normal(Arm()):
                if state.armed_at is None:
                    state.armed_at = 10.0
                    actions.add(Tracked("beat", Timer(at=10.0)))
            case Normal(Poke()):
                state.pokes += 1
            case TrackedActionCompleted(result=TimerFired(now=now)):
                state.beats += 1
                state.armed_at = round(now + 10.0, 3)
                actions.add(Tracked("beat", Timer(at=state.armed_at)))

    async def restore(self, state: Beats, actions: BeatActions) -> None:
        if state.armed_at is not None:
            actions.add(Tracked("beat", Timer(at=state.armed_at)))


def beat_inputs(rng: random.Random, state: Beats) -> BeatInput:
    return Arm() if rng.random() < 0.1 else Poke()
