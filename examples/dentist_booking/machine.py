"""The clinic as a state machine.

A patient asks for an appointment type (15 to 60 minutes) either at a specific slot or by
preferences (a week, days in order of preference, time ranges); the machine finds the slot,
*holds* it, and asks the card processor to pre-authorise the price. The answer confirms the
booking or, when declined, releases the slot. A durable timer bounds the wait: if the processor
has not answered by the deadline, the hold expires and the slot goes back on the calendar.

Why the slot is held before the money is there: the stf decides who gets a slot at the moment it
runs, one input at a time, so two patients asking for the same slot can never both get it, however
many submit at once. The payment is a tracked action recorded in the request, and the timeout a
tracked ``fasm.Timer`` recorded next to it, so both survive a crash: ``restore`` re-sends the
pre-authorisation (the processor recognises its idempotency key) and re-arms the timer.

Time comes in through inputs (``at`` on every request, ``TimerFired.now`` on every timer), never
from a clock read in the stf. All ids come from ``next_request_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from typing import Literal

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

GRID = 15  # minutes: every appointment starts on a quarter hour
DAY_MINUTES = 24 * 60


class Day(StrEnum):
    MON = "mon"
    TUE = "tue"
    WED = "wed"
    THU = "thu"
    FRI = "fri"
    SAT = "sat"
    SUN = "sun"


DAYS: tuple[Day, ...] = tuple(Day)
_DAY_INDEX = {day: i for i, day in enumerate(DAYS)}


class AptType(StrEnum):
    CHECKUP = "checkup"
    CLEANING = "cleaning"
    FILLING = "filling"
    ROOT_CANAL = "root_canal"

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")


DURATION: dict[AptType, int] = {  # minutes
    AptType.CHECKUP: 15,
    AptType.CLEANING: 30,
    AptType.FILLING: 45,
    AptType.ROOT_CANAL: 60,
}
PRICE: dict[AptType, int] = {  # cents, pre-authorised when the slot is held
    AptType.CHECKUP: 50_00,
    AptType.CLEANING: 80_00,
    AptType.FILLING: 150_00,
    AptType.ROOT_CANAL: 400_00,
}


def minutes(text: str) -> int:
    """``"09:30"`` -> 570 (minutes since midnight)."""
    hours, mins = text.split(":")
    return int(hours) * 60 + int(mins)


def hhmm(m: int) -> str:
    """570 -> ``"09:30"``."""
    return f"{m // 60:02d}:{m % 60:02d}"


# -- the calendar ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    """Minutes since midnight, ``[start, end)``."""

    start: int
    end: int

    @classmethod
    def of(cls, start: str, end: str) -> TimeRange:
        return cls(minutes(start), minutes(end))

    def holds(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end

    def __str__(self) -> str:
        return f"{hhmm(self.start)}-{hhmm(self.end)}"


@dataclass(frozen=True)
class Slot:
    """Where an appointment starts: a week (0 = this week), a day, minutes since midnight."""

    week: int
    day: Day
    start: int

    @property
    def order(self) -> tuple[int, int, int]:
        """Chronological sort key (``Day`` values sort alphabetically, not by weekday)."""
        return (self.week, _DAY_INDEX[self.day], self.start)

    def __str__(self) -> str:
        return f"week {self.week} {self.day.value.title()} {hhmm(self.start)}"


@dataclass(frozen=True)
class Preferences:
    """What an auto-selected request accepts: ``days`` in order of preference, and time ranges
    (also in order of preference; empty means any time the clinic is open)."""

    week: int
    days: tuple[Day, ...]
    times: tuple[TimeRange, ...] = ()

    def admits(self, slot: Slot, duration: int) -> bool:
        if slot.week != self.week or slot.day not in self.days:
            return False
        return not self.times or any(r.holds(slot.start, slot.start + duration)
                                     for r in self.times)


Hours = dict[Day, tuple[TimeRange, ...]]


def standard_week() -> Hours:
    """Mornings and afternoons with a lunch break on weekdays, Saturday mornings."""
    weekday = (TimeRange.of("09:00", "12:00"), TimeRange.of("13:00", "17:00"))
    hours: Hours = {day: weekday for day in DAYS[:5]}
    hours[Day.SAT] = (TimeRange.of("09:00", "12:00"),)
    return hours


RequestStatus = Literal["awaiting_payment", "confirmed", "payment_failed", "expired",
                        "cancelled"]
PaymentStatus = Literal["pending", "authorized", "declined"]


@dataclass
class Booking:
    """A slot taken on the calendar: ``held`` while the payment is being authorised."""

    slot: Slot
    apt_type: AptType
    user: str
    status: Literal["held", "confirmed"] = "held"

    @property
    def end(self) -> int:
        return self.slot.start + DURATION[self.apt_type]


@dataclass
class Request:
    """A booking request and everything pending for it (the tracked actions restore re-emits).

    ``asked`` is the slot a specific request named; ``prefs`` what an auto-selected one accepts
    (exactly one of them is set). ``slot`` is the slot it was given.
    """

    user: str
    apt_type: AptType
    slot: Slot
    asked: Slot | None
    prefs: Preferences | None
    amount: int
    deadline: float
    status: RequestStatus = "awaiting_payment"
    payment: PaymentStatus = "pending"  # the PreAuthorize action is in flight while "pending"
    timer_armed: bool = True  # the timeout Timer is in flight while True
    auth: str | None = None


@dataclass
class Totals:
    """What happened to requests over the clinic's life (the dashboard's counters, and the
    simulation's report): requests that are over are not kept in state."""

    confirmed: int = 0
    payment_failures: int = 0
    expired: int = 0
    cancelled: int = 0


@dataclass
class Clinic:
    hours: Hours = field(default_factory=standard_week)
    payment_timeout: float = 15 * 60.0  # seconds from the request to its payment deadline
    # Live requests: held, confirmed, or with a payment or timer still in flight. A request that
    # is over leaves (see archive_if_settled); ``totals`` counts what happened.
    requests: dict[int, Request] = field(default_factory=dict)
    bookings: dict[int, Booking] = field(default_factory=dict)  # the calendar, by request id
    next_request_id: int = 1
    now: float = 0.0  # the latest time an input carried: deadlines never go backwards
    totals: Totals = field(default_factory=Totals)


# -- inputs, actions, results ---------------------------------------------------------------------


@dataclass(frozen=True)
class BookSlot:
    user: str
    apt_type: AptType
    slot: Slot
    at: float  # the clock when the patient asked (the service reads its clock, never the stf)


@dataclass(frozen=True)
class BookPreferred:
    user: str
    apt_type: AptType
    prefs: Preferences
    at: float


@dataclass(frozen=True)
class Cancel:
    request_id: int
    user: str
    at: float


@dataclass(frozen=True)
class SetHours:
    """Change a weekday's opening hours (refused while it would strand a booking)."""

    day: Day
    ranges: tuple[TimeRange, ...]
    at: float


BookingInput = BookSlot | BookPreferred | Cancel | SetHours


@dataclass(frozen=True)
class PreAuthorize:
    request_id: int
    user: str
    amount: int


@dataclass(frozen=True)
class Authorized:
    auth: str


@dataclass(frozen=True)
class Declined:
    reason: str


@dataclass(frozen=True)
class Notify:
    user: str
    message: str


@dataclass(frozen=True)
class VoidAuthorization:
    """Release a pre-authorisation the clinic no longer needs (the hold expired or the booking
    was cancelled). Untracked: a card processor lets unused authorisations lapse by itself, so a
    void lost in a crash costs the patient a few days' hold, never money."""

    request_id: int
    user: str
    auth: str


ClinicAction = PreAuthorize | Timer
ClinicResult = Authorized | Declined | TimerFired
ClinicNotice = Notify | VoidAuthorization
Actions = ActionsContainer[str, ClinicAction, ClinicNotice]


def payment_id(request_id: int) -> str:
    """The tracked-action id of a request's pre-authorisation (derived from state, never
    random: the processor's idempotency key is built from it)."""
    return f"payment:{request_id}"


def timeout_id(request_id: int) -> str:
    """The tracked-action id of a request's payment timeout."""
    return f"timeout:{request_id}"


# -- refusals -------------------------------------------------------------------------------------


class BookingRejected(Rejected):
    """Every refusal of the clinic (callers catch this one to show the message)."""


class InvalidRequest(BookingRejected):
    pass


class OutsideWorkingHours(BookingRejected):
    pass


class SlotTaken(BookingRejected):
    pass


class NoSlotAvailable(BookingRejected):
    pass


class UnknownRequest(BookingRejected):
    pass


class NotYourRequest(BookingRejected):
    pass


class NotCancellable(BookingRejected):
    pass


class HoursInUse(BookingRejected):
    pass


class StaleResult(BookingRejected):
    """A result for an action that is no longer pending (delivered twice, or late)."""


# -- the machine ----------------------------------------------------------------------------------


class DentistMachine(
    StateMachine[Clinic, BookingInput, str, ClinicAction, ClinicResult, ClinicNotice]
):
    """Hold a slot, pre-authorise, confirm or release; expire holds the processor never
    answered."""

    machine_name = "examples.dentist_booking"

    async def stf(
        self, state: Clinic, input: Input[BookingInput, str, ClinicResult], actions: Actions
    ) -> None:
        match input:
            case Normal(BookSlot(user=user, apt_type=apt_type, slot=slot, at=at)):
                check_user(user)
                check_slot(state, slot, apt_type)
                hold(state, user, apt_type, slot, at, actions, asked=slot, prefs=None)
            case Normal(BookPreferred(user=user, apt_type=apt_type, prefs=prefs, at=at)):
                check_user(user)
                check_prefs(prefs)
                found = find_slot(state, prefs, DURATION[apt_type])
                if found is None:
                    raise NoSlotAvailable(f"no free {apt_type.label} slot in week {prefs.week} "
                                          f"on {', '.join(d.value for d in prefs.days)}")
                hold(state, user, apt_type, found, at, actions, asked=None, prefs=prefs)
            case Normal(Cancel(request_id=rid, user=user, at=at)):
                cancel(state, rid, user, at, actions)
            case Normal(SetHours(day=day, ranges=ranges, at=at)):
                set_hours(state, day, ranges, at)
            case TrackedActionCompleted(id=action_id, result=result):
                complete(state, action_id, result, actions)

    async def restore(self, state: Clinic, actions: Actions) -> None:
        # Only what state records as in flight, in request order.
        for rid, request in sorted(state.requests.items()):
            if request.payment == "pending":
                actions.add(Tracked(payment_id(rid),
                                    PreAuthorize(rid, request.user, request.amount)))
            if request.timer_armed:
                actions.add(Tracked(timeout_id(rid), Timer(at=request.deadline)))


# -- validation -----------------------------------------------------------------------------------


def check_user(user: str) -> None:
    if not user:
        raise InvalidRequest("a request needs a user")


def check_slot(state: Clinic, slot: Slot, apt_type: AptType) -> None:
    """A specific slot must be on the grid, inside opening hours, and free."""
    if slot.week < 0 or slot.start % GRID:
        raise InvalidRequest(f"{slot}: appointments start on a quarter hour of week >= 0")
    end = slot.start + DURATION[apt_type]
    if not inside_hours(state.hours, slot.day, slot.start, end):
        raise OutsideWorkingHours(f"{slot} + {DURATION[apt_type]} min is outside opening hours")
    clash = first_clash(state, slot, end)
    if clash is not None:
        raise SlotTaken(f"{slot} is taken (request {clash})")


def check_prefs(prefs: Preferences) -> None:
    if prefs.week < 0 or not prefs.days:
        raise InvalidRequest("preferences need a week >= 0 and at least one day")
    if any(not 0 <= r.start < r.end <= DAY_MINUTES for r in prefs.times):
        raise InvalidRequest("preferred times must be ranges within a day")


def check_ranges(ranges: tuple[TimeRange, ...]) -> None:
    previous_end = 0
    for r in ranges:
        if not (previous_end <= r.start < r.end <= DAY_MINUTES) or r.start % GRID or r.end % GRID:
            raise InvalidRequest("opening hours must be ordered, disjoint quarter-hour ranges "
                                 f"within a day, got {', '.join(map(str, ranges))}")
        previous_end = r.end


def inside_hours(hours: Hours, day: Day, start: int, end: int) -> bool:
    return any(r.holds(start, end) for r in hours.get(day, ()))


def first_clash(state: Clinic, slot: Slot, end: int) -> int | None:
    """The request id of a held or confirmed booking overlapping ``[slot.start, end)``."""
    for rid, booking in state.bookings.items():
        b = booking.slot
        if b.week == slot.week and b.day == slot.day and b.start < end \
                and slot.start < booking.end:
            return rid
    return None


def find_slot(state: Clinic, prefs: Preferences, duration: int) -> Slot | None:
    """Auto-selection: the first preferred day with room, the first preferred time range on it,
    the earliest free start in it. Deterministic: it depends on state and the request only."""
    for day in prefs.days:
        taken = sorted((b.slot.start, b.end) for b in state.bookings.values()
                       if b.slot.week == prefs.week and b.slot.day == day)
        for window in prefs.times or (TimeRange(0, DAY_MINUTES),):
            for open_range in state.hours.get(day, ()):
                for start in _starts(window, open_range, duration):
                    if all(end <= start or start + duration <= s for s, end in taken):
                        return Slot(prefs.week, day, start)
    return None


def _starts(window: TimeRange, open_range: TimeRange, duration: int) -> Iterator[int]:
    lo = max(window.start, open_range.start)
    lo += -lo % GRID  # round up to the grid
    hi = min(window.end, open_range.end)
    return iter(range(lo, hi - duration + 1, GRID))


# -- transitions ----------------------------------------------------------------------------------


def hold(state: Clinic, user: str, apt_type: AptType, slot: Slot, at: float, actions: Actions,
         *, asked: Slot | None, prefs: Preferences | None) -> None:
    """Validated already: emit the payment and its timeout, then record both and the hold."""
    rid = state.next_request_id
    now = max(state.now, at)
    deadline = now + state.payment_timeout
    amount = PRICE[apt_type]
    # Fallible operations first ...
    actions.add(Tracked(payment_id(rid), PreAuthorize(rid, user, amount)))
    actions.add(Tracked(timeout_id(rid), Timer(at=deadline)))
    actions.add(Untracked(Notify(user, f"{slot} held for your {apt_type.label}; authorising "
                                       f"{amount / 100:.2f}")))
    # ... then the mutations, recording the tracked actions in the transition that emits them.
    state.next_request_id += 1
    state.now = now
    state.requests[rid] = Request(user, apt_type, slot, asked, prefs, amount, deadline)
    state.bookings[rid] = Booking(slot, apt_type, user)


def cancel(state: Clinic, rid: int, user: str, at: float, actions: Actions) -> None:
    request = state.requests.get(rid)
    if request is None:
        raise UnknownRequest(f"no request {rid}")
    if request.user != user:
        raise NotYourRequest(f"request {rid} is not {user}'s")
    if request.status not in ("awaiting_payment", "confirmed"):
        raise NotCancellable(f"request {rid} is {request.status}")
    if request.auth is not None:
        actions.add(Untracked(VoidAuthorization(rid, user, request.auth)))
    actions.add(Untracked(Notify(user, f"{request.slot} cancelled")))
    # The payment and the timer stay recorded while they are in flight: their results still
    # come back and are absorbed (an authorisation arriving now is voided).
    state.now = max(state.now, at)
    request.status = "cancelled"
    del state.bookings[rid]
    state.totals.cancelled += 1
    archive_if_settled(state, rid, request)


def set_hours(state: Clinic, day: Day, ranges: tuple[TimeRange, ...], at: float) -> None:
    check_ranges(ranges)
    stranded = sorted(rid for rid, b in state.bookings.items()
                      if b.slot.day == day and not any(r.holds(b.slot.start, b.end)
                                                       for r in ranges))
    if stranded:
        raise HoursInUse(f"{day.value}: requests {stranded} would fall outside the new hours")
    state.now = max(state.now, at)
    state.hours[day] = ranges


def complete(state: Clinic, action_id: str, result: ClinicResult, actions: Actions) -> None:
    kind, _, number = action_id.partition(":")
    request = state.requests.get(int(number)) if number.isdigit() else None
    if request is None:
        raise UnknownRequest(f"result for unknown action {action_id!r}")
    rid = int(number)
    match kind, result:
        case "payment", Authorized(auth=auth) if request.payment == "pending":
            request.payment, request.auth = "authorized", auth
            if request.status == "awaiting_payment":
                request.status = "confirmed"
                state.bookings[rid].status = "confirmed"
                state.totals.confirmed += 1
                actions.add(Untracked(Notify(request.user, f"{request.slot} confirmed: "
                                                           f"{request.apt_type.label}")))
            else:  # expired or cancelled meanwhile: the slot is gone, release the money
                actions.add(Untracked(VoidAuthorization(rid, request.user, auth)))
        case "payment", Declined(reason=reason) if request.payment == "pending":
            request.payment = "declined"
            if request.status == "awaiting_payment":
                release(state, rid, request, "payment_failed")
                state.totals.payment_failures += 1
                actions.add(Untracked(Notify(request.user, f"{request.slot} released: payment "
                                                           f"declined ({reason})")))
        case "timeout", TimerFired(now=fired) if request.timer_armed:
            request.timer_armed = False
            state.now = max(state.now, fired)
            if request.status == "awaiting_payment":
                release(state, rid, request, "expired")
                state.totals.expired += 1
                actions.add(Untracked(Notify(request.user, f"{request.slot} released: the "
                                                           "payment took too long")))
        case _:
            raise StaleResult(f"{action_id!r} is not pending (got {result!r})")
    archive_if_settled(state, rid, request)


def release(state: Clinic, rid: int, request: Request, status: RequestStatus) -> None:
    request.status = status
    del state.bookings[rid]


def archive_if_settled(state: Clinic, rid: int, request: Request) -> None:
    """Drop a request that is over (no booking, nothing in flight) from state; ``totals`` keeps
    the count. State is what a checkpoint writes and what every rollback and check reads, so it
    holds what is live, not the whole history (a service that needs the history sends it to an
    archive table through an untracked action)."""
    if request.status not in ("awaiting_payment", "confirmed") \
            and request.payment != "pending" and not request.timer_armed:
        del state.requests[rid]


# -- invariants: functions of state, run by the tests and after every simulated step -------------


def no_overlapping_bookings(state: Clinic) -> str | None:
    by_day: dict[tuple[int, Day], list[tuple[int, int, int]]] = {}
    for rid, b in state.bookings.items():
        by_day.setdefault((b.slot.week, b.slot.day), []).append((b.slot.start, b.end, rid))
    for (week, day), spans in by_day.items():
        spans.sort()
        for (_, end, first), (start, _, second) in pairwise(spans):
            if start < end:
                return f"requests {first} and {second} overlap on week {week} {day.value}"
    return None


def bookings_inside_working_hours(state: Clinic) -> str | None:
    for rid, b in state.bookings.items():
        if not inside_hours(state.hours, b.slot.day, b.slot.start, b.end):
            return f"request {rid}: {b.slot} ({b.apt_type.label}) is outside opening hours"
    return None


def confirmed_requests_have_bookings(state: Clinic) -> str | None:
    for rid, r in state.requests.items():
        booking = state.bookings.get(rid)
        if r.status == "confirmed" and (booking is None or booking.status != "confirmed"):
            return f"request {rid} is confirmed but its booking is {booking}"
        if r.status == "confirmed" and r.payment != "authorized":
            return f"request {rid} is confirmed without an authorised payment"
    return None


def failed_payments_leave_no_booking(state: Clinic) -> str | None:
    for rid, booking in state.bookings.items():
        request = state.requests.get(rid)
        if request is None:
            return f"booking {rid} has no request"
        wanted = {"awaiting_payment": "held", "confirmed": "confirmed"}.get(request.status)
        if booking.status != wanted:
            return (f"request {rid} is {request.status} (payment {request.payment}) and still "
                    f"has a {booking.status} booking")
    return None


def bookings_match_requests(state: Clinic) -> str | None:
    for rid, booking in state.bookings.items():
        r = state.requests.get(rid)
        if r is None:
            continue  # an orphan booking: failed_payments_leave_no_booking reports it
        if (booking.slot, booking.user, booking.apt_type) != (r.slot, r.user, r.apt_type):
            return f"booking {rid} ({booking}) does not match its request ({r})"
        if r.asked is not None and r.slot != r.asked:
            return f"request {rid} asked for {r.asked} and was given {r.slot}"
        if r.prefs is not None and not r.prefs.admits(r.slot, DURATION[r.apt_type]):
            return f"request {rid} was given {r.slot}, outside its preferences {r.prefs}"
        if (r.asked is None) == (r.prefs is None):
            return f"request {rid} must name a slot or preferences, not both or neither"
    return None


INVARIANTS: tuple[Callable[[Clinic], str | None], ...] = (
    no_overlapping_bookings,
    bookings_inside_working_hours,
    confirmed_requests_have_bookings,
    failed_payments_leave_no_booking,
    bookings_match_requests,
)


def check_invariants(state: Clinic) -> None:
    """Raise AssertionError naming every invariant that does not hold."""
    broken = [message for inv in INVARIANTS if (message := inv(state)) is not None]
    assert not broken, "; ".join(broken)
