"""Store identity (Store rule 5): made once with the store's data, stable across reopen,
distinct between stores, present after open (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fasm.persistence import FileStore, MemoryStore, SQLiteDatabase, SQLiteStore

pytestmark = pytest.mark.anyio


async def _identity(store: object) -> str:
    await store.open()  # type: ignore[attr-defined]
    try:
        return str(store.identity)  # type: ignore[attr-defined]
    finally:
        await store.close()  # type: ignore[attr-defined]


async def test_memory_identity_per_data() -> None:
    a = MemoryStore()
    first = await _identity(a)
    assert first and await _identity(MemoryStore(data=a.data)) == first
    assert await _identity(MemoryStore()) != first


async def test_file_identity_stable_and_distinct(tmp_path: Path) -> None:
    first = await _identity(FileStore(tmp_path / "a", fsync=False))
    assert first == await _identity(FileStore(tmp_path / "a", fsync=False))
    assert first != await _identity(FileStore(tmp_path / "b", fsync=False))


async def test_file_store_of_older_fasm_gets_an_identity_once(tmp_path: Path) -> None:
    await _identity(FileStore(tmp_path / "a", fsync=False))
    (tmp_path / "a" / "FASM-STORE-ID").unlink()  # as an older fasm left it
    made = await _identity(FileStore(tmp_path / "a", fsync=False))
    assert made == await _identity(FileStore(tmp_path / "a", fsync=False))


async def test_sqlite_identity_stable_and_distinct(tmp_path: Path) -> None:
    first = await _identity(SQLiteStore(tmp_path / "a.db"))
    assert first == await _identity(SQLiteStore(tmp_path / "a.db"))
    assert first != await _identity(SQLiteStore(tmp_path / "b.db"))


async def test_sqlite_database_identity_stable_and_distinct(tmp_path: Path) -> None:
    first = await _identity(SQLiteDatabase(tmp_path / "a.db"))
    assert first == await _identity(SQLiteDatabase(tmp_path / "a.db"))
    assert first != await _identity(SQLiteDatabase(tmp_path / "b.db"))


async def test_postgres_identity_stable_and_distinct(pg_dsn: str, pg_schema: str) -> None:
    from fasm.persistence import PostgresDatabase, PostgresStore
    first = await _identity(PostgresStore(pg_dsn, schema=pg_schema))
    assert first == await _identity(PostgresStore(pg_dsn, schema=pg_schema))
    other = await _identity(PostgresStore(pg_dsn, schema=pg_schema, table_prefix="other_"))
    assert first != other
    db = await _identity(PostgresDatabase(pg_dsn, schema=pg_schema))
    assert db == await _identity(PostgresDatabase(pg_dsn, schema=pg_schema)) and db != first


class _NoIdentity:
    """A user's store written against the protocol before it had ``identity``."""

    def __init__(self) -> None:
        self._inner = MemoryStore()

    def __getattr__(self, name: str) -> object:
        if name == "identity":
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_a_store_without_identity_is_a_definition_error_at_start() -> None:
    from dataclasses import dataclass

    from fasm import DefinitionError, StateMachine
    from fasm.runtime import Runtime

    @dataclass
    class N:
        n: int = 0

    class Count(StateMachine[N, int]):
        async def stf(self, state: N, input: object, actions: object) -> None:
            state.n += 1

        async def restore(self, state: N, actions: object) -> None:
            return None

    store = _NoIdentity()
    with pytest.raises(DefinitionError, match="identity"):
        async with Runtime(Count(), initial_state=N, store=store):  # type: ignore[arg-type]
            pass
    await store._inner.open()  # the failed start closed the store and released the key
    await store._inner.acquire("default")
    await store._inner.close()
