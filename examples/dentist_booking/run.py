"""The dentist booking demo, through the Runtime on SQLite.

    python examples/dentist_booking/run.py              # in a temporary directory
    python examples/dentist_booking/run.py --data DIR   # keep clinic.db in DIR

It books a specific slot, lets five patients race for one slot, auto-selects a slot from
preferences, meets a declined card, a bank that never answers (the durable payment timeout
expires the hold), a cancellation, and a crash with a payment in flight, after which a new
runtime on the same database finishes the booking exactly once.

The runtime's clock is a ``ManualClock`` so that the demo can move 15 minutes ahead instead of
waiting; a service passes ``SystemClock()`` (the default) and reads the same clock for the ``at``
of each request. Nothing in the machine reads a clock: time arrives in the inputs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

if __package__ in (None, ""):  # run as a script: make `examples.dentist_booking` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.dentist_booking"

from fasm.persistence import Journal, SQLiteStore, Store
from fasm.runtime import Clock, Listener, ManualClock, Runtime, RuntimeEvent, TransitionCommitted

from .machine import (
    DAYS,
    AptType,
    BookingInput,
    BookingRejected,
    BookPreferred,
    BookSlot,
    Cancel,
    Clinic,
    ClinicAction,
    ClinicNotice,
    ClinicResult,
    Day,
    DentistMachine,
    PreAuthorize,
    Preferences,
    Slot,
    TimeRange,
    check_invariants,
    minutes,
)
from .processor import CardProcessor, Inboxes, preauthorize_executor

ClinicRuntime = Runtime[Clinic, BookingInput, str, ClinicAction, ClinicResult, ClinicNotice]


def clinic_runtime(store: Store, processor: CardProcessor, inboxes: Inboxes, clock: Clock, *,
                   listeners: Sequence[Listener] = ()) -> ClinicRuntime:
    """The clinic's runtime: payments through the processor, notifications to the inboxes.
    ``Timer`` needs no executor: the runtime fires it from ``clock``."""
    return Runtime(DentistMachine(), initial_state=Clinic, key="clinic", store=store,
                   # The default, named: each commit appends the input (O(input)) and a
                   # checkpoint comes now and then; Snapshot() would rewrite the calendar.
                   durability=Journal(),
                   executors={PreAuthorize: preauthorize_executor(processor)},
                   handlers=inboxes.handlers(processor), clock=clock, listeners=listeners,
                   # The stf validates before it mutates, and the simulation's atomicity
                   # check holds it to that: a refusal (a taken slot) costs no reload.
                   rollback="trust-rejected")


class Watch:
    """A runtime listener that lets a caller wait for a condition on the state: results and
    timers commit on the runtime's own time, and this wakes the waiter after every commit
    instead of polling."""

    def __init__(self) -> None:
        self._changed: anyio.Event | None = None

    def __call__(self, event: RuntimeEvent) -> None:
        if isinstance(event, TransitionCommitted) and self._changed is not None:
            self._changed.set()
            self._changed = None

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed = self._changed or anyio.Event()
            await self._changed.wait()


@dataclass
class Report:
    specific: Clinic  # after ada's booking
    winners: list[str]
    refused: list[str]
    auto_slot: Slot
    declined_status: str
    expired_status: str
    expired_voided: bool
    after_cancel: Clinic
    recovery_in_flight: list[str]  # what restore re-dispatched after the crash
    recovered_status: str
    authorizations_for_crashed: int
    final: Clinic
    messages: list[str]


async def run_clinic(path: Path, processor: CardProcessor, inboxes: Inboxes,
                     clock: ManualClock) -> Report:
    watch = Watch()

    def runtime() -> ClinicRuntime:
        # A new store object each time, over the same file, as a new process would open it.
        return clinic_runtime(SQLiteStore(path), processor, inboxes, clock, listeners=[watch])

    async with runtime() as rt:
        print("=== 1. Opening hours ===")
        for day in DAYS:
            ranges = rt.state.hours.get(day, ())
            print(f"  {day.value.title()}: {', '.join(map(str, ranges)) or 'closed'}")

        print("\n=== 2. A specific slot ===")
        monday_nine = Slot(week=0, day=Day.MON, start=minutes("09:00"))
        committed = await rt.submit(BookSlot("ada", AptType.CHECKUP, monday_nine, clock.now()))
        print(f"  ada asks for {monday_nine}: committed at seq {committed.seq}")
        await rt.wait_idle()  # the pre-authorisation comes back and is committed
        print(f"  request 1 is {rt.state.requests[1].status}")
        specific = copy.deepcopy(rt.state)

        print("\n=== 3. Five patients, one slot, all at once ===")
        contested = Slot(week=0, day=Day.MON, start=minutes("10:00"))
        winners: list[str] = []
        refused: list[str] = []

        async def ask(user: str) -> None:
            try:
                await rt.submit(BookSlot(user, AptType.CLEANING, contested, clock.now()))
                winners.append(user)
            except BookingRejected as e:
                refused.append(f"{user}: {type(e).__name__}")

        async with anyio.create_task_group() as tg:
            for user in ("bob", "cyd", "dee", "eve", "fay"):
                tg.start_soon(ask, user)
        print(f"  {contested}: won by {winners}; refused: {refused}")
        await rt.wait_idle()

        print("\n=== 4. Auto-selection from preferences ===")
        prefs = Preferences(week=0, days=(Day.TUE, Day.WED),
                            times=(TimeRange.of("13:00", "15:00"),))
        await rt.submit(BookPreferred("gus", AptType.FILLING, prefs, clock.now()))
        gus = max(rt.state.requests)
        auto_slot = rt.state.requests[gus].slot
        print(f"  gus wants a filling on Tue or Wed, 13:00-15:00: given {auto_slot}")
        await rt.wait_idle()

        print("\n=== 5. A declined card ===")
        processor.declined.add("hal")
        await rt.submit(BookSlot("hal", AptType.ROOT_CANAL,
                                 Slot(0, Day.THU, minutes("09:00")), clock.now()))
        hal = max(rt.state.requests)
        await rt.wait_idle()
        declined_status = rt.state.requests[hal].status
        print(f"  request {hal} is {declined_status}; booked: {hal in rt.state.bookings}")

        print("\n=== 6. A bank that never answers: the payment timeout ===")
        processor.silent.add("ivy")
        await rt.submit(BookSlot("ivy", AptType.CHECKUP, Slot(0, Day.FRI, minutes("16:45")),
                                 clock.now()))
        ivy = max(rt.state.requests)
        print(f"  request {ivy} held; in flight: {sorted(rt.in_flight)}")
        clock.advance(rt.state.payment_timeout)  # 15 minutes later
        await watch.until(lambda: rt.state.requests[ivy].status != "awaiting_payment")
        expired_status = rt.state.requests[ivy].status
        print(f"  after {rt.state.payment_timeout / 60:.0f} minutes: request {ivy} is "
              f"{expired_status}; booked: {ivy in rt.state.bookings}")
        processor.bank_back.set()  # the bank answers at last: the authorisation is voided
        clock.advance(1.0)  # the attempt timed out meanwhile; its retry is due now
        await rt.wait_idle()
        print(f"  request {ivy} settled and archived: {ivy not in rt.state.requests}")
        ivy_auths = [a for a in processor.authorizations.values() if a.user == "ivy"]
        expired_voided = bool(ivy_auths) and all(a.voided for a in ivy_auths)
        print(f"  the late authorisation was voided: {expired_voided}")

        print("\n=== 7. Cancellation ===")
        await rt.submit(Cancel(1, "ada", clock.now()))
        await rt.wait_idle()
        after_cancel = copy.deepcopy(rt.state)
        print(f"  request 1 archived: {1 not in rt.state.requests}; {monday_nine} free again: "
              f"{1 not in rt.state.bookings}; totals {rt.state.totals}")

    print("\n=== 8. A crash with a payment in flight, then a restart ===")
    processor.lose_next_answer = True
    with anyio.CancelScope() as crash:
        async with runtime() as rt:
            await rt.submit(BookSlot("jo", AptType.CLEANING, Slot(0, Day.SAT, minutes("11:00")),
                                     clock.now()))
            jo = max(rt.state.requests)
            await processor.answer_lost.wait()  # authorised; the answer never arrives
            print(f"  crash! request {jo} in flight: {sorted(rt.in_flight)}")
            crash.cancel()
            await anyio.sleep_forever()

    async with runtime() as rt:
        in_flight = sorted(rt.in_flight)
        print(f"  restarted at seq {rt.seq}; restore re-dispatched {in_flight}")
        await rt.wait_idle()
        recovered_status = rt.state.requests[jo].status
        jo_auths = sum(1 for a in processor.authorizations.values() if a.user == "jo")
        print(f"  request {jo} is {recovered_status}; authorisations for jo at the processor: "
              f"{jo_auths}")
        final = copy.deepcopy(rt.state)

    print("\n=== The calendar ===")
    for rid, booking in sorted(final.bookings.items(), key=lambda kv: kv[1].slot.order):
        print(f"  {booking.slot}  {booking.apt_type.value:<10} {booking.user:<4} "
              f"(request {rid}, {booking.status})")
    check_invariants(final)
    print(f"  totals: {final.totals}; invariants hold")
    return Report(specific, winners, refused, auto_slot, declined_status, expired_status,
                  expired_voided, after_cancel, in_flight, recovered_status, jo_auths, final,
                  inboxes.messages)


async def main(data: Path | None = None) -> Report:
    """Run the demo with its database in ``data`` (an existing directory) or a temporary one."""
    inboxes = Inboxes(echo=True)
    processor = CardProcessor()
    clock = ManualClock(start=1_000_000.0)
    if data is not None:
        return await run_clinic(data / "clinic.db", processor, inboxes, clock)
    with tempfile.TemporaryDirectory() as tmp:
        return await run_clinic(Path(tmp) / "clinic.db", processor, inboxes, clock)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="directory for clinic.db (default: a temporary one)")
    args = parser.parse_args()
    if args.data is not None:
        if (args.data / "clinic.db").exists():
            sys.exit(f"{args.data / 'clinic.db'} exists: the demo starts from an empty clinic")
        args.data.mkdir(parents=True, exist_ok=True)
    anyio.run(main, args.data)
