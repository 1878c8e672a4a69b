"""SQLiteStore: one SQLite database (stdlib ``sqlite3``, WAL mode), one connection per store.

Tables::

    fasm_meta(name PRIMARY KEY, value)             the format version; the store's identity
    fasm_keys(key PRIMARY KEY, seq, checkpoint_seq) seq as of the last checkpoint write
    fasm_checkpoints(key PRIMARY KEY, data, crc)
    fasm_journal(key, seq, entry, crc, PRIMARY KEY (key, seq))
    fasm_in_flight(key PRIMARY KEY)                the in-flight index: one row per marked key
    fasm_history_base(key PRIMARY KEY, seq, data, crc)  the history base (Store.history_base)

A key's sequence number is the larger of ``fasm_keys.seq`` and its last journal row's seq, so a
journal append writes the journal's B-tree page and nothing else: one page in the WAL per commit,
as a plain single-row insert. (Format 2 kept the key's seq in ``fasm_keys`` and updated it on every
append, a second page per commit; its data is valid format 3 data, and ``open`` upgrades the
format number in place.) The checkpoint has a table of its own for the same reason: a row that
also held the checkpoint blob would make an update of that row rewrite checkpoint pages.

A commit is one ``BEGIN IMMEDIATE`` transaction: read the key's seq, refuse a stale writer, then
append entries (or replace the checkpoint and delete the entries it covers) and ``COMMIT``; a
commit of one entry on a key that has one is a single fenced ``INSERT ... SELECT ... WHERE`` in
autocommit, which SQLite runs under the write lock it takes before reading.
``commit_many`` is the same transaction over several keys: every key is fenced first, then
every key written, then one ``COMMIT`` (one fsync of the WAL for the group). The in-flight mark
is a row in ``fasm_in_flight`` inserted or deleted in the commit's transaction, so
``keys_in_flight`` reads that small table and never the keys. (Format 3 had no such table: its
data is valid format 4 data, with no key marked, and ``open`` creates the table and upgrades the
format number in place.) ``fasm_history_base`` is created by ``open`` where it is missing,
without a format change: a fasm that does not know it leaves it alone, and a base whose seq is
not just before the first kept journal row is not one (replay ignores it).
Every record carries a CRC-32 that ``load`` checks, because SQLite itself checksums nothing.

The connection is used from the store's own worker thread, one call at a time, so the event loop
never blocks on the disk and the store works on asyncio and trio alike; with ``inline=True`` it is
used from the event loop's thread instead.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..errors import StoreConflict, StoreCorrupt, StoreError, StoreUnavailable
from ._file_format import key_file_name
from ._file_locks import try_flock, unflock
from ._store import (
    KeyCommit,
    StoredRecords,
    check_commit_args,
    check_keys_args,
    check_many_args,
    contiguous,
    not_held,
)
from ._worker import Worker

__all__ = ("SQLiteStore", "connect", "records_from_rows")

log = logging.getLogger("fasm.persistence")

_FORMAT = "4"  # 2: checkpoints moved out of fasm_keys; 3: appends leave fasm_keys alone;
# 4: the in-flight index (fasm_in_flight)
_UPGRADABLE = ("2", "3")  # formats whose data is valid as it is under _FORMAT
# A key's seq: its last journal row's, or the one fasm_keys recorded with the last checkpoint.
_SEQ = "max(k.seq, coalesce((SELECT max(j.seq) FROM fasm_journal j WHERE j.key = ?1), 0))"
_FENCED_APPEND = ("INSERT INTO fasm_journal (key, seq, entry, crc) SELECT ?1, ?2, ?3, ?4 "
                  f"FROM fasm_keys k WHERE k.key = ?1 AND {_SEQ} = ?5")
_T = TypeVar("_T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS fasm_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fasm_keys (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
    "checkpoint_seq INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fasm_checkpoints (key TEXT PRIMARY KEY, data BLOB NOT NULL, "
    "crc INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fasm_journal (key TEXT NOT NULL, seq INTEGER NOT NULL, "
    "entry BLOB NOT NULL, crc INTEGER NOT NULL, PRIMARY KEY (key, seq)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS fasm_in_flight (key TEXT PRIMARY KEY) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS fasm_history_base (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
    "data BLOB NOT NULL, crc INTEGER NOT NULL)",
)
_ALL_LOCK = "FASM-ALL"  # in <path>.locks/: flock'd exclusive by acquire_all, shared by acquire
# (key lock files are named k-... or h-..., so no key's file has this name)


def connect(path: str | os.PathLike[str], busy_timeout: float,
            synchronous: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any one thread
    at a time, in WAL mode with the given busy timeout and ``synchronous`` level."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL").fetchone()
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


class _Busy(StoreUnavailable):
    """Internal: another connection holds the write lock (SQLITE_BUSY); nothing was done, so
    the call may be made again."""


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _rollback(conn: sqlite3.Connection) -> None:
    """End an open transaction without masking the error that is being raised."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite rolls back by itself when the statement or connection failed


def history_from_rows(store: str, key: str, rows: Sequence[Sequence[Any]],
                      end: int) -> tuple[tuple[int, bytes], ...]:
    """Check the ``(seq, entry, crc)`` journal rows a SQL store read for :meth:`Store.history`
    (shared by the SQL stores), ending at the key's seq ``end``.

    Raises:
        StoreCorrupt: an entry fails its CRC-32, or the rows have a gap or end short of ``end``.
    """
    out: list[tuple[int, bytes]] = []
    for seq, entry, crc in rows:
        data = bytes(entry)
        if _crc(data) != crc:
            raise StoreCorrupt("journal entry fails its checksum", store=store, key=key,
                               seq=seq)
        out.append((int(seq), data))
    return contiguous(out, key, store, end)


def base_from_row(store: str, key: str,
                  row: Sequence[Any] | None) -> tuple[int, bytes] | None:
    """Check the ``(seq, data, crc)`` history-base row a SQL store read (None: no base).

    Raises:
        StoreCorrupt: the base fails its CRC-32.
    """
    if row is None:
        return None
    data = bytes(row[1])
    if _crc(data) != row[2]:
        raise StoreCorrupt("the history base fails its checksum", store=store, key=key,
                           seq=int(row[0]))
    return int(row[0]), data


def records_from_rows(store: str, key: str, row: Sequence[Any],
                      rows: Sequence[Sequence[Any]], in_flight: bool = False) -> StoredRecords:
    """Check what a SQL store read for a key and build its records.

    Args:
        store: the store's description, for errors.
        key: the key.
        row: ``(seq, checkpoint_seq, checkpoint, checkpoint_crc)`` from the keys table.
        rows: ``(seq, entry, crc)`` journal rows after ``checkpoint_seq``, ascending.
        in_flight: the key's in-flight mark.

    Raises:
        StoreCorrupt: a record fails its CRC-32, the journal has gaps or ends short of seq, the
            checkpoint the row names is missing, or the row has no records at all.
    """
    seq, checkpoint_seq, checkpoint, checkpoint_crc = row
    if checkpoint is None and checkpoint_seq != 0:
        raise StoreCorrupt(f"the key's row says a checkpoint at seq {checkpoint_seq} exists, but "
                           "the checkpoint is missing (deleted behind the store's back)",
                           store=store, key=key, seq=checkpoint_seq)
    if checkpoint is not None:
        checkpoint = bytes(checkpoint)
        if _crc(checkpoint) != checkpoint_crc:
            raise StoreCorrupt("checkpoint fails its checksum", store=store, key=key,
                               seq=checkpoint_seq)
    journal: list[tuple[int, bytes]] = []
    for entry_seq, entry, crc in rows:
        want = checkpoint_seq + len(journal) + 1
        if entry_seq != want:
            raise StoreCorrupt(f"journal has seq {entry_seq} where {want} was expected",
                               store=store, key=key, seq=entry_seq)
        data = bytes(entry)
        if _crc(data) != crc:
            raise StoreCorrupt("journal entry fails its checksum", store=store, key=key,
                               seq=entry_seq)
        journal.append((entry_seq, data))
    if checkpoint_seq + len(journal) != seq:
        raise StoreCorrupt(f"key is at seq {seq} but its records end at "
                           f"{checkpoint_seq + len(journal)}", store=store, key=key, seq=seq)
    if seq == 0:  # the row is written with the key's first records, never alone
        raise StoreCorrupt("the key has a row but its records are missing (deleted behind the "
                           "store's back)", store=store, key=key, seq=seq)
    return StoredRecords(seq, checkpoint, checkpoint_seq, tuple(journal), in_flight)


class SQLiteStore:
    """A :class:`~fasm.persistence.Store` in one SQLite database file.

    Args:
        path: the database file (created when missing), or ``":memory:"`` for a private,
            non-durable database.
        synchronous: SQLite's ``PRAGMA synchronous``. ``"FULL"`` (the default) fsyncs the WAL on
            every commit: a commit that returned survives power loss. ``"NORMAL"`` in WAL mode
            fsyncs only at checkpoints of the WAL: a commit survives a crash of the process, but
            the last commits before a power loss or OS crash may be lost (never torn). ``"OFF"``
            never fsyncs: for tests and throwaway data.
        busy_timeout: seconds one attempt waits for another connection's write lock (SQLite's
            busy handler).
        max_attempts: how many attempts a call makes while another connection or process
            holds the write lock (a backup, an open ``sqlite3`` shell in a transaction) before
            giving up with :class:`StoreUnavailable` ("database is locked by another
            process"): the store waits up to ``busy_timeout * max_attempts`` seconds in all,
            25 by default, as :class:`~fasm.persistence.SQLiteDatabase` does with the same two
            options. Meanwhile the call waits, and so do the runtime's submitters, whose inputs
            stay queued.
        inline: run every call (its statements and its commit's fsync) on the event loop's
            thread instead of the store's worker thread. It saves the hand-off to the thread and
            back, which on a virtual machine can cost nearly as much as a fast disk's fsync (a
            sequential submitter's throughput rose by 60% in bench/bench_persistence.py); the
            price is that every other task of the loop waits for each commit, fsync included,
            and for up to ``busy_timeout * max_attempts`` when another process holds the
            write lock. For a
            process that does little else (a batch job, a single-purpose worker), on a fast
            local disk.

    What a user should know:

    * ``acquire`` is exclusive across store objects and processes through an ``flock`` on a lock
      file per key in ``<path>.locks/``. The kernel drops it when the process dies, so a killed
      process never leaves a key locked. Lock files are never deleted.
    * ``commit`` is fenced by ``expected_seq`` in the same transaction that writes, so a stale
      writer is refused even when it never acquired the key.
    * Driver errors are translated: a locked or unreachable database is
      :class:`StoreUnavailable`; a file that is not an SQLite database, a malformed database, or
      a record whose CRC-32 does not match is :class:`StoreCorrupt`. A gap in the journal, a
      journal that ends before the seq recorded with the last checkpoint, a checkpoint row
      missing that the key's row names, a key row without records or records without their key
      row are corrupt too, and so is an empty or missing database file beside an existing
      ``<path>.locks/`` (SQLite would start a new, empty database in it). The newest journal
      rows deleted by hand look like commits that never happened (SQLite never loses a
      committed row by itself).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL", "OFF"] = "FULL",
        busy_timeout: float = 5.0,
        max_attempts: int = 5,
        inline: bool = False,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL", "OFF"):
            raise ValueError(f"synchronous must be FULL, NORMAL or OFF, not {synchronous!r}")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self._max_attempts = max_attempts
        self._path = os.fspath(path)
        self._memory = self._path == ":memory:"
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self.inline = inline
        """Whether calls run on the event loop's thread (see the ``inline`` argument)."""
        self._conn: sqlite3.Connection | None = None
        self._worker = Worker(f"fasm-{self.description}")
        self._held: dict[str, int | None] = {}  # key -> flock fd (None for ":memory:")
        self._held_lock = threading.Lock()
        self._shared: int | None = None  # shared flock on the all-lock while keys are held
        self._all: int | None = None  # exclusive flock on it (-1 for ":memory:") by acquire_all
        self._identity = ""

    @property
    def description(self) -> str:
        """``sqlite:<path>``."""
        return f"sqlite:{self._path}"

    @property
    def identity(self) -> str:
        """The UUID in ``fasm_meta`` (row ``identity``), made by the first ``open`` of the
        database (also of one written by an older fasm that had none).

        Raises:
            StoreUnavailable: the store is not open.
        """
        if self._conn is None:
            raise StoreUnavailable("store is not open", store=self.description)
        return self._identity

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        if self.inline:
            return fn(*args)
        return await self._worker.run(fn, *args)

    def _translate(self, e: sqlite3.Error, doing: str, key: str | None = None,
                   seq: int | None = None) -> StoreError:
        text = str(e)
        if "not a database" in text or "malformed" in text:
            return StoreCorrupt(f"{doing}: the database file is damaged or not an SQLite "
                                f"database ({text})", store=self.description, key=key, seq=seq)
        if "locked" in text or "busy" in text:
            return _Busy(f"{doing}: the database is locked by another process or connection",
                         store=self.description, key=key, seq=seq)
        return StoreUnavailable(f"{doing}: {type(e).__name__}: {text}", store=self.description,
                                key=key, seq=seq)

    def _patient(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)``, made again while another connection holds the write lock, up to
        ``max_attempts`` times (each waits ``busy_timeout`` in SQLite's busy handler)."""
        for attempt in range(1, self._max_attempts + 1):
            try:
                return fn(*args)
            except _Busy as busy:
                if attempt == 1 and self._max_attempts > 1:
                    log.warning("%s: %s (key=%r); waiting up to %gs more", self.description,
                                busy.message, busy.key,
                                self._busy_timeout * (self._max_attempts - 1))
                if attempt == self._max_attempts:
                    waited = self._busy_timeout * self._max_attempts
                    error = StoreUnavailable(
                        f"{busy.message}: database is locked by another process (waited "
                        f"{waited:g}s: {self._max_attempts} attempts of busy_timeout="
                        f"{self._busy_timeout:g}s)", store=self.description, key=busy.key,
                        seq=busy.seq)
                    raise error from busy.__cause__
        raise AssertionError("unreachable")

    def _connection(self, key: str | None) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("store is not open", store=self.description, key=key)
        return self._conn

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, switch it to WAL mode and create the tables.

        Raises:
            StoreUnavailable: the file cannot be opened, or the database stays locked for
                ``busy_timeout * max_attempts`` seconds.
            StoreCorrupt: the file is not an SQLite database, or not one this code can read.
        """
        await self._run(self._patient, self._open_sync)

    def _open_sync(self) -> None:
        if self._conn is not None:
            return
        self._check_file()
        conn: sqlite3.Connection | None = None
        try:
            conn = connect(self._path, self._busy_timeout, self._synchronous)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO fasm_meta VALUES ('format', ?)", (_FORMAT,))
                (found,) = conn.execute(
                    "SELECT value FROM fasm_meta WHERE name = 'format'").fetchone()
                if found in _UPGRADABLE:
                    conn.execute("UPDATE fasm_meta SET value = ? WHERE name = 'format'",
                                 (_FORMAT,))
                elif found != _FORMAT:
                    raise StoreCorrupt(f"unknown store format {found!r}", store=self.description)
                # Made once with the store (or at the first open of one from an older fasm).
                conn.execute("INSERT OR IGNORE INTO fasm_meta VALUES ('identity', ?)",
                             (str(uuid.uuid4()),))
                (identity,) = conn.execute(
                    "SELECT value FROM fasm_meta WHERE name = 'identity'").fetchone()
                conn.execute("COMMIT")
            finally:
                _rollback(conn)
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise self._translate(e, "cannot open the database") from e
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if not self._memory:
            try:
                Path(self._path + ".locks").mkdir(exist_ok=True)
            except OSError as e:
                conn.close()
                raise StoreUnavailable(f"cannot create the lock directory: {e}",
                                       store=self.description) from e
        self._identity = str(identity)
        self._conn = conn

    def _check_file(self) -> None:
        """Refuse an empty or missing database file where a store was (its lock directory,
        made by the first ``open`` once the file had its tables, is there): SQLite would
        silently start a new, empty database in it."""
        if self._memory or not os.path.isdir(self._path + ".locks"):
            return
        try:
            size = os.stat(self._path).st_size
        except FileNotFoundError:
            raise StoreCorrupt(
                f"the database file is missing but its lock directory {self._path}.locks "
                "exists: the store's data was deleted or moved (to start a new store here, "
                "delete the lock directory too)", store=self.description) from None
        except OSError:
            return  # connecting reports it
        if size == 0:
            raise StoreCorrupt(
                "the database file is empty (0 bytes) but its lock directory exists: the "
                "store's data was truncated (to start a new store here, delete the file and "
                "the lock directory)", store=self.description)

    async def close(self) -> None:
        """Release every held key and close the connection. Safe to call twice."""
        try:
            await self._run(self._close_sync)
        finally:
            self._worker.stop()

    def _close_sync(self) -> None:
        with self._held_lock:
            held, self._held = self._held, {}
            shared, self._shared = self._shared, None
            whole, self._all = self._all, None
        for fd in [*held.values(), shared, whole]:
            if fd is not None and fd >= 0:
                try:
                    unflock(fd)
                except OSError:
                    pass  # the descriptor is closed either way, and with it the lock
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass  # nothing uncommitted can be lost: every commit ends its transaction

    # -- locking ----------------------------------------------------------------------------

    async def acquire(self, key: str) -> None:
        """Take exclusive use of ``key`` (a no-op if this object holds it already).

        Raises:
            StoreConflict: another store object or process holds the key.
            StoreUnavailable: the store is closed or the lock file cannot be created.
        """
        await self._run(self._acquire_sync, key)

    def _acquire_sync(self, key: str) -> None:
        self._connection(key)
        with self._held_lock:
            if key in self._held:
                return
            if self._memory:
                self._held[key] = None  # a private database: nobody else can see the key
                return
            try:
                fd = try_flock(Path(self._path + ".locks") / key_file_name(key))
            except OSError as e:
                raise StoreUnavailable(f"cannot take the key's lock file: {e}",
                                       store=self.description, key=key) from e
            if fd is None:
                raise StoreConflict("key is held by another store object or process",
                                    store=self.description, key=key)
            if self._all is None and self._shared is None:
                # While this object holds keys, a shared lock on the all-lock keeps every other
                # object's acquire_all out (and fails when one holds it).
                try:
                    shared = try_flock(Path(self._path + ".locks") / _ALL_LOCK, shared=True)
                except OSError as e:
                    unflock(fd)
                    raise StoreUnavailable(f"cannot take the store's lock file: {e}",
                                           store=self.description, key=key) from e
                if shared is None:
                    unflock(fd)
                    raise StoreConflict("the whole store is held by another store object or "
                                        "process (acquire_all)", store=self.description, key=key)
                self._shared = shared
            self._held[key] = fd

    async def release(self, key: str) -> None:
        """Give up ``key``; releasing a key that is not held does nothing."""
        with self._held_lock:
            fd = self._held.pop(key, None)
            shared = None
            if not self._held:
                shared, self._shared = self._shared, None
        for d in (fd, shared):
            if d is not None:
                try:
                    unflock(d)
                except OSError:
                    pass

    async def acquire_all(self) -> None:
        """Take exclusive use of every key: an exclusive ``flock`` on ``<path>.locks/FASM-ALL``,
        which every other object's ``acquire`` takes shared (a no-op if held already).

        Raises:
            StoreConflict: another store object or process holds the store or one of its keys.
            StoreUnavailable: the store is closed or the lock file cannot be created.
        """
        await self._run(self._acquire_all_sync)

    def _acquire_all_sync(self) -> None:
        self._connection(None)
        with self._held_lock:
            if self._all is not None:
                return
            if self._memory:
                self._all = -1
                return
            shared, self._shared = self._shared, None
            if shared is not None:  # our own shared lock would refuse our exclusive one
                unflock(shared)
            try:
                fd = try_flock(Path(self._path + ".locks") / _ALL_LOCK)
            except OSError as e:
                raise StoreUnavailable(f"cannot take the store's lock file: {e}",
                                       store=self.description) from e
            if fd is None:
                if self._held:  # take our shared lock back (nobody can hold it exclusive)
                    self._shared = try_flock(Path(self._path + ".locks") / _ALL_LOCK,
                                             shared=True)
                raise StoreConflict("another store object or process holds the store or one of "
                                    "its keys", store=self.description)
            self._all = fd

    async def release_all(self) -> None:
        """Give up what :meth:`acquire_all` took (nothing if it is not held)."""
        with self._held_lock:
            fd, self._all = self._all, None
            if fd is not None and fd >= 0 and self._held and not self._memory:
                # keys acquired one by one stay held: they need the shared lock back
                self._shared = try_flock(Path(self._path + ".locks") / _ALL_LOCK, shared=True)
        if fd is not None and fd >= 0:
            try:
                unflock(fd)
            except OSError:
                pass

    def _holds(self, key: str) -> bool:
        return self._all is not None or key in self._held

    async def keys_in_flight(self) -> list[str]:
        """Every key whose in-flight mark is set, sorted (from ``fasm_in_flight``).

        Raises:
            StoreUnavailable: the database cannot be read.
        """
        return await self._run(self._patient, self._keys_in_flight_sync)

    def _keys_in_flight_sync(self) -> list[str]:
        conn = self._connection(None)
        try:
            return [k for (k,) in conn.execute("SELECT key FROM fasm_in_flight ORDER BY key")]
        except sqlite3.Error as e:
            raise self._translate(e, "cannot list the keys in flight") from e

    # -- reading and writing ----------------------------------------------------------------

    async def keys(self, after: str | None = None, limit: int = 1000) -> list[str]:
        """Committed keys from ``fasm_keys`` (a row is written with a key's first records), in
        SQLite's binary order, which for UTF-8 text is code point order."""
        check_keys_args(limit)
        return await self._run(self._patient, self._keys_sync, after, limit)

    def _keys_sync(self, after: str | None, limit: int) -> list[str]:
        conn = self._connection(None)
        try:
            rows = conn.execute(
                "SELECT key FROM fasm_keys WHERE ?1 IS NULL OR key > ?1 ORDER BY key LIMIT ?2",
                (after, limit)).fetchall()
        except sqlite3.Error as e:
            raise self._translate(e, "cannot list keys") from e
        return [str(r[0]) for r in rows]

    async def load(self, key: str) -> StoredRecords | None:
        """Everything stored for ``key``, read in one transaction, or None.

        Raises:
            StoreCorrupt: a record fails its CRC-32, entries are missing, or the file is damaged.
            StoreUnavailable: the database cannot be read (closed, locked, I/O error).
        """
        return await self._run(self._patient, self._load_sync, key)

    async def load_many(self, keys: Sequence[str]) -> dict[str, StoredRecords | None]:
        """:meth:`load` of each key, in one call to the store's thread (raises as it does)."""
        return await self._run(self._patient, self._load_many_sync, list(keys))

    def _load_many_sync(self, keys: list[str]) -> dict[str, StoredRecords | None]:
        if not keys:
            return {}
        conn = self._connection(keys[0])
        for key in keys[1:]:
            self._connection(key)  # each key must be held
        try:
            conn.execute("BEGIN")  # one read snapshot for every key
            try:
                found = {key: self._rows(conn, key) for key in keys}
            finally:
                _rollback(conn)
        except sqlite3.Error as e:
            raise self._translate(e, "cannot load", None) from e
        return {key: self._records(key, *got) for key, got in found.items()}

    def _load_sync(self, key: str) -> StoredRecords | None:
        conn = self._connection(key)
        try:
            conn.execute("BEGIN")  # one read snapshot for both tables
            try:
                got = self._rows(conn, key)
            finally:
                _rollback(conn)
        except sqlite3.Error as e:
            raise self._translate(e, "cannot load", key) from e
        return self._records(key, *got)

    def _rows(self, conn: sqlite3.Connection, key: str) -> tuple[Any, list[Any], bool, bool]:
        """Inside a read transaction: the key's row, its journal after the checkpoint, its
        in-flight mark, and whether it has records without a row."""
        row = conn.execute(
            f"SELECT {_SEQ}, k.checkpoint_seq, c.data, c.crc FROM fasm_keys k "
            "LEFT JOIN fasm_checkpoints c ON c.key = k.key WHERE k.key = ?1",
            (key,)).fetchone()
        rows = [] if row is None else conn.execute(
            "SELECT seq, entry, crc FROM fasm_journal WHERE key = ? AND seq > ? "
            "ORDER BY seq", (key, row[1])).fetchall()
        marked = row is not None and conn.execute(
            "SELECT 1 FROM fasm_in_flight WHERE key = ?", (key,)).fetchone() is not None
        orphans = row is None and conn.execute(
            "SELECT 1 FROM fasm_journal WHERE key = ?1 UNION ALL "
            "SELECT 1 FROM fasm_checkpoints WHERE key = ?1 LIMIT 1",
            (key,)).fetchone() is not None
        return row, rows, marked, orphans

    def _records(self, key: str, row: Any, rows: list[Any], marked: bool,
                 orphans: bool) -> StoredRecords | None:
        if orphans:
            raise StoreCorrupt("the key has records but its row in fasm_keys is missing "
                               "(deleted behind the store's back)", store=self.description,
                               key=key)
        if row is None:
            return None
        return records_from_rows(self.description, key, row, rows, marked)

    async def history(self, key: str) -> tuple[tuple[int, bytes], ...]:
        """Every journal row of ``key`` (rows a checkpoint kept included), checked."""
        return await self._run(self._patient, self._history_sync, key)

    def _history_sync(self, key: str) -> tuple[tuple[int, bytes], ...]:
        conn = self._connection(key)
        try:
            conn.execute("BEGIN")
            try:
                row = conn.execute(f"SELECT {_SEQ} FROM fasm_keys k WHERE k.key = ?1",
                                   (key,)).fetchone()
                rows = conn.execute("SELECT seq, entry, crc FROM fasm_journal WHERE key = ? "
                                    "ORDER BY seq", (key,)).fetchall()
            finally:
                _rollback(conn)
        except sqlite3.Error as e:
            raise self._translate(e, "cannot read the journal", key) from e
        return history_from_rows(self.description, key, rows,
                                 0 if row is None else int(row[0]))

    async def history_base(self, key: str) -> tuple[int, bytes] | None:
        """The row of ``key`` in ``fasm_history_base``, checked."""
        return await self._run(self._patient, self._history_base_sync, key)

    def _history_base_sync(self, key: str) -> tuple[int, bytes] | None:
        conn = self._connection(key)
        try:
            row = conn.execute("SELECT seq, data, crc FROM fasm_history_base WHERE key = ?",
                               (key,)).fetchone()
        except sqlite3.Error as e:
            raise self._translate(e, "cannot read the history base", key) from e
        return base_from_row(self.description, key, row)

    async def commit(
        self,
        key: str,
        *,
        expected_seq: int,
        seq: int,
        entries: Sequence[bytes] = (),
        checkpoint: bytes | None = None,
        in_flight: bool | None = None,
        keep_journal: bool = False,
        history_base: tuple[int, bytes] | None = None,
    ) -> None:
        """Durably and atomically move ``key`` from ``expected_seq`` to ``seq``, in one
        ``BEGIN IMMEDIATE`` transaction (with the in-flight mark, when given).

        Raises:
            StoreConflict: the stored seq is not ``expected_seq``; nothing written.
            StoreUnavailable: the database stays locked (for ``busy_timeout * max_attempts``
                seconds), is closed or failing; nothing committed.
            StoreCorrupt: the database file is damaged.
            ValueError: the arguments break the commit rules.
        """
        check_commit_args(expected_seq, seq, entries, checkpoint, keep_journal, history_base)
        await self._run(self._patient, self._commit_sync,
                        KeyCommit(key, expected_seq, seq, entries, checkpoint, in_flight,
                                  keep_journal, history_base))

    async def commit_many(self, commits: Sequence[KeyCommit]) -> None:
        """Commit several keys in one ``BEGIN IMMEDIATE`` transaction: all fenced, then all
        written, then one ``COMMIT``.

        Raises:
            StoreConflict: a key's stored seq is not its ``expected_seq``, or a key is not held
                by this object; nothing written.
            StoreUnavailable: as for :meth:`commit`; nothing committed.
            StoreCorrupt: the database file is damaged.
            ValueError: a key appears twice, or a part breaks the commit rules.
        """
        check_many_args(commits)
        if not commits:
            return
        for c in commits:
            if not self._holds(c.key):
                raise not_held(self.description, c.key, c.seq)
        await self._run(self._patient, self._commit_many_sync, commits)

    def _commit_sync(self, c: KeyCommit) -> None:
        conn = self._connection(c.key)
        if (c.checkpoint is None and len(c.entries) == 1 and c.expected_seq > 0
                and c.in_flight is None):
            # The common commit, one entry on a known key, is one statement in autocommit: its
            # fence is its WHERE clause, read under the write lock the INSERT takes first, so
            # it costs what a plain single-row insert costs. Refused, it falls through to the
            # full transaction below, which says what the stored seq is.
            entry = bytes(c.entries[0])
            try:
                if conn.execute(_FENCED_APPEND, (c.key, c.seq, entry, _crc(entry),
                                                 c.expected_seq)).rowcount == 1:
                    return
            except sqlite3.Error as e:
                raise self._translate(e, "commit failed, nothing committed", c.key,
                                      c.seq) from e
        self._commit_many_sync([c])

    def _commit_many_sync(self, commits: Sequence[KeyCommit]) -> None:
        conn = self._connection(commits[0].key)
        c = commits[0]
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = []
                for c in commits:
                    row = conn.execute(f"SELECT {_SEQ} FROM fasm_keys k WHERE k.key = ?1",
                                       (c.key,)).fetchone()
                    current = 0 if row is None else row[0]
                    if current != c.expected_seq:
                        raise StoreConflict(f"stale writer: stored seq is {current}, writer "
                                            f"expected {c.expected_seq}", store=self.description,
                                            key=c.key, seq=c.seq)
                    rows.append(row is not None)
                for c, known in zip(commits, rows, strict=True):
                    self._write(conn, c, known)
                conn.execute("COMMIT")
            finally:
                _rollback(conn)
        except sqlite3.Error as e:
            key, seq = (c.key, c.seq) if len(commits) == 1 else (None, None)
            raise self._translate(e, "commit failed, nothing committed", key, seq) from e

    def _write(self, conn: sqlite3.Connection, c: KeyCommit, known: bool) -> None:
        """Inside the commit's transaction: write one key's part (``known``: it has a row)."""
        key, seq = c.key, c.seq
        if c.checkpoint is not None:
            conn.execute(
                "INSERT INTO fasm_keys VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE "
                "SET seq = excluded.seq, checkpoint_seq = excluded.checkpoint_seq",
                (key, seq, seq))
            conn.execute(
                "INSERT INTO fasm_checkpoints VALUES (?, ?, ?) ON CONFLICT (key) "
                "DO UPDATE SET data = excluded.data, crc = excluded.crc",
                (key, c.checkpoint, _crc(c.checkpoint)))
            if not c.keep_journal:
                conn.execute("DELETE FROM fasm_journal WHERE key = ? AND seq <= ?", (key, seq))
                conn.execute("DELETE FROM fasm_history_base WHERE key = ?", (key,))
            elif c.history_base is not None:
                b, data = c.history_base[0], bytes(c.history_base[1])
                conn.execute("INSERT INTO fasm_history_base VALUES (?, ?, ?, ?) ON CONFLICT "
                             "(key) DO UPDATE SET seq = excluded.seq, data = excluded.data, "
                             "crc = excluded.crc", (key, b, data, _crc(data)))
                conn.execute("DELETE FROM fasm_journal WHERE key = ? AND seq <= ?", (key, b))
        if c.checkpoint is None or c.keep_journal:
            if not known and c.checkpoint is None:  # first commit; later appends leave it be
                conn.execute("INSERT INTO fasm_keys VALUES (?, 0, 0)", (key,))
            conn.executemany(
                "INSERT INTO fasm_journal VALUES (?, ?, ?, ?)",
                ((key, s, bytes(e), _crc(e))
                 for s, e in zip(range(c.expected_seq + 1, seq + 1), c.entries, strict=True)))
        if c.in_flight is True:
            conn.execute("INSERT OR IGNORE INTO fasm_in_flight VALUES (?)", (key,))
        elif c.in_flight is False:
            conn.execute("DELETE FROM fasm_in_flight WHERE key = ?", (key,))
