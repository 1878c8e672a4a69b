"""The payments ledger on the ``eventsourcing`` library (SQLite infrastructure).

The natural modelling: one ``Ledger`` aggregate per ledger, created with its accounts; the
command ``pay`` validates the balance and triggers one ``PaymentRecorded`` event, whose ``apply``
debits the account, records the pending payment (the pending charge, which a downstream
process application would follow through the notification log) under an id taken from the
counter, and advances the counter. ``Application.save`` writes the event in one SQLite
transaction, so the caller is answered after the commit.

eventsourcing has no setting for SQLite's ``synchronous``: it switches the database to WAL and
leaves ``synchronous`` at SQLite's default. The run reads both back from the library's own
pooled connection, so the report shows what was in force, not what was assumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from bench._peers_common import INITIAL_BALANCE, Result, timed_loop

# The settings measured, from the library's application docs ("Application configuration"):
# no cache (the default: every command replays the aggregate's events); the aggregate cache
# (which deep-copies the cached aggregate for each command); the cache without the copy; and the
# cache without the copy nor fast-forwarding (the docs' advice for a single application instance,
# which saves the query for newer events).
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "cache": {"AGGREGATE_CACHE_MAXSIZE": "100"},
    "cache-nocopy": {"AGGREGATE_CACHE_MAXSIZE": "100", "DEEPCOPY_FROM_AGGREGATE_CACHE": "n"},
    "fastest": {"AGGREGATE_CACHE_MAXSIZE": "100", "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
                "AGGREGATE_CACHE_FASTFORWARD": "n"},
}

class Insufficient(Exception):
    """A payment larger than the balance (the domain rejection)."""


class Ledger(Aggregate):
    """Accounts with balances, the pending payments and the counter that numbers them.

    Keys are strings because the library's JSON transcoder would turn integer keys into strings
    when the aggregate is rebuilt from its events.
    """

    @event("Opened")
    def __init__(self, accounts: int) -> None:
        self.balances = {str(a): INITIAL_BALANCE for a in range(accounts)}
        self.pending: dict[str, list[int]] = {}
        self.next_id = 0

    def pay(self, account: int, amount: int) -> None:
        balance = self.balances.get(str(account))
        if balance is None or balance < amount:
            raise Insufficient(f"account {account}")
        self._record(self.next_id, account, amount)

    @event("PaymentRecorded")
    def _record(self, pid: int, account: int, amount: int) -> None:
        self.balances[str(account)] -= amount
        self.pending[str(pid)] = [account, amount]  # the pending (tracked) charge
        self.next_id = pid + 1


class Payments(Application):
    """The application service: open a ledger, pay from an account."""

    def open(self, accounts: int) -> UUID:
        ledger = Ledger(accounts)
        self.save(ledger)
        return ledger.id

    def pay(self, ledger_id: UUID, account: int, amount: int) -> None:
        ledger: Ledger = self.repository.get(ledger_id)
        ledger.pay(account, amount)
        self.save(ledger)


def run(case_id: str, setting: str, accounts: int, duration: float, where: Path) -> Result:
    """Measure sequential payments on a fresh SQLite database in ``where``.

    Returns:
        The run's result, with the journal mode and synchronous level read back from the
        library's connection.
    """
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite",
           "SQLITE_DBNAME": str(where / "eventsourcing.db"), **SETTINGS[setting]}
    app = Payments(env=env)
    try:
        ledger_id = app.open(accounts)
        app.pay(ledger_id, 0, 1)  # untimed: primes the cache where there is one
        timed = timed_loop(duration, lambda i: app.pay(ledger_id, i % accounts, 1))
        checked = _pragmas(app)
    finally:
        app.close()
    return timed.result(case_id, checked)


def _pragmas(app: Application) -> dict[str, str]:
    datastore: Any = app.recorder.datastore  # type: ignore[attr-defined]
    with datastore.get_connection(commit=False) as conn:
        raw = conn._sqlite_conn  # the library's own sqlite3 connection (read-only use)
        mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
        sync = raw.execute("PRAGMA synchronous").fetchone()[0]
    return {"journal_mode": str(mode), "synchronous": _SYNC.get(int(sync), str(sync))}


_SYNC = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
