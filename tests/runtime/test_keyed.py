"""Keyed runtime: one machine instance per key in one Runtime (issue 12). Each key's state is
made by a factory that receives the key; inputs of many keys share one store write; idle keys
are evicted past ``max_active`` and loaded again on use; at start only the keys the store marks
as having actions in flight are loaded and restored; keys send each other inputs with
``Send``, applied once even when a crash makes the sender send again. On asyncio and trio, on
every store."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from fasm import (
    ActionsContainer,
    Delivered,
    Input,
    InvalidInput,
    Normal,
    Refused,
    Rejected,
    Send,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
    Untracked,
)
from fasm.errors import DefinitionError, StoreError, StoreUnavailable
from fasm.persistence import MemoryStore, StoredRecords
from fasm.runtime import (
    ActionContext,
    HandlerContext,
    Runtime,
    RuntimeEvent,
    TransitionCommitted,
)
from tests.runtime.conftest import StoreFactory

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Deposit:
    amount: int


@dataclass(frozen=True)
class Transfer:
    id: str
    to: str
    amount: int


@dataclass(frozen=True)
class Credit:
    amount: int
    source: str


@dataclass(frozen=True)
class Audit:
    """Ask the outside world (an executor) to look at this account."""

    id: str


@dataclass(frozen=True)
class Audited:
    by: str


@dataclass(frozen=True)
class Notice:
    text: str


BankInput = Deposit | Transfer | Credit | Audit


@dataclass
class Account:
    key: str
    balance: int = 0
    sends: dict[str, Send[Credit]] = field(default_factory=dict)  # transfer id -> pending send
    audits: list[str] = field(default_factory=list)  # audit ids in flight
    audited: list[str] = field(default_factory=list)
    credits: int = 0
    refunds: int = 0
    log: list[int] = field(default_factory=list)


class Bank(StateMachine[Account, BankInput, str, Send[Credit] | Audit,
                        Delivered | Refused | Audited, Notice]):
    """Accounts; a transfer debits now and credits the other key by a message. Keys starting
    with ``closed`` refuse credits (the sender is refunded)."""

    @staticmethod
    async def stf(state: Account, input: Input[BankInput, str, Delivered | Refused | Audited],
                  actions: ActionsContainer[str, Send[Credit] | Audit, Notice]) -> None:
        if isinstance(input, TrackedActionCompleted):
            result = input.result
            if isinstance(result, Audited):
                if input.id in state.audits:
                    state.audits.remove(input.id)
                    state.audited.append(result.by)
                return
            send = state.sends.pop(input.id, None)
            if send is not None and isinstance(result, Refused):
                state.balance += send.input.amount
                state.refunds += 1
            return
        value = input.value
        if isinstance(value, Deposit):
            state.balance += value.amount
            state.log.append(value.amount)
            actions.add(Untracked(Notice(f"{state.key} +{value.amount}")))
        elif isinstance(value, Transfer):
            if value.amount > state.balance:
                raise Rejected(f"{state.key} has {state.balance}, not {value.amount}")
            if value.id in state.sends:
                raise Rejected(f"transfer {value.id} is in flight")
            state.balance -= value.amount
            send = Send(value.to, Credit(value.amount, state.key))
            state.sends[value.id] = send
            actions.add(Tracked(value.id, send))
        elif isinstance(value, Credit):
            if state.key.startswith("closed"):
                raise Rejected(f"{state.key} is closed")
            state.balance += value.amount
            state.credits += 1
        else:
            state.audits.append(value.id)
            actions.add(Tracked(value.id, value))

    @staticmethod
    async def restore(state: Account,
                      actions: ActionsContainer[str, Send[Credit] | Audit, Notice]) -> None:
        for id, send in state.sends.items():
            actions.add(Tracked(id, send))
        for id in state.audits:
            actions.add(Tracked(id, Audit(id)))


def account(key: str) -> Account:
    return Account(key)


async def audit(action: Audit, ctx: ActionContext) -> Audited:
    return Audited(ctx.machine_key)


async def notice(action: Notice) -> None:
    pass


def bank(store: Any, **kw: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
    kw.setdefault("executors", {Audit: audit})
    kw.setdefault("handlers", {Notice: notice})
    return Runtime(Bank(), initial_state=account, keyed=True, store=store, **kw)


async def total(rt: Runtime[Any, Any, Any, Any, Any, Any], keys: list[str]) -> int:
    """Money in the accounts plus money in flight in sends."""
    money = 0
    for k in keys:
        money += await rt.read(lambda s: s.balance + sum(x.input.amount for x in s.sends.values()),
                               key=k)
    return money


class CountingStore(MemoryStore):
    """The real MemoryStore, counting its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.commits = 0
        self.many: list[int] = []

    async def commit(self, key: str, **kw: Any) -> None:
        self.commits += 1
        await super().commit(key, **kw)

    async def commit_many(self, commits: Any) -> None:
        self.many.append(len(commits))
        await super().commit_many(commits)


# -- keys, factory, order --------------------------------------------------------------------


async def test_each_key_starts_from_the_factory_and_keeps_its_order(
        stores: StoreFactory) -> None:
    async with bank(stores()) as rt:
        async with anyio.create_task_group() as tg:
            for k in range(20):
                async def deposits(key: str) -> None:
                    for n in range(1, 6):
                        await rt.submit(Deposit(n), key=key)
                tg.start_soon(deposits, f"acct-{k}")
        for k in range(20):
            state = await rt.read(lambda s: (s.key, s.balance, list(s.log)), key=f"acct-{k}")
            assert state == (f"acct-{k}", 15, [1, 2, 3, 4, 5])
    # After a restart the keys are loaded from the store on first use.
    async with bank(stores()) as rt:
        assert rt.active_keys == 0
        assert await rt.read(lambda s: s.balance, key="acct-7") == 15
        assert await rt.read(lambda s: s.balance, key="never-used") == 0
        assert rt.active_keys == 0  # a read of an idle key does not activate it
        done = await rt.submit(Deposit(1), key="acct-7")
        assert done.seq == 6
        assert rt.active_keys == 1


async def test_key_is_required_and_checked() -> None:
    async with bank(MemoryStore()) as rt:
        with pytest.raises(InvalidInput, match="needs the machine key"):
            await rt.submit(Deposit(1))
        for bad in ("", "a\x00b", 42):
            with pytest.raises(InvalidInput):
                await rt.submit(Deposit(1), key=bad)  # type: ignore[arg-type]
        with pytest.raises(DefinitionError, match="read\\(fn, key"):
            rt.state  # noqa: B018
        await rt.submit(Deposit(1), key="ok")  # the runtime went on
    single = Runtime(Bank(), initial_state=Account("one"), key="one",
                     executors={Audit: audit}, handlers={Notice: notice})
    async with single:
        await single.submit(Deposit(2), key="one")
        await single.submit(Deposit(3))
        assert single.state.balance == 5
        with pytest.raises(InvalidInput, match="single key 'one'"):
            await single.submit(Deposit(1), key="other")
    with pytest.raises(DefinitionError, match="key= names the one key"):
        Runtime(Bank(), initial_state=account, keyed=True, key="x",
                executors={Audit: audit}, handlers={Notice: notice})
    with pytest.raises(DefinitionError, match="max_active"):
        bank(MemoryStore(), max_active=0)


async def test_executors_and_handlers_know_the_key() -> None:
    seen: list[tuple[str, int]] = []
    contexts: list[ActionContext] = []

    async def told(action: Notice, ctx: HandlerContext) -> None:
        seen.append((ctx.machine_key, ctx.seq))

    async def audit_ctx(action: Audit, ctx: ActionContext) -> Audited:
        contexts.append(ctx)
        return Audited(ctx.machine_key)

    async with bank(MemoryStore(), executors={Audit: audit_ctx}, handlers={Notice: told}) as rt:
        await rt.submit(Deposit(1), key="a")
        await rt.submit(Deposit(1), key="b")
        await rt.submit(Audit("x"), key="a")
        await rt.submit(Audit("x"), key="b")
        await rt.wait_idle()
        assert sorted(seen) == [("a", 1), ("b", 1)]
        assert sorted(c.machine_key for c in contexts) == ["a", "b"]
        keys = {c.idempotency_key for c in contexts}
        assert len(keys) == 2 and all(k.endswith(f"/{c.machine_key}/x")
                                      for k, c in zip(sorted(keys), sorted(
                                          contexts, key=lambda c: c.idempotency_key), strict=True))
        assert await rt.read(lambda s: s.audited, key="b") == ["b"]


# -- group commit, activation and passivation --------------------------------------------------


async def test_inputs_of_many_keys_share_one_write() -> None:
    store = CountingStore()
    async with bank(store) as rt, anyio.create_task_group() as tg:
        for k in range(200):
            tg.start_soon(lambda k=k: rt.submit(Deposit(1), key=f"k{k}"))
    assert sum(store.many) + store.commits == 200  # every key written once
    assert store.many and max(store.many) > 1, store.many
    assert store.commits + len(store.many) < 200  # grouped, not one write per key


async def test_idle_keys_are_evicted_past_max_active(stores: StoreFactory) -> None:
    async with bank(stores(), max_active=10) as rt:
        for k in range(50):
            await rt.submit(Deposit(k), key=f"k{k}")
            assert rt.active_keys <= 10
        for k in range(50):  # evicted keys come back from the store intact
            assert await rt.read(lambda s: s.balance, key=f"k{k}") == k
        await rt.submit(Deposit(1), key="k3")
        assert await rt.read(lambda s: s.balance, key="k3") == 4


async def test_keys_with_actions_in_flight_are_not_evicted() -> None:
    release = anyio.Event()

    async def slow_audit(action: Audit, ctx: ActionContext) -> Audited:
        await release.wait()
        return Audited(ctx.machine_key)

    async with bank(MemoryStore(), max_active=2, executors={Audit: slow_audit}) as rt:
        for k in range(6):
            await rt.submit(Audit(f"a{k}"), key=f"busy{k}")
        for k in range(10):
            await rt.submit(Deposit(1), key=f"idle{k}")
        assert rt.active_keys == 6  # the busy ones stay, the idle ones went
        assert set(rt.in_flight_by_key) == {f"busy{k}" for k in range(6)}
        release.set()
        await rt.wait_idle()
        for k in range(6):
            assert await rt.read(lambda s: s.audited, key=f"busy{k}") == [f"busy{k}"]
        await rt.submit(Deposit(1), key="last")
        assert rt.active_keys <= 2


# -- restore across keys ---------------------------------------------------------------------


async def test_restart_restores_only_the_keys_with_actions_in_flight(
        stores: StoreFactory) -> None:
    started = anyio.Event()

    async def never(action: Audit, ctx: ActionContext) -> Audited:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError

    async with bank(stores(), executors={Audit: never}, shutdown_grace=0) as rt:
        for k in range(30):
            await rt.submit(Deposit(1), key=f"idle{k}")
        for k in range(5):
            await rt.submit(Audit(f"a{k}"), key=f"busy{k}")
        await started.wait()
    audited: list[str] = []

    async def ok(action: Audit, ctx: ActionContext) -> Audited:
        audited.append(f"{ctx.machine_key}/{action.id}")
        return Audited("restart")

    async with bank(stores(), executors={Audit: ok}) as rt:
        # Loaded at start: the five keys with an audit in flight, not the thirty idle ones.
        assert rt.active_keys == 5
        await rt.wait_idle()
        assert sorted(audited) == [f"busy{k}/a{k}" for k in range(5)]
        for k in range(5):
            assert await rt.read(lambda s: (s.audits, s.audited), key=f"busy{k}") == (
                [], ["restart"])
    # Their completions cleared the marks: the next start loads nothing.
    async with bank(stores(), executors={Audit: ok}) as rt:
        assert rt.active_keys == 0


# -- messages between keys --------------------------------------------------------------------


async def test_transfers_conserve_money_and_refused_credits_are_refunded(
        stores: StoreFactory) -> None:
    keys = [f"acct-{k}" for k in range(8)] + ["closed-1"]
    async with bank(stores()) as rt:
        for k in keys[:8]:
            await rt.submit(Deposit(100), key=k)
        async with anyio.create_task_group() as tg:
            for n in range(40):
                src, dst = keys[n % 8], keys[(n * 5 + 1) % len(keys)]
                tg.start_soon(lambda n=n, src=src, dst=dst: rt.submit(
                    Transfer(f"t{n}", dst, 5), key=src))
        await rt.wait_idle()
        assert await total(rt, keys) == 800
        refunds = sum([await rt.read(lambda s: s.refunds, key=k) for k in keys])
        assert refunds > 0
        assert await rt.read(lambda s: s.balance, key="closed-1") == 0
        assert rt.in_flight_by_key == {}


async def test_a_send_to_an_invalid_key_is_refused_and_refunded() -> None:
    async with bank(MemoryStore()) as rt:
        await rt.submit(Deposit(10), key="a")
        await rt.submit(Transfer("t", "", 4), key="a")
        await rt.wait_idle()
        assert await rt.read(lambda s: (s.balance, s.refunds), key="a") == (10, 1)


class FailAfterCredit(MemoryStore):
    """A real MemoryStore whose next write after ``arm()`` fails, as a store that went down."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.failed = False

    def arm(self) -> None:
        self.armed = True

    def _check(self) -> None:
        if self.armed and not self.failed:
            self.failed = True
            raise StoreUnavailable("disk gone", store=self.description)

    async def commit(self, key: str, **kw: Any) -> None:
        self._check()
        await super().commit(key, **kw)

    async def commit_many(self, commits: Any) -> None:
        self._check()
        await super().commit_many(commits)


async def test_a_message_sent_again_after_a_crash_is_applied_once() -> None:
    """The receiver commits the credit; the sender's write of ``Delivered`` fails (the runtime
    stops). After the restart the sender's restore sends again: the receiver answers it as a
    duplicate, so the money moved once."""
    store = FailAfterCredit()
    events: list[RuntimeEvent] = []

    def arm_on_credit(event: RuntimeEvent) -> None:
        events.append(event)
        if (isinstance(event, TransitionCommitted) and event.key == "b"
                and event.input_kind == "Credit"):
            store.arm()

    rt = bank(store, listeners=[arm_on_credit])
    with pytest.raises(StoreUnavailable):
        async with rt:
            await rt.submit(Deposit(10), key="a")
            await rt.submit(Transfer("t1", "b", 7), key="a")
            await rt.wait_failed()
    assert store.failed
    delivered: list[Any] = []

    def results(event: RuntimeEvent) -> None:
        if isinstance(event, TransitionCommitted) and event.key == "a":
            delivered.append(event)

    async with bank(store, listeners=[results]) as rt:
        assert rt.active_keys == 1  # "a": its send is in flight
        await rt.wait_idle()
        assert await rt.read(lambda s: (s.balance, dict(s.sends)), key="a") == (3, {})
        assert await rt.read(lambda s: (s.balance, s.credits), key="b") == (7, 1)
    assert [e.input_kind for e in delivered] == ["TrackedActionCompleted"]


async def test_message_keys_outlive_the_submit_idempotency_window() -> None:
    """A message key is not forgotten after idempotency_ttl: a resend after a long outage
    is still a duplicate (submit keys would have expired)."""
    from fasm.runtime._engine import Duplicate, Engine

    engine = Engine(Bank(), state=Account("b"), idempotency_ttl=1.0)
    engine.now = 0.0
    key = "fasm:msg/Bank/a/t1"
    first = await engine.step(Normal(Credit(5, "a")), key)
    engine.committed([first])  # type: ignore[list-item]
    engine.now = 10_000.0
    again = await engine.step(Normal(Credit(5, "a")), key)
    assert isinstance(again, Duplicate)
    assert engine.state.balance == 5


async def test_submit_keys_may_not_pose_as_messages() -> None:
    async with bank(MemoryStore()) as rt:
        with pytest.raises(InvalidInput, match="reserved"):
            await rt.submit(Credit(5, "a"), key="b", idempotency_key="fasm:msg/Bank/a/t1")


async def test_records_of_a_keyed_store_are_per_key() -> None:
    store = MemoryStore()
    async with bank(store) as rt:
        await rt.submit(Deposit(1), key="x")
        await rt.submit(Deposit(2), key="y")
    await store.open()
    try:
        records = await store.load("x")
        assert isinstance(records, StoredRecords) and records.seq == 1
        assert await store.keys() == ["x", "y"]
    finally:
        await store.close()


class BrokenLoad(MemoryStore):
    """Loading key ``bad`` raises something no store should (a bug in a store)."""

    async def load(self, key: str) -> StoredRecords | None:
        if key == "bad":
            raise RuntimeError("bug in load")
        return await super().load(key)


async def test_a_key_that_cannot_be_started_or_loaded_stops_only_itself() -> None:
    """A factory that raises for one key, or a store whose load raises for one key, refuses
    that key's inputs with a typed error; every other key, and the runtime, go on."""

    def picky(key: str) -> Account:
        if key.startswith("x"):
            raise ValueError("no x accounts")
        return Account(key)

    rt = Runtime(Bank(), initial_state=picky, keyed=True, store=BrokenLoad(),
                 executors={Audit: audit}, handlers={Notice: notice})
    async with rt:
        with pytest.raises(InvalidInput, match="initial_state\\('x1'\\) raised ValueError"):
            await rt.submit(Deposit(1), key="x1")
        with pytest.raises(StoreError, match="loading key 'bad' raised RuntimeError"):
            await rt.submit(Deposit(1), key="bad")
        async with anyio.create_task_group() as tg:
            for k in ("a", "x2", "bad", "b"):
                async def one(k: str = k) -> None:
                    with contextlib.suppress(InvalidInput, StoreError):
                        await rt.submit(Deposit(2), key=k)
                tg.start_soon(one)
        assert await rt.read(lambda s: s.balance, key="a") == 2
        assert await rt.read(lambda s: s.balance, key="b") == 2
        assert rt.active_keys == 2
