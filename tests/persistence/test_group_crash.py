"""A crash in the middle of a group commit (``commit_many``) leaves all of it or none of it on
every durable store, the in-flight marks included.

A child process commits a group of keys and dies with ``os._exit`` at its n-th write (FileStore:
every file write and directory fsync, so every boundary of the redo record and of applying it;
SQL stores: every key's part inside the transaction, and just before ``COMMIT``), for every n
until the group completes. The parent then opens the store and finds each key either all at the
group's seq with the group's marks, or all as before.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from fasm.persistence import FileStore, SQLiteStore, Store

ROOT = Path(__file__).resolve().parents[2]
KEYS = [f"acct-{i}" for i in range(6)] + ["ü/long-" + "x" * 150]  # one hashed directory name

_CHILD = """
import os, sys, anyio
sys.path.insert(0, {root!r})
from fasm.persistence import FileStore, SQLiteStore, KeyCommit
KEYS = {keys!r}
CRASH_AT = {crash_at}
calls = -10**9  # no crash while opening and seeding

def tick():
    global calls
    calls += 1
    if calls == CRASH_AT:
        os._exit(17)

class CrashingFile(FileStore):
    def _write_at(self, fd, data, offset):
        tick()
        super()._write_at(fd, data, offset)
    def _sync_dir(self, path):
        tick()
        super()._sync_dir(path)

class CrashingSQLite(SQLiteStore):
    def _write(self, conn, c, known):
        tick()
        super()._write(conn, c, known)
        if c.key == KEYS[-1]:
            tick()  # after the last part, before COMMIT

def crashing_postgres(dsn, schema):
    from fasm.persistence import PostgresStore
    class CrashingPostgres(PostgresStore):
        def _write(self, conn, c, token):
            tick()
            super()._write(conn, c, token)
            if c.key == KEYS[-1]:
                tick()
    return CrashingPostgres(dsn, schema=schema)

async def main():
    global calls
    store = {make}
    await store.open()
    await store.acquire_all()

    for i, k in enumerate(KEYS):
        if (await store.load(k)) is None:
            await store.commit(k, expected_seq=0, seq=1, entries=[b"first"],
                               in_flight=(i % 2 == 0))
    calls = 0
    group = [KeyCommit(k, 1, 3, checkpoint=b"ckpt-" + k.encode(), in_flight=False)
             if i == 3 else KeyCommit(k, 1, 3, [b"second", b"third"], in_flight=(i % 2 == 1))
             for i, k in enumerate(KEYS)]
    await store.commit_many(group)
    print("DONE", flush=True)

anyio.run(main)
"""


def _child(make: str, crash_at: int) -> int:
    script = _CHILD.format(root=str(ROOT), keys=KEYS, crash_at=crash_at, make=make)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    if done.returncode not in (0, 17):
        raise AssertionError(f"child failed: {done.stderr}")
    return done.returncode


async def _judge(store: Store) -> str:
    await store.open()
    try:
        got = {k: await store.load(k) for k in KEYS}
        marked = [k for k in await store.keys_in_flight() if k in KEYS]
    finally:
        await store.close()
    seqs = {k: r.seq if r is not None else None for k, r in got.items()}
    if all(s == 1 for s in seqs.values()):
        want_marks = {k: i % 2 == 0 for i, k in enumerate(KEYS)}
        state = "none"
    else:
        assert all(s == 3 for s in seqs.values()), f"torn group commit: {seqs}"
        want_marks = {k: i % 2 == 1 and i != 3 for i, k in enumerate(KEYS)}
        for i, k in enumerate(KEYS):
            r = got[k]
            assert r is not None
            if i == 3:
                assert r.checkpoint == b"ckpt-" + k.encode() and r.journal == ()
            else:
                assert [e for _, e in r.journal] == [b"first", b"second", b"third"]
        state = "all"
    for k, r in got.items():
        assert r is not None and r.in_flight is want_marks[k], (k, r, state)
    assert marked == sorted(k for k, m in want_marks.items() if m), (marked, state)
    return state


def _crash_everywhere(make: Callable[[int], tuple[str, Store]]) -> list[str]:
    """For n = 1, 2, ...: a fresh store location, a child crashing at its n-th write, the
    outcome, until the child completes."""
    outcomes = []
    for n in range(1, 200):
        expression, store = make(n)
        code = _child(expression, n)
        outcomes.append(anyio.run(_judge, store))
        if code == 0:
            break
    else:
        raise AssertionError("the group commit never completed")
    return outcomes


def _check(outcomes: list[str]) -> None:
    assert outcomes[-1] == "all"
    assert "none" in outcomes, "no crash point fell before the commit point"
    # once a crash point shows the group, every later one does (the commit point is one step)
    assert outcomes == sorted(outcomes, key=lambda o: o == "all"), outcomes


def test_file_store_group_commit_is_all_or_nothing(tmp_path: Path) -> None:
    def make(n: int) -> tuple[str, Store]:
        d = tmp_path / f"files-{n}"
        return f"CrashingFile({str(d)!r})", FileStore(d)

    outcomes = _crash_everywhere(make)
    _check(outcomes)
    assert len(outcomes) > 10, outcomes  # every write and directory sync of the group
    assert not any(tmp_path.glob("files-*/FASM-STORE-REDO*")), "a replayed record was left"


def test_sqlite_store_group_commit_is_all_or_nothing(tmp_path: Path) -> None:
    def make(n: int) -> tuple[str, Store]:
        db = tmp_path / f"s-{n}.db"
        return f"CrashingSQLite({str(db)!r})", SQLiteStore(db)

    _check(_crash_everywhere(make))


@pytest.mark.postgres
def test_postgres_store_group_commit_is_all_or_nothing(pg_dsn: str, pg_schema: str) -> None:
    import psycopg

    from fasm.persistence import PostgresStore

    schemas: list[str] = []

    def make(n: int) -> tuple[str, Store]:
        schemas.append(f"{pg_schema}_{n}")
        return (f"crashing_postgres({pg_dsn!r}, {schemas[-1]!r})",
                PostgresStore(pg_dsn, schema=schemas[-1]))

    try:
        _check(_crash_everywhere(make))
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for schema in schemas:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
