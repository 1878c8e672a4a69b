"""SQLiteStore under faults: a locked database, a file that is not one, damaged rows, locks of
dead processes, and the synchronous modes."""

from __future__ import annotations

import os
import sqlite3
import threading
import zlib
from pathlib import Path

import pytest

from fasm.errors import StoreConflict, StoreCorrupt, StoreUnavailable
from fasm.persistence import SQLiteStore
from tests.persistence._faults import check_killed_holder_frees_key, flip_byte

pytestmark = pytest.mark.anyio

KEY = "order/42"


async def opened(path: Path, **kwargs: float | str) -> SQLiteStore:
    store = SQLiteStore(path, **kwargs)  # type: ignore[arg-type]
    await store.open()
    return store


def db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


async def test_a_locked_database_is_unavailable_and_nothing_is_committed(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await opened(path, busy_timeout=0.1)
    await store.commit(KEY, expected_seq=0, seq=1, entries=[b"one"])
    other = db(path)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="database is locked") as caught:
            await store.commit(KEY, expected_seq=1, seq=2, entries=[b"two"])
        assert "order/42" in str(caught.value) and "seq=2" in str(caught.value)
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        got = await store.load(KEY)  # WAL: readers are not blocked by a writer
        assert got is not None and got.seq == 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    await store.commit(KEY, expected_seq=1, seq=2, entries=[b"two"])
    got = await store.load(KEY)
    assert got is not None and got.journal == ((1, b"one"), (2, b"two"))
    await store.close()


async def test_a_file_that_is_not_a_database_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"these are my holiday notes, not a database\n" * 200)
    with pytest.raises(StoreCorrupt, match="not an SQLite database") as caught:
        await SQLiteStore(path).open()
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    assert path.read_bytes().startswith(b"these are my holiday notes")


async def test_an_unreachable_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="cannot open"):
        await SQLiteStore(tmp_path / "missing-dir" / "s.db").open()


@pytest.mark.parametrize("damage", ["checkpoint", "entry", "missing-entry", "seq-ahead"])
async def test_damaged_rows_are_corruption(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s.db"
    store = await opened(path)
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"state")
    await store.commit(KEY, expected_seq=1, seq=4, entries=[b"two", b"three", b"four"])
    with db(path) as other:
        if damage == "checkpoint":
            other.execute("UPDATE fasm_checkpoints SET data = ?", (flip_byte(b"state", 0),))
        elif damage == "entry":
            other.execute("UPDATE fasm_journal SET entry = ? WHERE seq = 3",
                          (flip_byte(b"three", 2),))
        elif damage == "missing-entry":
            other.execute("DELETE FROM fasm_journal WHERE seq = 3")
        else:
            other.execute("UPDATE fasm_keys SET seq = 9")
    other.close()
    with pytest.raises(StoreCorrupt, match="order/42"):
        await store.load(KEY)
    await store.close()


@pytest.mark.parametrize("lost", [
    "checkpoint-row", "checkpoint-row-of-a-snapshot-key", "key-row", "key-row-of-a-snapshot-key",
    "whole-journal-without-checkpoint"])
async def test_deleted_rows_are_refused_not_loaded_as_less(tmp_path: Path, lost: str) -> None:
    """Rows deleted by hand that the key's other rows say exist: never an empty or shorter
    state (or a replay from the initial state)."""
    path = tmp_path / "s.db"
    store = await opened(path)
    if lost == "whole-journal-without-checkpoint":
        await store.commit(KEY, expected_seq=0, seq=3, entries=[b"one", b"two", b"three"])
    else:
        await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"state")
        if "snapshot" not in lost:
            await store.commit(KEY, expected_seq=1, seq=4, entries=[b"two", b"three", b"four"])
    with db(path) as other:
        if lost.startswith("checkpoint-row"):
            other.execute("DELETE FROM fasm_checkpoints")
        elif lost.startswith("key-row"):
            other.execute("DELETE FROM fasm_keys")
        else:
            other.execute("DELETE FROM fasm_journal")
    other.close()
    for attempt in ("open store", "reopened"):
        with pytest.raises(StoreCorrupt, match="order/42") as caught:
            await store.load(KEY)
        assert "missing" in str(caught.value), attempt
        await store.close()
        store = await opened(path)
    await store.close()


@pytest.mark.parametrize("damage", ["truncated-to-zero", "deleted"])
async def test_an_emptied_database_file_is_refused(tmp_path: Path, damage: str) -> None:
    """SQLite would open a 0-byte or missing file as a new, empty database; the lock directory
    beside it says a store was there."""
    path = tmp_path / "s.db"
    store = await opened(path)
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"state")
    await store.close()
    for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if damage == "deleted":
            leftover.unlink(missing_ok=True)
        elif leftover.exists():
            os.truncate(leftover, 0)
    with pytest.raises(StoreCorrupt, match="lock directory"):
        await SQLiteStore(path).open()
    assert not path.exists() or path.stat().st_size == 0  # nothing written into it


async def test_an_empty_file_without_a_lock_directory_becomes_a_store(tmp_path: Path) -> None:
    """A file made empty on purpose (a temporary file) is a new store, as before."""
    path = tmp_path / "s.db"
    path.touch()
    store = await opened(path)
    await store.commit(KEY, expected_seq=0, seq=1, entries=[b"one"])
    got = await store.load(KEY)
    assert got is not None and got.seq == 1
    await store.close()


async def test_a_stale_writer_is_refused_without_acquire(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a, b = await opened(path), await opened(path)
    await a.commit(KEY, expected_seq=0, seq=1, entries=[b"a"])
    with pytest.raises(StoreConflict, match="stored seq is 1, writer expected 0"):
        await b.commit(KEY, expected_seq=0, seq=1, entries=[b"b"])
    with pytest.raises(StoreConflict):
        await b.commit(KEY, expected_seq=0, seq=1, checkpoint=b"b")
    got = await b.load(KEY)
    assert got is not None and got.journal == ((1, b"a"),)
    await a.close()
    await b.close()


async def test_a_second_store_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a, b = await opened(path), await opened(path)
    await a.acquire(KEY)
    with pytest.raises(StoreConflict, match="held by another"):
        await b.acquire(KEY)
    await a.close()
    await b.acquire(KEY)
    await b.close()


async def test_a_killed_process_does_not_keep_the_key(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    await check_killed_holder_frees_key(lambda: SQLiteStore(path), "SQLiteStore",
                                        f"SQLiteStore({str(path)!r})", KEY)


@pytest.mark.parametrize("mode", ["FULL", "NORMAL", "OFF"])
async def test_wal_and_synchronous_modes(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "s.db"
    store = await opened(path, synchronous=mode)
    assert store._conn is not None
    levels = {"OFF": 0, "NORMAL": 1, "FULL": 2}
    assert store._conn.execute("PRAGMA synchronous").fetchone() == (levels[mode],)
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"c")
    await store.close()
    with db(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other.close()
    store = await opened(path)
    got = await store.load(KEY)
    assert got is not None and got.checkpoint == b"c"
    await store.close()


def test_an_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(tmp_path / "s.db", synchronous="EXTRA")  # type: ignore[arg-type]


async def test_a_database_from_another_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await opened(path)
    await store.close()
    with db(path) as other:
        other.execute("UPDATE fasm_meta SET value = '99' WHERE name = 'format'")
    other.close()
    with pytest.raises(StoreCorrupt, match="unknown store format"):
        await SQLiteStore(path).open()


async def test_a_memory_database_works() -> None:
    store = SQLiteStore(":memory:")
    await store.open()
    await store.acquire(KEY)
    await store.commit(KEY, expected_seq=0, seq=1, entries=[b"x"])
    got = await store.load(KEY)
    assert got is not None and got.seq == 1
    await store.close()


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s.db")
    await store.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.commit(KEY, expected_seq=0, seq=1, entries=[b"x"])


@pytest.mark.anyio
async def test_append_cost_does_not_grow_with_the_checkpoint(tmp_path: Path) -> None:
    """An append must not rewrite the checkpoint: WAL bytes per append are the same next to a
    1 MB checkpoint as next to a tiny one (measured in bytes, not time)."""

    async def wal_growth(name: str, checkpoint_size: int) -> int:
        path = tmp_path / f"{name}.db"
        store = SQLiteStore(path)
        await store.open()
        try:
            await store.commit("k", expected_seq=0, seq=1, checkpoint=b"c" * checkpoint_size)
            wal = Path(f"{path}-wal")
            before = os.path.getsize(wal)  # noqa: ASYNC240 (a stat in a test)
            for seq in range(2, 22):
                await store.commit("k", expected_seq=seq - 1, seq=seq, entries=[b"e" * 100])
            return os.path.getsize(wal) - before  # noqa: ASYNC240
        finally:
            await store.close()

    small = await wal_growth("small", 100)
    big = await wal_growth("big", 1024 * 1024)
    assert big < 2 * small + 8192, f"{big} WAL bytes next to 1 MB vs {small} next to 100 B"


async def test_an_append_writes_one_page(tmp_path: Path) -> None:
    """A journal append is one B-tree page in the WAL, as a plain single-row insert: the key's
    seq is read from the journal, not rewritten beside it (format 2 wrote two pages)."""
    path = tmp_path / "s.db"
    store = await opened(path)
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"state")
    await store.commit(KEY, expected_seq=1, seq=2, entries=[b"e" * 100])
    wal = Path(f"{path}-wal")
    before = os.path.getsize(wal)  # noqa: ASYNC240 (a stat in a test)
    for seq in range(3, 23):
        await store.commit(KEY, expected_seq=seq - 1, seq=seq, entries=[b"e" * 100])
    frame = 4096 + 24  # the default page size plus a WAL frame header
    assert os.path.getsize(wal) - before == 20 * frame  # noqa: ASYNC240
    got = await store.load(KEY)
    assert got is not None and got.seq == 22 and len(got.journal) == 21
    await store.close()


async def test_a_format_2_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """Format 2 kept each key's seq in fasm_keys on every append; that data is valid format 3
    data, so open only renumbers the format, and what was there loads and goes on."""
    path = tmp_path / "s.db"
    with db(path) as old:
        old.executescript("""
            CREATE TABLE fasm_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE fasm_keys (key TEXT PRIMARY KEY, seq INTEGER NOT NULL,
                                    checkpoint_seq INTEGER NOT NULL);
            CREATE TABLE fasm_checkpoints (key TEXT PRIMARY KEY, data BLOB NOT NULL,
                                           crc INTEGER NOT NULL);
            CREATE TABLE fasm_journal (key TEXT NOT NULL, seq INTEGER NOT NULL,
                entry BLOB NOT NULL, crc INTEGER NOT NULL, PRIMARY KEY (key, seq)) WITHOUT ROWID;
            INSERT INTO fasm_meta VALUES ('format', '2');
        """)
        old.execute("INSERT INTO fasm_keys VALUES (?, 3, 1)", (KEY,))
        old.execute("INSERT INTO fasm_checkpoints VALUES (?, ?, ?)",
                    (KEY, b"state", _crc(b"state")))
        for seq, entry in ((2, b"two"), (3, b"three")):
            old.execute("INSERT INTO fasm_journal VALUES (?, ?, ?, ?)",
                        (KEY, seq, entry, _crc(entry)))
    old.close()
    store = await opened(path)
    got = await store.load(KEY)
    assert got is not None
    assert (got.seq, got.checkpoint, got.checkpoint_seq) == (3, b"state", 1)
    assert got.journal == ((2, b"two"), (3, b"three"))
    await store.commit(KEY, expected_seq=3, seq=4, entries=[b"four"])
    await store.close()
    with db(path) as after:
        assert after.execute("SELECT value FROM fasm_meta").fetchone() == ("4",)
    after.close()
    again = await opened(path)
    got = await again.load(KEY)
    assert got is not None and got.seq == 4 and got.journal[-1] == (4, b"four")
    await again.close()


async def test_inline_calls_run_on_the_callers_thread(tmp_path: Path) -> None:
    threads: dict[str, set[int]] = {}
    for inline in (False, True):
        store = SQLiteStore(tmp_path / f"{inline}.db", inline=inline)
        seen = threads.setdefault(str(inline), set())
        commit = store._commit_sync

        def spy(*args: object, commit: object = commit, seen: set[int] = seen) -> None:
            seen.add(threading.get_ident())
            commit(*args)  # type: ignore[operator]

        store._commit_sync = spy  # type: ignore[method-assign]
        await store.open()
        for seq in (1, 2):
            await store.commit(KEY, expected_seq=seq - 1, seq=seq, entries=[b"x"])
        await store.close()
    assert threads["True"] == {threading.get_ident()}
    assert len(threads["False"]) == 1 and threading.get_ident() not in threads["False"]


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF
