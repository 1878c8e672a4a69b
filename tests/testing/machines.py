"""Machines for the simulation tests: a correct order desk, and deliberately broken versions of it,
one per rule of docs/02_invariants.md. Each broken class overrides the one piece that breaks its
rule; its docstring says which check must catch it."""

from __future__ import annotations

import random
import time
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
from fasm.testing import Simulation, Weighted

STOCK = 1_000

# -- the correct order desk -----------------------------------------------------------------------


@dataclass
class Order:
    qty: int
    customer: str


@dataclass
class Desk:
    stock: int = STOCK
    next_id: int = 1
    pending: dict[int, Order] = field(default_factory=dict)
    shipped: dict[int, int] = field(default_factory=dict)  # id -> qty
    shipped_total: int = 0
    waiting: set[str] = field(default_factory=set)  # customers waiting for a restock call


@dataclass(frozen=True)
class Place:
    qty: int
    customer: str


@dataclass(frozen=True)
class Wait:
    customer: str


@dataclass(frozen=True)
class CallWaiting:
    pass


DeskInput = Place | Wait | CallWaiting


@dataclass(frozen=True)
class Ship:
    qty: int


@dataclass(frozen=True)
class Call:
    customer: str


DeskAction = Ship | Call


@dataclass(frozen=True)
class Shipped:
    pass


@dataclass(frozen=True)
class Lost:
    reason: str


DeskResult = Shipped | Lost


@dataclass(frozen=True)
class Note:
    text: str


class OutOfStock(Rejected):
    pass


class UnknownOrder(Rejected):
    pass


Actions = ActionsContainer[int, DeskAction, Note]
DeskIn = Input[DeskInput, int, DeskResult]


class DeskMachine(StateMachine[Desk, DeskInput, int, DeskAction, DeskResult, Note]):
    """Orders take stock and ship as tracked actions; a lost shipment returns its stock. Waiting
    customers are called back (one tracked call each) in name order."""

    machine_name = "tests.testing.DeskMachine"

    async def stf(self, state: Desk, input: DeskIn, actions: Actions) -> None:
        match input:
            case Normal(Place(qty=qty, customer=customer)):
                self.place(state, qty, customer, actions)
            case Normal(Wait(customer=customer)):
                state.waiting.add(customer)
            case Normal(CallWaiting()):
                self.call_waiting(state, actions)
            case TrackedActionCompleted(id=order_id, result=result):
                self.complete(state, order_id, result, actions)

    def place(self, state: Desk, qty: int, customer: str, actions: Actions) -> None:
        if qty > state.stock:
            raise OutOfStock(f"{qty} > {state.stock}")
        order_id = state.next_id
        actions.add(Tracked(order_id, Ship(qty)))
        state.next_id += 1
        state.pending[order_id] = Order(qty, customer)
        state.stock -= qty

    def call_waiting(self, state: Desk, actions: Actions) -> None:
        for customer in sorted(state.waiting):
            call_id = state.next_id
            actions.add(Tracked(call_id, Call(customer)))
            state.next_id += 1
            state.pending[call_id] = Order(0, customer)
        state.waiting.clear()

    def complete(self, state: Desk, order_id: int, result: DeskResult, actions: Actions) -> None:
        order = state.pending.get(order_id)
        if order is None:
            raise UnknownOrder(f"order {order_id} is not pending")
        del state.pending[order_id]
        match result:
            case Shipped():
                state.shipped[order_id] = order.qty
                state.shipped_total += order.qty
                actions.add(Untracked(Note(f"{order.customer}: shipped")))
            case Lost():
                state.stock += order.qty

    async def restore(self, state: Desk, actions: Actions) -> None:
        for order_id, order in state.pending.items():
            actions.add(Tracked(order_id, Ship(order.qty) if order.qty else Call(order.customer)))


def stock_is_conserved(state: Desk) -> str | None:
    held = sum(o.qty for o in state.pending.values())
    total = state.stock + held + state.shipped_total
    if total != STOCK:
        return f"stock {state.stock} + pending {held} + shipped {state.shipped_total} != {STOCK}"
    return None


def ids_below_counter(state: Desk) -> bool:
    return all(i < state.next_id for i in [*state.pending, *state.shipped])


CUSTOMERS = ("ada", "bo", "cy", "dee", "eve", "fay")


def desk_inputs(rng: random.Random, state: Desk) -> DeskInput:
    r = rng.random()
    if r < 0.6:
        return Place(rng.randint(1, 40), rng.choice(CUSTOMERS))
    if r < 0.9:
        return Wait(rng.choice(CUSTOMERS))
    return CallWaiting()


def desk_sim(machine: DeskMachine | None = None, **options: object) -> Simulation[Desk, DeskInput]:
    """A simulation of ``machine`` (default: the correct one) with the default fault plan and
    no user invariants unless given (so the framework's checks are what finds a broken one)."""
    options.setdefault("executors", {
        Ship: Weighted((Shipped(), 9), (Lost("truck broke down"), 1)),
        Call: lambda action: Shipped(),
    })
    options.setdefault("inputs", desk_inputs)
    return Simulation(machine or DeskMachine(), initial_state=Desk,
                      **options)  # type: ignore[arg-type]


# -- one broken machine per rule ------------------------------------------------------------------


class MutatesThenRaises(DeskMachine):
    """Rule 1 (atomicity): takes the stock, then finds it was not enough. Caught by
    ``atomicity``."""

    def place(self, state: Desk, qty: int, customer: str, actions: Actions) -> None:
        state.next_id += 1  # reserved an id ...
        if qty > state.stock:
            raise OutOfStock(f"{qty} > {state.stock}")  # ... and raised with it taken
        state.next_id -= 1
        super().place(state, qty, customer, actions)


class EmitsWithoutStoring(DeskMachine):
    """Rule 4: emits the shipment but does not record it as pending. Caught by ``restore``
    (restore cannot re-emit what state does not hold)."""

    def place(self, state: Desk, qty: int, customer: str, actions: Actions) -> None:
        if qty > state.stock:
            raise OutOfStock(f"{qty} > {state.stock}")
        actions.add(Tracked(state.next_id, Ship(qty)))
        state.next_id += 1
        state.stock -= qty


class RandomIds(DeskMachine):
    """Rule 7: the order id comes from ``random``. Caught by ``determinism``."""

    def place(self, state: Desk, qty: int, customer: str, actions: Actions) -> None:
        if qty > state.stock:
            raise OutOfStock(f"{qty} > {state.stock}")
        order_id = random.getrandbits(48)
        actions.add(Tracked(order_id, Ship(qty)))
        state.pending[order_id] = Order(qty, customer)
        state.stock -= qty


class ClockIds(DeskMachine):
    """Rule 7 (and 2): the order id comes from the clock. Caught by ``determinism``."""

    def place(self, state: Desk, qty: int, customer: str, actions: Actions) -> None:
        if qty > state.stock:
            raise OutOfStock(f"{qty} > {state.stock}")
        order_id = time.perf_counter_ns()
        actions.add(Tracked(order_id, Ship(qty)))
        state.pending[order_id] = Order(qty, customer)
        state.stock -= qty


class RestoreForgets(DeskMachine):
    """Rule 5: restore skips big orders. Caught by ``restore`` (lost)."""

    async def restore(self, state: Desk, actions: Actions) -> None:
        for order_id, order in state.pending.items():
            if order.qty <= 30:
                actions.add(Tracked(order_id, Ship(order.qty) if order.qty
                                    else Call(order.customer)))


class RestoreInvents(DeskMachine):
    """Rule 5: restore re-sends shipped orders too. Caught by ``restore`` (invented)."""

    async def restore(self, state: Desk, actions: Actions) -> None:
        await super().restore(state, actions)
        for order_id, qty in state.shipped.items():
            actions.add(Tracked(order_id, Ship(qty)))


class IgnoresLost(DeskMachine):
    """Rule 6: a lost shipment is logged and nothing else: the order stays pending. Caught by
    ``absorbed``."""

    def complete(self, state: Desk, order_id: int, result: DeskResult, actions: Actions) -> None:
        if isinstance(result, Lost):
            actions.add(Untracked(Note(f"order {order_id} lost: {result.reason}")))
            return
        super().complete(state, order_id, result, actions)


class CallsInSetOrder(DeskMachine):
    """Rule 2: calls waiting customers in set order, so ids depend on string hashing and the
    set's history. Caught by ``determinism``."""

    def call_waiting(self, state: Desk, actions: Actions) -> None:
        for customer in state.waiting:
            call_id = state.next_id
            actions.add(Tracked(call_id, Call(customer)))
            state.next_id += 1
            state.pending[call_id] = Order(0, customer)
        state.waiting.clear()


class CountsDuplicates(DeskMachine):
    """Rule 6, duplicates: a shipment result is counted whether or not the order is still
    pending, so a duplicated delivery ships twice. Caught by ``duplicates`` (with duplicated
    results in the fault plan)."""

    def complete(self, state: Desk, order_id: int, result: DeskResult, actions: Actions) -> None:
        if order_id in state.pending:
            super().complete(state, order_id, result, actions)
        elif isinstance(result, Shipped) and order_id in state.shipped:
            state.shipped_total += state.shipped[order_id]
        else:
            raise UnknownOrder(f"order {order_id} is not pending")


class RaisesKeyError(DeskMachine):
    """An stf that fails with a bug (KeyError) instead of a Rejected. Caught by ``errors``."""

    def complete(self, state: Desk, order_id: int, result: DeskResult, actions: Actions) -> None:
        order = state.pending.pop(order_id)  # KeyError for an unknown id
        state.pending[order_id] = order
        super().complete(state, order_id, result, actions)


# -- durable timers -------------------------------------------------------------------------------


@dataclass
class Reminders:
    next_id: int = 1
    pending: dict[int, float] = field(default_factory=dict)  # id -> due time
    fired: list[tuple[float, float]] = field(default_factory=list)  # (due, fired at)


@dataclass(frozen=True)
class RemindAt:
    at: float


class ReminderMachine(StateMachine[Reminders, RemindAt, int, Timer, TimerFired]):
    """Durable timers: each reminder is a ``Timer`` tracked action recorded in state."""

    machine_name = "tests.testing.ReminderMachine"

    async def stf(self, state: Reminders, input: Input[RemindAt, int, TimerFired],
                  actions: ActionsContainer[int, Timer, object]) -> None:
        match input:
            case Normal(RemindAt(at=at)):
                actions.add(Tracked(state.next_id, Timer(at=at)))
                state.pending[state.next_id] = at
                state.next_id += 1
            case TrackedActionCompleted(id=timer_id, result=TimerFired(at=at, now=now)):
                if state.pending.pop(timer_id, None) is None:
                    raise UnknownOrder(f"timer {timer_id} is not pending")
                state.fired.append((at, now))

    async def restore(self, state: Reminders,
                      actions: ActionsContainer[int, Timer, object]) -> None:
        for timer_id, at in state.pending.items():
            actions.add(Tracked(timer_id, Timer(at=at)))


def fired_on_time(state: Reminders) -> str | None:
    for at, now in state.fired:
        if now < at:
            return f"a timer due at {at} fired at {now}"
    return None


def reminder_inputs(rng: random.Random, state: Reminders) -> RemindAt:
    return RemindAt(at=round(rng.uniform(0.0, 600.0), 3))
