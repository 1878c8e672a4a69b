"""Simulation suites for the dentist booking machine, run by fasm.testing.

Each suite runs the real engine over many seeds with crashes at every durability boundary, store
failures, executor failures, timeouts and retries, and checks after every step the clinic's
invariants (no overlapping bookings, every booking inside opening hours, confirmed requests have
bookings, failed payments leave no booking, every booking matches its request) and the toolkit's
own (atomicity, determinism by re-execution, restore completeness, results absorbed, liveness,
idempotent submits). Each prints its counts; run with ``-s`` to see them.

Short budgets by default (the whole file in well under a minute); a long run by option:

    pytest tests/examples/test_dentist_simulation.py -s --fasm-budget 600
    pytest 'tests/examples/test_dentist_simulation.py::test_high_contention' --fasm-seed 12

The last tests break the machine on purpose, once per invariant, and show that the simulation
finds each bug: the invariants are not vacuous.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from examples.dentist_booking.machine import (
    DAY_MINUTES,
    INVARIANTS,
    Actions,
    Authorized,
    BookingInput,
    BookPreferred,
    BookSlot,
    Clinic,
    ClinicResult,
    Day,
    Declined,
    DentistMachine,
    Hours,
    PreAuthorize,
    Preferences,
    Slot,
    TimeRange,
    standard_week,
)
from fasm import Input, Normal
from fasm.runtime import RetryPolicy
from fasm.testing import FaultPlan, SeedResult, SimExecutor, Simulation
from tests.examples._patients import Patients
from tests.examples._sim_suite import SuiteReport, count_lines, run_suite

FIELDS = ("bookings", "conflicts", "payment failures", "expired", "cancelled")

# -- the simulated world -------------------------------------------------------------------------


def processor(approve: float) -> SimExecutor[PreAuthorize, Authorized | Declined]:
    """The simulated card processor: approves with probability ``approve``; the retry policy and
    the exhaustion mapping are the production executor's (processor.py)."""

    def answer(action: PreAuthorize, rng: random.Random) -> Authorized | Declined:
        if rng.random() < approve:
            return Authorized(f"AUTH-{action.request_id}")
        return Declined("card declined")

    return SimExecutor(
        answer,
        retry=RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=1.0, timeout=30.0),
        on_exhausted=lambda action, error: Declined(f"card processor unavailable ({error})"),
    )


def clinic(hours: Hours | None = None) -> Clinic:
    # Simulated processor calls take up to 2 s (FaultPlan.latency), one that hangs takes its 30 s
    # attempt timeout, and a crashed process is back within 5 s: a 20 s payment timeout lets
    # payments win most races and the timer win some (hangs, retries, long restarts).
    return Clinic(hours=hours if hours is not None else standard_week(), payment_timeout=20.0)


def dentist_sim(
    patients: Patients,
    *,
    approve: float = 0.9,
    hours: Hours | None = None,
    faults: FaultPlan | None = None,
    steps: int = 300,
    machine: DentistMachine | None = None,
) -> Simulation[Clinic, BookingInput]:
    return Simulation(
        machine or DentistMachine(),
        initial_state=lambda: clinic(hours),
        inputs=patients,
        executors={PreAuthorize: processor(approve)},
        invariants=INVARIANTS,
        faults=faults,
        # The stf validates before it mutates (the atomicity check holds it to that), so a
        # refusal needs no reload; anything else still rolls back.
        rollback="trust-rejected",
        steps=steps,
    )


def tally(state: Clinic, result: SeedResult) -> Mapping[str, int]:
    t = state.totals
    return {
        "bookings": t.confirmed,
        "payment failures": t.payment_failures,
        "expired": t.expired,
        "cancelled": t.cancelled,
        # Refusals are not state, so they are counted in the trace.
        "conflicts": count_lines(result, "refused: SlotTaken(", "refused: NoSlotAvailable("),
        "outside hours": count_lines(result, "refused: OutsideWorkingHours("),
    }


def suite(request: pytest.FixtureRequest, name: str, patients: Patients, *, seeds: int,
          fields: Sequence[str] = FIELDS, approve: float = 0.9,
          hours: Hours | None = None, faults: FaultPlan | None = None,
          steps: int = 300) -> SuiteReport:
    sim = dentist_sim(patients, approve=approve, hours=hours, faults=faults, steps=steps)
    report = run_suite(request, sim, tally, name=name, seeds=seeds, keep_trace=True)
    print("\n" + report.line(fields))
    return report


# -- the suites -----------------------------------------------------------------------------------


def test_mixed_operations(request: pytest.FixtureRequest) -> None:
    """Everything at once: specific and auto-selected requests, cancellations (some by the wrong
    patient), opening hours changing, 10% declined cards, the default fault plan."""
    r = suite(request, "mixed operations", Patients(), seeds=16)
    if r.full:  # a replay of fewer seeds (--fasm-seed) checks the invariants only
        assert r["bookings"] and r["conflicts"] and r["payment failures"] and r["cancelled"]
        assert r["crashes"] and r["expired"]


def test_high_contention(request: pytest.FixtureRequest) -> None:
    """Thirty patients and three overlapping slots on one morning: nearly every request is a
    conflict, and never are two of them booked at once."""
    hot = (Slot(0, Day.MON, 9 * 60), Slot(0, Day.MON, 9 * 60 + 15), Slot(0, Day.MON, 9 * 60 + 30))
    patients = Patients(book_slot=80, book_preferred=0, cancel=20, set_hours=0, users=30,
                        weeks=1, hot=hot)
    r = suite(request, "high contention", patients, seeds=24,
              fields=("bookings", "conflicts", "cancelled", "payment failures"))
    if r.full:  # a replay of fewer seeds (--fasm-seed) checks the invariants only
        assert r["conflicts"] > r["bookings"] > 0


def test_payment_failures_at_half(request: pytest.FixtureRequest) -> None:
    """Half the cards are declined: every declined request must release its slot."""
    r = suite(request, "payment failures at 50%", Patients(), seeds=16, approve=0.5)
    if r.full:  # a replay of fewer seeds (--fasm-seed) checks the invariants only
        settled = r["bookings"] + r["payment failures"]
        assert 0.35 < r["payment failures"] / settled < 0.65, r.domain


def test_auto_selection_heavy(request: pytest.FixtureRequest) -> None:
    """Mostly preference requests: every slot the machine picks must be inside the request's
    week, days and time ranges (bookings_match_requests) and free (no_overlapping_bookings)."""
    patients = Patients(book_slot=5, book_preferred=80, cancel=15, set_hours=0, users=20)
    r = suite(request, "auto-selection heavy", patients, seeds=10)
    if r.full:  # a replay of fewer seeds (--fasm-seed) checks the invariants only
        assert r["bookings"] and r["conflicts"]  # conflicts here: NoSlotAvailable


def test_sparse_schedule(request: pytest.FixtureRequest) -> None:
    """Two short openings a week: most requests fall outside opening hours or find no room."""
    sparse: Hours = {Day.TUE: (TimeRange.of("10:00", "11:00"),),
                     Day.THU: (TimeRange.of("14:00", "15:30"),)}
    patients = Patients(set_hours=1, hour_templates=((TimeRange.of("10:00", "11:00"),), ()))
    r = suite(request, "sparse schedule", patients, seeds=20, hours=sparse,
              fields=(*FIELDS, "outside hours"))
    if r.full:  # a replay of fewer seeds (--fasm-seed) checks the invariants only
        assert r["outside hours"] > r["bookings"] > 0


def test_long_run(request: pytest.FixtureRequest) -> None:
    """Few seeds, many steps: the calendar fills, empties and refills over thousands of
    transitions, checkpoints and journal replays."""
    patients = Patients(cancel=35, weeks=1)  # the calendar fills, empties and refills
    r = suite(request, "long run", patients, seeds=2, steps=2000)
    if r.full:  # a replay of fewer seeds (--fasm-seed) checks the invariants only
        assert r["bookings"] > 100


def test_crashes_throughout(request: pytest.FixtureRequest) -> None:
    """A crash at one boundary in eight, store failures, flaky and hanging processor calls."""
    faults = FaultPlan(crash=0.12, store_failure=0.02, fail=0.15, timeout=0.05)
    r = suite(request, "crashes throughout", Patients(), seeds=12, faults=faults)
    if r.full:  # a replay of fewer seeds (--fasm-seed) checks the invariants only
        assert r["crashes"] > r["bookings"] > 0
        assert r["store failures"]


# -- the invariants find real bugs ----------------------------------------------------------------


class IgnoresHeldSlots(DentistMachine):
    """Double booking: a slot whose payment is still being authorised counts as free."""

    async def stf(self, state: Clinic, input: Input[BookingInput, str, ClinicResult],
                  actions: Actions) -> None:
        match input:
            case Normal(BookSlot() | BookPreferred()):
                held = {rid: b for rid, b in state.bookings.items() if b.status == "held"}
                for rid in held:
                    del state.bookings[rid]
                try:
                    await super().stf(state, input, actions)
                finally:
                    state.bookings.update(held)
            case _:
                await super().stf(state, input, actions)


class KeepsDeclinedBookings(DentistMachine):
    """A declined payment fails the request but leaves its slot on the calendar."""

    async def stf(self, state: Clinic, input: Input[BookingInput, str, ClinicResult],
                  actions: Actions) -> None:
        bookings = dict(state.bookings)
        await super().stf(state, input, actions)
        for rid, booking in bookings.items():
            if rid not in state.bookings and rid in state.requests \
                    and state.requests[rid].status == "payment_failed":
                state.bookings[rid] = booking


class IgnoresPreferredTimes(DentistMachine):
    """Auto-selection that honours the preferred days but not the preferred times."""

    async def stf(self, state: Clinic, input: Input[BookingInput, str, ClinicResult],
                  actions: Actions) -> None:
        match input:
            case Normal(BookPreferred(prefs=prefs) as ask) if prefs.times:
                loose = replace(ask, prefs=Preferences(prefs.week, prefs.days))
                await super().stf(state, Normal(loose), actions)
                state.requests[state.next_request_id - 1].prefs = prefs  # records what was asked
            case _:
                await super().stf(state, input, actions)


class OverrunsClosingTime(DentistMachine):
    """Opening hours checked by the start of a specific slot only: a long appointment booked
    late in a range runs past its end."""

    async def stf(self, state: Clinic, input: Input[BookingInput, str, ClinicResult],
                  actions: Actions) -> None:
        match input:
            case Normal(BookSlot()):
                hours = state.hours
                state.hours = {day: tuple(TimeRange(r.start, DAY_MINUTES) for r in ranges)
                               for day, ranges in hours.items()}
                try:
                    await super().stf(state, input, actions)
                finally:
                    state.hours = hours
            case _:
                await super().stf(state, input, actions)


class StampsTimeFirst(DentistMachine):
    """Records the time of a request before validating it: a refused request still moves
    ``state.now``. The Runtime's rollback would hide it; the atomicity check does not, which is
    what lets the clinic run with ``rollback="trust-rejected"``."""

    async def stf(self, state: Clinic, input: Input[BookingInput, str, ClinicResult],
                  actions: Actions) -> None:
        match input:
            case Normal(BookSlot(at=at)):
                state.now = max(state.now, at)
        await super().stf(state, input, actions)


@pytest.mark.parametrize(
    ("machine", "check", "needle"),
    [
        (IgnoresHeldSlots(), "invariant", "no_overlapping_bookings"),
        (KeepsDeclinedBookings(), "invariant", "failed_payments_leave_no_booking"),
        (IgnoresPreferredTimes(), "invariant", "bookings_match_requests"),
        (OverrunsClosingTime(), "invariant", "bookings_inside_working_hours"),
        (StampsTimeFirst(), "atomicity", "after changing state (state['now']"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, DentistMachine) else None,
)
def test_the_simulation_finds_a_broken_rule(machine: DentistMachine, check: str,
                                             needle: str) -> None:
    sim = dentist_sim(Patients(), approve=0.6, machine=machine)
    report = sim.run(seeds=30)
    assert report.failures, f"{type(machine).__name__}: no seed found the bug"
    failure = report.failures[0]
    assert (failure.check, needle in failure.message) == (check, True), str(failure)
    # The failure is a reproduction: replaying its seed fails the same way, at the same step.
    again = sim.replay(failure.seed or 0).failure
    assert again is not None and (again.step, again.message) == (failure.step, failure.message)
