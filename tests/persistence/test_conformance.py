"""Every backend passes the public conformance suite; the suite catches broken stores."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fasm import Normal
from fasm.persistence import Codec, FileStore, MemoryStore, SQLiteStore, Store, StoredRecords
from fasm.persistence._file_format import key_file_name
from fasm.testing import STORE_CHECKS, StoreConformance, check_store
from fasm.testing._store_suite import _Probe
from tests.persistence._faults import flip_byte, flip_file_byte

# -- the backends ----------------------------------------------------------------------------


class TestMemoryStore(StoreConformance):
    durable = False

    @pytest.fixture(autouse=True)
    def _data(self) -> None:
        self.data: dict[str, object] = {}

    async def make_store(self) -> Store:
        return MemoryStore(data=self.data)

    async def corrupt(self, key: str) -> None:
        record: Any = self.data["keys"][key]  # type: ignore[index]
        record.journal[1] = (record.journal[1][0], flip_byte(record.journal[1][1], 20))

    async def delete_checkpoint(self, key: str) -> None:
        record: Any = self.data["keys"][key]  # type: ignore[index]
        record.checkpoint = None


class TestFileStore(StoreConformance):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "store"

    async def make_store(self) -> Store:
        return FileStore(self.dir)

    async def corrupt(self, key: str) -> None:
        (checkpoint,) = (self.dir / key_file_name(key)).glob("ckpt-*")
        flip_file_byte(checkpoint, checkpoint.stat().st_size - 3)

    async def delete_checkpoint(self, key: str) -> None:
        (checkpoint,) = (self.dir / key_file_name(key)).glob("ckpt-*")
        checkpoint.unlink()


class TestFileStoreInline(TestFileStore):
    """The same store with every call on the event loop's thread."""

    async def make_store(self) -> Store:
        return FileStore(self.dir, inline=True)


class TestSQLiteStore(StoreConformance):
    @pytest.fixture(autouse=True)
    def _path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "store.sqlite"

    async def make_store(self) -> Store:
        return SQLiteStore(self.path)

    async def corrupt(self, key: str) -> None:
        with sqlite3.connect(self.path) as db:
            (entry,) = db.execute("SELECT entry FROM fasm_journal WHERE key = ? AND seq = 3",
                                  (key,)).fetchone()
            db.execute("UPDATE fasm_journal SET entry = ? WHERE key = ? AND seq = 3",
                       (flip_byte(entry, 5), key))
        db.close()

    async def delete_checkpoint(self, key: str) -> None:
        with sqlite3.connect(self.path) as db:
            db.execute("DELETE FROM fasm_checkpoints WHERE key = ?", (key,))
        db.close()


class TestSQLiteStoreInline(TestSQLiteStore):
    """The same store with every call on the event loop's thread."""

    async def make_store(self) -> Store:
        return SQLiteStore(self.path, inline=True)


@pytest.mark.postgres
class TestPostgresStore(StoreConformance):
    @pytest.fixture(autouse=True)
    def _schema(self, pg_dsn: str, pg_schema: str) -> None:
        self.dsn, self.schema = pg_dsn, pg_schema

    async def make_store(self) -> Store:
        from fasm.persistence import PostgresStore

        return PostgresStore(self.dsn, schema=self.schema)

    async def corrupt(self, key: str) -> None:
        import psycopg
        from psycopg import sql

        table = sql.Identifier(self.schema, "fasm_keys")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(sql.SQL("SELECT checkpoint FROM {} WHERE key = %s").format(table),
                               (key,)).fetchone()
            assert row is not None
            conn.execute(sql.SQL("UPDATE {} SET checkpoint = %s WHERE key = %s").format(table),
                         (flip_byte(row[0], 7), key))

    async def delete_checkpoint(self, key: str) -> None:
        import psycopg
        from psycopg import sql

        # The checkpoint is a column of the key's row: clearing it is what deleting it means.
        table = sql.Identifier(self.schema, "fasm_keys")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("UPDATE {} SET checkpoint = NULL, checkpoint_crc = NULL "
                                 "WHERE key = %s").format(table), (key,))


# -- the suite itself ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_check_store_passes_a_good_store() -> None:
    data: dict[str, object] = {}

    async def make() -> Store:
        return MemoryStore(data=data)

    await check_store(make, durable=False, big_state_bytes=1024)


class _Unfenced(MemoryStore):
    """Writes whatever it is given: ignores expected_seq."""

    async def commit(self, key: str, *, expected_seq: int, seq: int,
                     entries: Sequence[bytes] = (), checkpoint: bytes | None = None) -> None:
        current = await self.load(key)
        await super().commit(key, expected_seq=current.seq if current else 0, seq=seq,
                             entries=entries, checkpoint=checkpoint)


class _Shared(MemoryStore):
    """acquire never refuses."""

    async def acquire(self, key: str) -> None:
        self._check_open(key)


class _Lenient(MemoryStore):
    """Loads a key whose checkpoint is gone as a key never committed."""

    async def load(self, key: str) -> StoredRecords | None:
        record: Any = self._keys().get(key)
        if record is not None and record.checkpoint is None and record.checkpoint_seq:
            return None
        return await super().load(key)


class _Unsorted(MemoryStore):
    """Lists keys in the order they were made, not sorted."""

    async def keys(self, after: str | None = None, limit: int = 1000) -> list[str]:
        return [k for k in self._keys() if after is None or k > after][:limit]


class _Forgetful(MemoryStore):
    """Drops the journal tail it cannot read instead of raising StoreCorrupt."""

    async def load(self, key: str) -> StoredRecords | None:
        got = await super().load(key)
        if got is None or not self.data.get("damaged"):
            return got
        return StoredRecords(got.seq - 1, got.checkpoint, got.checkpoint_seq, got.journal[:-1])


@pytest.mark.anyio
@pytest.mark.parametrize(("store_class", "check"), [
    (_Unfenced, "stale_writer"),
    (_Shared, "acquire"),
    (_Forgetful, "corruption"),
    (_Lenient, "lost_checkpoint"),
    (_Unsorted, "keys"),
])
async def test_check_store_names_the_failed_check(store_class: type[MemoryStore],
                                                  check: str) -> None:
    data: dict[str, object] = {}

    async def make() -> Store:
        return store_class(data=data)

    async def corrupt(key: str) -> None:
        data["damaged"] = True
        record: Any = data["keys"][key]  # type: ignore[index]
        record.journal[1] = (record.journal[1][0], flip_byte(record.journal[1][1], 20))

    async def delete_checkpoint(key: str) -> None:
        data["keys"][key].checkpoint = None  # type: ignore[index]

    with pytest.raises(AssertionError, match=f"store check '{check}' failed"):
        await check_store(make, durable=False, corrupt=corrupt, big_state_bytes=1024,
                          delete_checkpoint=delete_checkpoint)


@pytest.mark.anyio
async def test_a_hook_that_damages_nothing_fails_the_corruption_check() -> None:
    data: dict[str, object] = {}

    async def make() -> Store:
        return MemoryStore(data=data)

    async def corrupt(key: str) -> None:
        return None

    with pytest.raises(AssertionError, match="corrupt hook must damage"):
        await check_store(make, durable=False, corrupt=corrupt, big_state_bytes=1024)


@pytest.mark.anyio
async def test_silently_different_valid_data_fails_the_corruption_check() -> None:
    """A backend that returns another record that decodes fine is caught."""
    data: dict[str, object] = {}

    async def make() -> Store:
        return MemoryStore(data=data)

    async def corrupt(key: str) -> None:
        record: Any = data["keys"][key]  # type: ignore[index]
        record.journal[0] = (2, Codec(_Probe).encode_entry(2, Normal("forged"), None))

    with pytest.raises(AssertionError, match="must fail decoding"):
        await check_store(make, durable=False, corrupt=corrupt, big_state_bytes=1024)


def test_the_class_has_a_test_per_check() -> None:
    assert sorted(f"test_{name}" for name in STORE_CHECKS) == sorted(
        name for name in vars(StoreConformance) if name.startswith("test_"))
