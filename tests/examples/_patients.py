"""The patients of the dentist tests: an input source drawing booking requests, cancellations and
changes of opening hours from the current state. The simulation suites give it to fasm.testing;
the integration tests draw a random sequence from it and submit it through the Runtime."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from examples.dentist_booking.machine import (
    DAY_MINUTES,
    DAYS,
    GRID,
    AptType,
    BookingInput,
    BookPreferred,
    BookSlot,
    Cancel,
    Clinic,
    Preferences,
    SetHours,
    Slot,
    TimeRange,
)

APT_TYPES = tuple(AptType)


@dataclass(frozen=True)
class Patients:
    """The input source: patients asking for slots, by name or by preferences, cancelling, and
    the clinic changing its hours. Weights are relative; every choice is made with the run's RNG
    from the current state, which is only read.

    Args:
        users: how many distinct patients.
        weeks: bookings go to weeks ``0 .. weeks - 1``.
        hot: when given, specific requests pick from these slots only (contention).
        earliest, latest: specific slots start in ``[earliest, latest)`` (some fall outside
            opening hours on purpose).
        wrong_user: chance that a cancellation comes from someone else (refused).
    """

    book_slot: float = 45
    book_preferred: float = 30
    cancel: float = 20
    set_hours: float = 5
    users: int = 12
    weeks: int = 2
    hot: tuple[Slot, ...] = ()
    earliest: int = 8 * 60
    latest: int = 18 * 60
    wrong_user: float = 0.1
    hour_templates: tuple[tuple[TimeRange, ...], ...] = (
        (TimeRange.of("09:00", "12:00"), TimeRange.of("13:00", "17:00")),
        (TimeRange.of("08:00", "12:00"), TimeRange.of("13:00", "18:00")),
        (TimeRange.of("09:00", "12:00"),),
        (),
    )
    _names: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_names", tuple(f"p{i:02d}" for i in range(self.users)))

    def __call__(self, rng: random.Random, state: Clinic) -> BookingInput:
        at = state.now + rng.uniform(0.0, 1.0)
        kind = rng.choices(("slot", "preferred", "cancel", "hours"),
                           (self.book_slot, self.book_preferred, self.cancel, self.set_hours))[0]
        user, apt_type = rng.choice(self._names), rng.choice(APT_TYPES)
        if kind == "cancel" and state.requests:
            # Mostly live bookings; sometimes a request that is over or waiting on its payment.
            ids = list(state.bookings) if state.bookings and rng.random() < 0.8 \
                else list(state.requests)
            rid = rng.choice(ids)
            owner = state.requests[rid].user
            return Cancel(rid, owner if rng.random() >= self.wrong_user else user, at)
        if kind == "hours":
            return SetHours(rng.choice(DAYS), rng.choice(self.hour_templates), at)
        if kind == "preferred":
            return BookPreferred(user, apt_type, self.preferences(rng), at)
        if self.hot:
            slot = rng.choice(self.hot)
        else:
            slot = Slot(rng.randrange(self.weeks), rng.choice(DAYS),
                        rng.randrange(self.earliest, self.latest, GRID))
        return BookSlot(user, apt_type, slot, at)

    def preferences(self, rng: random.Random) -> Preferences:
        days = tuple(rng.sample(DAYS, rng.randint(1, 3)))
        times: tuple[TimeRange, ...] = ()
        if rng.random() < 0.7:
            start = rng.randrange(8 * 60, 16 * 60, 30)
            times = (TimeRange(start, min(DAY_MINUTES, start + rng.choice((60, 120, 180)))),)
            if rng.random() < 0.3:  # a second, later window
                later = min(DAY_MINUTES - 60, times[0].end + 60)
                times += (TimeRange(later, later + 60),)
        return Preferences(rng.randrange(self.weeks), days, times)
