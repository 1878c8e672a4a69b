"""The booking machine: its inputs, actions, results, and an stf that reads and writes SQL.

Nothing here checks whether a slot is free: the database does. Inserting a booking that overlaps
another breaks a constraint (see schema.py), the Transaction raises ConstraintViolation, and the
stf turns it into the domain's own rejection, SlotTaken. What the database cannot know (opening
hours, appointment lengths, a patient's record) the stf validates before it writes.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace

from fasm import (
    ActionsContainer,
    ConstraintViolation,
    Input,
    Normal,
    Rejected,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
    Untracked,
)
from fasm.persistence import Keyspace, Transaction

SLOT = 30  # minutes: bookings start on a slot boundary and last one or two slots
DEPOSIT_CENTS = {30: 2_500, 60: 5_000}

# -- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestBooking:
    patient: str
    dentist: str
    day: str  # ISO date, "2025-03-03"
    time: str  # "09:30"
    minutes: int = 30


@dataclass(frozen=True)
class CancelBooking:
    patient: str
    booking_id: int


BookingInput = RequestBooking | CancelBooking

# -- actions and results --------------------------------------------------------------------------


@dataclass(frozen=True)
class PreAuthorize:
    """Hold the deposit on the patient's card (tracked: the result confirms or frees the slot)."""

    booking_id: int
    patient: str
    amount_cents: int


@dataclass(frozen=True)
class Authorized:
    auth_code: str


@dataclass(frozen=True)
class Declined:
    reason: str


@dataclass(frozen=True)
class Notify:
    patient: str
    message: str


PaymentResult = Authorized | Declined
Actions = ActionsContainer[int, PreAuthorize, Notify]


# -- rejections -----------------------------------------------------------------------------------


class SlotTaken(Rejected):
    """The time overlaps another booking of the same dentist (the database said so)."""


class Closed(Rejected):
    """The dentist does not work then, or the appointment length is not offered."""


class UnknownDentist(Rejected):
    pass


class TooManyDeclines(Rejected):
    """The patient's card was declined twice: bookings need a call to the practice now."""


class NotCancellable(Rejected):
    """No such booking for this patient, or it is not confirmed (yet, or any more)."""


# -- the key-value layer: each patient's history ---------------------------------------------------


@dataclass(frozen=True)
class History:
    confirmed: int = 0
    declined: int = 0
    cancelled: int = 0


HISTORY: Keyspace[History] = Keyspace("patient-history", History)


def start_minute(day: str, time: str) -> int:
    """Minutes since 0001-01-01 00:00 (a pure function of the input: no clock)."""
    hours, minutes = time.split(":")
    return datetime.date.fromisoformat(day).toordinal() * 1440 + int(hours) * 60 + int(minutes)


class DentistBooking(
    StateMachine[Transaction, BookingInput, int, PreAuthorize, PaymentResult, Notify]
):
    machine_name = "examples.dentist_booking_sql"

    async def stf(self, db: Transaction, input: Input[BookingInput, int, PaymentResult],
                  actions: Actions) -> None:
        match input:
            case Normal(RequestBooking() as request):
                await self._request(db, request, actions)
            case Normal(CancelBooking(patient=patient, booking_id=booking_id)):
                await self._cancel(db, patient, booking_id, actions)
            case TrackedActionCompleted(id=booking_id, result=Authorized(auth_code=code)):
                patient = await self._awaiting(db, booking_id)
                await db.execute("UPDATE bookings SET status = 'confirmed', auth_code = ? "
                                 "WHERE id = ?", (code, booking_id))
                history = await db.kv.get(HISTORY, patient, History())
                await db.kv.set(HISTORY, patient, replace(history,
                                                          confirmed=history.confirmed + 1))
                actions.add(Untracked(Notify(patient, f"booking {booking_id} confirmed")))
            case TrackedActionCompleted(id=booking_id, result=Declined(reason=reason)):
                patient = await self._awaiting(db, booking_id)
                await db.execute("UPDATE bookings SET status = 'declined', reason = ? "
                                 "WHERE id = ?", (reason, booking_id))
                await db.execute("DELETE FROM slots WHERE booking_id = ?", (booking_id,))
                history = await db.kv.get(HISTORY, patient, History())
                await db.kv.set(HISTORY, patient, replace(history, declined=history.declined + 1))
                actions.add(Untracked(Notify(patient, f"booking {booking_id} released: {reason}")))
            case _:
                raise TypeError(f"unexpected input {input!r}")

    async def _request(self, db: Transaction, request: RequestBooking, actions: Actions) -> None:
        # 1. Validate what the database cannot know.
        hours = await db.fetchone("SELECT opens, closes FROM dentists WHERE name = ?",
                                  (request.dentist,))
        if hours is None:
            raise UnknownDentist(request.dentist)
        start = start_minute(request.day, request.time)
        end = start + request.minutes
        opens, closes = hours
        if (request.minutes not in DEPOSIT_CENTS or start % SLOT
                or not opens <= start % 1440 < end % 1440 <= closes):
            raise Closed(f"{request.dentist} does not see {request.minutes}-minute patients at "
                         f"{request.day} {request.time}")
        history = await db.kv.get(HISTORY, request.patient, History())
        if history.declined >= 2:
            raise TooManyDeclines(request.patient)
        # 2. Prepare: the id comes from the state, never from randomness or a clock.
        booking_id = await db.fetchval("SELECT COALESCE(MAX(id), 0) + 1 FROM bookings")
        deposit = DEPOSIT_CENTS[request.minutes]
        # 3. Write. The constraints decide whether the slot is free.
        try:
            await db.execute(
                "INSERT INTO bookings (id, patient, dentist, start_minute, end_minute, status, "
                "deposit_cents) VALUES (?, ?, ?, ?, ?, 'awaiting_payment', ?)",
                (booking_id, request.patient, request.dentist, start, end, deposit))
            await db.executemany(
                "INSERT INTO slots (dentist, slot_minute, booking_id) VALUES (?, ?, ?)",
                [(request.dentist, m, booking_id) for m in range(start, end, SLOT)])
        except ConstraintViolation as e:
            raise SlotTaken(f"{request.dentist} is booked at {request.time} "
                            f"(constraint {e.constraint})") from e
        # 4. The tracked action is in the state (the booking row) as it is emitted.
        actions.add(Tracked(booking_id, PreAuthorize(booking_id, request.patient, deposit)))
        actions.add(Untracked(Notify(request.patient, f"holding {request.day} {request.time} "
                                                      f"with {request.dentist}")))

    async def _cancel(self, db: Transaction, patient: str, booking_id: int,
                      actions: Actions) -> None:
        status = await db.fetchval("SELECT status FROM bookings WHERE id = ? AND patient = ?",
                                   (booking_id, patient))
        if status != "confirmed":
            raise NotCancellable(f"booking {booking_id} of {patient} is {status or 'unknown'}")
        await db.execute("UPDATE bookings SET status = 'cancelled' WHERE id = ?", (booking_id,))
        await db.execute("DELETE FROM slots WHERE booking_id = ?", (booking_id,))
        history = await db.kv.get(HISTORY, patient, History())
        await db.kv.set(HISTORY, patient, replace(history, cancelled=history.cancelled + 1))
        actions.add(Untracked(Notify(patient, f"booking {booking_id} cancelled")))

    async def _awaiting(self, db: Transaction, booking_id: int) -> str:
        patient = await db.fetchval("SELECT patient FROM bookings WHERE id = ? "
                                    "AND status = 'awaiting_payment'", (booking_id,))
        if patient is None:
            raise Rejected(f"booking {booking_id} is not awaiting payment")
        return patient

    async def restore(self, db: Transaction, actions: Actions) -> None:
        for booking_id, patient, deposit in await db.fetchall(
                "SELECT id, patient, deposit_cents FROM bookings "
                "WHERE status = 'awaiting_payment' ORDER BY id"):
            actions.add(Tracked(booking_id, PreAuthorize(booking_id, patient, deposit)))
