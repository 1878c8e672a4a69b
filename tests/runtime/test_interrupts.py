"""SystemExit and KeyboardInterrupt inside the runtime: raised by an stf, a restore, an executor or
a handler, they come out as themselves (never as a store error), the runtime stops as if the
process had been killed (nothing of the interrupted group is acknowledged), and what was
committed before is intact. On every kind of storage, on asyncio and trio."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from fasm import (
    ActionsContainer,
    Input,
    Normal,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
    Untracked,
)
from fasm.errors import RuntimeClosed, StoreError
from fasm.persistence import FileStore, MemoryStore, SQLiteStore, Transaction
from fasm.runtime import ActionContext, ManualClock, Runtime
from tests.persistence.txn_ledger import DatabaseFactory

pytestmark = pytest.mark.anyio

KINDS: dict[str, type[BaseException]] = {"exit": SystemExit, "interrupt": KeyboardInterrupt}


@dataclass
class Box:
    items: list[int] = field(default_factory=list)
    jobs: dict[int, int] = field(default_factory=dict)  # pending job id -> n


@dataclass(frozen=True)
class Add:
    n: int
    job: bool = False  # also emit a tracked Job and an untracked Ping


@dataclass(frozen=True)
class Quit:
    """Appends to the state, then raises ``KINDS[kind]``: the transition is half done."""

    kind: str


@dataclass(frozen=True)
class Job:
    n: int


@dataclass(frozen=True)
class JobDone:
    n: int


@dataclass(frozen=True)
class Ping:
    n: int


BoxActions = ActionsContainer[int, Job, Ping]


class Quitter(StateMachine[Box, Add | Quit, int, Job, JobDone, Ping]):
    machine_name = "tests.quitter"

    def __init__(self, restore_raises: str | None = None) -> None:
        self.restore_raises = restore_raises

    async def stf(self, state: Box, input: Input[Add | Quit, int, JobDone],
                  actions: BoxActions) -> None:
        match input:
            case Normal(Add(n, job)):
                state.items.append(n)
                if job:
                    actions.add(Tracked(n, Job(n)))
                    actions.add(Untracked(Ping(n)))
                    state.jobs[n] = n
            case Normal(Quit(kind)):
                state.items.append(-1)
                raise KINDS[kind](kind)
            case TrackedActionCompleted(id, JobDone(n)):
                del state.jobs[id]
                state.items.append(1000 + n)

    async def restore(self, state: Box, actions: BoxActions) -> None:
        if self.restore_raises is not None:
            raise KINDS[self.restore_raises](self.restore_raises)
        for job_id, n in state.jobs.items():
            actions.add(Tracked(job_id, Job(n)))


class DbQuitter(StateMachine[Transaction, Add | Quit]):
    """The same inputs, with the items in a table of a database transaction."""

    machine_name = "tests.db_quitter"

    def __init__(self, restore_raises: str | None = None) -> None:
        self.restore_raises = restore_raises

    async def stf(self, db: Transaction, input: Input[Add | Quit, Any, Any],
                  actions: ActionsContainer[Any, Any, Any]) -> None:
        await db.execute("CREATE TABLE IF NOT EXISTS items (n BIGINT NOT NULL)")
        match input:
            case Normal(Add(n)):
                await db.execute("INSERT INTO items (n) VALUES (?)", (n,))
            case Normal(Quit(kind)):
                await db.execute("INSERT INTO items (n) VALUES (-1)")
                raise KINDS[kind](kind)

    async def restore(self, db: Transaction, actions: ActionsContainer[Any, Any, Any]) -> None:
        if self.restore_raises is not None:
            raise KINDS[self.restore_raises](self.restore_raises)


async def done_job(action: Job, ctx: ActionContext) -> JobDone:
    return JobDone(action.n)


async def quiet(ping: Ping) -> None:
    pass


@dataclass
class Storage:
    """One place state is kept, and how to start a runtime on it and read what it committed."""

    runtime: Callable[..., Runtime[Any, Any, Any, Any, Any, Any]]
    items: Callable[[], Awaitable[list[int]]]


@pytest.fixture(params=["memory", "file", "sqlite-store", "sqlite-db",
                        pytest.param("postgres-db", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    kind: str = request.param
    if kind.endswith("-db"):
        factory = _db(request, kind, tmp_path)

        def db_runtime(restore_raises: str | None = None,
                       **kw: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
            return Runtime(DbQuitter(restore_raises), database=factory(), **kw)

        async def db_items() -> list[int]:
            async with db_runtime() as rt:
                await rt.submit(Add(0))  # creates the table if nothing was ever committed
            database = factory()
            async with database, database.transaction(readonly=True) as tx:
                rows = await tx.fetchall("SELECT n FROM items WHERE n <> 0 ORDER BY n")
            return [int(n) for (n,) in rows]

        return Storage(db_runtime, db_items)
    memory = MemoryStore()

    def store() -> Any:
        if kind == "memory":
            return memory
        if kind == "file":
            return FileStore(tmp_path / "files")
        return SQLiteStore(tmp_path / "state.db")

    def runtime(restore_raises: str | None = None,
                **kw: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
        kw.setdefault("executors", {Job: done_job})
        kw.setdefault("handlers", {Ping: quiet})
        kw.setdefault("clock", ManualClock())
        return Runtime(Quitter(restore_raises), initial_state=Box, store=store(), **kw)

    async def items() -> list[int]:
        async with runtime() as rt:
            return list(rt.state.items)

    return Storage(runtime, items)


def _db(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> DatabaseFactory:
    from fasm.persistence import SQLiteDatabase

    if kind == "sqlite-db":
        return lambda **options: SQLiteDatabase(tmp_path / "items.db", **options)
    import psycopg.conninfo

    from fasm.persistence import PostgresDatabase

    dsn: str = request.getfixturevalue("pg_dsn")
    schema: str = request.getfixturevalue("pg_schema")
    scoped = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")
    return lambda **options: PostgresDatabase(scoped, schema=schema, **options)


# -- the stf ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_an_stf_that_raises_them_stops_the_runtime_and_they_come_out_as_themselves(
        storage: Storage, kind: str) -> None:
    error = KINDS[kind]
    with pytest.raises(error) as left:
        async with storage.runtime() as rt:
            await rt.submit(Add(1))
            with pytest.raises(error) as raised:
                await rt.submit(Quit(kind))
            assert type(raised.value) is error  # itself, not a StoreError wrapping it
            assert not rt.running
            with pytest.raises(RuntimeClosed) as closed:
                await rt.submit(Add(2))
            assert closed.value.__cause__ is raised.value
    assert left.value is raised.value and not isinstance(left.value, StoreError)
    # What was acknowledged is there; the half-done transition is not.
    assert await storage.items() == [1]


class GatedStore(MemoryStore):
    """Holds the next commit until ``gate`` is set (so that inputs queue up into one group)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: anyio.Event | None = None

    async def commit(self, *args: Any, **kwargs: Any) -> None:
        if self.gate is not None:
            gate, self.gate = self.gate, None
            await gate.wait()
        await super().commit(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
async def test_nothing_of_the_interrupted_group_is_acknowledged(kind: str) -> None:
    store = GatedStore()
    error = KINDS[kind]
    answers: dict[int, BaseException | int] = {}

    async def submit(rt: Runtime[Any, Any, Any, Any, Any, Any], n: int) -> None:
        try:
            answers[n] = (await rt.submit(Add(n))).seq
        except Exception as e:
            answers[n] = e

    rt = Runtime(Quitter(), initial_state=Box, store=store, executors={Job: done_job},
                 handlers={Ping: quiet}, clock=ManualClock())
    with pytest.raises(error):
        async with rt, anyio.create_task_group() as tg:
            store.gate = gate = anyio.Event()
            tg.start_soon(submit, rt, 1)  # its commit waits at the gate ...
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(submit, rt, 2)  # ... while 2, the Quit and 3 queue up as one group
            await anyio.wait_all_tasks_blocked()

            async def then_3_and_open() -> None:
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(submit, rt, 3)
                await anyio.wait_all_tasks_blocked()
                gate.set()

            tg.start_soon(then_3_and_open)
            with pytest.raises(error):
                await rt.submit(Quit(kind))
    assert answers[1] == 1
    for n in (2, 3):
        closed = answers[n]
        assert isinstance(closed, RuntimeClosed), closed
        assert isinstance(closed.__cause__, error)
    again = Runtime(Quitter(), initial_state=Box, store=store, executors={Job: done_job},
                    handlers={Ping: quiet}, clock=ManualClock())
    async with again:
        assert again.state.items == [1] and again.seq == 1


class InterruptedStore(MemoryStore):
    """The next commit is interrupted (Ctrl-C while the store writes) before it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupt: str | None = None

    async def commit(self, *args: Any, **kwargs: Any) -> None:
        if self.interrupt is not None:
            raise KINDS[self.interrupt](self.interrupt)
        await super().commit(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_commit_interrupted_by_them_is_not_acknowledged(kind: str) -> None:
    store = InterruptedStore()
    error = KINDS[kind]

    def runtime() -> Runtime[Any, Any, Any, Any, Any, Any]:
        return Runtime(Quitter(), initial_state=Box, store=store, executors={Job: done_job},
                       handlers={Ping: quiet}, clock=ManualClock())

    with pytest.raises(error) as left:
        async with runtime() as rt:
            await rt.submit(Add(1))
            store.interrupt = kind
            with pytest.raises(RuntimeClosed) as closed:  # its stf ran; the commit did not
                await rt.submit(Add(2))
            assert isinstance(closed.value.__cause__, error)
    assert type(left.value) is error
    store.interrupt = None
    async with runtime() as again:
        assert again.state.items == [1] and again.seq == 1


# -- restore, executors, handlers -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_restore_that_raises_them_fails_the_start_as_themselves(
        storage: Storage, kind: str) -> None:
    async with storage.runtime() as rt:
        await rt.submit(Add(1))
    with pytest.raises(KINDS[kind]) as raised:
        async with storage.runtime(restore_raises=kind):
            raise AssertionError("started")
    assert type(raised.value) is KINDS[kind]
    assert await storage.items() == [1]  # the key was released: the next start works


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["executor", "handler"])
async def test_an_executor_or_handler_that_raises_them_crashes_the_runtime(
        kind: str, where: str) -> None:
    """Decided: the process is being told to stop, so the runtime stops as if killed (not a
    failed attempt that is retried); the tracked action stays pending and restore re-emits it."""
    error = KINDS[kind]

    async def job(action: Job, ctx: ActionContext) -> JobDone:
        if where == "executor":
            raise error(kind)
        return JobDone(action.n)

    async def ping(action: Ping) -> None:
        if where == "handler":
            raise error(kind)

    store = MemoryStore()

    def runtime(**kw: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
        return Runtime(Quitter(), initial_state=Box, store=store, clock=ManualClock(), **kw)

    with pytest.raises(error) as raised, anyio.fail_after(10):
        async with runtime(executors={Job: job}, handlers={Ping: ping}) as rt:
            await rt.submit(Add(7, job=True))
            await anyio.sleep_forever()  # the crash cancels the body
    assert type(raised.value) is error and not rt.running
    with pytest.raises(RuntimeClosed):
        await rt.submit(Add(8))
    async with runtime(executors={Job: done_job}, handlers={Ping: quiet}) as again:
        await again.wait_idle()
        expected = [7, 1007]  # the job was pending (executor) or completed (handler) exactly once
        assert again.state.items == expected and again.state.jobs == {}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_listener_that_raises_them_leaves_no_submitter_waiting(kind: str) -> None:
    """Raised after the commit (the transition is durable) and before the submitter was answered:
    a crash between the two. The submitter, in a task outside the runtime's block, is answered
    with RuntimeClosed instead of waiting for ever."""
    store = MemoryStore()
    answers: list[BaseException | int] = []

    def listener(event: Any) -> None:
        if type(event).__name__ == "TransitionCommitted":
            raise KINDS[kind](kind)

    async def submitter(rt: Runtime[Any, Any, Any, Any, Any, Any]) -> None:
        try:
            answers.append((await rt.submit(Add(1))).seq)
        except Exception as e:
            answers.append(e)

    left: BaseException | None = None
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            try:
                async with Runtime(Quitter(), initial_state=Box, store=store,
                                   executors={Job: done_job}, handlers={Ping: quiet},
                                   clock=ManualClock(), listeners=[listener]) as rt:
                    tg.start_soon(submitter, rt)
                    await anyio.sleep_forever()
            except KINDS[kind] as e:
                left = e
    assert type(left) is KINDS[kind]
    assert len(answers) == 1 and isinstance(answers[0], RuntimeClosed)
    async with Runtime(Quitter(), initial_state=Box, store=store, executors={Job: done_job},
                       handlers={Ping: quiet}, clock=ManualClock()) as again:
        assert again.state.items == [1]  # durable, though never acknowledged
