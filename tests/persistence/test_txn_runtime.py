"""Transactional state through the Runtime, on real SQLite and real PostgreSQL, on asyncio and trio:
commits, rollbacks, constraint violations as rejections, actions only after the commit, restore
from pending rows, a crash between commit and dispatch, idempotency keys in the database, the
key-value layer inside an stf, fencing, and how a Runtime is declared with ``database=``."""

from __future__ import annotations

import sqlite3
from collections.abc import Generator
from pathlib import Path
from typing import Any, Never

import anyio
import pytest

from fasm import (
    ActionsContainer,
    ConstraintViolation,
    DefinitionError,
    Input,
    RestoreFailed,
    StateMachine,
    Tracked,
    TransitionFailed,
)
from fasm.errors import StoreConflict, TransactionConflict
from fasm.persistence import Database, MemoryStore, SQLiteDatabase, Transaction
from fasm.runtime import (
    ActionContext,
    Committed,
    ManualClock,
    RuntimeEvent,
    TransactionRetried,
    TransitionCommitted,
)
from fasm.runtime import Runtime as _Runtime
from tests.persistence.txn_ledger import (
    NOTES,
    Careless,
    DatabaseFactory,
    Deposit,
    InsufficientFunds,
    LedgerMachine,
    Note,
    Notice,
    Open,
    Overdraw,
    Paid,
    Payout,
    Stamp,
    Swallow,
    UnknownAccount,
    Withdraw,
    balances,
    create_schema,
    make_db,
    payouts,
)

__all__ = ("make_db",)  # the fixture, imported so that pytest finds it here

pytestmark = pytest.mark.anyio


async def pay(action: Payout, ctx: ActionContext) -> Paid:
    return Paid(f"ref-{action.payout_id}")


async def ignore(notice: Notice) -> None:
    return None


def runtime(database: Database, executor: Any = pay, handler: Any = ignore,
            **options: Any) -> _Runtime[Any, Any, Any, Any, Any, Any]:
    return _Runtime(LedgerMachine(), database=database, executors={Payout: executor},
                    handlers={Notice: handler}, **options)


@pytest.fixture
async def schema(make_db: DatabaseFactory) -> DatabaseFactory:
    await create_schema(make_db())
    return make_db


# -- commit and rollback ------------------------------------------------------------------------


async def test_a_committed_transition_is_in_the_database(schema: DatabaseFactory) -> None:
    async with runtime(schema()) as rt:
        assert (await rt.submit(Open("ada", 100))).seq == 1
        assert (await rt.submit(Deposit("ada", 5))).seq == 2
        assert rt.seq == 2
    assert await balances(schema()) == {"ada": 105}
    async with runtime(schema()) as rt:  # the sequence number is in the database too
        assert rt.seq == 2
        assert (await rt.submit(Deposit("ada", 1))).seq == 3


async def test_a_failed_stf_leaves_the_database_unchanged(schema: DatabaseFactory) -> None:
    async with runtime(schema()) as rt:
        await rt.submit(Open("ada", 100))
        with pytest.raises(TransitionFailed) as failed:
            await rt.submit(Careless("ada", 60))  # wrote, then raised
        assert isinstance(failed.value.__cause__, RuntimeError)
        with pytest.raises(InsufficientFunds):
            await rt.submit(Withdraw("ada", 500))
        with pytest.raises(UnknownAccount):
            await rt.submit(Deposit("zoe", 1))
        assert rt.seq == 1
        await rt.submit(Deposit("ada", 1))
    assert await balances(schema()) == {"ada": 101}
    assert await payouts(schema()) == []


async def test_a_constraint_violation_is_a_rejection(schema: DatabaseFactory) -> None:
    async with runtime(schema()) as rt:
        await rt.submit(Open("ada", 10))
        with pytest.raises(ConstraintViolation) as check:
            await rt.submit(Overdraw("ada", 11))  # CHECK (balance >= 0)
        assert check.value.__cause__ is not None  # the driver's error, chained
        with pytest.raises(ConstraintViolation):
            await rt.submit(Open("ada", 5))  # PRIMARY KEY
        with pytest.raises(ConstraintViolation):
            await rt.submit(Swallow("ada"))  # caught inside the stf: rejected all the same
        assert rt.seq == 1
        await rt.submit(Overdraw("ada", 10))  # within the constraint: fine
    assert await balances(schema()) == {"ada": 0}


async def test_one_failure_in_a_group_rolls_back_that_input_alone(
        schema: DatabaseFactory) -> None:
    events: list[RuntimeEvent] = []
    db = schema()
    values = [Deposit("ada", 1), Careless("ada", 50), Deposit("ada", 2), Overdraw("ada", 1000),
              Note("ada", "lost", fail=True), Deposit("ada", 4), Swallow("ada"),
              Note("bob", "kept"), Deposit("ada", 8)]
    outcomes: dict[int, Committed[Any, Any, Any] | BaseException] = {}

    async def one(i: int, value: Any) -> None:
        try:
            outcomes[i] = await rt.submit(value)
        except Exception as e:
            outcomes[i] = e

    async with runtime(db, listeners=[events.append]) as rt:
        await rt.submit(Open("ada", 100))
        # While the lock is held the driver waits: the submits queue up into one group.
        async with anyio.create_task_group() as tg, db.lock():
            for i, value in enumerate(values):
                tg.start_soon(one, i, value)
            await anyio.wait_all_tasks_blocked()
    kinds = {i: type(o).__name__ for i, o in outcomes.items()}
    assert kinds == {0: "Committed", 1: "TransitionFailed", 2: "Committed",
                     3: "ConstraintViolation", 4: "UnknownAccount", 5: "Committed",
                     6: "ConstraintViolation", 7: "Committed", 8: "Committed"}
    groups = [e.group for e in events if isinstance(e, TransitionCommitted)]
    assert max(groups) >= 4  # several inputs shared one transaction
    assert sorted(o.seq for o in outcomes.values() if isinstance(o, Committed)) == [2, 3, 4, 5, 6]
    assert await balances(schema()) == {"ada": 115}
    async with schema() as again, again.transaction(readonly=True) as tx:
        assert await tx.kv.get(NOTES, "ada") is None
        assert await tx.kv.get(NOTES, "bob") == "kept"


# -- actions, restore, crashes ------------------------------------------------------------------


async def test_actions_run_only_after_the_commit(schema: DatabaseFactory) -> None:
    seen_by_executor: list[Any] = []
    seen_by_handler: list[Any] = []

    async def check_then_pay(action: Payout, ctx: ActionContext) -> Paid:
        seen_by_executor.append(await payouts(schema()))  # another connection: committed data
        return Paid("r")

    async def check_notice(notice: Notice) -> None:
        seen_by_handler.append(await payouts(schema()))

    async with runtime(schema(), check_then_pay, check_notice) as rt:
        await rt.submit(Open("ada", 10))
        await rt.submit(Withdraw("ada", 3))
        await rt.wait_idle()
    pending = [(1, "ada", 3, "pending", None)]
    assert seen_by_executor == [pending]
    assert seen_by_handler[0] in (pending, [(1, "ada", 3, "paid", "r")])
    assert await payouts(schema()) == [(1, "ada", 3, "paid", "r")]


async def test_restore_re_emits_the_pending_rows(schema: DatabaseFactory) -> None:
    async def stuck(action: Payout, ctx: ActionContext) -> Paid:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async with runtime(schema(), stuck, shutdown_grace=0) as rt:
        await rt.submit(Open("ada", 10))
        await rt.submit(Withdraw("ada", 3))
        await rt.submit(Withdraw("ada", 4))
        assert rt.in_flight == {1: Payout(1, "ada", 3), 2: Payout(2, "ada", 4)}
    assert [p[3] for p in await payouts(schema())] == ["pending", "pending"]

    calls: list[int] = []

    async def count_and_pay(action: Payout, ctx: ActionContext) -> Paid:
        calls.append(ctx.action_id)
        return await pay(action, ctx)

    async with runtime(schema(), count_and_pay) as rt:
        await rt.wait_idle()
        assert rt.in_flight == {}
    assert sorted(calls) == [1, 2]
    assert [p[3:] for p in await payouts(schema())] == [("paid", "ref-1"), ("paid", "ref-2")]
    assert await balances(schema()) == {"ada": 3}


async def test_a_crash_between_commit_and_dispatch_loses_nothing(
        schema: DatabaseFactory) -> None:
    calls: list[int] = []

    async def count_and_pay(action: Payout, ctx: ActionContext) -> Paid:
        calls.append(ctx.action_id)
        return await pay(action, ctx)

    with anyio.CancelScope() as crash:

        def crash_after_the_withdrawal_commits(event: RuntimeEvent) -> None:
            if isinstance(event, TransitionCommitted) and event.input_kind == "Withdraw":
                crash.cancel()  # the transaction committed; nothing is dispatched

        async with runtime(schema(), count_and_pay,
                           listeners=[crash_after_the_withdrawal_commits]) as rt:
            await rt.submit(Open("ada", 10))
            await rt.submit(Withdraw("ada", 3))
            await anyio.sleep_forever()
    assert crash.cancelled_caught
    assert calls == []
    assert await payouts(schema()) == [(1, "ada", 3, "pending", None)]

    async with runtime(schema(), count_and_pay) as rt:
        assert rt.seq == 2
        await rt.wait_idle()
    assert calls == [1]  # restore read the pending row and re-emitted it, once
    assert await payouts(schema()) == [(1, "ada", 3, "paid", "ref-1")]


async def test_a_machine_that_writes_in_restore_does_not_start(schema: DatabaseFactory) -> None:
    class Scribbler(LedgerMachine):
        async def restore(self, db, actions):  # type: ignore[no-untyped-def]
            await db.execute("INSERT INTO accounts (name, balance) VALUES ('mallory', 1)")

    with pytest.raises(RestoreFailed):
        async with _Runtime(Scribbler(), database=schema(), executors={Payout: pay},
                            handlers={Notice: ignore}):
            pass
    assert await balances(schema()) == {}


# -- idempotency, the key-value layer, fencing --------------------------------------------------


async def test_idempotency_keys_are_kept_in_the_database(schema: DatabaseFactory) -> None:
    async with runtime(schema(), idempotency_window=2) as rt:
        first = await rt.submit(Open("ada", 1), idempotency_key="open-ada")
        await rt.submit(Deposit("ada", 1), idempotency_key="d1")
    async with runtime(schema(), idempotency_window=2) as rt:
        again = await rt.submit(Open("ada", 1), idempotency_key="open-ada")
        assert again == Committed(first.seq, (), True)
        await rt.submit(Deposit("ada", 1), idempotency_key="d2")  # "open-ada" is forgotten now
    async with schema() as db, db.transaction(readonly=True) as tx:
        rows = await tx.fetchall("SELECT idempotency_key FROM fasm_idempotency ORDER BY seq")
    assert rows == [("d1",), ("d2",)]
    assert await balances(schema()) == {"ada": 3}


async def test_a_group_commits_all_its_idempotency_keys_at_once(schema: DatabaseFactory) -> None:
    """Keys of inputs that share a transaction are written by one statement (set-based on
    PostgreSQL); a later runtime knows every one of them."""
    db = schema()
    seqs: dict[str, int] = {}

    async def one(key: str, value: Any) -> None:
        seqs[key] = (await rt.submit(value, idempotency_key=key)).seq

    # While the lock is held the submits queue up; released, the last four share a group.
    async with runtime(db) as rt, anyio.create_task_group() as tg, db.lock():
        tg.start_soon(one, "open", Open("ada", 1))
        for n in range(4):
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(one, f"d{n}", Deposit("ada", 1))
    async with runtime(schema()) as rt:
        for key, value in (("open", Open("ada", 1)), ("d2", Deposit("ada", 1))):
            again = await rt.submit(value, idempotency_key=key)
            assert again == Committed(seqs[key], (), True)
    assert await balances(schema()) == {"ada": 5}


async def test_a_retry_gets_the_original_outcome_from_the_database(
        schema: DatabaseFactory) -> None:
    """The outcome of a keyed transition is a column of its key's row: a retry after a restart
    learns its payout id, and nothing runs or is released twice."""
    async with runtime(schema(), clock=ManualClock(100.0)) as rt:
        await rt.submit(Open("ada", 50))
        first = await rt.submit(Withdraw("ada", 20), idempotency_key="w-1")
        assert first.actions[0] == Tracked(1, Payout(1, "ada", 20))
        await rt.wait_idle()
    async with runtime(schema(), clock=ManualClock(150.0)) as rt:
        again = await rt.submit(Withdraw("ada", 20), idempotency_key="w-1")
        assert again == Committed(first.seq, first.actions, True)
    assert await balances(schema()) == {"ada": 30}
    assert [p[0] for p in await payouts(schema())] == [1]


async def test_database_keys_are_remembered_for_the_ttl(schema: DatabaseFactory) -> None:
    async with runtime(schema(), clock=ManualClock(100.0), idempotency_ttl=60.0) as rt:
        await rt.submit(Open("ada", 1), idempotency_key="open")
        await rt.submit(Deposit("ada", 1), idempotency_key="d1")
    async with runtime(schema(), clock=ManualClock(159.0), idempotency_ttl=60.0) as rt:
        assert (await rt.submit(Deposit("ada", 1), idempotency_key="d1")).duplicate
    async with runtime(schema(), clock=ManualClock(161.0), idempotency_ttl=60.0) as rt:
        assert not (await rt.submit(Deposit("ada", 1), idempotency_key="d1")).duplicate
    async with schema() as db, db.transaction(readonly=True) as tx:
        rows = await tx.fetchall("SELECT idempotency_key, at FROM fasm_idempotency ORDER BY seq")
    assert rows == [("d1", 161.0)]  # the expired ones are pruned in the same commit
    assert await balances(schema()) == {"ada": 3}


async def test_a_key_table_of_an_older_fasm_is_migrated(schema: DatabaseFactory) -> None:
    """A database written before keys were dated: its rows get the new columns (NULL: undated,
    outcome unknown), and their window starts at the first commit after the upgrade."""
    async with runtime(schema()) as rt:
        first = await rt.submit(Open("ada", 1), idempotency_key="open")
    async with schema() as db, db.transaction() as tx:
        await tx.execute("CREATE TABLE keys_old AS SELECT key, idempotency_key, seq "
                         "FROM fasm_idempotency")
        await tx.execute("DROP TABLE fasm_idempotency")
        await tx.execute("CREATE TABLE fasm_idempotency (key TEXT NOT NULL, "
                         "idempotency_key TEXT NOT NULL, seq BIGINT NOT NULL, "
                         "PRIMARY KEY (key, idempotency_key))")
        await tx.execute("INSERT INTO fasm_idempotency SELECT * FROM keys_old")
        await tx.execute("DROP TABLE keys_old")
    async with runtime(schema(), clock=ManualClock(500.0), idempotency_ttl=60.0) as rt:
        again = await rt.submit(Open("ada", 1), idempotency_key="open")
        assert again == Committed(first.seq, (), True)  # undated, outcome unknown
        await rt.submit(Deposit("ada", 1), idempotency_key="d1")  # dates "open" at 500
    async with runtime(schema(), clock=ManualClock(559.0), idempotency_ttl=60.0) as rt:
        assert (await rt.submit(Open("ada", 1), idempotency_key="open")).duplicate


async def test_the_stf_reads_its_own_key_value_writes(schema: DatabaseFactory) -> None:
    async with runtime(schema()) as rt:
        await rt.submit(Note("ada", "first"))
        await rt.submit(Note("ada", "second"))
        with pytest.raises(UnknownAccount):
            await rt.submit(Note("ada", "third", fail=True))
    async with schema() as db, db.transaction(readonly=True) as tx:
        assert await tx.kv.range(NOTES) == [("ada", "second")]


async def test_a_stale_writer_is_fenced_off(schema: DatabaseFactory) -> None:
    with pytest.raises(StoreConflict, match="stale writer"):
        async with runtime(schema()) as rt:
            await rt.submit(Open("ada", 1))
            async with schema() as other, other.transaction() as tx:
                await tx.execute("UPDATE fasm_machines SET seq = seq + 5")  # behind its back
            with pytest.raises(StoreConflict):
                await rt.submit(Deposit("ada", 1))
    assert await balances(schema()) == {"ada": 1}


async def test_one_key_one_runtime(schema: DatabaseFactory) -> None:
    async with runtime(schema()):
        with pytest.raises(StoreConflict, match="held"):
            async with runtime(schema()):
                pass
        async with runtime(schema(), key="another"):
            pass


# -- what an stf may not do ---------------------------------------------------------------------


class _Suspend:
    def __await__(self) -> Generator[None, None, None]:
        yield


class Sleepy(StateMachine[Transaction, str]):
    async def stf(self, state: Transaction, input: Input[str, Never, Never],
                  actions: ActionsContainer[Never, Never, Never]) -> None:
        await state.execute("CREATE TABLE IF NOT EXISTS naps (n INTEGER)")
        await _Suspend()  # as a sleep or a network call would

    async def restore(self, state: Transaction,
                      actions: ActionsContainer[Never, Never, Never]) -> None:
        return None


async def test_an_stf_that_awaits_something_else_fails(make_db: DatabaseFactory) -> None:
    async with _Runtime(Sleepy(), database=make_db()) as rt:
        with pytest.raises(TransitionFailed, match="suspended"):
            await rt.submit("nap")
        assert rt.seq == 0


async def test_the_runtime_owns_the_transaction(make_db: DatabaseFactory) -> None:
    class Committer(Sleepy):
        async def stf(self, state: Transaction, input: Input[str, Never, Never],
                      actions: ActionsContainer[Never, Never, Never]) -> None:
            await state.execute("COMMIT")

    async with _Runtime(Committer(), database=make_db()) as rt:
        with pytest.raises(TransitionFailed, match="COMMIT is not allowed"):
            await rt.submit("now")


# -- SQLite busy: contention is retried, then reported ------------------------------------------


async def test_a_locked_sqlite_database_is_retried(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    await create_schema(SQLiteDatabase(path))
    events: list[RuntimeEvent] = []
    holder = sqlite3.connect(path, isolation_level=None)
    async with runtime(SQLiteDatabase(path, busy_timeout=0.02, max_attempts=10),
                       listeners=[events.append]) as rt:
        await rt.submit(Open("ada", 1))
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock for a while

        async def release_soon() -> None:
            await anyio.sleep(0.15)
            holder.execute("COMMIT")

        async with anyio.create_task_group() as tg:
            tg.start_soon(release_soon)
            assert (await rt.submit(Deposit("ada", 1))).seq == 2
    retried = [e for e in events if isinstance(e, TransactionRetried)]
    assert retried and all(isinstance(e.error, TransactionConflict) for e in retried)
    assert await balances(SQLiteDatabase(path)) == {"ada": 2}
    holder.close()


async def test_contention_that_does_not_end_is_reported_and_the_runtime_goes_on(
        tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    await create_schema(SQLiteDatabase(path))
    holder = sqlite3.connect(path, isolation_level=None)
    async with runtime(SQLiteDatabase(path, busy_timeout=0.01, max_attempts=2)) as rt:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(TransactionConflict, match="gave up after 2 attempts") as gave_up:
            await rt.submit(Open("ada", 1))
        assert gave_up.value.attempts == 2
        holder.execute("ROLLBACK")
        assert rt.running and rt.seq == 0
        assert (await rt.submit(Open("ada", 1))).seq == 1
    holder.close()


# -- declaring a transactional runtime ----------------------------------------------------------


def test_a_runtime_takes_a_state_object_or_a_database_not_both(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "x.db")
    handlers = {"executors": {Payout: pay}, "handlers": {Notice: ignore}}
    with pytest.raises(DefinitionError, match="initial_state cannot be given"):
        _Runtime(LedgerMachine(), database=db, initial_state=None or object(), **handlers)
    with pytest.raises(DefinitionError, match="store cannot be given"):
        _Runtime(LedgerMachine(), database=db, store=MemoryStore(), **handlers)
    with pytest.raises(DefinitionError, match="rollback='copy'"):
        _Runtime(LedgerMachine(), database=db, rollback="copy", **handlers)
    with pytest.raises(DefinitionError, match=r"initial_state= .* or database="):
        _Runtime(LedgerMachine(), **handlers)
    _Runtime(LedgerMachine(), database=db, rollback="trust", **handlers)

    class NotATransaction(StateMachine[dict[str, int], str]):
        async def stf(self, state: dict[str, int], input: Input[str, Never, Never],
                      actions: ActionsContainer[Never, Never, Never]) -> None:
            return None

        async def restore(self, state: dict[str, int],
                          actions: ActionsContainer[Never, Never, Never]) -> None:
            return None

    with pytest.raises(DefinitionError, match="declare StateMachine\\[Transaction"):
        _Runtime(NotATransaction(), database=db)


async def test_a_result_that_meets_endless_contention_is_queued_again(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    await create_schema(SQLiteDatabase(path))
    holder = sqlite3.connect(path, isolation_level=None)
    answer = anyio.Event()
    contended = anyio.Event()
    events: list[RuntimeEvent] = []

    def count(event: RuntimeEvent) -> None:
        events.append(event)
        if sum(isinstance(e, TransactionRetried) for e in events) >= 4:
            contended.set()

    async def pay_when_told(action: Payout, ctx: ActionContext) -> Paid:
        await answer.wait()
        return Paid("late")

    async with runtime(SQLiteDatabase(path, busy_timeout=0.005, max_attempts=2),
                       pay_when_told, listeners=[count]) as rt:
        await rt.submit(Open("ada", 10))
        await rt.submit(Withdraw("ada", 3))
        holder.execute("BEGIN IMMEDIATE")
        answer.set()  # the result arrives while the database stays locked
        await contended.wait()  # two groups gave up; the result went back in the queue
        holder.execute("ROLLBACK")
        await rt.wait_idle()
        assert rt.in_flight == {}
    holder.close()
    assert await payouts(SQLiteDatabase(path)) == [(1, "ada", 3, "paid", "late")]


async def test_inline_sqlite_runs_the_same_machine(tmp_path: Path) -> None:
    """SQLiteDatabase(inline=True): the groups run on the event loop's thread; same outcomes."""
    path = tmp_path / "inline.db"
    await create_schema(SQLiteDatabase(path))
    async with runtime(SQLiteDatabase(path, inline=True)) as rt:
        await rt.submit(Open("ada", 10))
        with pytest.raises(TransitionFailed):
            await rt.submit(Careless("ada", 5))
        with pytest.raises(ConstraintViolation):
            await rt.submit(Overdraw("ada", 11))
        await rt.submit(Withdraw("ada", 4))
        await rt.submit(Note("ada", "inline"))
        await rt.wait_idle()
        assert rt.seq == 4
    assert await balances(SQLiteDatabase(path)) == {"ada": 6}
    assert await payouts(SQLiteDatabase(path)) == [(1, "ada", 4, "paid", "ref-1")]
    async with runtime(SQLiteDatabase(path, inline=True)) as rt:
        assert rt.seq == 4


def _model(values: list[Any]) -> tuple[list[str], dict[str, int], list[tuple[int, str, int]],
                                      dict[str, str]]:
    """What the ledger must do with ``values``, in order, computed in plain Python."""
    balances: dict[str, int] = {}
    payouts: list[tuple[int, str, int]] = []
    notes: dict[str, str] = {}
    kinds: list[str] = []
    for v in values:
        kind = "Committed"
        match v:
            case Open(name=name, balance=balance):
                kind = "ConstraintViolation" if name in balances else kind
                balances.setdefault(name, balance)
            case Deposit(name=name, amount=amount):
                if name not in balances:
                    kind = "UnknownAccount"
                else:
                    balances[name] += amount
            case Withdraw(name=name, amount=amount):
                if name not in balances:
                    kind = "UnknownAccount"
                elif balances[name] < amount:
                    kind = "InsufficientFunds"
                else:
                    balances[name] -= amount
                    payouts.append((len(payouts) + 1, name, amount))
            case Careless(name=name, amount=amount):  # writes first: the CHECK may refuse it
                kind = ("ConstraintViolation" if balances.get(name, amount) < amount
                        else "TransitionFailed")
            case Overdraw(name=name, amount=amount):
                if name not in balances:
                    kind = "UnknownAccount"
                elif balances[name] < amount:
                    kind = "ConstraintViolation"
                else:
                    balances[name] -= amount
            case Swallow(name=name):
                if name in balances:
                    kind = "ConstraintViolation"
                else:
                    balances[name] = 0
            case Note(name=name, text=text, fail=fail):
                if fail:
                    kind = "UnknownAccount"
                else:
                    notes[name] = text
            case Stamp(name=name, fail=fail):
                if name not in notes or name not in balances or fail:
                    kind = "UnknownAccount"
                else:
                    balances[name] += 1
                    notes[name] += "!"
        kinds.append(kind)
    return kinds, balances, payouts, notes


@pytest.mark.parametrize("seed", range(1, 9))
async def test_random_groups_agree_with_a_model(schema: DatabaseFactory, seed: int) -> None:
    """Random inputs, failing ones among them, queued so that they share transactions: the
    database ends as a plain-Python model of the same inputs says, input by input."""
    import random

    rng = random.Random(seed)
    names = ["ana", "ben", "cy"]
    makers = [lambda n: Open(n, rng.randint(0, 30)), lambda n: Deposit(n, rng.randint(1, 9)),
              lambda n: Withdraw(n, rng.randint(1, 20)), lambda n: Careless(n, 3),
              lambda n: Overdraw(n, rng.randint(1, 40)), Swallow,
              lambda n: Note(n, f"note {rng.randint(0, 99)}", fail=rng.random() < 0.3),
              lambda n: Stamp(n, fail=rng.random() < 0.3),
              lambda n: Stamp(n)]
    values = [rng.choice(makers)(rng.choice(names)) for _ in range(80)]
    outcomes: dict[int, str] = {}
    db = schema()

    async def one(i: int, value: Any) -> None:
        try:
            await rt.submit(value)
            outcomes[i] = "Committed"
        except Exception as e:
            outcomes[i] = type(e).__name__

    async with runtime(db, max_group=8) as rt:
        # While the lock is held the submits queue up in order; once it is released (before the
        # task group waits for them) the driver runs them, up to 8 inputs per transaction.
        async with anyio.create_task_group() as tg, db.lock():
            for i, value in enumerate(values):
                tg.start_soon(one, i, value)
                await anyio.wait_all_tasks_blocked()
        await rt.wait_idle()
    kinds, balances_, payouts_, notes = _model(values)
    assert [outcomes[i] for i in range(len(values))] == kinds
    assert await balances(schema()) == balances_
    assert [p[:3] for p in await payouts(schema())] == payouts_
    async with schema() as again, again.transaction(readonly=True) as tx:
        assert dict(await tx.kv.range(NOTES)) == notes


async def test_read_points_a_database_runtime_to_a_read_only_transaction(
    schema: DatabaseFactory,
) -> None:
    async with runtime(schema()) as rt:
        await rt.submit(Open("ada", 100))
        with pytest.raises(DefinitionError, match=r"transaction\(readonly=True\)"):
            await rt.read(lambda txn: txn)
        assert rt.database is not None
        async with rt.database.transaction(readonly=True) as txn:
            assert await txn.fetchval("SELECT balance FROM accounts WHERE name = 'ada'") == 100
