"""The dentist booking example on SQLite and PostgreSQL: the scripted demo, the script itself,
and the constraints and restore it is there to show."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from examples.dentist_booking_sql import run, schema
from examples.dentist_booking_sql.machine import (
    DentistBooking,
    History,
    PreAuthorize,
    start_minute,
)
from fasm import ActionList, ConstraintViolation, Tracked
from tests.persistence.txn_ledger import DatabaseFactory, make_db

__all__ = ("make_db",)  # the fixture, imported so that pytest finds it here

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "dentist_booking_sql" / "run.py"


def _is_postgres(make_db: DatabaseFactory) -> bool:
    return "postgres" in make_db().description


@pytest.mark.anyio
async def test_the_demo_runs_to_a_consistent_report(make_db: DatabaseFactory) -> None:
    lines: list[str] = []
    report = await run.main(make_db, postgres=_is_postgres(make_db), out=lines.append)
    assert report.consistent, report.problems
    refused = [o for o in report.outcomes if "refused" in o]
    assert sum("SlotTaken" in o for o in refused) == 3  # inside an hour, same slot, the race
    assert sum(o.split()[0] in ("gia", "hal") for o in refused) == 1
    assert report.restored == [6]  # fay's booking, found in its row after the crash
    statuses = {b[1]: b[5] for b in report.bookings}
    assert statuses["ana"] == "cancelled" and statuses["dee"] == "declined"
    assert statuses["fay"] == statuses["gus"] == statuses["eve"] == "confirmed"
    assert report.histories["ana"] == History(confirmed=1, cancelled=1)
    assert report.histories["dee"] == History(declined=1)
    assert any("CONSISTENT" in line for line in lines)
    if _is_postgres(make_db):
        assert "EXCLUDE USING gist" in report.guard
        assert "constraint bookings_no_overlap" in refused[0]


@pytest.mark.anyio
async def test_restore_reads_the_bookings_awaiting_payment(make_db: DatabaseFactory) -> None:
    await schema.create(make_db(), postgres=False)
    m = start_minute("2025-03-03", "09:00")
    async with make_db() as db, db.transaction() as tx:
        await tx.executemany(
            "INSERT INTO bookings (id, patient, dentist, start_minute, end_minute, status, "
            "deposit_cents) VALUES (?, ?, 'dr_ada', ?, ?, ?, 2500)",
            [(3, "cy", m, m + 30, "awaiting_payment"), (1, "ana", m + 30, m + 60, "confirmed"),
             (2, "ben", m + 60, m + 90, "awaiting_payment"), (4, "dee", m + 90, m + 120,
                                                              "declined")])
    actions: ActionList[int, PreAuthorize, object] = ActionList()
    async with make_db() as db, db.transaction(readonly=True) as tx:
        await DentistBooking().restore(tx, actions)  # type: ignore[arg-type]
    assert list(actions) == [Tracked(2, PreAuthorize(2, "ben", 2500)),
                             Tracked(3, PreAuthorize(3, "cy", 2500))]


@pytest.mark.anyio
@pytest.mark.postgres
async def test_the_exclusion_constraint_alone_refuses_an_overlap(pg_dsn: str,
                                                                 pg_schema: str) -> None:
    make = run.postgres_databases(pg_dsn, pg_schema)
    assert "EXCLUDE" in await schema.create(make(), postgres=True)
    m = start_minute("2025-03-03", "09:00")
    insert = ("INSERT INTO bookings (id, patient, dentist, start_minute, end_minute, status, "
              "deposit_cents) VALUES (?, ?, 'dr_ada', ?, ?, ?, 2500)")
    async with make() as db, db.transaction() as tx:
        await tx.execute(insert, (1, "ana", m, m + 60, "confirmed"))
        await tx.execute(insert, (2, "old", m, m + 60, "cancelled"))  # not live: allowed
    with pytest.raises(ConstraintViolation) as refused:
        async with make() as db, db.transaction() as tx:  # no slot rows: the range decides
            await tx.execute(insert, (3, "ben", m + 45, m + 75, "awaiting_payment"))
    assert refused.value.constraint == "bookings_no_overlap"


def test_the_script_runs_on_sqlite(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--db", str(tmp_path / "b.db"),
                           "--backend", "trio"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restore re-emitted the pre-authorisations of bookings [6]" in done.stdout
    assert "CONSISTENT" in done.stdout and "Traceback" not in done.stderr


@pytest.mark.postgres
def test_the_script_runs_on_postgres(pg_dsn: str) -> None:
    schema_name = f"fasm_test_{uuid.uuid4().hex[:12]}"
    try:
        done = subprocess.run([sys.executable, str(SCRIPT), "--postgres", pg_dsn,
                               "--schema", schema_name], capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "bookings_no_overlap" in done.stdout and "CONSISTENT" in done.stdout
    finally:
        import psycopg

        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema_name}" CASCADE')
