"""The booking tables, with the constraints that make a double booking impossible.

Every database: a live booking holds one row in ``slots`` per 30 minutes it lasts, and
``UNIQUE (dentist, slot_minute)`` refuses a second booking of any of them. PostgreSQL also gets an
exclusion constraint over the bookings' time ranges (it needs the btree_gist extension), which
would keep overlapping bookings out even without the slot rows.
"""

from __future__ import annotations

from fasm.persistence import Database

TABLES = (
    "CREATE TABLE dentists (name TEXT PRIMARY KEY, opens INTEGER NOT NULL, "
    "closes INTEGER NOT NULL, CHECK (opens < closes))",
    "CREATE TABLE bookings (id BIGINT PRIMARY KEY, patient TEXT NOT NULL, "
    "dentist TEXT NOT NULL REFERENCES dentists (name), start_minute BIGINT NOT NULL, "
    "end_minute BIGINT NOT NULL, deposit_cents INTEGER NOT NULL, auth_code TEXT, reason TEXT, "
    "status TEXT NOT NULL "
    "CHECK (status IN ('awaiting_payment', 'confirmed', 'declined', 'cancelled')), "
    "CHECK (end_minute > start_minute))",
    "CREATE TABLE slots (dentist TEXT NOT NULL, slot_minute BIGINT NOT NULL, "
    "booking_id BIGINT NOT NULL REFERENCES bookings (id), UNIQUE (dentist, slot_minute))",
)

POSTGRES_EXCLUSION = (
    "CREATE EXTENSION IF NOT EXISTS btree_gist",
    "ALTER TABLE bookings ADD CONSTRAINT bookings_no_overlap EXCLUDE USING gist "
    "(dentist WITH =, int8range(start_minute, end_minute) WITH &&) "
    "WHERE (status IN ('awaiting_payment', 'confirmed'))",
)

DENTISTS = [("dr_ada", 9 * 60, 17 * 60), ("dr_bob", 8 * 60, 12 * 60)]


async def create(database: Database, *, postgres: bool) -> str:
    """Create the tables and the dentists; return which constraints guard against double
    booking (on PostgreSQL without btree_gist, the exclusion constraint is left out)."""
    async with database, database.transaction() as tx:
        for statement in TABLES:
            await tx.execute(statement)
        await tx.executemany("INSERT INTO dentists (name, opens, closes) VALUES (?, ?, ?)",
                             DENTISTS)
    guard = "UNIQUE (dentist, slot_minute)"
    if not postgres:
        return guard
    try:
        async with database, database.transaction() as tx:
            for statement in POSTGRES_EXCLUSION:
                await tx.execute(statement)
    except Exception as e:  # the extension is not installed, or we may not create it
        return f"{guard} (btree_gist unavailable, no exclusion constraint: {e})"
    return f"{guard} and EXCLUDE USING gist (dentist WITH =, time range WITH &&)"
