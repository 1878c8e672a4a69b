"""PostgresDatabase: transactional state in PostgreSQL (psycopg 3, the ``postgres`` extra).

A group of inputs is one transaction at the configured isolation level (SERIALIZABLE by default),
whose first statement locks the machine's row (``SELECT seq ... FOR UPDATE``: the fence). Statements
the session queues (``BEGIN``, the fence, savepoints and their release, key-value writes, the
bookkeeping, ``COMMIT``) go out in one pipeline with the next statement that needs an answer, so a
transition costs the round trips of its own reads and writes and one for the commit.

psycopg's async connection needs an asyncio loop, so, as :class:`~fasm.persistence.PostgresStore`
does, the driver uses a synchronous connection from worker threads: the runtime drives a whole
group on one worker thread, and the code works on asyncio and trio alike.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import psycopg
import psycopg.pq

from ..errors import StoreConflict, StoreCorrupt, StoreUnavailable
from ._postgres import Secrets, is_transient, safe_dsn
from ._txn import Database, Failure, Fetch, Stmt

__all__ = ("PostgresDatabase", "to_pyformat")

_RELOCK_TIMEOUT = "2s"  # waiting for our own dead session to let go of its locks
_RESOLVE_TIMEOUT = "10s"
_FIRST_DELAY = 0.05  # seconds before the first reconnect attempt; doubles up to _MAX_DELAY
_MAX_DELAY = 1.0
log = logging.getLogger("fasm.persistence")
_ISOLATIONS = ("serializable", "repeatable read", "read committed")
_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
# serialization failure, deadlock, lock timeout, statement timeout
_CONTENTION = {"40001", "40P01", "55P03", "57014"}
_LOST = {"57P01", "57P02", "57P03"}  # admin shutdown, crash shutdown, cannot connect now
_OPEN = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _hash(*parts: str) -> int:
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def to_pyformat(sql: str) -> str:
    """Rewrite ``?`` / ``:name`` placeholders as psycopg's ``%s`` / ``%(name)s``, and ``%`` as
    ``%%``, leaving string literals, quoted identifiers, dollar quotes, comments and ``::`` casts
    alone.

    Raises:
        ValueError: the statement mixes ``?`` and ``:name``.
    """
    out: list[str] = []
    styles: set[str] = set()
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not _word(sql[i - 2]))
            j = i + 1
            while j < n:
                if escapes and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            end = j + 1
        elif c == '"':
            j = i + 1
            while j < n and not (sql[j] == '"' and (j + 1 >= n or sql[j + 1] != '"')):
                j += 2 if sql[j] == '"' else 1
            end = j + 1
        elif c == "-" and nxt == "-":
            j = sql.find("\n", i)
            end = n if j < 0 else j
        elif c == "/" and nxt == "*":
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            end = j
        elif c == "$" and (i == 0 or not _word(sql[i - 1])) and (m := _DOLLAR.match(sql, i)):
            close = sql.find(m.group(0), m.end())
            end = n if close < 0 else close + len(m.group(0))
        elif c == "?":
            styles.add("?")
            out.append("%s")
            i += 1
            continue
        elif c == ":" and nxt == ":":
            out.append("::")
            i += 2
            continue
        elif c == ":" and (m := _NAME.match(sql, i + 1)) and (i == 0 or sql[i - 1] != ":"):
            styles.add(":name")
            out.append(f"%({m.group(0)})s")
            i = m.end()
            continue
        elif c == "%":
            out.append("%%")
            i += 1
            continue
        else:
            out.append(c)
            i += 1
            continue
        out.append(sql[i:end].replace("%", "%%"))
        i = end
    if len(styles) > 1:
        raise ValueError(f"the statement mixes ? and :name placeholders: {sql!r}")
    return "".join(out)


def _word(c: str) -> bool:
    return c.isalnum() or c == "_"


class _PgDriver:
    # COMMIT goes out in one pipeline with the bookkeeping, so the fence is checked first, and
    # a COMMIT whose answer was lost is looked up by its token.
    fence_at_begin = True
    commit_token = True

    def __init__(self, dsn: str, schema: str, prefix: str, isolation: str,
                 lock_timeout: float | None, connect_timeout: float,
                 reconnect_budget: float) -> None:
        self._secrets = Secrets(dsn)
        self._dsn = dsn
        self._reconnect_budget = reconnect_budget
        self._schema = schema
        self._prefix = prefix
        self._isolation = isolation.upper()
        self._lock_timeout = lock_timeout
        self._connect_timeout = max(1, round(connect_timeout))
        self._app = f"fasm-db-{uuid.uuid4().hex[:12]}"
        self._ns = _hash(schema, prefix, "fasm-txn") >> 32
        self._conn: psycopg.Connection[Any] | None = None
        self._pid: int | None = None
        self.identity = ""
        self._opened = False
        self._held: set[str] = set()
        self._guard = threading.Lock()
        self._translated: dict[str, str] = {}
        self.description = f"postgres:{safe_dsn(dsn)} {schema}.{prefix}*"
        kv, keys = self.table("kv"), self.table("idempotency")
        self._set_based = {  # the internal statements of many(), one array per column
            "kv_put": f"INSERT INTO {kv} (space, key, value) SELECT * FROM "
                      "unnest(%s::text[], %s::bytea[], %s::bytea[]) "
                      "ON CONFLICT (space, key) DO UPDATE SET value = excluded.value",
            "kv_delete": f"DELETE FROM {kv} WHERE (space, key) IN "
                         "(SELECT * FROM unnest(%s::text[], %s::bytea[]))",
            "key_put": f"INSERT INTO {keys} (key, idempotency_key, seq, at, outcome) SELECT * "
                       "FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::float8[], "
                       "%s::bytea[]) ON CONFLICT (key, idempotency_key) DO UPDATE SET "
                       "seq = excluded.seq, at = excluded.at, outcome = excluded.outcome",
        }

    @property
    def backend_pid(self) -> int | None:
        return self._pid

    def table(self, name: str) -> str:
        return f"{_ident(self._schema)}.{_ident(self._prefix + name)}"

    def translate(self, sql: str) -> str:
        found = self._translated.get(sql)
        if found is None:
            found = to_pyformat(sql)
            if len(self._translated) > 1024:
                self._translated.clear()
            self._translated[sql] = found
        return found

    def _key_lock(self, key: str) -> int:
        return _hash(self._schema, self._prefix, "fasm-txn", key)

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        """A new connection, trying again with backoff while the server cannot be reached, for
        up to the reconnect budget.

        Raises:
            StoreUnavailable: the budget is spent, or the server refused the session for good
                (no such database, user or password).
        """
        deadline: float | None = None
        delay = _FIRST_DELAY
        while True:
            timeout = self._connect_timeout
            if deadline is not None:  # an attempt never runs far past the budget
                timeout = max(1, min(timeout, round(deadline - time.monotonic())))
            try:
                conn = psycopg.connect(self._dsn, autocommit=True, application_name=self._app,
                                       connect_timeout=timeout)
                if self._lock_timeout is not None:
                    try:
                        conn.execute(f"SET lock_timeout = '{int(self._lock_timeout * 1000)}ms'")
                    except BaseException:
                        conn.close()
                        raise
            except psycopg.Error as e:
                failure = e
            else:
                if deadline is not None:
                    log.warning("%s: reconnected after %.1fs", self.description,
                                time.monotonic() - deadline + self._reconnect_budget)
                self._conn, self._pid = conn, conn.info.backend_pid
                return conn
            now = time.monotonic()
            text = self._secrets.scrub(str(failure))
            if deadline is None and is_transient(failure):
                deadline = now + self._reconnect_budget
                log.warning("%s: cannot connect (%s); trying again for up to %gs",
                            self.description, text, self._reconnect_budget)
            if deadline is None or now >= deadline:
                spent = "" if deadline is None else (
                    f"; the database stayed unreachable for the whole reconnect budget "
                    f"({self._reconnect_budget:g}s)")
                error = StoreUnavailable(f"cannot connect: {text}{spent}",
                                         store=self.description)
                raise error from self._secrets.cause(failure)
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, _MAX_DELAY)

    def _connection(self) -> psycopg.Connection[Any]:
        """The live connection; after a lost one, a new session holding the same keys.

        Raises:
            StoreUnavailable: the database is not open, or cannot be reached again within the
                reconnect budget.
            StoreConflict: another process took a held key while the connection was down.
            psycopg.Error: the new connection broke too (a ``lost`` failure).
        """
        if not self._opened:
            raise StoreUnavailable("the database is not open", store=self.description)
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        old_pid = self._pid
        self._drop()
        conn = self._connect()
        try:
            if old_pid is not None:
                # End our old session if the server still runs it (a half-open connection), so
                # its transaction and locks go now rather than when the server notices.
                try:
                    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE pid = %s AND application_name = %s", (old_pid, self._app))
                except psycopg.errors.InsufficientPrivilege:
                    pass
            with self._guard:
                held = sorted(self._held)
            conn.execute(f"SET lock_timeout = '{_RELOCK_TIMEOUT}'")
            for key in held:
                try:
                    conn.execute("SELECT pg_advisory_lock(%s)", (self._key_lock(key),))
                except psycopg.errors.LockNotAvailable as e:
                    with self._guard:
                        self._held.discard(key)
                    raise StoreConflict("the key's lock was lost with the connection and another "
                                        "process holds it now", store=self.description,
                                        key=key) from e
            timeout = "0" if self._lock_timeout is None else f"{int(self._lock_timeout * 1000)}ms"
            conn.execute(f"SET lock_timeout = '{timeout}'")
        except BaseException:
            self._drop()
            raise
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        if self._opened and self._conn is not None and not self._conn.broken:
            return
        conn = self._connect()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (self._ns,))
                if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                (self._schema,)).fetchone() is None:
                    conn.execute(f"CREATE SCHEMA {_ident(self._schema)}")
                for statement in self._schema_sql():
                    conn.execute(statement)
                meta = self.table("meta")
                conn.execute(f"INSERT INTO {meta} VALUES ('database identity', %s) "
                             "ON CONFLICT DO NOTHING", (str(uuid.uuid4()),))
                row = conn.execute(
                    f"SELECT value FROM {meta} WHERE name = 'database identity'").fetchone()
                self.identity = str(row[0]) if row is not None else ""
        except psycopg.Error as e:
            self._drop()
            if isinstance(e, psycopg.errors.UndefinedColumn | psycopg.errors.DatatypeMismatch):
                raise StoreCorrupt(f"the tables are not fasm's: {self._secrets.scrub(str(e))}",
                                   store=self.description) from self._secrets.cause(e)
            error = StoreUnavailable(
                f"cannot open the database: {type(e).__name__}: {self._secrets.scrub(str(e))}",
                store=self.description)
            raise error from self._secrets.cause(e)
        self._opened = True

    def _schema_sql(self) -> list[str]:
        m, i, kv = self.table("machines"), self.table("idempotency"), self.table("kv")
        return [
            f"CREATE TABLE IF NOT EXISTS {m} (key text PRIMARY KEY, seq bigint NOT NULL, "
            "last_commit text)",
            f"CREATE TABLE IF NOT EXISTS {i} (key text NOT NULL, idempotency_key text NOT NULL, "
            "seq bigint NOT NULL, at float8, outcome bytea, PRIMARY KEY (key, idempotency_key))",
            # what a database made by an older fasm lacks (its keys: undated, outcome unknown)
            f"ALTER TABLE {i} ADD COLUMN IF NOT EXISTS at float8",
            f"ALTER TABLE {i} ADD COLUMN IF NOT EXISTS outcome bytea",
            f"CREATE INDEX IF NOT EXISTS {_ident(self._prefix + 'idempotency_seq')} "
            f"ON {i} (key, seq)",
            f"CREATE TABLE IF NOT EXISTS {kv} (space text NOT NULL, key bytea NOT NULL, "
            "value bytea NOT NULL, PRIMARY KEY (space, key))",
            f"CREATE TABLE IF NOT EXISTS {self.table('meta')} (name text PRIMARY KEY, "
            "value text NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {self.table('in_flight')} (key text PRIMARY KEY)",
        ]

    def close(self) -> None:
        self._opened = False
        with self._guard:
            self._held.clear()
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            try:
                conn.execute("SELECT pg_advisory_unlock_all()")  # free the keys now, not when
            except psycopg.Error:                                # the server notices the close
                pass
        self._drop()
        self._pid = None

    def acquire(self, key: str) -> None:
        if "\0" in key:
            raise ValueError("PostgreSQL text cannot hold NUL characters, so keys cannot either")
        for attempt in (1, 2):
            try:
                conn = self._connection()
                if key in self._held:
                    return
                row = conn.execute("SELECT pg_try_advisory_lock(%s)",
                                   (self._key_lock(key),)).fetchone()
                break
            except psycopg.Error as e:
                if attempt == 1 and self.classify(e) == Failure("lost"):
                    continue  # a stale connection: the next _connection() reconnects
                error = StoreUnavailable(f"cannot lock the key: {self._secrets.scrub(str(e))}",
                                         store=self.description, key=key)
                raise error from self._secrets.cause(e)
        if row is None or not row[0]:
            raise StoreConflict("key is held by another runtime or process",
                                store=self.description, key=key)
        with self._guard:
            self._held.add(key)

    def release(self, key: str) -> None:
        with self._guard:
            if key not in self._held:
                return
            self._held.discard(key)
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return  # the session, and the lock with it, is gone already
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (self._key_lock(key),))
        except psycopg.Error:
            self._drop()  # ending the session releases the lock for sure

    # -- statements -------------------------------------------------------------------------

    def begin(self, write: bool) -> list[Stmt]:
        self._connection()
        if write:
            return [Stmt(f"BEGIN ISOLATION LEVEL {self._isolation}")]
        return [Stmt("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")]

    @staticmethod
    def _exec(conn: psycopg.Connection[Any], stmt: Stmt) -> psycopg.Cursor[Any]:
        if stmt.many:
            cur = conn.cursor()
            cur.executemany(stmt.sql, stmt.params)
            return cur
        return conn.execute(stmt.sql, stmt.params)

    @staticmethod
    def _result(cur: psycopg.Cursor[Any] | None, fetch: Fetch) -> Any:
        if cur is None:
            return None
        if fetch == "one":
            return cur.fetchone() if cur.description is not None else None
        if fetch == "all":
            return cur.fetchall() if cur.description is not None else []
        return cur.rowcount

    def run(self, queued: Sequence[Stmt], last: Stmt | None, fetch: Fetch) -> Any:
        conn = self._live()
        if not queued:
            return None if last is None else self._result(self._exec(conn, last), fetch)
        with conn.pipeline():
            sent = [(stmt, self._exec(conn, stmt)) for stmt in queued]
            cur = None if last is None else self._exec(conn, last)
        for stmt, c in sent:
            if stmt.check is not None:
                stmt.check(c)
        return self._result(cur, fetch)

    def _live(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            raise psycopg.OperationalError("the connection to the database was lost")
        return conn

    def commit(self, queued: Sequence[Stmt], token: tuple[str, str] | None) -> None:
        conn = self._live()
        try:
            with conn.pipeline():
                for stmt in queued:
                    self._exec(conn, stmt)
                conn.execute("COMMIT")
        except psycopg.Error as e:
            if conn.broken or conn.closed:
                self._resolve(token, e)
                return
            raise

    def _resolve(self, token: tuple[str, str] | None, error: psycopg.Error) -> None:
        """The connection broke while COMMIT was in flight: find out whether it committed.

        Returns when it did; re-raises ``error`` (a lost connection: nothing committed) when it
        did not; raises StoreUnavailable when it cannot be known.
        """
        text = self._secrets.scrub(str(error))
        if token is None:
            raise StoreUnavailable(f"connection lost during COMMIT ({text}); whether it "
                                   "committed is unknown", store=self.description) from error
        key, expected = token
        try:
            conn = self._connection()  # ends the old session if the server still has it
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{_RESOLVE_TIMEOUT}'")
                # Waits until the old transaction, if still running, has ended either way.
                row = conn.execute(f"SELECT last_commit FROM {self.table('machines')} "
                                   "WHERE key = %s FOR UPDATE", (key,)).fetchone()
        except (psycopg.Error, StoreConflict, StoreUnavailable) as e:
            # (_connection rode out the outage for the whole reconnect budget already.)
            raise StoreUnavailable(
                f"connection lost while COMMIT was in flight ({text}) and the outcome cannot be "
                f"checked now ({self._secrets.scrub(str(e))}); restart once the database is "
                "reachable: the runtime resumes from whatever committed",
                store=self.description, key=key) from self._secrets.cause(error)
        if row is not None and row[0] == expected:
            return
        raise error

    def rollback(self) -> None:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return
        if conn.info.transaction_status in _OPEN:
            conn.execute("ROLLBACK")

    def in_transaction(self) -> bool:
        conn = self._conn
        return (conn is not None and not conn.closed and not conn.broken
                and conn.info.transaction_status in _OPEN)

    def many(self, name: str, sql: str, rows: list[tuple[Any, ...]]) -> Stmt:
        if len(rows) == 1:
            return Stmt(sql, rows[0])
        # psycopg's executemany in a pipeline exchanges messages with the server row by row;
        # unnest() over one array per column is one statement however many rows there are.
        # (Rows never repeat a key: the buffers they come from are keyed, so ON CONFLICT never
        # meets the same row twice in one statement.)
        return Stmt(self._set_based[name],
                    tuple(list(column) for column in zip(*rows, strict=True)))

    def transaction_aborted(self) -> bool:
        conn = self._conn
        return (conn is not None and not conn.closed and not conn.broken
                and conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR)

    def classify(self, error: Exception) -> Failure | None:
        if not isinstance(error, psycopg.Error):
            return None
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return Failure("lost")
        state = error.sqlstate or ""
        if state.startswith("23"):
            return Failure("constraint", error.diag.constraint_name)
        if state in _CONTENTION:
            return Failure("contention")
        if state.startswith("08") or state in _LOST:
            return Failure("lost")
        if not state and isinstance(error, psycopg.OperationalError):
            # libpq's own report of a connection that failed (no SQLSTATE: the server never
            # answered), as _resolve re-raises it once a lost COMMIT turned out not to commit.
            return Failure("lost")
        if state.startswith(("53", "58")):  # insufficient resources, system error
            return Failure("unavailable")
        return None


class PostgresDatabase(Database):
    """Transactional state in PostgreSQL.

    Args:
        dsn: a libpq connection string or URL.
        schema: the schema of the internal tables (created when missing); yours may live
            anywhere the connection can reach.
        table_prefix: prefix of the internal tables (``<prefix>machines``,
            ``<prefix>idempotency``, ``<prefix>kv``).
        isolation: ``"serializable"`` (default), ``"repeatable read"`` or ``"read committed"``:
            the isolation level of the runtime's transactions. Serializable makes concurrent
            writers (other runtimes, other services) safe without thinking; the runtime reruns a
            group the database aborts.
        lock_timeout: seconds a statement waits for a row lock before the attempt counts as
            contention (None: wait forever, which can make a stop wait as long).
        connect_timeout: seconds to wait for a connection.
        reconnect_budget: seconds the driver keeps trying to reach the server when it cannot
            connect (after losing its connection, or at open), with backoff from 50 ms doubling
            to 1 s, before the runtime stops with :class:`~fasm.errors.StoreUnavailable`: long
            enough by default to ride out an ordinary server restart. Submitters' inputs wait
            in the runtime's queue meanwhile. A server that refuses the session for good (no
            such database, user or password) fails at once.
        max_attempts: how many times the runtime runs a group the database keeps aborting
            (serialization failure, deadlock, lock timeout) or loses the connection in, before
            answering :class:`~fasm.errors.TransactionConflict` (contention) or stopping with
            :class:`~fasm.errors.StoreUnavailable` (no connection).

    What a user should know:

    * One connection, owned by whoever opened the object. A machine key is locked with a session
      advisory lock, so two runtimes never drive one key; a killed process's lock dies with its
      session. After a lost connection the driver reconnects (for up to ``reconnect_budget``),
      ends its old session if the server still has it, and takes the key's lock again; if
      another process took the key meanwhile, the runtime stops with
      :class:`~fasm.errors.StoreConflict` rather than become a second writer. The group then
      runs again on the new session, its first statement checking the machine's stored seq.
    * If the connection breaks while COMMIT is in flight, the driver reconnects and looks for the
      commit's token in the machine's row: found, the group committed; absent, it did not and is
      run again. Only when the database cannot be reached within the budget is the outcome
      unknown; the runtime then stops without acknowledging anything.
    * The DSN's password never appears in a message, a description, a log line or a chained
      driver error; a DSN that cannot be parsed is refused with ValueError, without quoting it.
    * Placeholders ``?`` and ``:name`` are rewritten to psycopg's; PostgreSQL's ``?``, ``?|``
      and ``?&`` jsonb operators therefore cannot be written literally (use ``jsonb_exists``,
      ``jsonb_exists_any``, ``jsonb_exists_all``), nor can a slice bound named like a parameter
      (``a[lo:hi]``: write ``a[lo : hi]``).
    * A constraint that refuses a write surfaces as :class:`~fasm.errors.ConstraintViolation`
      with the constraint's name.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        table_prefix: str = "fasm_",
        isolation: Literal["serializable", "repeatable read", "read committed"] = "serializable",
        lock_timeout: float | None = 5.0,
        connect_timeout: float = 10.0,
        reconnect_budget: float = 30.0,
        max_attempts: int = 5,
    ) -> None:
        if isolation not in _ISOLATIONS:
            raise ValueError(f"isolation must be one of {_ISOLATIONS}, not {isolation!r}")
        if lock_timeout is not None and lock_timeout <= 0:
            raise ValueError("lock_timeout must be > 0 or None")
        if reconnect_budget < 0:
            raise ValueError("reconnect_budget must be >= 0")
        self._pg = _PgDriver(dsn, schema, table_prefix, isolation, lock_timeout, connect_timeout,
                             reconnect_budget)
        super().__init__(self._pg, max_attempts=max_attempts)

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the current session, or None when not connected."""
        return self._pg.backend_pid
