"""Dentist booking with state in a database: SQLite by default, PostgreSQL with ``--postgres``.

The machine's state is a database transaction. Bookings, the 30-minute slots they hold and the
dentists' hours are SQL tables whose constraints make a double booking impossible (a UNIQUE
slot on every database, and on PostgreSQL an exclusion constraint over time ranges too); each
booking's deposit is pre-authorised with a card provider as a tracked action, and after a crash
``restore`` finds the bookings still awaiting payment in their rows. A patient's history lives in
the key-value layer.

    python examples/dentist_booking_sql/run.py                  # SQLite, ./dentist-data/
    python examples/dentist_booking_sql/run.py --postgres DSN   # PostgreSQL
"""
