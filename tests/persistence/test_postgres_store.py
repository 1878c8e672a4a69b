"""PostgresStore under faults: a server that is down, a session killed mid-run, a connection cut
while COMMIT is in flight (before and after the server saw it), locks of dead processes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("psycopg")

import psycopg
import psycopg.conninfo
from psycopg import sql

from fasm.errors import StoreConflict, StoreCorrupt, StoreUnavailable
from fasm.persistence import PostgresStore
from tests.persistence._faults import check_killed_holder_frees_key, flip_byte

KEY = "order/42"


async def opened(dsn: str, schema: str, **kwargs: Any) -> PostgresStore:
    store = PostgresStore(dsn, schema=schema, **kwargs)
    await store.open()
    return store


def query(dsn: str, statement: str, *params: Any, schema: str) -> list[tuple[Any, ...]]:
    """Run one statement on a separate connection; ``{keys}`` and ``{journal}`` name the tables."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql.SQL(statement).format(
            keys=sql.Identifier(schema, "fasm_keys"),
            journal=sql.Identifier(schema, "fasm_journal")), params)
        return cur.fetchall() if cur.description else []


def terminate(dsn: str, pid: int | None) -> None:
    assert pid is not None
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))


# -- a server that is down or goes away ------------------------------------------------------


@pytest.mark.anyio
async def test_server_down_at_start_is_unavailable_and_the_password_stays_secret() -> None:
    store = PostgresStore("postgresql://postgres:s3cret@127.0.0.1:1/test", connect_timeout=2,
                          reconnect_budget=0.2)
    with pytest.raises(StoreUnavailable, match=r"cannot connect.*whole reconnect budget") as caught:
        await store.open()
    text = str(caught.value)
    assert "host=127.0.0.1" in text and "port=1" in text
    assert "s3cret" not in text and "s3cret" not in store.description
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    await store.close()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_session_killed_mid_run(pg_dsn: str, pg_schema: str) -> None:
    store = await opened(pg_dsn, pg_schema)
    await store.acquire(KEY)
    await store.commit(KEY, expected_seq=0, seq=2, entries=[b"one", b"two"])
    old_pid = store.backend_pid
    terminate(pg_dsn, old_pid)
    # The commit meets the dead session, reconnects, takes the key's lock again and commits.
    await store.commit(KEY, expected_seq=2, seq=3, entries=[b"three"])
    assert store.backend_pid != old_pid
    assert query(pg_dsn, "SELECT seq FROM {keys}", schema=pg_schema) == [(3,)]
    with pytest.raises(StoreConflict, match="stored seq is 3"):
        await store.commit(KEY, expected_seq=2, seq=3, entries=[b"three again"])
    other = await opened(pg_dsn, pg_schema)
    with pytest.raises(StoreConflict, match="held by another"):
        await other.acquire(KEY)
    got = await other.load(KEY)
    assert got is not None and got.journal == ((1, b"one"), (2, b"two"), (3, b"three"))
    await store.close()
    await other.acquire(KEY)
    await other.close()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_a_lock_taken_while_the_session_was_down_is_lost(pg_dsn: str,
                                                               pg_schema: str) -> None:
    a = await opened(pg_dsn, pg_schema)
    b = await opened(pg_dsn, pg_schema)
    await a.acquire(KEY)
    await a.commit(KEY, expected_seq=0, seq=1, entries=[b"a1"])
    terminate(pg_dsn, a.backend_pid)
    await b.acquire(KEY)  # the server released a's lock with its session
    # a reconnects, finds the key taken, and never becomes a second writer.
    with pytest.raises(StoreConflict, match="lost the key's lock"):
        await a.commit(KEY, expected_seq=1, seq=2, entries=[b"a2"])
    with pytest.raises(StoreConflict, match="lost the key's lock"):
        await a.commit(KEY, expected_seq=1, seq=2, entries=[b"a2"])
    await b.commit(KEY, expected_seq=1, seq=2, entries=[b"b2"])
    with pytest.raises(StoreConflict, match="held by another"):
        await a.acquire(KEY)
    await b.close()
    await a.acquire(KEY)
    with pytest.raises(StoreConflict, match="stored seq is 2"):  # fencing catches the stale seq
        await a.commit(KEY, expected_seq=1, seq=2, entries=[b"a2"])
    await a.commit(KEY, expected_seq=2, seq=3, entries=[b"a3"])
    got = await a.load(KEY)
    assert got is not None and got.journal == ((1, b"a1"), (2, b"b2"), (3, b"a3"))
    await a.close()


# -- a connection cut while COMMIT is in flight ----------------------------------------------


class CommitCutter:
    """A TCP proxy to PostgreSQL that cuts the connection carrying the next COMMIT: ``"before"``
    the server sees it, or ``"after"`` the server answered it (the answer never arrives)."""

    def __init__(self, dsn: str) -> None:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        self.target = (str(params.get("host", "127.0.0.1")), int(str(params.get("port", 5432))))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # so that close() stops the accept loop promptly
        self._stop = False
        port = self.listener.getsockname()[1]
        self.dsn = psycopg.conninfo.make_conninfo(
            dsn, host="127.0.0.1", port=port, sslmode="disable", gssencmode="disable")
        self.mode: str | None = None
        self.refuse = False  # close new connections at once, as if the server were gone
        self.cut = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.refuse:
                client.close()
                continue
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            state: dict[str, bool] = {}
            for src, dst, up in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up, state), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool,
              state: dict[str, bool]) -> None:
        try:
            while data := src.recv(65536):
                if up and self.mode is not None and b"COMMIT\0" in data:
                    mode, self.mode = self.mode, None
                    if mode == "before":
                        self.cut.set()
                        return
                    state["answer-due"] = True
                elif not up and state.get("answer-due"):
                    self.cut.set()
                    return  # the server committed and answered; the client never hears it
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._threads[0].join(5)
        self.listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(5)

    def cut_all(self) -> None:
        """Cut every connection the proxy carries, both ways, as a server restart does."""
        sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def cutter(pg_dsn: str) -> Iterator[CommitCutter]:
    proxy = CommitCutter(pg_dsn)
    yield proxy
    proxy.close()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_commit_answer_lost_after_the_server_committed(
        pg_dsn: str, pg_schema: str, cutter: CommitCutter) -> None:
    store = await opened(cutter.dsn, pg_schema)
    await store.acquire(KEY)
    await store.commit(KEY, expected_seq=0, seq=1, entries=[b"one"])
    cutter.mode = "after"
    await store.commit(KEY, expected_seq=1, seq=3, entries=[b"two", b"three"])  # acknowledged
    assert cutter.cut.is_set()
    assert query(pg_dsn, "SELECT seq FROM {keys}", schema=pg_schema) == [(3,)]
    await store.commit(KEY, expected_seq=3, seq=4, entries=[b"four"])  # still holds the key
    got = await store.load(KEY)
    assert got is not None and [s for s, _ in got.journal] == [1, 2, 3, 4]
    await store.close()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_commit_cut_before_the_server_saw_it(pg_dsn: str, pg_schema: str,
                                                   cutter: CommitCutter) -> None:
    store = await opened(cutter.dsn, pg_schema)
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"state")
    cutter.mode = "before"
    # Checked after reconnecting: nothing committed, so the commit runs again, once.
    await store.commit(KEY, expected_seq=1, seq=3, entries=[b"two", b"three"])
    assert cutter.cut.is_set()
    assert query(pg_dsn, "SELECT count(*) FROM {journal}", schema=pg_schema) == [(2,)]
    assert query(pg_dsn, "SELECT seq FROM {keys}", schema=pg_schema) == [(3,)]
    got = await store.load(KEY)
    assert got is not None and got.seq == 3 and got.journal == ((2, b"two"), (3, b"three"))
    await store.close()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_commit_outcome_unknown_when_the_server_stays_away(
        pg_dsn: str, pg_schema: str, cutter: CommitCutter) -> None:
    store = await opened(cutter.dsn, pg_schema, reconnect_budget=1)
    await store.commit(KEY, expected_seq=0, seq=1, entries=[b"one"])
    cutter.mode, cutter.refuse = "after", True
    with pytest.raises(StoreUnavailable, match="outcome cannot be checked now"):
        await store.commit(KEY, expected_seq=1, seq=2, entries=[b"two"])
    # It did commit: the store said it could not tell, and did not claim it failed.
    assert query(pg_dsn, "SELECT seq FROM {keys}", schema=pg_schema) == [(2,)]
    cutter.refuse = False
    got = await store.load(KEY)
    assert got is not None and got.seq == 2
    await store.close()


# -- records and keys ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.postgres
@pytest.mark.parametrize("damage", ["entry", "missing-entry"])
async def test_damaged_rows_are_corruption(pg_dsn: str, pg_schema: str, damage: str) -> None:
    store = await opened(pg_dsn, pg_schema)
    await store.commit(KEY, expected_seq=0, seq=3, entries=[b"one", b"two", b"three"])
    if damage == "entry":
        query(pg_dsn, "UPDATE {journal} SET entry = %s WHERE seq = 2", flip_byte(b"two", 1),
              schema=pg_schema)
    else:
        query(pg_dsn, "DELETE FROM {journal} WHERE seq = 2", schema=pg_schema)
    with pytest.raises(StoreCorrupt, match="order/42"):
        await store.load(KEY)
    await store.close()


@pytest.mark.anyio
@pytest.mark.postgres
@pytest.mark.parametrize("lost", ["key-row", "checkpoint", "newest-entries", "whole-journal"])
async def test_deleted_rows_are_refused_not_loaded_as_less(pg_dsn: str, pg_schema: str,
                                                           lost: str) -> None:
    store = await opened(pg_dsn, pg_schema)
    await store.commit(KEY, expected_seq=0, seq=1, checkpoint=b"state")
    await store.commit(KEY, expected_seq=1, seq=4, entries=[b"two", b"three", b"four"])
    if lost == "key-row":
        query(pg_dsn, "DELETE FROM {keys}", schema=pg_schema)
    elif lost == "checkpoint":
        query(pg_dsn, "UPDATE {keys} SET checkpoint = NULL, checkpoint_crc = NULL",
              schema=pg_schema)
    elif lost == "newest-entries":
        query(pg_dsn, "DELETE FROM {journal} WHERE seq >= 3", schema=pg_schema)
    else:
        query(pg_dsn, "DELETE FROM {journal}", schema=pg_schema)
    with pytest.raises(StoreCorrupt, match="order/42"):
        await store.load(KEY)
    await store.close()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_table_prefixes_are_separate_stores(pg_dsn: str, pg_schema: str) -> None:
    a = await opened(pg_dsn, pg_schema, table_prefix="a_")
    b = await opened(pg_dsn, pg_schema, table_prefix="b_")
    await a.acquire(KEY)
    await b.acquire(KEY)  # another store: another lock
    await a.commit(KEY, expected_seq=0, seq=1, entries=[b"a"])
    assert await b.load(KEY) is None
    await a.close()
    await b.close()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_a_nul_in_a_key_is_refused(pg_dsn: str, pg_schema: str) -> None:
    store = await opened(pg_dsn, pg_schema)
    with pytest.raises(ValueError, match="NUL"):
        await store.commit("a\0b", expected_seq=0, seq=1, entries=[b"x"])
    await store.close()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_a_killed_process_does_not_keep_the_key(pg_dsn: str, pg_schema: str) -> None:
    store = await opened(pg_dsn, pg_schema)  # creates the schema before the child starts
    await store.close()
    await check_killed_holder_frees_key(
        lambda: PostgresStore(pg_dsn, schema=pg_schema), "PostgresStore",
        f"PostgresStore({pg_dsn!r}, schema={pg_schema!r})", KEY)
