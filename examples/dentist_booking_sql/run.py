"""Run the dentist booking demo on SQLite (default) or PostgreSQL.

    python examples/dentist_booking_sql/run.py [--db dentist-data/booking.db]
    python examples/dentist_booking_sql/run.py --postgres postgresql://user@host/db [--schema S]

Each run starts from empty tables (the SQLite file is replaced; on PostgreSQL the schema, default
``dentist_booking_demo``, is dropped and created again). The script books, double-books, gets a
card declined, crashes right after a booking committed and before its pre-authorisation was sent,
restarts (restore finds the booking still awaiting payment in its row and sends it), cancels, and
prints a report that checks the tables against the card provider.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

if __package__ in (None, ""):  # run as a script: make `examples.dentist_booking_sql` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.dentist_booking_sql"

from fasm import Rejected
from fasm.persistence import Database, SQLiteDatabase
from fasm.runtime import (
    ActionDispatched,
    Executor,
    RetryPolicy,
    Runtime,
    RuntimeEvent,
    TransitionCommitted,
)

from . import schema
from .machine import (
    HISTORY,
    CancelBooking,
    DentistBooking,
    History,
    Notify,
    PreAuthorize,
    RequestBooking,
)
from .provider import CardProvider

DAY = "2025-03-03"

FIRST = [
    RequestBooking("ana", "dr_ada", DAY, "09:00", 60),
    RequestBooking("ben", "dr_ada", DAY, "09:30"),        # inside ana's hour: refused
    RequestBooking("ben", "dr_ada", DAY, "10:00"),
    RequestBooking("cy", "dr_ada", DAY, "10:00"),         # the same slot: refused
    RequestBooking("dee", "dr_bob", DAY, "08:00"),        # her card is declined: slot freed
    RequestBooking("zed", "dr_ada", DAY, "18:00"),        # after hours
    RequestBooking("ben", "dr_nobody", DAY, "10:00"),
]


@dataclass
class Report:
    """What the demo did and what the tables say at the end."""

    guard: str
    outcomes: list[str] = field(default_factory=list)
    restored: list[int] = field(default_factory=list)
    bookings: list[tuple[Any, ...]] = field(default_factory=list)
    histories: dict[str, History] = field(default_factory=dict)
    notifications: list[Notify] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems


async def main(make_db: Callable[[], Database], *, postgres: bool,
               out: Callable[[str], None] = print) -> Report:
    """Run the scenario against databases made by ``make_db`` (new objects, one location)."""
    report = Report(await schema.create(make_db(), postgres=postgres))
    out(f"double booking guarded by: {report.guard}")
    provider = CardProvider(declines=frozenset({"dee"}))

    async def notify(n: Notify) -> None:
        report.notifications.append(n)

    def runtime(listeners: list[Callable[[RuntimeEvent], None]] | None = None) -> Any:
        charge = Executor(provider.preauthorize, retry=RetryPolicy(initial_backoff=0.01))
        return Runtime(DentistBooking(), database=make_db(), key="front-desk",
                       executors={PreAuthorize: charge}, handlers={Notify: notify},
                       listeners=listeners or [])

    async def book(rt: Any, request: RequestBooking) -> None:
        try:
            committed = await rt.submit(request)
            outcome = f"booking {committed.actions[0].id} awaiting payment"
        except Rejected as e:
            outcome = f"refused, {type(e).__name__}: {e}"
        line = (f"{request.patient:>4} {request.dentist} {request.time} "
                f"({request.minutes} min): {outcome}")
        report.outcomes.append(line)
        out("  " + line)

    out("-- first run")
    async with runtime() as rt:
        for request in FIRST:
            await book(rt, request)
        await rt.wait_idle()  # dee's decline frees 08:00 ...
        await book(rt, RequestBooking("eve", "dr_bob", DAY, "08:00"))  # ... for eve
        # Two patients race for one slot (often in one transaction): the database lets one in.
        async with anyio.create_task_group() as tg:
            tg.start_soon(book, rt, RequestBooking("gia", "dr_ada", DAY, "11:00"))
            tg.start_soon(book, rt, RequestBooking("hal", "dr_ada", DAY, "11:00"))
        await rt.wait_idle()

    out("-- a crash right after fay's booking commits, before its pre-authorisation is sent")
    with anyio.CancelScope() as crash:

        def crash_after_commit(event: RuntimeEvent) -> None:
            if isinstance(event, TransitionCommitted) and event.input_kind == "RequestBooking":
                crash.cancel()

        async with runtime([crash_after_commit]) as rt:
            await rt.submit(RequestBooking("fay", "dr_bob", DAY, "09:00", 60))
            await anyio.sleep_forever()
    calls_before = provider.calls

    out("-- restart")

    def restored(event: RuntimeEvent) -> None:
        if isinstance(event, ActionDispatched) and provider.calls == calls_before:
            report.restored.append(event.action_id)

    async with runtime([restored]) as rt:
        out(f"  restore re-emitted the pre-authorisations of bookings {report.restored}")
        await rt.wait_idle()
        try:
            await rt.submit(CancelBooking("ana", 1))
            out("   ana cancelled booking 1")
        except Rejected as e:
            out(f"   ana could not cancel: {e}")
        await book(rt, RequestBooking("gus", "dr_ada", DAY, "09:00", 30))  # ana's freed slot
        await rt.wait_idle()

    await _check(make_db(), provider, report)
    out("-- bookings")
    for booking_id, patient, dentist, start, end, status, code in report.bookings:
        out(f"  {booking_id:>2} {patient:>4} {dentist} {(start % 1440) // 60:02d}:"
            f"{start % 60:02d} {end - start:>2} min  {status:<9} {code or ''}")
    out(f"-- histories: {report.histories}")
    verdict = "CONSISTENT" if report.consistent else f"INCONSISTENT: {report.problems}"
    out(f"report: {len(report.bookings)} bookings, {len(provider.holds)} deposits held; "
        f"{verdict}")
    return report


async def _check(database: Database, provider: CardProvider, report: Report) -> None:
    """Compare the tables with each other and with the card provider."""
    async with database, database.transaction(readonly=True) as tx:
        report.bookings = await tx.fetchall(
            "SELECT id, patient, dentist, start_minute, end_minute, status, auth_code "
            "FROM bookings ORDER BY id")
        slots = await tx.fetchall("SELECT dentist, slot_minute, booking_id FROM slots")
        report.histories = dict(await tx.kv.range(HISTORY))
    live = [b for b in report.bookings if b[5] in ("awaiting_payment", "confirmed")]
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            if a[2] == b[2] and a[3] < b[4] and b[3] < a[4]:
                report.problems.append(f"bookings {a[0]} and {b[0]} overlap")
    held = sorted((d, m) for d, m, _ in slots)
    wanted = sorted((b[2], m) for b in live for m in range(b[3], b[4], 30))
    if held != wanted:
        report.problems.append(f"slot rows {held} do not match live bookings {wanted}")
    codes = [b[6] for b in report.bookings if b[5] in ("confirmed", "cancelled")]
    if sorted(codes) != sorted(provider.holds.values()):
        report.problems.append(f"confirmed bookings {codes} != deposits held "
                               f"{sorted(provider.holds.values())}")
    if any(b[5] == "awaiting_payment" for b in report.bookings):
        report.problems.append("a booking is still awaiting payment")


def sqlite_databases(path: Path) -> Callable[[], Database]:
    """A fresh SQLite file; returns a factory of database objects on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(f"{path}.locks", ignore_errors=True)
    return lambda: SQLiteDatabase(path)


def postgres_databases(dsn: str, schema_name: str) -> Callable[[], Database]:
    """A fresh schema (dropped first); returns a factory of database objects whose connections
    use it as their search_path."""
    import psycopg
    import psycopg.conninfo
    from psycopg import sql

    from fasm.persistence import PostgresDatabase

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier(schema_name)))
    scoped = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema_name},public")
    return lambda: PostgresDatabase(scoped, schema=schema_name)


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--db", type=Path, default=Path("dentist-data/booking.db"),
                        help="the SQLite file (replaced on each run)")
    parser.add_argument("--postgres", metavar="DSN", help="use PostgreSQL instead of SQLite")
    parser.add_argument("--schema", default="dentist_booking_demo",
                        help="the PostgreSQL schema (dropped and created again)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    if args.postgres:
        make_db, postgres = postgres_databases(args.postgres, args.schema), True
    else:
        make_db, postgres = sqlite_databases(args.db), False
    report = anyio.run(lambda: main(make_db, postgres=postgres), backend=args.backend)
    return 0 if report.consistent else 1


if __name__ == "__main__":
    sys.exit(cli())
