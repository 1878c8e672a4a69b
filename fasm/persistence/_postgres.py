"""PostgresStore: records in PostgreSQL tables, keys locked with session advisory locks.

Tables (``<prefix>`` is ``table_prefix``, in ``schema``)::

    <prefix>meta(name PRIMARY KEY, value)         the format version; the store's identity
    <prefix>keys(key PRIMARY KEY, seq, checkpoint_seq, checkpoint, checkpoint_crc, last_commit,
                 in_flight)                    with a partial index on the keys in flight
    <prefix>journal(key, seq, entry, crc, PRIMARY KEY (key, seq))
    <prefix>history_base(key PRIMARY KEY, seq, data, crc)   the history base (Store.history_base)

A commit is one transaction: a transaction-scoped advisory lock on the key (so that two first
commits of a new key queue instead of colliding), ``SELECT seq ... FOR UPDATE``, the fencing check,
the writes, and a ``last_commit`` token unique to this commit. The token is how a commit whose
connection dropped while ``COMMIT`` was in flight finds out, after reconnecting, whether it
committed: the store never acknowledges a commit that did not commit, and does not report as
failed one that did whenever the database can be asked.

``commit_many`` is the same transaction over several keys: their advisory locks in key order (so
two groups never deadlock), every key fenced, every key written with the same token, one
``COMMIT``. The in-flight mark is the ``in_flight`` column, set in the commit's transaction; the
partial index ``<prefix>keys_in_flight ... WHERE in_flight`` holds only the marked keys, so
``keys_in_flight`` never reads the others. (Format 1 had no such column: ``open`` adds it, false
for every key, with the index, and upgrades the format number.) ``open`` creates the
``history_base`` table where it is missing, without a format change: a fasm that does not know
it leaves it alone, and a base whose seq is not just before the first kept journal row is not one
(replay ignores it).

psycopg is imported only here. Its async connection needs an asyncio event loop, so the store
drives a synchronous ``psycopg.Connection`` from its own worker thread, one call at a time: it
works on asyncio and trio alike.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
from psycopg import sql

from ..errors import StoreConflict, StoreCorrupt, StoreError, StoreUnavailable
from ._sqlite import base_from_row, history_from_rows, records_from_rows
from ._store import (
    KeyCommit,
    StoredRecords,
    check_commit_args,
    check_keys_args,
    check_many_args,
    not_held,
)
from ._worker import Worker

__all__ = ("PostgresStore", "Secrets", "is_transient", "safe_dsn")

log = logging.getLogger("fasm.persistence")

_FORMAT = "2"  # 2: the in_flight column and its partial index
_UPGRADABLE = ("1",)
_T = TypeVar("_T")
_RELOCK_TIMEOUT = "2s"  # waiting for our own dead session to let go of its locks
_RESOLVE_TIMEOUT = "10s"
_FIRST_DELAY = 0.05  # seconds before the first reconnect attempt; doubles up to _MAX_DELAY
_MAX_DELAY = 1.0
# What a server says while it restarts, or when it is too busy to take a session now.
_TRANSIENT_FATAL = ("the database system is", "too many clients", "connection slots",
                    "terminating connection", "cannot connect now")
_TRANSIENT_STATES = {"57P01", "57P02", "57P03", "53300"}
_SECRET_PARAMS = ("password", "sslpassword")  # the client key's passphrase is a secret too
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS {meta} (name text PRIMARY KEY, value text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {keys} (key text PRIMARY KEY, seq bigint NOT NULL, "
    "checkpoint_seq bigint NOT NULL, checkpoint bytea, checkpoint_crc bigint, last_commit uuid)",
    "CREATE TABLE IF NOT EXISTS {journal} (key text NOT NULL, seq bigint NOT NULL, "
    "entry bytea NOT NULL, crc bigint NOT NULL, PRIMARY KEY (key, seq))",
    "ALTER TABLE {keys} ADD COLUMN IF NOT EXISTS in_flight boolean NOT NULL DEFAULT false",
    "CREATE INDEX IF NOT EXISTS {index} ON {keys} (key) WHERE in_flight",
    "CREATE TABLE IF NOT EXISTS {base} (key text PRIMARY KEY, seq bigint NOT NULL, "
    "data bytea NOT NULL, crc bigint NOT NULL)",
)


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def safe_dsn(dsn: str) -> str:
    """The connection string without its password, for messages (URL or keyword form)."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable dsn>"
    for secret in _SECRET_PARAMS:
        params.pop(secret, None)
    return psycopg.conninfo.make_conninfo("", **params)


class Secrets:
    """What must never appear in a message: the DSN's password, however it is written.

    psycopg's own error text may echo parts of the connection string (a DSN it cannot parse is
    quoted word by word), so every message, log line and chained driver error of a PostgreSQL
    store or database goes through :meth:`scrub` or :meth:`cause`.

    Raises:
        ValueError: the DSN cannot be parsed (its text is not shown: it may hold a password).
    """

    def __init__(self, dsn: str) -> None:
        try:
            params = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.Error:
            params = None
        if params is None:  # raised here, outside the handler, so nothing chains psycopg's text
            raise ValueError("the DSN is not a valid libpq connection string or URL (its text "
                             "is not shown, since it may hold a password)")
        words = {str(params.get(name) or "") for name in _SECRET_PARAMS}
        # The raw spellings too, in case a message quotes the string rather than the value.
        words.update(m.group(1) for m in re.finditer(r"://[^:/@]*:([^@]*)@", dsn))
        words.update(m.group(1) or m.group(2) for m in
                     re.finditer(r"(?:ssl)?password\s*=\s*(?:'((?:[^'\\]|\\.)*)'|(\S+))?", dsn)
                     if m.group(1) or m.group(2))
        self._words = sorted((w for w in words if w), key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """``text`` with every occurrence of the password replaced by ``***``, on one line
        (libpq's messages end with hints on lines of their own)."""
        for word in self._words:
            text = text.replace(word, "***")
        return " ".join(text.split())

    def leaks(self, text: str) -> bool:
        """Whether ``text`` holds the password."""
        return any(word in text for word in self._words)

    def cause(self, error: BaseException) -> BaseException:
        """``error`` to chain as a cause, or, when its text (or its chain's) holds the password,
        a plain error of the same kind with the password scrubbed and no chain."""
        seen: BaseException | None = error
        while seen is not None:
            if self.leaks(str(seen)):
                kind = type(error) if isinstance(error, psycopg.Error) else psycopg.Error
                try:
                    return kind(self.scrub(str(error)))
                except Exception:  # an exception class that wants other arguments
                    return psycopg.Error(self.scrub(str(error)))
            seen = seen.__cause__ or seen.__context__
        return error


def is_transient(error: psycopg.Error) -> bool:
    """Whether a failure to connect is one that time cures (the server restarting, the network
    down, no free connection slot) rather than a wrong database, user or password.

    libpq reports no SQLSTATE for a failed connection, so this reads its text: a server that
    answered with ``FATAL`` refused the session for good unless it said it is starting or
    shutting down or full. (A server whose messages are translated is treated as transient: the
    reconnect budget then bounds the wait.)"""
    if error.sqlstate is not None:
        return error.sqlstate.startswith("08") or error.sqlstate in _TRANSIENT_STATES
    text = str(error)
    return "FATAL:" not in text or any(part in text for part in _TRANSIENT_FATAL)


class _Lost(StoreUnavailable):
    """Internal: the connection broke or could not be made, and nothing was committed: the call
    may be made again on a new connection, within the reconnect budget."""


def _hash(*parts: str) -> bytes:
    return hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8).digest()


class PostgresStore:
    """A :class:`~fasm.persistence.Store` in PostgreSQL (psycopg 3).

    Args:
        dsn: a libpq connection string or URL.
        schema: the schema holding the tables; created when missing.
        table_prefix: prefix of the three table names.
        connect_timeout: seconds to wait for a connection.
        reconnect_budget: seconds the store keeps trying to reach the server after losing its
            connection (or not getting one) before a call gives up with
            :class:`StoreUnavailable`: long enough by default to ride out an ordinary server
            restart or failover. The call that met the outage waits meanwhile, and so do the
            runtime's submitters, whose inputs stay queued; 0 gives up at once.

    What a user should know:

    * ``acquire`` takes ``pg_try_advisory_lock`` on a 64-bit hash of schema, prefix and key,
      held by this store's session: exclusive across store objects and processes, and released
      by the server when the session ends (a killed process never leaves a key locked).
    * A lost connection is ridden out: the call that meets it (``open``, ``acquire``, ``load``,
      ``commit``) reconnects, with backoff from 50 ms doubling to 1 s, for up to
      ``reconnect_budget`` seconds, then runs again on the new session (logged at WARNING on
      the ``fasm.persistence`` logger, once per outage); when the budget is spent it raises
      :class:`StoreUnavailable` saying so. A server that refuses the session for good (no such
      database, user or password) fails at once. The session's advisory locks die with it, so
      on reconnecting the store ends its old session if the server still runs it and takes
      every held key's lock again. A key that another store object took in the meantime is
      lost: ``commit`` on it raises :class:`StoreConflict` until it is acquired again, never a
      second writer. Whatever happened while the lock was down, ``commit`` is fenced by
      ``expected_seq`` inside the transaction, so a stale writer can never overwrite a newer
      commit.
    * If the connection drops while ``COMMIT`` is in flight, the store reconnects (within the
      same budget) and looks for the commit's token: found, the commit returns normally;
      absent, nothing committed and the commit runs again. Only when the database cannot be
      reached again within the budget is the outcome unknown; the error then says so, and a
      later ``load`` tells. It is never guessed.
    * The DSN's password never appears in a message, a description, a log line or a chained
      driver error (psycopg's own text is scrubbed); a DSN that cannot be parsed is refused
      with ValueError at construction, without quoting it.
    * Keys cannot contain NUL characters (PostgreSQL ``text`` cannot hold them): ValueError.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        table_prefix: str = "fasm_",
        connect_timeout: float = 10.0,
        reconnect_budget: float = 30.0,
    ) -> None:
        if reconnect_budget < 0:
            raise ValueError("reconnect_budget must be >= 0")
        self._secrets = Secrets(dsn)
        self._dsn = dsn
        self._schema = schema
        self._prefix = table_prefix
        self._connect_timeout = max(1, round(connect_timeout))
        self._reconnect_budget = reconnect_budget
        self._deadline: float | None = None  # when the current outage's budget is spent
        self._app = f"fasm-store-{uuid.uuid4().hex[:12]}"
        self._keys = sql.Identifier(schema, f"{table_prefix}keys")
        self._journal = sql.Identifier(schema, f"{table_prefix}journal")
        self._meta = sql.Identifier(schema, f"{table_prefix}meta")
        self._base = sql.Identifier(schema, f"{table_prefix}history_base")
        self._index = sql.Identifier(f"{table_prefix}keys_in_flight")
        self._ns = int.from_bytes(_hash(schema, table_prefix)[:4], "big", signed=True)
        # No key's lock has this hash input: keys cannot hold NUL.
        self._all_key = int.from_bytes(_hash(schema, table_prefix, "", "all"), "big", signed=True)
        self._conn: psycopg.Connection[Any] | None = None
        self._pid: int | None = None
        self._opened = False
        self._worker = Worker(f"fasm-postgres-store-{self._app}")
        self._held: set[str] = set()
        self._lost: set[str] = set()
        self._all = False  # acquire_all holds the all-lock exclusively
        self._shared = False  # holders of keys hold it shared
        self._all_lost = False
        self._guard = threading.Lock()
        self._identity = ""

    @property
    def description(self) -> str:
        """``postgres:<dsn without password> <schema>.<prefix>*``."""
        return f"postgres:{safe_dsn(self._dsn)} {self._schema}.{self._prefix}*"

    @property
    def identity(self) -> str:
        """The UUID in ``<prefix>meta`` (row ``identity``), made by the first ``open`` of the
        tables (also of tables written by an older fasm that had none).

        Raises:
            StoreUnavailable: the store is not open.
        """
        if not self._opened:
            raise StoreUnavailable("store is not open", store=self.description)
        return self._identity

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the current session, or None when not connected."""
        return self._pid

    def _session_key(self, key: str) -> int:
        return int.from_bytes(_hash(self._schema, self._prefix, key), "big", signed=True)

    def _xact_key(self, key: str) -> tuple[int, int]:
        # The two-int advisory key space does not overlap the bigint one used by acquire.
        return self._ns, int.from_bytes(_hash(key)[:4], "big", signed=True)

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await self._worker.run(fn, *args)

    def _translate(self, e: psycopg.Error, doing: str, key: str | None = None,
                   seq: int | None = None) -> StoreError:
        text = self._secrets.scrub(str(e))
        if isinstance(e, psycopg.errors.DataCorrupted | psycopg.errors.IndexCorrupted):
            error: StoreError = StoreCorrupt(f"{doing}: the database reports corruption: {text}",
                                             store=self.description, key=key, seq=seq)
        elif isinstance(e, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
            error = StoreCorrupt(f"{doing}: the tables are missing or are not a fasm store "
                                 f"({text})", store=self.description, key=key, seq=seq)
        elif self._is_lost(e):
            error = _Lost(f"{doing}: connection lost: {type(e).__name__}: {text}",
                          store=self.description, key=key, seq=seq)
        else:
            error = StoreUnavailable(f"{doing}: {type(e).__name__}: {text}",
                                     store=self.description, key=key, seq=seq)
        error.__cause__ = self._secrets.cause(e)
        return error

    def _is_lost(self, e: psycopg.Error) -> bool:
        """Whether ``e`` means the session is gone (so nothing it had open committed)."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return True
        state = e.sqlstate or ""
        return state.startswith("08") or state in _TRANSIENT_STATES

    def _riding(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)``, run again on a new connection while it meets a lost one, until the
        reconnect budget is spent (then StoreUnavailable, saying so)."""
        self._deadline = None
        started = time.monotonic()
        delay = _FIRST_DELAY
        try:
            while True:
                try:
                    result = fn(*args)
                except _Lost as lost:
                    now = time.monotonic()
                    if self._deadline is None:
                        self._deadline = now + self._reconnect_budget
                        log.warning("%s: %s%s; reconnecting for up to %gs",
                                    self.description, lost.message,
                                    "" if lost.key is None else f" (key={lost.key!r})",
                                    self._reconnect_budget)
                    if now >= self._deadline:
                        error = StoreUnavailable(
                            f"{lost.message}; the database stayed unreachable for the whole "
                            f"reconnect budget ({self._reconnect_budget:g}s)",
                            store=self.description, key=lost.key, seq=lost.seq)
                        raise error from lost.__cause__
                    time.sleep(min(delay, self._deadline - now))
                    delay = min(delay * 2, _MAX_DELAY)
                    continue
                if self._deadline is not None:
                    log.warning("%s: reconnected after %.1fs", self.description,
                                time.monotonic() - started)
                return result
        finally:
            self._deadline = None

    def _remaining(self) -> float | None:
        """Seconds left of the current outage's budget, or None outside an outage."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    @staticmethod
    def _check_key(key: str) -> None:
        if "\0" in key:
            raise ValueError("PostgreSQL text cannot hold NUL characters, so keys cannot either")

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        timeout = self._connect_timeout
        remaining = self._remaining()
        if remaining is not None:  # an attempt never runs far past the budget
            timeout = max(1, min(timeout, round(remaining)))
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, application_name=self._app,
                                   connect_timeout=timeout)
        except psycopg.Error as e:
            kind = _Lost if is_transient(e) else StoreUnavailable
            error = kind(f"cannot connect: {self._secrets.scrub(str(e))}",
                         store=self.description)
            cause = self._secrets.cause(e)
        else:
            self._conn, self._pid = conn, conn.info.backend_pid
            return conn
        raise error from cause  # outside the handler: psycopg's own error is not the context

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self, key: str | None = None) -> psycopg.Connection[Any]:
        """The live connection; reconnects (and takes held keys again) after a lost one."""
        if not self._opened:
            raise StoreUnavailable("store is not open", store=self.description, key=key)
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        old_pid = self._pid
        self._drop_connection()
        conn = self._connect()
        try:
            self._end_session(conn, old_pid)
            with self._guard:
                held = sorted(self._held)
            if held:
                conn.execute(f"SET lock_timeout = '{_RELOCK_TIMEOUT}'")
            if self._all or self._shared:
                if self._all or held:
                    conn.execute(f"SET lock_timeout = '{_RELOCK_TIMEOUT}'")
                try:
                    conn.execute("SELECT pg_advisory_lock(%s)" if self._all else
                                 "SELECT pg_advisory_lock_shared(%s)", (self._all_key,))
                except psycopg.errors.LockNotAvailable:
                    with self._guard:  # another store object took the store while we were away
                        self._all_lost = self._all
                        self._all = self._shared = False
                        self._lost.update(self._held)
                        self._held.clear()
                        held = []
            for k in held:
                try:
                    conn.execute("SELECT pg_advisory_lock(%s)", (self._session_key(k),))
                except psycopg.errors.LockNotAvailable:
                    with self._guard:  # another store object took it while we were away
                        self._held.discard(k)
                        self._lost.add(k)
            conn.execute("SET lock_timeout = 0")
        except psycopg.Error as e:
            error = self._translate(e, "cannot restore the session after reconnecting", key)
            self._drop_connection()
            raise error from error.__cause__
        return conn

    def _end_session(self, conn: psycopg.Connection[Any], pid: int | None) -> None:
        """End our previous session if the server still runs it (a half-open connection), so
        its locks and any transaction it has are released rather than held until it times out."""
        if pid is None:
            return
        try:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE pid = %s AND application_name = %s", (pid, self._app))
        except psycopg.errors.InsufficientPrivilege:
            pass  # then we wait for the server to notice the dead client

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and create the schema and tables when missing.

        Raises:
            StoreUnavailable: the server cannot be reached or the tables cannot be created.
            StoreCorrupt: the tables hold a format this code does not know.
        """
        await self._run(self._riding, self._open_sync)

    def _open_sync(self) -> None:
        if self._opened:
            return
        conn = self._connect()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (self._ns,))
                if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                (self._schema,)).fetchone() is None:
                    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self._schema)))
                for statement in _SCHEMA:
                    conn.execute(sql.SQL(statement).format(
                        meta=self._meta, keys=self._keys, journal=self._journal,
                        index=self._index, base=self._base))
                conn.execute(sql.SQL("INSERT INTO {} VALUES ('format', %s) ON CONFLICT DO NOTHING")
                             .format(self._meta), (_FORMAT,))
                row = conn.execute(sql.SQL("SELECT value FROM {} WHERE name = 'format'")
                                   .format(self._meta)).fetchone()
                if row is not None and row[0] in _UPGRADABLE:  # the ALTER above migrated it
                    conn.execute(sql.SQL("UPDATE {} SET value = %s WHERE name = 'format'")
                                 .format(self._meta), (_FORMAT,))
                elif row is None or row[0] != _FORMAT:
                    raise StoreCorrupt(f"unknown store format {row!r}", store=self.description)
                conn.execute(sql.SQL("INSERT INTO {} VALUES ('identity', %s) "
                                     "ON CONFLICT DO NOTHING").format(self._meta),
                             (str(uuid.uuid4()),))
                identity = conn.execute(sql.SQL("SELECT value FROM {} WHERE name = 'identity'")
                                        .format(self._meta)).fetchone()
                self._identity = str(identity[0]) if identity is not None else ""
        except psycopg.Error as e:
            error = self._translate(e, "cannot prepare the tables")
            self._drop_connection()
            raise error from error.__cause__
        except BaseException:
            self._drop_connection()
            raise
        self._opened = True

    async def close(self) -> None:
        """Release every held key and disconnect. Safe to call twice."""
        try:
            await self._run(self._close_sync)
        finally:
            self._worker.stop()

    def _close_sync(self) -> None:
        self._opened = False
        with self._guard:
            self._held.clear()
            self._lost.clear()
            self._all = self._shared = self._all_lost = False
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            try:
                # Ending the session releases its locks too, but only once the server process
                # has exited, after close() returned: unlock now so the keys are free at once.
                conn.execute("SELECT pg_advisory_unlock_all()")
            except psycopg.Error:
                pass
        self._drop_connection()
        self._pid = None

    # -- locking ----------------------------------------------------------------------------

    async def acquire(self, key: str) -> None:
        """Take ``pg_try_advisory_lock`` for ``key`` (a no-op if this object holds it).

        Raises:
            StoreConflict: another store object or process holds the key.
            StoreUnavailable: the server cannot be reached.
        """
        self._check_key(key)
        await self._run(self._riding, self._acquire_sync, key)

    def _acquire_sync(self, key: str) -> None:
        conn = self._connection(key)
        if key in self._held:
            return
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)",
                               (self._session_key(key),)).fetchone()
        except psycopg.Error as e:
            error = self._translate(e, "cannot lock the key", key)
            raise error from error.__cause__
        if row is None or not row[0]:
            raise StoreConflict("key is held by another store object or process",
                                store=self.description, key=key)
        if not self._all and not self._shared:
            try:
                row = conn.execute("SELECT pg_try_advisory_lock_shared(%s)",
                                   (self._all_key,)).fetchone()
                if row is None or not row[0]:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (self._session_key(key),))
                    raise StoreConflict("the whole store is held by another store object or "
                                        "process (acquire_all)", store=self.description, key=key)
            except psycopg.Error as e:
                error = self._translate(e, "cannot lock the key", key)
                raise error from error.__cause__
            self._shared = True
        with self._guard:
            self._held.add(key)
            self._lost.discard(key)

    async def release(self, key: str) -> None:
        """Give up ``key``; releasing a key that is not held does nothing."""
        await self._run(self._release_sync, key)

    def _release_sync(self, key: str) -> None:
        with self._guard:
            self._lost.discard(key)
            if key not in self._held:
                return
            self._held.discard(key)
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return  # the session, and the lock with it, is gone already
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (self._session_key(key),))
            if not self._held and self._shared:
                self._shared = False
                conn.execute("SELECT pg_advisory_unlock_shared(%s)", (self._all_key,))
        except psycopg.Error:
            self._drop_connection()  # ending the session releases the lock for sure

    async def acquire_all(self) -> None:
        """Take ``pg_try_advisory_lock`` on the store's own lock, which every other store
        object holding a key holds shared (a no-op if this object holds it already).

        Raises:
            StoreConflict: another store object or process holds the store or one of its keys.
            StoreUnavailable: the server cannot be reached.
        """
        await self._run(self._riding, self._acquire_all_sync)

    def _acquire_all_sync(self) -> None:
        conn = self._connection()
        if self._all:
            return
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self._all_key,)).fetchone()
        except psycopg.Error as e:
            error = self._translate(e, "cannot lock the store")
            raise error from error.__cause__
        if row is None or not row[0]:
            raise StoreConflict("another store object or process holds the store or one of "
                                "its keys", store=self.description)
        self._all, self._all_lost = True, False

    async def release_all(self) -> None:
        """Give up what :meth:`acquire_all` took (nothing if it is not held)."""
        await self._run(self._release_all_sync)

    def _release_all_sync(self) -> None:
        self._all_lost = False
        if not self._all:
            return
        self._all = False
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return
        try:
            if self._held and not self._shared:  # keys acquired one by one stay held
                conn.execute("SELECT pg_advisory_lock_shared(%s)", (self._all_key,))
                self._shared = True
            conn.execute("SELECT pg_advisory_unlock(%s)", (self._all_key,))
        except psycopg.Error:
            self._drop_connection()

    async def keys_in_flight(self) -> list[str]:
        """Every key whose in-flight mark is set, sorted (through the partial index).

        Raises:
            StoreUnavailable: the server cannot be reached.
        """
        return await self._run(self._riding, self._keys_in_flight_sync)

    def _keys_in_flight_sync(self) -> list[str]:
        conn = self._connection()
        try:
            rows = conn.execute(sql.SQL("SELECT key FROM {} WHERE in_flight ORDER BY key")
                                .format(self._keys)).fetchall()
        except psycopg.Error as e:
            error = self._translate(e, "cannot list the keys in flight")
            raise error from error.__cause__
        return [str(k) for (k,) in rows]

    # -- reading and writing ----------------------------------------------------------------

    async def keys(self, after: str | None = None, limit: int = 1000) -> list[str]:
        """Committed keys from the keys table, in code point order (``COLLATE "C"`` on UTF-8
        text), whatever the database's own collation."""
        check_keys_args(limit)
        return await self._run(self._riding, self._keys_sync, after, limit)

    def _keys_sync(self, after: str | None, limit: int) -> list[str]:
        conn = self._connection()
        try:
            with conn.transaction():
                rows = conn.execute(
                    sql.SQL('SELECT key FROM {} WHERE %s::text IS NULL OR key COLLATE "C" > '
                            '%s::text ORDER BY key COLLATE "C" LIMIT %s').format(self._keys),
                    (after, after, limit)).fetchall()
        except psycopg.Error as e:
            error = self._translate(e, "cannot list keys")
            raise error from error.__cause__
        return [str(r[0]) for r in rows]

    async def load(self, key: str) -> StoredRecords | None:
        """Everything stored for ``key``, read in one repeatable-read transaction, or None.

        Raises:
            StoreCorrupt: a record fails its CRC-32 or entries are missing.
            StoreUnavailable: the server cannot be reached.
        """
        self._check_key(key)
        return await self._run(self._riding, self._load_sync, key)

    async def load_many(self, keys: Sequence[str]) -> dict[str, StoredRecords | None]:
        """:meth:`load` of each key, in one call to the store's thread (raises as it does)."""
        for key in keys:
            self._check_key(key)
        return await self._run(self._riding, self._load_many_sync, list(keys))

    def _load_many_sync(self, keys: list[str]) -> dict[str, StoredRecords | None]:
        return {key: self._load_sync(key) for key in keys}

    def _load_sync(self, key: str) -> StoredRecords | None:
        conn = self._connection(key)
        try:
            with conn.transaction(), conn.cursor(binary=True) as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                row = cur.execute(
                    sql.SQL("SELECT seq, checkpoint_seq, checkpoint, checkpoint_crc, in_flight "
                            "FROM {} WHERE key = %s").format(self._keys), (key,)).fetchone()
                rows = [] if row is None else cur.execute(
                    sql.SQL("SELECT seq, entry, crc FROM {} WHERE key = %s AND seq > %s "
                            "ORDER BY seq").format(self._journal), (key, row[1])).fetchall()
                orphans = row is None and cur.execute(
                    sql.SQL("SELECT 1 FROM {} WHERE key = %s LIMIT 1").format(self._journal),
                    (key,)).fetchone() is not None
        except psycopg.Error as e:
            error = self._translate(e, "cannot load", key)
            raise error from error.__cause__
        if orphans:
            raise StoreCorrupt("the key has journal rows but its row in the keys table is "
                               "missing (deleted behind the store's back)",
                               store=self.description, key=key)
        if row is None:
            return None
        return records_from_rows(self.description, key, row[:4], rows, bool(row[4]))

    async def history(self, key: str) -> tuple[tuple[int, bytes], ...]:
        """Every journal row of ``key`` (rows a checkpoint kept included), checked."""
        self._check_key(key)
        return await self._run(self._riding, self._history_sync, key)

    def _history_sync(self, key: str) -> tuple[tuple[int, bytes], ...]:
        conn = self._connection(key)
        try:
            with conn.transaction(), conn.cursor(binary=True) as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                row = cur.execute(sql.SQL("SELECT seq FROM {} WHERE key = %s")
                                  .format(self._keys), (key,)).fetchone()
                rows = cur.execute(sql.SQL("SELECT seq, entry, crc FROM {} WHERE key = %s "
                                           "ORDER BY seq").format(self._journal),
                                   (key,)).fetchall()
        except psycopg.Error as e:
            error = self._translate(e, "cannot read the journal", key)
            raise error from error.__cause__
        return history_from_rows(self.description, key, rows,
                                 0 if row is None else int(row[0]))

    async def history_base(self, key: str) -> tuple[int, bytes] | None:
        """The row of ``key`` in the ``history_base`` table, checked."""
        self._check_key(key)
        return await self._run(self._riding, self._history_base_sync, key)

    def _history_base_sync(self, key: str) -> tuple[int, bytes] | None:
        conn = self._connection(key)
        try:
            with conn.transaction(), conn.cursor(binary=True) as cur:
                row = cur.execute(sql.SQL("SELECT seq, data, crc FROM {} WHERE key = %s")
                                  .format(self._base), (key,)).fetchone()
        except psycopg.Error as e:
            error = self._translate(e, "cannot read the history base", key)
            raise error from error.__cause__
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
        transaction (with the in-flight mark, when given).

        Raises:
            StoreConflict: the stored seq is not ``expected_seq``, or this store lost the key to
                another store object while its connection was down; nothing written.
            StoreUnavailable: the server cannot be reached or refused the write; nothing
                committed (or, if it could not be reached again after losing the connection
                during ``COMMIT``, the message says the outcome is unknown).
            ValueError: the arguments break the commit rules.
        """
        self._check_key(key)
        check_commit_args(expected_seq, seq, entries, checkpoint, keep_journal, history_base)
        await self._run(self._riding, self._commit_sync,
                        [KeyCommit(key, expected_seq, seq, entries, checkpoint, in_flight,
                                   keep_journal, history_base)])

    async def commit_many(self, commits: Sequence[KeyCommit]) -> None:
        """Commit several keys in one transaction (see the module's notes).

        Raises:
            StoreConflict: a key's stored seq is not its ``expected_seq``, or a key is not held
                by this object; nothing written.
            StoreUnavailable: as for :meth:`commit`.
            ValueError: a key appears twice, holds NUL, or a part breaks the commit rules.
        """
        check_many_args(commits)
        if not commits:
            return
        for c in commits:
            self._check_key(c.key)
            if not self._all and c.key not in self._held:
                raise not_held(self.description, c.key, c.seq)
        await self._run(self._riding, self._commit_sync, commits)

    def _commit_sync(self, commits: Sequence[KeyCommit]) -> None:
        first = commits[0]
        conn = self._connection(first.key)
        if self._all_lost and len(commits) > 1:
            raise StoreConflict("this store lost the whole store's lock when its connection "
                                "dropped and another store object took it; acquire_all again",
                                store=self.description)
        for c in commits:
            if c.key in self._lost:
                raise StoreConflict("this store lost the key's lock when its connection dropped "
                                    "and another store object took it; acquire it again",
                                    store=self.description, key=c.key, seq=c.seq)
        token = uuid.uuid4()
        committing = False
        try:
            conn.execute("BEGIN")
            try:
                if len(commits) == 1:
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                                 self._xact_key(first.key))
                    row = conn.execute(sql.SQL("SELECT key, seq FROM {} WHERE key = %s FOR "
                                               "UPDATE").format(self._keys),
                                       (first.key,)).fetchone()
                    stored = {} if row is None else {row[0]: row[1]}
                else:  # one round trip each for the locks (in a fixed order) and the fences
                    conn.execute(
                        "SELECT count(pg_advisory_xact_lock(%s, k)) FROM (SELECT k FROM "
                        "unnest(%s::int[]) AS k ORDER BY k) AS ordered",
                        (self._ns, sorted(self._xact_key(c.key)[1] for c in commits)))
                    stored = dict(conn.execute(
                        sql.SQL("SELECT key, seq FROM {} WHERE key = ANY(%s) FOR UPDATE")
                        .format(self._keys), ([c.key for c in commits],)).fetchall())
                for c in commits:
                    current = stored.get(c.key, 0)
                    if current != c.expected_seq:
                        raise StoreConflict(f"stale writer: stored seq is {current}, writer "
                                            f"expected {c.expected_seq}", store=self.description,
                                            key=c.key, seq=c.seq)
                for c in commits:
                    self._write(conn, c, token)
                committing = True
                conn.execute("COMMIT")
            except BaseException:
                if not committing and not conn.broken:
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass  # the server rolls back a transaction whose session ends
                raise
        except psycopg.Error as e:
            if committing and (conn.broken or conn.closed):
                self._resolve(first.key, first.seq, token, e)
                return
            error = self._translate(e, "commit failed, nothing committed", first.key, first.seq)
            raise error from error.__cause__

    def _write(self, conn: psycopg.Connection[Any], c: KeyCommit, token: uuid.UUID) -> None:
        """Inside the commit's transaction: write one key's part, stamped with ``token``."""
        key, expected_seq, seq, entries, checkpoint = (c.key, c.expected_seq, c.seq, c.entries,
                                                       c.checkpoint)
        flag = sql.SQL("{}.in_flight").format(self._keys) if c.in_flight is None else (
            sql.SQL("true") if c.in_flight else sql.SQL("false"))
        mark = sql.Literal(bool(c.in_flight))
        if checkpoint is not None and c.keep_journal:
            with conn.cursor() as cur:
                cur.executemany(
                    sql.SQL("INSERT INTO {} VALUES (%s, %s, %b, %s)").format(self._journal),
                    [(key, s, bytes(e), _crc(e))
                     for s, e in zip(range(expected_seq + 1, seq + 1), entries, strict=True)])
        if checkpoint is not None:
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %b, %s, %s, {}) ON CONFLICT (key) DO "
                        "UPDATE SET seq = excluded.seq, checkpoint_seq = excluded.checkpoint_seq, "
                        "checkpoint = excluded.checkpoint, checkpoint_crc = "
                        "excluded.checkpoint_crc, last_commit = excluded.last_commit, "
                        "in_flight = {}")
                .format(self._keys, mark, flag),
                (key, seq, seq, checkpoint, _crc(checkpoint), token))
            if not c.keep_journal:
                conn.execute(sql.SQL("DELETE FROM {} WHERE key = %s AND seq <= %s")
                             .format(self._journal), (key, seq))
                conn.execute(sql.SQL("DELETE FROM {} WHERE key = %s").format(self._base),
                             (key,))
            elif c.history_base is not None:
                b, data = c.history_base[0], bytes(c.history_base[1])
                conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %b, %s) ON CONFLICT (key) "
                                     "DO UPDATE SET seq = excluded.seq, data = excluded.data, "
                                     "crc = excluded.crc").format(self._base),
                             (key, b, data, _crc(data)))
                conn.execute(sql.SQL("DELETE FROM {} WHERE key = %s AND seq <= %s")
                             .format(self._journal), (key, b))
            return
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %b, %s)").format(self._journal),
                [(key, s, bytes(e), _crc(e))
                 for s, e in zip(range(expected_seq + 1, seq + 1), entries, strict=True)])
        conn.execute(
            sql.SQL("INSERT INTO {} (key, seq, checkpoint_seq, last_commit, in_flight) VALUES "
                    "(%s, %s, 0, %s, {}) ON CONFLICT (key) DO UPDATE SET seq = excluded.seq, "
                    "last_commit = excluded.last_commit, in_flight = {}")
            .format(self._keys, mark, flag), (key, seq, token))

    def _resolve(self, key: str, seq: int, token: uuid.UUID, error: psycopg.Error) -> None:
        """The connection died while COMMIT was in flight: find out whether it committed.

        Returns when it did; raises _Lost (nothing committed: the commit may run again) when it
        did not; StoreUnavailable when it cannot be known within the reconnect budget.
        """
        if self._deadline is None:
            self._deadline = time.monotonic() + self._reconnect_budget
        text = self._secrets.scrub(str(error))
        cause = self._secrets.cause(error)
        delay = _FIRST_DELAY
        while True:
            try:
                conn = self._connection(key)  # also ends the old session if the server has it
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = '{_RESOLVE_TIMEOUT}'")
                    # Waits until the old transaction, if still running, has ended either way.
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", self._xact_key(key))
                    row = conn.execute(sql.SQL("SELECT last_commit FROM {} WHERE key = %s")
                                       .format(self._keys), (key,)).fetchone()
                break
            except (psycopg.Error, StoreError) as e:
                why = self._secrets.scrub(str(e))
                if isinstance(e, StoreError) and not isinstance(e, _Lost):
                    gave_up = True
                else:
                    remaining = self._remaining() or 0.0
                    gave_up = remaining <= 0
                    if not gave_up:
                        time.sleep(min(delay, remaining))
                        delay = min(delay * 2, _MAX_DELAY)
                        continue
            unknown = StoreUnavailable(
                f"connection lost while COMMIT was in flight ({text}) and the outcome cannot be "
                f"checked now ({why}); load the key once the database is reachable to see "
                "whether it committed", store=self.description, key=key, seq=seq)
            raise unknown from cause
        if row is not None and row[0] == token:
            return
        lost = _Lost(f"connection lost during COMMIT ({text}); checked after reconnecting: "
                     "nothing committed", store=self.description, key=key, seq=seq)
        raise lost from cause
