"""The key-value conformance suite (fasm.testing.KVConformance) on SQLite and PostgreSQL, and
check_kv as a user would call it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fasm.persistence import Database, PostgresDatabase, SQLiteDatabase
from fasm.testing import KV_CHECKS, KVConformance, check_kv


class TestSQLiteKV(KVConformance):
    @pytest.fixture(autouse=True)
    def _location(self, tmp_path: Path) -> None:
        self.path = tmp_path / "kv.db"

    async def make_database(self) -> Database:
        return SQLiteDatabase(self.path)


@pytest.mark.postgres
class TestPostgresKV(KVConformance):
    @pytest.fixture(autouse=True)
    def _location(self, pg_dsn: str, pg_schema: str) -> None:
        self.dsn, self.schema = pg_dsn, pg_schema

    async def make_database(self) -> Database:
        return PostgresDatabase(self.dsn, schema=self.schema)


@pytest.mark.anyio
async def test_check_kv_runs_every_check_on_a_private_sqlite_database(tmp_path: Path) -> None:
    made: list[Database] = []

    async def make() -> Database:
        made.append(SQLiteDatabase(tmp_path / "again.db"))
        return made[-1]

    await check_kv(make)
    assert len(made) >= len(KV_CHECKS)


@pytest.mark.anyio
async def test_a_broken_kv_layer_fails_the_suite_by_name(tmp_path: Path) -> None:
    """A database whose keys sort by a locale collation, not by bytes, is caught."""

    class Collated(SQLiteDatabase):
        def _range_sql(self, space, start, end, reverse, limit):  # type: ignore[no-untyped-def]
            sql, params = super()._range_sql(space, start, end, reverse, limit)
            return sql.replace("ORDER BY key", "ORDER BY lower(CAST(key AS TEXT))"), params

    async def make() -> Database:
        return Collated(tmp_path / "collated.db")

    with pytest.raises(AssertionError, match="kv check 'key_order' failed"):
        await check_kv(make)
