"""Simulated steps per second: fasm.testing's Simulation vs a plain loop, in the same run.

    python bench/bench_simulation.py [--quick]

For each machine, three ways of running the same input source and the same invariants:

* ``plain loop``: the seed README's loop, by hand: draw an input (or complete a random pending
  tracked action), call ``stf``, call the invariants. No engine, no store, no faults, no checks.
* ``engine + codec + store, by hand``: the same loop through what the simulation cannot skip
  (input validation, the engine, a journal entry through the codec, a MemoryStore write): the
  floor under the simulation, measured to show which part of the cost is the simulation's own.
* ``sim, invariants only``: ``Simulation(checks=Checks.invariants_only())`` with the default
  fault plan: the real engine, journal writes through the codec into a MemoryStore, crashes and
  restarts with replay and restore, executor failures and retries, the invariants after every step.
* ``sim, all checks``: the same with every check (atomicity, determinism by re-execution, restore
  completeness after every commit, results absorbed, liveness ...).

Two more rows show where the time goes: ``reload`` runs the engine with ``rollback="reload"``,
the Runtime's default (a store reload and replay after each refused input; the simulation's
default is ``"trust"``), and ``no faults`` runs ``FaultPlan.none()`` (no crashes, restarts or
retries).

Machines: the seed README's PaymentMachine (a tiny stf and a one-line invariant), the coffee shop
(when examples/coffee_shop.py is there) and a clinic booking machine defined below (a larger state,
an stf that searches a calendar, invariants that look at every slot). Nothing is asserted; the
target is "invariants only" at >= 50% of the plain loop, and the ratio column says where it lands.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fasm import (
    ActionList,
    ActionsContainer,
    Input,
    Normal,
    Rejected,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
)
from fasm.persistence import Journal, MemoryStore
from fasm.persistence._codec import Codec
from fasm.persistence._durability import Writer
from fasm.runtime import Rollback
from fasm.runtime._engine import Accepted, Engine
from fasm.testing import Checks, FaultPlan, Simulation, Weighted

# -- a larger machine: clinic bookings ------------------------------------------------------------

DAYS, ROOMS, HOURS, PRICE = 7, 10, 10, 80


def slot_name(day: int, room: int, hour: int) -> str:
    return f"d{day}-r{room:02d}-h{hour:02d}"


@dataclass
class Booking:
    user: str
    slot: str
    status: str  # "held" (payment authorizing), "confirmed", "cancelling" (refund running)


@dataclass
class Clinic:
    slots: dict[str, int] = field(default_factory=dict)  # slot -> booking id
    bookings: dict[int, Booking] = field(default_factory=dict)
    actions: dict[int, tuple[str, int]] = field(default_factory=dict)  # tracked id -> (kind, id)
    next_id: int = 1
    revenue: int = 0
    refunds: int = 0


@dataclass(frozen=True)
class Book:
    user: str
    day: int
    earliest: int
    latest: int


@dataclass(frozen=True)
class Cancel:
    booking: int


@dataclass(frozen=True)
class Authorize:
    booking: int
    amount: int


@dataclass(frozen=True)
class Refund:
    booking: int
    amount: int


@dataclass(frozen=True)
class Approved:
    pass


@dataclass(frozen=True)
class Declined:
    reason: str


@dataclass(frozen=True)
class Refunded:
    pass


class NoSlot(Rejected):
    pass


class NotCancellable(Rejected):
    pass


class UnknownAction(Rejected):
    pass


ClinicInput = Book | Cancel
ClinicAction = Authorize | Refund
ClinicResult = Approved | Declined | Refunded
ClinicActions = ActionsContainer[int, ClinicAction, Any]


class ClinicMachine(StateMachine[Clinic, ClinicInput, int, ClinicAction, ClinicResult]):
    machine_name = "bench.ClinicMachine"

    async def stf(self, state: Clinic, input: Input[ClinicInput, int, ClinicResult],
                  actions: ClinicActions) -> None:
        match input:
            case Normal(Book(user=user, day=day, earliest=earliest, latest=latest)):
                slot = next((s for hour in range(earliest, latest + 1) for room in range(ROOMS)
                             if (s := slot_name(day, room, hour)) not in state.slots), None)
                if slot is None:
                    raise NoSlot(f"day {day} is full between {earliest} and {latest}")
                booking, tracked = state.next_id, state.next_id + 1
                actions.add(Tracked(tracked, Authorize(booking, PRICE)))
                state.next_id += 2
                state.slots[slot] = booking
                state.bookings[booking] = Booking(user, slot, "held")
                state.actions[tracked] = ("authorize", booking)
            case Normal(Cancel(booking=booking)):
                found = state.bookings.get(booking)
                if found is None or found.status != "confirmed":
                    raise NotCancellable(f"booking {booking} is not confirmed")
                tracked = state.next_id
                actions.add(Tracked(tracked, Refund(booking, PRICE)))
                state.next_id += 1
                found.status = "cancelling"
                state.actions[tracked] = ("refund", booking)
            case TrackedActionCompleted(id=tracked, result=result):
                entry = state.actions.pop(tracked, None)
                if entry is None:
                    raise UnknownAction(f"action {tracked} is not pending")
                booking_id = entry[1]
                booking = state.bookings[booking_id]
                match result:
                    case Approved():
                        booking.status = "confirmed"
                        state.revenue += PRICE
                    case Declined() | Refunded():
                        if isinstance(result, Refunded):
                            state.refunds += PRICE
                        del state.slots[booking.slot]
                        del state.bookings[booking_id]

    async def restore(self, state: Clinic, actions: ClinicActions) -> None:
        for tracked, (kind, booking) in state.actions.items():
            actions.add(Tracked(tracked, Authorize(booking, PRICE) if kind == "authorize"
                                else Refund(booking, PRICE)))


def no_double_booking(state: Clinic) -> str | None:
    for slot, booking in state.slots.items():
        if state.bookings[booking].slot != slot:
            return f"slot {slot} points at booking {booking}, which holds another slot"
    if len(state.slots) != len(state.bookings):
        return f"{len(state.slots)} slots held by {len(state.bookings)} bookings"
    return None


def revenue_matches(state: Clinic) -> str | None:
    paid = sum(PRICE for b in state.bookings.values() if b.status != "held")
    if state.revenue - state.refunds != paid:
        return f"revenue {state.revenue} - refunds {state.refunds} != {paid}"
    return None


def actions_match_bookings(state: Clinic) -> str | None:
    for tracked, (kind, booking) in state.actions.items():
        expected = "held" if kind == "authorize" else "cancelling"
        if state.bookings[booking].status != expected:
            return f"action {tracked} ({kind}) for a booking that is {expected!r}"
    return None


USERS = [f"user{i}" for i in range(40)]


def clinic_inputs(rng: random.Random, state: Clinic) -> ClinicInput:
    if rng.random() < 0.8:
        earliest = rng.randrange(HOURS)
        return Book(rng.choice(USERS), rng.randrange(DAYS), earliest,
                    min(HOURS - 1, earliest + rng.randrange(4)))
    return Cancel(rng.randrange(1, max(2, state.next_id)))


# -- the seed machine and the coffee shop ---------------------------------------------------------


def payment_case() -> Case:
    from examples.seed_readme import (
        Charge,
        CheckStatus,
        Failed,
        PaymentMachine,
        PaymentSystem,
        Process,
        Status,
        Success,
    )

    balance = 10**9

    def inputs(rng: random.Random, state: PaymentSystem) -> Process:
        return Process(amount=rng.randint(1, 300), user=rng.choice(["ada", "bo", "cy"]))

    def balance_matches_confirmed(state: PaymentSystem) -> str | None:
        confirmed = sum(p.amount for p in state.pending.values() if p.status is Status.CONFIRMED)
        return None if state.balance == balance - confirmed else "balance drifted"

    return Case("seed PaymentMachine", PaymentMachine(), lambda: PaymentSystem(balance=balance),
                inputs, {Charge: Weighted((Success(), 9), (Failed("declined"), 1)),
                         CheckStatus: Weighted((Success(), 1))},
                [balance_matches_confirmed])


def coffee_case() -> Case | None:
    try:
        import examples.coffee_shop as shop
    except ImportError:
        return None
    names = [f"c{i}" for i in range(20)]

    def inputs(rng: random.Random, state: Any) -> Any:
        r = rng.random()
        if r < 0.7:
            return shop.BuyCoffee(rng.choice(names))
        if r < 0.9:
            return shop.RedeemFreeCoffee(rng.choice(names))
        # Gifts only between known customers: the example's deliberately careless branch (a gift
        # to a stranger mutates, then raises) would stop the all-checks run at once.
        known = [n for n in names if n in state.customers] or [names[0]]
        return shop.GiftPoints(rng.choice(known), rng.choice(known), 10)

    def points_never_negative(state: Any) -> str | None:
        bad = [n for n, c in state.customers.items() if c.points < 0]
        return f"negative points: {bad}" if bad else None

    return Case("coffee shop", shop.LoyaltyMachine(), shop.LoyaltyApp, inputs,
                {shop.Redeem: Weighted((shop.Approved("FREE"), 9), (shop.Declined("no"), 1))},
                [points_never_negative])


def clinic_case() -> Case:
    return Case("clinic bookings (larger)", ClinicMachine(), Clinic, clinic_inputs,
                {Authorize: Weighted((Approved(), 9), (Declined("card"), 1)),
                 Refund: Weighted((Refunded(), 1))},
                [no_double_booking, revenue_matches, actions_match_bookings])


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    machine: StateMachine[Any, Any, Any, Any, Any, Any]
    initial: Callable[[], Any]
    inputs: Callable[[random.Random, Any], Any]
    executors: dict[type[Any], Weighted[Any]]
    invariants: Sequence[Callable[[Any], object]]


def _run(coro: Any) -> None:
    _result(coro)


def _result(coro: Any) -> Any:
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("a coroutine suspended")


def plain_loop(case: Case, seeds: int, steps: int) -> tuple[int, float]:
    """The loop a user would write by hand: input or result, stf, invariants."""
    done = 0
    start = time.perf_counter()
    for seed in range(seeds):
        rng = random.Random(seed)
        state, actions = case.initial(), ActionList[Any, Any, Any]()
        pending: list[Tracked[Any, Any]] = []
        for _ in range(steps):
            if pending and rng.random() < 0.5:
                tracked = pending.pop(rng.randrange(len(pending)))
                spec = next(w for t, w in case.executors.items()
                            if isinstance(tracked.action, t))
                inp: Any = TrackedActionCompleted(tracked.id, spec.sample(rng))
            else:
                inp = Normal(case.inputs(rng, state))
            actions.clear()
            try:
                _run(case.machine.stf(state, inp, actions))
            except Rejected:
                pass
            pending.extend(a for a in actions if isinstance(a, Tracked))
            for invariant in case.invariants:
                verdict = invariant(state)
                if verdict is not None and verdict is not True:
                    raise AssertionError(verdict)
            done += 1
    return done, time.perf_counter() - start


def production_path(case: Case, seeds: int, steps: int) -> tuple[int, float]:
    """The plain loop plus what the simulation cannot skip: input validation, the engine, a
    journal entry through the codec, a MemoryStore write, the engine's commit bookkeeping (no
    faults, no events, no checks). The floor under the simulation's own cost."""
    codec = Codec(type(case.machine))
    validator = Engine(case.machine, state=None)
    validator.validate(case.inputs(random.Random(0), case.initial()))  # build the validator
    done = 0
    start = time.perf_counter()
    for seed in range(seeds):
        rng = random.Random(seed)
        engine = Engine(case.machine, state=case.initial(), rollback="trust")
        writer = Writer(codec, Journal(min_checkpoint_bytes=1024))
        store = MemoryStore()
        _run(store.open())
        _run(store.acquire("bench"))
        pending: list[Tracked[Any, Any]] = []
        for i in range(steps):
            if pending and rng.random() < 0.5:
                tracked = pending.pop(rng.randrange(len(pending)))
                spec = next(w for t, w in case.executors.items()
                            if isinstance(tracked.action, t))
                inp: Any = TrackedActionCompleted(tracked.id, spec.sample(rng))
            else:
                inp = Normal(validator.validate(case.inputs(rng, engine.state)))
            step = _result(engine.step(inp))
            done += 1
            if not isinstance(step, Accepted):
                continue
            for invariant in case.invariants:
                verdict = invariant(engine.state)
                if verdict is not None and verdict is not True:
                    raise AssertionError(verdict)
            encoded = writer.encode([(step.seq, step.input, None)])
            checkpoint = (codec.encode_checkpoint(step.seq, engine.state, {})
                          if i == 0 or writer.checkpoint_due(encoded) else None)
            plan = writer.plan(engine.committed_seq, step.seq, encoded, checkpoint)
            _run(store.commit("bench", expected_seq=plan.expected_seq, seq=plan.seq,
                              entries=plan.entries, checkpoint=plan.checkpoint))
            writer.written(plan)
            pending.extend(engine.committed([step]).tracked)
    return done, time.perf_counter() - start


def simulated(case: Case, seeds: int, steps: int, checks: Checks, faults: FaultPlan,
              rollback: Rollback = "trust") -> tuple[int, float]:
    sim = Simulation(case.machine, initial_state=case.initial, inputs=case.inputs,
                     executors=case.executors, invariants=case.invariants, checks=checks,
                     faults=faults, rollback=rollback)
    sim.run(seeds=1, steps=20, base_seed=10_000)  # warm up: validators and codec adapters
    report = sim.run(seeds=seeds, steps=steps)
    if not report.ok:
        raise AssertionError(str(report))
    return report.counts["steps"], report.elapsed


def best_of(n: int, fn: Callable[[], tuple[int, float]]) -> tuple[int, float]:
    results = []
    for _ in range(n):
        gc.collect()
        results.append(fn())
    return min(results, key=lambda r: r[1] / r[0])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, one repetition")
    args = parser.parse_args(argv)
    seeds, steps, reps = (3, 300, 1) if args.quick else (10, 500, 3)
    cases = [c for c in (payment_case(), coffee_case(), clinic_case()) if c is not None]
    only, every = Checks.invariants_only(), Checks()
    modes: list[tuple[str, Checks | str | None, FaultPlan, Rollback]] = [
        ("plain loop", None, FaultPlan(), "trust"),
        ("engine + codec + store, by hand", "bare", FaultPlan(), "trust"),
        ("sim, invariants only", only, FaultPlan(), "trust"),
        ("sim, invariants only, reload", only, FaultPlan(), "reload"),
        ("sim, invariants only, no faults", only, FaultPlan.none(), "trust"),
        ("sim, all checks", every, FaultPlan(), "trust"),
    ]
    print(f"{seeds} seeds x {steps} steps per row, best of {reps}; Python "
          f"{sys.version.split()[0]}")
    print(f"{'machine':<26} {'mode':<32} {'steps':>7} {'seconds':>8} {'steps/s':>9} "
          f"{'vs plain':>9}")
    for case in cases:
        base = 0.0
        for mode, checks, faults, rollback in modes:
            def measure(case: Case = case, checks: Checks | str | None = checks,
                        faults: FaultPlan = faults, rollback: Rollback = rollback
                        ) -> tuple[int, float]:
                if checks is None:
                    return plain_loop(case, seeds, steps)
                if isinstance(checks, str):
                    return production_path(case, seeds, steps)
                return simulated(case, seeds, steps, checks, faults, rollback)

            n, seconds = best_of(reps, measure)
            rate = n / seconds
            if checks is None:
                base = rate
            print(f"{case.name:<26} {mode:<32} {n:>7} {seconds:>8.3f} {rate:>9,.0f} "
                  f"{rate / base:>8.0%}")


if __name__ == "__main__":
    main()
