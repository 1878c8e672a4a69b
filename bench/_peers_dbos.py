"""The payments ledger on DBOS Transact, with SQLite for the system and the application database.

The natural modelling: a workflow per input. The ledger lives in the application database
(tables ``accounts``, ``pending`` and ``counter``) and is changed by one DBOS transaction
(``SQLAlchemyDatasource.transaction``), which debits the account if its balance allows (the
validation), takes the payment id from the counter and records the pending payment; DBOS stores
the transaction's output in the same database transaction, and the workflow's status in the
system database.
Calling the workflow function returns once the workflow has finished, so the caller is answered
after every one of those commits. Two shapes:

* ``tx``: the workflow runs that one transaction; the pending row is the tracked charge (as
  with eventsourcing, where a follower would pick it up).
* ``tx+step``: the workflow then runs the charge as a DBOS step (returning at once, as fasm's
  executor does), which DBOS checkpoints: the full equivalent of fasm's tracked charge, whose
  result fasm also commits.

Settings: ``default`` leaves SQLite as DBOS opens it (DBOS sets a busy timeout and IMMEDIATE
transactions, and no journal mode: SQLite's rollback journal); ``wal`` presets both database
files to WAL before DBOS opens them (the journal mode is stored in the file). Neither sets
``synchronous``: SQLite's default applies, read back from DBOS's own engines after the run.

DBOS is a process-wide singleton whose registry keeps every datasource ever created, so each
case runs in a process of its own (the parent starts one per case).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from dbos import DBOS, SQLAlchemyDatasource

from bench._peers_common import INITIAL_BALANCE, Meter, Result, Timed, timed_loop


class Insufficient(Exception):
    """A payment larger than the balance (the domain rejection)."""


class _Ledger:
    """The datasource of the current case (one case per process), for the workflow bodies."""

    ds: SQLAlchemyDatasource | None = None
    record: Any = None


def _record_payment(account: int, amount: int) -> int:
    # The first statement writes: pysqlite opens the (IMMEDIATE) transaction only at the first
    # data-changing statement, so a leading SELECT would read the counter before the write lock
    # is held, and two concurrent workflows could take the same id.
    assert _Ledger.ds is not None
    session = _Ledger.ds.sql_session()
    debited = session.execute(
        sa.text("UPDATE accounts SET balance = balance - :m WHERE id = :a AND balance >= :m"),
        {"m": amount, "a": account})
    if debited.rowcount != 1:  # type: ignore[attr-defined]
        raise Insufficient(f"account {account}")  # DBOS rolls the transaction back
    pid = session.execute(sa.text(
        "UPDATE counter SET next_id = next_id + 1 WHERE id = 0 RETURNING next_id - 1")).scalar_one()
    session.execute(sa.text("INSERT INTO pending (id, account, amount) VALUES (:p, :a, :m)"),
                    {"p": pid, "a": account, "m": amount})
    return int(pid)


@DBOS.step()
def charge(pid: int, account: int, amount: int) -> bool:
    """The payment provider's charge: returns at once, as fasm's benchmark executor does."""
    return True


@DBOS.workflow()
def pay_tx(account: int, amount: int) -> int:
    return int(_Ledger.record(account, amount))


@DBOS.workflow()
def pay_tx_step(account: int, amount: int) -> int:
    pid = int(_Ledger.record(account, amount))
    charge(pid, account, amount)
    return pid


def _preset_wal(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def _make_ledger(ds: SQLAlchemyDatasource, accounts: int) -> None:
    with ds.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE accounts (id INTEGER PRIMARY KEY, "
                             "balance INTEGER NOT NULL)"))
        conn.execute(sa.text("CREATE TABLE pending (id INTEGER PRIMARY KEY, "
                             "account INTEGER NOT NULL, amount INTEGER NOT NULL)"))
        conn.execute(sa.text("CREATE TABLE counter (id INTEGER PRIMARY KEY, "
                             "next_id INTEGER NOT NULL)"))
        conn.execute(sa.text("INSERT INTO counter (id, next_id) VALUES (0, 0)"))
        conn.execute(sa.text("INSERT INTO accounts (id, balance) VALUES (:i, :b)"),
                     [{"i": i, "b": INITIAL_BALANCE} for i in range(accounts)])


def run(case_id: str, shape: str, setting: str, accounts: int, submitters: int,
        duration: float, where: Path) -> Result:
    """Measure payments through DBOS workflows on fresh SQLite files in ``where``.

    Args:
        shape: ``"tx"`` or ``"tx+step"`` (see the module docstring).
        setting: ``"default"`` or ``"wal"``.
        submitters: 1 (each workflow finishes before the next starts) or more threads, each
            running workflows one after another.

    Returns:
        The run's result, with the journal mode and synchronous level read back from DBOS's
        system-database engine and from the datasource's engine.
    """
    logging.getLogger("dbos").setLevel(logging.WARNING)
    system_db, app_db = where / "dbos_system.sqlite", where / "ledger.sqlite"
    if setting == "wal":
        _preset_wal(system_db)
        _preset_wal(app_db)
    ds = SQLAlchemyDatasource.create(f"sqlite:///{app_db}")
    _make_ledger(ds, accounts)
    _Ledger.ds = ds
    _Ledger.record = ds.transaction(name="record_payment")(_record_payment)
    workflow = pay_tx if shape == "tx" else pay_tx_step
    DBOS(config={"name": "fasm-bench-peers", "system_database_url": f"sqlite:///{system_db}",
                 "run_admin_server": False, "log_level": "WARNING"})
    DBOS.launch()
    try:
        workflow(0, 1)  # untimed: the first workflow warms the engines' connection pools
        if submitters == 1:
            timed = timed_loop(duration, lambda i: workflow(i % accounts, 1))
        else:
            timed = _concurrent(workflow, accounts, submitters, duration)
        checked = _pragmas("system db", _system_engine()) | _pragmas("ledger db", ds.engine)
    finally:
        DBOS.destroy()
        ds.engine.dispose()
    return timed.result(case_id, checked)


def _concurrent(workflow: Any, accounts: int, submitters: int, duration: float) -> Timed:
    counts = [0] * submitters
    lock = threading.Lock()
    meter = Meter()
    deadline = meter.start + duration

    def submitter(k: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            workflow((k * 7919 + i) % accounts, 1)
            i += 1
        with lock:
            counts[k] = i

    with ThreadPoolExecutor(max_workers=submitters) as pool:
        for future in [pool.submit(submitter, k) for k in range(submitters)]:
            future.result()
    return meter.stop(sum(counts))


def _system_engine() -> sa.Engine:
    from dbos._dbos import _get_dbos_instance  # private: read-only use, to report the PRAGMAs

    engine: sa.Engine = _get_dbos_instance()._sys_db.engine
    return engine


def _pragmas(name: str, engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    return {f"{name} journal_mode": str(mode),
            f"{name} synchronous": _SYNC.get(int(sync or 0), str(sync))}


_SYNC = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
