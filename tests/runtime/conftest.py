"""Helpers for runtime tests: virtual time that jumps to the next deadline, and a runtime of the
ledger machine (tests/_ledger.py) with executors and handlers that always succeed."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio import wait_all_tasks_blocked

from fasm.persistence import FileStore, MemoryStore, PostgresStore, SQLiteStore, Store
from fasm.runtime import ActionContext, ManualClock, Runtime
from tests._ledger import Charge, Charged, Ledger, LedgerMachine, Note

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["memory", "file", "sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Makes stores that all see the same data (a restart opens a new one; memory: the same
    object), on every backend."""
    if request.param == "memory":
        shared = MemoryStore()
        yield lambda: shared
    elif request.param == "file":
        yield lambda: FileStore(tmp_path / "fs")
    elif request.param == "sqlite":
        yield lambda: SQLiteStore(tmp_path / "db.sqlite")
    else:
        dsn = request.getfixturevalue("pg_dsn")
        schema = request.getfixturevalue("pg_schema")
        yield lambda: PostgresStore(dsn, schema=schema)


async def ok_charge(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


async def quiet(note: Note) -> None:
    pass


def make(store: MemoryStore | None = None, **kw: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
    """A ledger runtime (account "a" holds 100) on a ManualClock; ``kw`` overrides any option."""
    kw.setdefault("executors", {Charge: ok_charge})
    kw.setdefault("handlers", {Note: quiet})
    kw.setdefault("clock", ManualClock())
    return Runtime(LedgerMachine(), initial_state=lambda: Ledger(balances={"a": 100}),
                   store=store or MemoryStore(), **kw)


class JumpingClock(ManualClock):
    """Virtual time that jumps to whatever deadline is slept until."""

    async def sleep_until(self, deadline: float) -> None:
        self.advance_to(deadline)
        await super().sleep_until(deadline)


async def run_clock(clock: ManualClock, until: Callable[[], bool], *, limit: int = 1000) -> None:
    """Let every task run until blocked, then jump the clock to the next deadline; repeat until
    ``until()`` holds. Fails instead of hanging."""
    for _ in range(limit):
        await wait_all_tasks_blocked()
        if until():
            return
        if clock.next_deadline == math.inf:
            await wait_all_tasks_blocked()
            if until():
                return
            raise AssertionError("nothing left to wait for, and the condition does not hold")
        clock.advance_to(clock.next_deadline)
    raise AssertionError(f"condition still false after {limit} clock jumps")
