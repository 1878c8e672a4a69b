"""The dentist booking example: the machine called directly, then through the Runtime (on asyncio
and trio), then the demo script.

Directly: each refusal leaves state and actions untouched, auto-selection honours the day and
time preferences in order, results confirm, release and expire, duplicates change nothing,
restore re-emits exactly what is pending. Through the Runtime: the booking flow, many patients
racing for one slot as concurrent submits (exactly one wins), auto-selection under concurrency,
the invariants after a long random sequence (and the same state reloaded from the store), the
payment timeout on a ``ManualClock``, and crash/restart recovery on SQLite.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from examples.dentist_booking import run as demo
from examples.dentist_booking.machine import (
    DURATION,
    PRICE,
    AptType,
    Authorized,
    Booking,
    BookingInput,
    BookingRejected,
    BookPreferred,
    BookSlot,
    Cancel,
    Clinic,
    ClinicResult,
    Day,
    Declined,
    DentistMachine,
    HoursInUse,
    InvalidRequest,
    NoSlotAvailable,
    NotCancellable,
    Notify,
    NotYourRequest,
    OutsideWorkingHours,
    PreAuthorize,
    Preferences,
    SetHours,
    Slot,
    SlotTaken,
    StaleResult,
    TimeRange,
    UnknownRequest,
    VoidAuthorization,
    check_invariants,
    minutes,
    payment_id,
    timeout_id,
)
from examples.dentist_booking.processor import CardProcessor, Inboxes
from examples.dentist_booking.run import ClinicRuntime, Watch, clinic_runtime
from fasm import ActionList, Normal, Timer, TimerFired, Tracked, TrackedActionCompleted, Untracked
from fasm.persistence import MemoryStore, SQLiteStore, Store
from fasm.runtime import ManualClock
from tests.examples._patients import Patients

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_000_000.0  # the clock when the tests start
TIMEOUT = 15 * 60.0  # Clinic's default payment timeout


def at(day: Day, time: str, week: int = 0) -> Slot:
    return Slot(week, day, minutes(time))


def book(user: str, slot: Slot, apt_type: AptType = AptType.CHECKUP, when: float = T0) -> BookSlot:
    return BookSlot(user, apt_type, slot, when)


def prefer(user: str, apt_type: AptType, days: tuple[Day, ...], *times: tuple[str, str],
           week: int = 0, when: float = T0) -> BookPreferred:
    return BookPreferred(user, apt_type,
                         Preferences(week, days, tuple(TimeRange.of(a, b) for a, b in times)),
                         when)


Emitted = list[Tracked[str, Any] | Untracked[Any]]


async def stf(state: Clinic, input: BookingInput | TrackedActionCompleted[str, ClinicResult]
              ) -> Emitted:
    actions: ActionList[str, Any, Any] = ActionList()
    wrapped = input if isinstance(input, TrackedActionCompleted) else Normal(input)
    await DentistMachine().stf(state, wrapped, actions)
    return list(actions)


async def clinic_with(*inputs: BookingInput) -> Clinic:
    state = Clinic()
    for value in inputs:
        await stf(state, value)
    return state


# -- the machine, directly ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_specific_request_holds_the_slot_and_records_what_it_emits() -> None:
    state = Clinic()
    emitted = await stf(state, book("ada", at(Day.MON, "09:00"), AptType.CLEANING))
    deadline = T0 + TIMEOUT
    assert emitted[:2] == [Tracked("payment:1", PreAuthorize(1, "ada", PRICE[AptType.CLEANING])),
                           Tracked("timeout:1", Timer(at=deadline))]
    assert isinstance(emitted[2], Untracked) and isinstance(emitted[2].action, Notify)
    # Both tracked actions are recorded in the transition that emits them.
    request = state.requests[1]
    assert (request.payment, request.timer_armed, request.deadline) == ("pending", True, deadline)
    assert (request.status, request.asked, request.prefs) == ("awaiting_payment",
                                                              at(Day.MON, "09:00"), None)
    assert state.bookings == {1: Booking(at(Day.MON, "09:00"), AptType.CLEANING, "ada", "held")}
    assert (state.next_request_id, state.now) == (2, T0)
    check_invariants(state)


@pytest.mark.anyio
async def test_deadlines_never_go_backwards() -> None:
    """A request stamped earlier than one already seen (another client's clock) is timed from
    the latest time the clinic knows."""
    state = await clinic_with(book("ada", at(Day.MON, "09:00"), when=T0 + 60))
    await stf(state, book("bob", at(Day.MON, "10:00"), when=T0))
    assert state.requests[2].deadline == T0 + 60 + TIMEOUT


REFUSALS: list[tuple[str, Callable[[], BookingInput], type[BookingRejected]]] = [
    ("lunch break", lambda: book("x", at(Day.MON, "12:00")), OutsideWorkingHours),
    ("runs past closing", lambda: book("x", at(Day.MON, "16:30"), AptType.ROOT_CANAL),
     OutsideWorkingHours),
    ("runs into lunch", lambda: book("x", at(Day.MON, "11:30"), AptType.FILLING),
     OutsideWorkingHours),
    ("closed on Sunday", lambda: book("x", at(Day.SUN, "10:00")), OutsideWorkingHours),
    ("before opening", lambda: book("x", at(Day.SAT, "08:45")), OutsideWorkingHours),
    ("off the grid", lambda: book("x", Slot(0, Day.MON, minutes("09:10"))), InvalidRequest),
    ("negative week", lambda: book("x", at(Day.MON, "09:00", week=-1)), InvalidRequest),
    ("no user", lambda: book("", at(Day.TUE, "09:00")), InvalidRequest),
    ("same slot", lambda: book("x", at(Day.MON, "09:00")), SlotTaken),
    ("overlaps its end", lambda: book("x", at(Day.MON, "09:15")), SlotTaken),
    ("overlaps its start", lambda: book("x", at(Day.WED, "14:15"), AptType.CLEANING),
     SlotTaken),
    ("long one over it", lambda: book("x", at(Day.WED, "14:00"), AptType.ROOT_CANAL), SlotTaken),
    ("no preferred day", lambda: BookPreferred("x", AptType.CHECKUP, Preferences(0, ()), T0),
     InvalidRequest),
    ("no room in the window",
     lambda: prefer("x", AptType.FILLING, (Day.MON,), ("11:30", "13:30")), NoSlotAvailable),
    ("closed day only", lambda: prefer("x", AptType.CHECKUP, (Day.SUN,)), NoSlotAvailable),
    ("unknown request", lambda: Cancel(99, "ada", T0), UnknownRequest),
    ("someone else's", lambda: Cancel(1, "bob", T0), NotYourRequest),
    ("already cancelled", lambda: Cancel(3, "cyd", T0), NotCancellable),
    ("strands a booking", lambda: SetHours(Day.MON, (TimeRange.of("10:00", "12:00"),), T0),
     HoursInUse),
    ("overlapping hours", lambda: SetHours(
        Day.TUE, (TimeRange.of("09:00", "12:00"), TimeRange.of("11:00", "13:00")), T0),
     InvalidRequest),
    ("hours off the grid", lambda: SetHours(Day.TUE, (TimeRange(600, 610),), T0),
     InvalidRequest),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("case", "make", "error"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_refusals_change_nothing(case: str, make: Callable[[], BookingInput],
                                       error: type[BookingRejected]) -> None:
    state = await clinic_with(
        book("ada", at(Day.MON, "09:00"), AptType.CLEANING),  # 1: Mon 09:00-09:30
        book("bob", at(Day.WED, "14:30")),  # 2: Wed 14:30-14:45
        book("cyd", at(Day.THU, "10:00")))  # 3, cancelled below
    await stf(state, Cancel(3, "cyd", T0))
    before = copy.deepcopy(state)
    actions: ActionList[str, Any, Any] = ActionList()
    with pytest.raises(error):
        await DentistMachine().stf(state, Normal(make()), actions)
    assert state == before  # validated before anything was mutated
    assert list(actions) == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("taken", "ask", "given"),
    [
        # Days in the order of preference, not of the week.
        ([], prefer("x", AptType.CHECKUP, (Day.WED, Day.TUE)), at(Day.WED, "09:00")),
        # The earliest start inside the preferred time range.
        ([], prefer("x", AptType.CHECKUP, (Day.TUE,), ("14:00", "16:00")), at(Day.TUE, "14:00")),
        # A range that does not start on the grid is rounded up to it.
        ([], prefer("x", AptType.CHECKUP, (Day.TUE,), ("10:10", "11:00")), at(Day.TUE, "10:15")),
        # Skips what is taken: right after it ...
        ([book("a", at(Day.TUE, "15:00"))],
         prefer("x", AptType.ROOT_CANAL, (Day.TUE,), ("15:00", "17:00")), at(Day.TUE, "15:15")),
        # ... keeping the whole appointment inside the range (16:00-17:00 just fits).
        ([book("a", at(Day.TUE, "15:00"), AptType.ROOT_CANAL)],
         prefer("x", AptType.ROOT_CANAL, (Day.TUE,), ("15:00", "17:00")), at(Day.TUE, "16:00")),
        ([book("a", at(Day.TUE, "15:15"), AptType.ROOT_CANAL)],
         prefer("x", AptType.ROOT_CANAL, (Day.TUE,), ("15:00", "17:00"), ("09:00", "10:00")),
         at(Day.TUE, "09:00")),
        # Time ranges in order of preference: the later one first if it has room.
        ([], prefer("x", AptType.CHECKUP, (Day.FRI,), ("16:00", "17:00"), ("09:00", "10:00")),
         at(Day.FRI, "16:00")),
        ([book("a", at(Day.FRI, "16:00"), AptType.ROOT_CANAL)],
         prefer("x", AptType.CHECKUP, (Day.FRI,), ("16:00", "17:00"), ("09:00", "10:00")),
         at(Day.FRI, "09:00")),
        # No 45 minutes in 11:30-14:00 on Monday (lunch, then a root canal): the next day.
        ([book("a", at(Day.MON, "13:00"), AptType.ROOT_CANAL)],
         prefer("x", AptType.FILLING, (Day.MON, Day.TUE), ("11:30", "14:00")),
         at(Day.TUE, "13:00")),
        # The preferred week.
        ([], prefer("x", AptType.CHECKUP, (Day.SAT,), week=3), at(Day.SAT, "09:00", week=3)),
        # Fully booked days are passed over.
        ([prefer(f"a{i}", AptType.ROOT_CANAL, (Day.SAT,)) for i in range(3)],
         prefer("x", AptType.CHECKUP, (Day.SAT, Day.MON), ("09:00", "12:00")),
         at(Day.MON, "09:00")),
    ],
)
async def test_auto_selection_honours_preferences(taken: list[BookingInput], ask: BookPreferred,
                                                  given: Slot) -> None:
    state = await clinic_with(*taken)
    await stf(state, ask)
    request = state.requests[state.next_request_id - 1]
    assert (request.slot, request.prefs, request.asked) == (given, ask.prefs, None)
    assert ask.prefs.admits(given, DURATION[ask.apt_type])
    check_invariants(state)


@pytest.mark.anyio
async def test_an_authorised_payment_confirms_and_the_timer_then_only_disarms() -> None:
    state = await clinic_with(book("ada", at(Day.MON, "09:00")))
    emitted = await stf(state, TrackedActionCompleted("payment:1", Authorized("A1")))
    assert emitted == [Untracked(Notify("ada", "week 0 Mon 09:00 confirmed: checkup"))]
    assert (state.requests[1].status, state.bookings[1].status) == ("confirmed", "confirmed")
    await stf(state, TrackedActionCompleted("timeout:1", TimerFired(T0 + TIMEOUT, T0 + TIMEOUT)))
    assert (state.requests[1].status, state.requests[1].timer_armed) == ("confirmed", False)
    assert state.now == T0 + TIMEOUT  # time also arrives with the timer
    assert state.totals.confirmed == 1
    check_invariants(state)


@pytest.mark.anyio
async def test_a_declined_payment_releases_the_slot_for_someone_else() -> None:
    state = await clinic_with(book("ada", at(Day.MON, "09:00")))
    await stf(state, TrackedActionCompleted("payment:1", Declined("card declined")))
    assert state.requests[1].status == "payment_failed" and state.bookings == {}
    check_invariants(state)
    await stf(state, book("bob", at(Day.MON, "09:00")))
    assert state.bookings[2].user == "bob"
    # The timer still comes back; then the failed request is over and leaves state.
    await stf(state, TrackedActionCompleted("timeout:1", TimerFired(T0 + TIMEOUT, T0 + TIMEOUT)))
    assert 1 not in state.requests and state.totals.payment_failures == 1


@pytest.mark.anyio
async def test_the_timer_expires_a_hold_and_a_late_authorisation_is_voided() -> None:
    state = await clinic_with(book("ada", at(Day.MON, "09:00")))
    await stf(state, TrackedActionCompleted("timeout:1", TimerFired(T0 + TIMEOUT, T0 + TIMEOUT)))
    assert (state.requests[1].status, state.bookings, state.totals.expired) == ("expired", {}, 1)
    emitted = await stf(state, TrackedActionCompleted("payment:1", Authorized("A1")))
    assert emitted == [Untracked(VoidAuthorization(1, "ada", "A1"))]
    assert 1 not in state.requests  # settled: nothing pending, no booking
    check_invariants(state)


@pytest.mark.anyio
async def test_cancelling_a_confirmed_booking_voids_its_authorisation() -> None:
    state = await clinic_with(book("ada", at(Day.MON, "09:00")))
    await stf(state, TrackedActionCompleted("payment:1", Authorized("A1")))
    emitted = await stf(state, Cancel(1, "ada", T0 + 5))
    assert Untracked(VoidAuthorization(1, "ada", "A1")) in emitted
    assert (state.requests[1].status, state.bookings, state.totals.cancelled) == (
        "cancelled", {}, 1)
    await stf(state, book("bob", at(Day.MON, "09:00")))  # free again


@pytest.mark.anyio
@pytest.mark.parametrize(
    "result",
    [TrackedActionCompleted("payment:1", Authorized("A2")),
     TrackedActionCompleted("payment:1", Declined("late")),
     TrackedActionCompleted("timeout:2", TimerFired(0.0, 0.0)),
     TrackedActionCompleted("payment:7", Authorized("A7")),
     TrackedActionCompleted("refund:1", Authorized("A1")),
     TrackedActionCompleted("timeout:1", Authorized("A1"))],
)
async def test_results_that_are_not_pending_change_nothing(
        result: TrackedActionCompleted[str, ClinicResult]) -> None:
    state = await clinic_with(book("ada", at(Day.MON, "09:00")), book("bob", at(Day.TUE, "09:00")))
    await stf(state, TrackedActionCompleted("payment:1", Authorized("A1")))
    await stf(state, TrackedActionCompleted("timeout:2", TimerFired(T0 + TIMEOUT, T0 + TIMEOUT)))
    before = copy.deepcopy(state)
    with pytest.raises((StaleResult, UnknownRequest)):
        await stf(state, result)
    assert state == before


@pytest.mark.anyio
async def test_restore_re_emits_exactly_the_pending_actions() -> None:
    state = await clinic_with(book("ada", at(Day.MON, "09:00")), book("bob", at(Day.MON, "10:00")),
                              book("cyd", at(Day.MON, "11:00")))
    await stf(state, TrackedActionCompleted("payment:1", Authorized("A1")))  # timer 1 left
    await stf(state, TrackedActionCompleted("timeout:2", TimerFired(0, 0)))  # payment 2 left
    actions: ActionList[str, Any, Any] = ActionList()
    await DentistMachine().restore(state, actions)
    deadline = T0 + TIMEOUT
    assert list(actions) == [
        Tracked(timeout_id(1), Timer(deadline)),
        Tracked(payment_id(2), PreAuthorize(2, "bob", PRICE[AptType.CHECKUP])),
        Tracked(payment_id(3), PreAuthorize(3, "cyd", PRICE[AptType.CHECKUP])),
        Tracked(timeout_id(3), Timer(deadline)),
    ]


# -- through the Runtime --------------------------------------------------------------------------


class World:
    """The outside of one test: processor, inboxes, a manual clock, a commit watch, a store."""

    def __init__(self, store: Store | None = None) -> None:
        self.processor = CardProcessor(latency=0.0)
        self.inboxes = Inboxes()
        self.clock = ManualClock(start=T0)
        self.watch = Watch()
        self.store = store if store is not None else MemoryStore()

    def runtime(self, store: Store | None = None) -> ClinicRuntime:
        return clinic_runtime(store or self.store, self.processor, self.inboxes, self.clock,
                              listeners=[self.watch])

    async def until(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(10):
            await self.watch.until(condition)

    async def settle(self, rt: ClinicRuntime) -> None:
        """Wait until nothing is in flight, moving the clock on a second at a time: a retry
        waiting out its backoff on a ManualClock comes due only when the clock is moved."""
        with anyio.fail_after(10):
            while True:
                with anyio.move_on_after(0.02):
                    await rt.wait_idle()
                    return
                self.clock.advance(1.0)


@asynccontextmanager
async def crashing(rt: ClinicRuntime) -> AsyncIterator[ClinicRuntime]:
    """Run ``rt``, then kill it where the block ends: nothing more is committed or answered."""
    with anyio.CancelScope() as crash:
        async with rt:
            yield rt
            crash.cancel()
            await anyio.sleep_forever()
    assert crash.cancelled_caught


@pytest.mark.anyio
async def test_booking_flow_through_the_runtime() -> None:
    world = World()
    async with world.runtime() as rt:
        committed = await rt.submit(book("ada", at(Day.MON, "09:00"), when=world.clock.now()))
        assert (committed.seq, committed.actions[0]) == (
            1, Tracked("payment:1", PreAuthorize(1, "ada", PRICE[AptType.CHECKUP])))
        await rt.wait_idle()  # the payment (not the timer) completes and commits
        assert rt.state.requests[1].status == "confirmed"
        assert set(rt.in_flight) == {"timeout:1"}
        world.clock.advance(TIMEOUT)
        await world.until(lambda: not rt.in_flight)
        assert not rt.state.requests[1].timer_armed
    # The runtime's idempotency key reached the processor: one authorisation, under that key
    # (the store's identity, then machine, key and action id).
    (key,) = world.processor.authorizations
    identity, rest = key.split("/", 1)
    assert identity and rest == "examples.dentist_booking/clinic/payment:1"
    assert world.inboxes.of("ada") == ["week 0 Mon 09:00 held for your checkup; authorising 50.00",
                                       "week 0 Mon 09:00 confirmed: checkup"]


@pytest.mark.anyio
async def test_many_users_one_slot_exactly_one_wins() -> None:
    world = World()
    outcomes: dict[str, str] = {}
    slot = at(Day.TUE, "10:00")

    async with world.runtime() as rt:

        async def ask(user: str, apt_type: AptType) -> None:
            try:
                await rt.submit(book(user, slot, apt_type, world.clock.now()))
                outcomes[user] = "won"
            except SlotTaken:
                outcomes[user] = "taken"

        async with anyio.create_task_group() as tg:  # submitted concurrently
            for i in range(25):
                tg.start_soon(ask, f"p{i:02d}", list(AptType)[i % 4])
        await rt.wait_idle()
        winners = [u for u, o in outcomes.items() if o == "won"]
        assert len(outcomes) == 25 and len(winners) == 1
        (booking,) = rt.state.bookings.values()
        assert (booking.user, booking.slot, booking.status) == (winners[0], slot, "confirmed")
        check_invariants(rt.state)
    assert len(world.processor.authorizations) == 1  # the losers were never charged


@pytest.mark.anyio
async def test_overlapping_requests_racing_never_overlap() -> None:
    """Different slots that overlap each other: the winners are pairwise disjoint and every loser
    was refused because a winner overlaps it."""
    world = World()
    asks = [book(f"p{i}", at(Day.WED, start), apt_type)
            for i, (start, apt_type) in enumerate(
                [("10:00", AptType.ROOT_CANAL), ("10:00", AptType.CHECKUP),
                 ("10:15", AptType.CLEANING), ("10:30", AptType.FILLING),
                 ("10:45", AptType.CHECKUP), ("11:00", AptType.ROOT_CANAL),
                 ("09:30", AptType.FILLING)] * 2)]
    refused: list[BookSlot] = []
    async with world.runtime() as rt:

        async def ask(value: BookSlot) -> None:
            try:
                await rt.submit(value)
            except SlotTaken:
                refused.append(value)

        async with anyio.create_task_group() as tg:
            for value in asks:
                tg.start_soon(ask, value)
        await rt.wait_idle()
        bookings = list(rt.state.bookings.values())
        check_invariants(rt.state)
    assert len(bookings) + len(refused) == len(asks) and bookings and refused
    for loser in refused:
        end = loser.slot.start + DURATION[loser.apt_type]
        assert any(b.slot.start < end and loser.slot.start < b.end for b in bookings)


@pytest.mark.anyio
async def test_auto_selection_under_concurrency_gives_distinct_preferred_slots() -> None:
    world = World()
    results: list[str] = []
    async with world.runtime() as rt:

        async def ask(user: str) -> None:
            try:
                await rt.submit(prefer(user, AptType.CHECKUP, (Day.MON,), ("09:00", "10:00"),
                                       when=world.clock.now()))
                results.append(user)
            except NoSlotAvailable:
                results.append("none")

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(ask, f"p{i}")
        await rt.wait_idle()
        slots = sorted(b.slot.start for b in rt.state.bookings.values())
    assert slots == [minutes(t) for t in ("09:00", "09:15", "09:30", "09:45")]
    assert results.count("none") == 6


@pytest.mark.anyio
async def test_invariants_hold_after_a_random_sequence_and_the_store_agrees() -> None:
    """Three hundred random requests, cancellations and changes of hours, with declined cards
    and the clock moving on (payments expire, timers fire), through the Runtime."""
    store = MemoryStore()
    world = World(store)
    world.processor.declined.update({"p03", "p07"})
    world.processor.silent.add("p05")  # never answers: its holds expire
    rng = random.Random(6)
    patients = Patients()
    refused = 0
    async with world.runtime() as rt:
        for _ in range(300):
            value = replace(patients(rng, rt.state), at=world.clock.now())  # the real clock
            try:
                await rt.submit(value)
            except BookingRejected:
                refused += 1
            check_invariants(rt.state)
            if rng.random() < 0.1:  # time passes: due timers fire (when, is up to the runtime)
                world.clock.advance(rng.uniform(0, TIMEOUT))
        world.clock.advance(TIMEOUT)
        await world.until(lambda: all(r.status != "awaiting_payment"
                                      for r in rt.state.requests.values()))
        world.processor.bank_back.set()  # p05's bank answers at last: those are voided
        await world.settle(rt)
        check_invariants(rt.state)
    # Taken after the stop: a timer that came due while settling may still fire and commit
    # before the runtime has stopped, and the restart must load that too.
    final, seq = copy.deepcopy(rt.state), rt.seq
    totals = final.totals
    assert refused and totals.confirmed and totals.cancelled and totals.payment_failures
    assert totals.expired  # p05's holds
    async with world.runtime(MemoryStore(data=store.data)) as rt:  # what a restart loads
        assert (rt.state, rt.seq) == (final, seq)


@pytest.mark.anyio
async def test_the_payment_timeout_expires_the_hold() -> None:
    world = World()
    world.processor.silent.add("ivy")
    slot = at(Day.FRI, "16:45")
    async with world.runtime() as rt:
        await rt.submit(book("ivy", slot, when=world.clock.now()))
        world.clock.advance(TIMEOUT - 1)
        await anyio.sleep(0.01)
        assert rt.state.requests[1].status == "awaiting_payment"  # not yet
        world.clock.advance(1)
        await world.until(lambda: rt.state.requests[1].status == "expired")
        assert rt.state.bookings == {}
        # The slot is free again: someone else books it and is confirmed.
        await rt.submit(book("joe", slot, when=world.clock.now()))
        await world.until(lambda: rt.state.requests[2].status == "confirmed")
        # Ivy's bank answers at last; her authorisation is voided, the request leaves state.
        world.processor.bank_back.set()
        world.clock.advance(1)  # her attempt timed out; the retry is due
        await world.until(lambda: 1 not in rt.state.requests)
        await rt.wait_idle()
        check_invariants(rt.state)
    assert world.processor.held() == {"joe": PRICE[AptType.CHECKUP]}
    assert world.inboxes.of("ivy")[-1] == "week 0 Fri 16:45 released: the payment took too long"


@pytest.mark.anyio
async def test_a_crash_with_a_payment_in_flight_books_exactly_once(tmp_path: Path) -> None:
    world = World(SQLiteStore(tmp_path / "clinic.db"))
    world.processor.lose_next_answer = True
    async with crashing(world.runtime()) as rt:
        await rt.submit(book("jo", at(Day.SAT, "11:00"), AptType.CLEANING, world.clock.now()))
        await world.processor.answer_lost.wait()  # authorised at the processor, never answered
        at_crash = copy.deepcopy(rt.state)
    assert at_crash.requests[1].status == "awaiting_payment"

    async with world.runtime(SQLiteStore(tmp_path / "clinic.db")) as rt:
        assert rt.seq == 1
        assert rt.in_flight == {"payment:1": PreAuthorize(1, "jo", PRICE[AptType.CLEANING]),
                                "timeout:1": Timer(T0 + TIMEOUT)}
        await rt.wait_idle()
        assert rt.state.requests[1].status == "confirmed"
        check_invariants(rt.state)
    # Sent twice (before the crash and by restore) under one idempotency key: one authorisation.
    assert world.processor.calls == 2
    assert len(world.processor.authorizations) == 1

    async with world.runtime(SQLiteStore(tmp_path / "clinic.db")) as rt:  # nothing left to pay
        assert set(rt.in_flight) == {"timeout:1"}


@pytest.mark.anyio
async def test_the_timer_survives_a_crash(tmp_path: Path) -> None:
    """The process dies while a payment hangs and stays down past the deadline: on restart,
    restore re-arms the timer, it fires at once, and the hold expires."""
    world = World(SQLiteStore(tmp_path / "clinic.db"))
    world.processor.silent.add("ivy")
    async with crashing(world.runtime()) as rt:
        await rt.submit(book("ivy", at(Day.MON, "09:00"), when=world.clock.now()))
    world.clock.advance(2 * TIMEOUT)  # down for half an hour

    async with world.runtime(SQLiteStore(tmp_path / "clinic.db")) as rt:
        await world.until(lambda: rt.state.requests[1].status == "expired")
        assert rt.state.bookings == {}
        assert rt.state.now == T0 + 2 * TIMEOUT  # the timer brought the time
        check_invariants(rt.state)
        world.processor.bank_back.set()  # the bank answers: the authorisation is voided
        await rt.wait_idle()
        assert 1 not in rt.state.requests
    assert world.processor.held() == {}


# -- the demo -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_demo_main() -> None:
    report = await demo.main()
    assert report.specific.requests[1].status == "confirmed"
    assert len(report.winners) == 1 and len(report.refused) == 4
    assert all(r.endswith(": SlotTaken") for r in report.refused)
    assert report.auto_slot == at(Day.TUE, "13:00")
    assert (report.declined_status, report.expired_status, report.expired_voided) == (
        "payment_failed", "expired", True)
    assert 1 not in report.after_cancel.bookings
    assert report.recovery_in_flight == ["payment:6", "timeout:6"]
    assert (report.recovered_status, report.authorizations_for_crashed) == ("confirmed", 1)
    assert sorted(b.user for b in report.final.bookings.values()) == sorted(
        [report.winners[0], "gus", "jo"])
    check_invariants(report.final)


def test_demo_runs_as_a_script(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples/dentist_booking/run.py"),
                           "--data", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "request 6 is confirmed; authorisations for jo at the processor: 1" in done.stdout
    assert "invariants hold" in done.stdout
    assert (tmp_path / "data" / "clinic.db").exists()

