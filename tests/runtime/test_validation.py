"""Nothing acknowledged may make the store unreadable: what ``submit`` and executor results are
checked against (every shape of declared type, field for field), values and idempotency keys
that cannot be written refused alone, and stored records the current code would read as less
data (dropped fields, a migration that raises) refused with a typed error. On every store where
the case applies; every test on asyncio and trio."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Never

import anyio
import pydantic
import pytest

from fasm import (
    ActionsContainer,
    Input,
    InvalidInput,
    Normal,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
)
from fasm.errors import DefinitionError, IncompatibleRecord, MigrationFailed
from fasm.persistence import (
    FileStore,
    Journal,
    MemoryStore,
    Snapshot,
    SQLiteStore,
    Store,
)
from fasm.runtime import (
    ActionContext,
    ActionRetried,
    Committed,
    Executor,
    ManualClock,
    RetryPolicy,
    Runtime,
    RuntimeEvent,
    TransitionCommitted,
)
from tests.persistence.txn_ledger import (
    DatabaseFactory,
    Deposit,
    LedgerMachine,
    Notice,
    Open,
    Paid,
    Payout,
    balances,
    create_schema,
    make_db,
)
from tests.runtime.conftest import StoreFactory, run_clock

__all__ = ("make_db",)  # the fixture, imported so that pytest finds it here

pytestmark = pytest.mark.anyio


# -- machines -------------------------------------------------------------------------------------


@dataclass
class Count:
    n: int = 0
    seen: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Process:
    amount: int
    user: str
    note: Any = None


class Order(pydantic.BaseModel):
    amount: int
    user: str


@dataclass(frozen=True)
class Line:
    qty: int


class Crate(pydantic.BaseModel):
    line: Line


@dataclass(frozen=True)
class Basket:
    lines: list[Line]


def counting(tp: Any) -> type[StateMachine[Count, Any, Never, Never, Never, Never]]:
    """A machine whose input type is ``tp``; its stf counts inputs."""

    class Counting(StateMachine[Count, tp]):  # type: ignore[valid-type]
        machine_name = "counting"

        async def stf(self, state: Count, input: Input[Any, Never, Never],
                      actions: ActionsContainer[Never, Never, Never]) -> None:
            state.n += 1

        async def restore(self, state: Count,
                          actions: ActionsContainer[Never, Never, Never]) -> None:
            pass

    return Counting


def counter(tp: Any, store: Store, **kw: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
    return Runtime(counting(tp)(), initial_state=Count, store=store, clock=ManualClock(), **kw)


# -- 1. field checks for every shape --------------------------------------------------------------


def _mutated_order() -> Order:
    order = Order(amount=1, user="a")
    order.amount = "lots"  # type: ignore[assignment]  # no validate_assignment: unchecked
    return order


SHAPES: dict[str, tuple[Any, Any, list[Callable[[], Any]]]] = {
    "a single dataclass": (Process, Process(7, "ada"), [
        lambda: Process(1.5, "ada"),  # type: ignore[arg-type]
        lambda: Process(7, 42),  # type: ignore[arg-type]
    ]),
    "a pydantic model": (Order, Order(amount=7, user="ada"), [
        lambda: Order.model_construct(amount="lots", user="ada"),
        lambda: Order.model_construct(amount=7),  # a required field left out
        _mutated_order,
    ]),
    "a dataclass inside a model": (Crate, Crate(line=Line(1)), [
        lambda: Crate(line=Line("two")),  # type: ignore[arg-type]  # pydantic lets it through
    ]),
    "a union": (Process | Order, Order(amount=7, user="ada"), [
        lambda: Process(1.5, "ada"),  # type: ignore[arg-type]
        lambda: Order.model_construct(amount=1.5, user="ada"),
    ]),
    "nested dataclasses in a list": (Basket, Basket([Line(1)]), [
        lambda: Basket([Line(1), Line("two")]),  # type: ignore[arg-type]
    ]),
    "a list of dataclasses": (list[Line], [Line(1)], [
        lambda: [Line(1.5)],  # type: ignore[arg-type]
    ]),
    "a builtin": (int, 7, [lambda: 1.5, lambda: "7"]),
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_mismatched_field_is_refused_for_every_shape(shape: str, tmp_path: Path) -> None:
    """Before, a single dataclass, a model built with model_construct or mutated, was committed
    and every later start failed with StoreCorrupt."""
    tp, good, bads = SHAPES[shape]
    store = FileStore(tmp_path)
    async with counter(tp, store) as rt:
        for bad in bads:
            with pytest.raises(InvalidInput):
                await rt.submit(bad())
            assert rt.running
        assert (await rt.submit(good)).seq == 1
    async with counter(tp, FileStore(tmp_path)) as again:
        assert again.seq == 1 and again.state.n == 1


async def test_the_error_names_the_field(tmp_path: Path) -> None:
    async with counter(Basket, MemoryStore()) as rt:
        with pytest.raises(InvalidInput, match=r"lines\.1\.qty"):
            await rt.submit(Basket([Line(1), Line("two")]))  # type: ignore[arg-type]
    async with counter(Crate, MemoryStore()) as rt:
        with pytest.raises(InvalidInput, match=r"input at line\.qty cannot be encoded"):
            await rt.submit(Crate(line=Line("two")))  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match=r"input at line cannot be encoded: it would not "
                                               r"load back: Field required"):
            await rt.submit(Crate.model_construct())
    async with counter(Process, MemoryStore()) as rt:
        with pytest.raises(InvalidInput, match=r"input at note cannot be encoded"):
            await rt.submit(Process(1, "a", note=object()))
        with pytest.raises(InvalidInput, match=r"input at note\.k\[1\] cannot be encoded"):
            await rt.submit(Process(1, "a", note={"k": [1, "\ud800"]}))


# -- executor results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Charge:
    amount: int


@dataclass(frozen=True)
class Done:
    id: int
    extra: Any = None


@dataclass
class Book:
    results: list[int] = field(default_factory=list)


class Charging(StateMachine[Book, int, int, Charge, Done]):
    machine_name = "charging"

    async def stf(self, state: Book, input: Input[int, int, Done],
                  actions: ActionsContainer[int, Charge, Never]) -> None:
        match input:
            case Normal(amount):
                actions.add(Tracked(amount, Charge(amount)))
            case TrackedActionCompleted(_, Done(id=ident)):
                state.results.append(ident)

    async def restore(self, state: Book, actions: ActionsContainer[int, Charge, Never]) -> None:
        pass


@pytest.mark.parametrize("bad", [
    Done(1.5),  # type: ignore[arg-type]
    Done(2**64),  # validates as an int; msgpack cannot write it
    Done(1, extra=object()),
    Done(1, extra="\ud800"),
], ids=["float-field", "int-2**64", "object-in-Any", "lone-surrogate"])
async def test_a_result_that_cannot_be_committed_is_a_failed_attempt(bad: Done,
                                                                     tmp_path: Path) -> None:
    """Before, the bad result reached the store: the group failed and the runtime stopped
    (or every later start failed)."""
    clock = ManualClock()
    calls: list[int] = []

    async def charge(action: Charge, ctx: ActionContext) -> Done:
        calls.append(ctx.attempt)
        return bad if ctx.attempt == 1 else Done(action.amount)

    events: list[RuntimeEvent] = []
    spec = Executor(charge, retry=RetryPolicy(initial_backoff=1.0, jitter=0.0))
    rt = Runtime(Charging(), initial_state=Book, store=FileStore(tmp_path), clock=clock,
                 executors={Charge: spec}, listeners=[events.append])
    async with rt:
        await rt.submit(5)
        await run_clock(clock, lambda: rt.state.results == [5])
        assert rt.running
    retried = [e for e in events if isinstance(e, ActionRetried)]
    assert calls == [1, 2] and len(retried) == 1 and isinstance(retried[0].error, TypeError)
    async with Runtime(Charging(), initial_state=Book, store=FileStore(tmp_path), clock=clock,
                       executors={Charge: spec}) as again:
        assert again.state.results == [5] and again.seq == 2


# -- 2 and 3. one bad submit in a group fails alone ----------------------------------------------


BAD_INPUTS: list[tuple[Any, str | None]] = [
    (Process(1, "\ud800"), None),  # json.loads happily returns lone surrogates
    (Process(2**64, "ada"), None),
    (Process(1, "ada", note=object()), None),
    (Process(1, "ada", note={"k": "\udcff"}), None),
    (Process(1, "ada"), "\ud800"),
    (Process(1, "ada"), "nul\x00key"),
    (Process(1, "ada"), 7),  # an int key: deduplicated within a run, forgotten after a restart
]


@pytest.mark.parametrize("durability", [Journal(), Snapshot()], ids=["journal", "snapshot"])
async def test_a_bad_submit_in_a_group_fails_alone(stores: StoreFactory,
                                                   durability: Any) -> None:
    committed: list[TransitionCommitted] = []
    goods = [f"good-{n}" for n in range(6)]
    outcomes: dict[str, BaseException | Committed[Any, Any, Any]] = {}

    async def one(name: str, value: Any, key: Any) -> None:
        try:
            outcomes[name] = await rt.submit(value, idempotency_key=key)
        except InvalidInput as e:
            outcomes[name] = e

    rt = counter(Process, stores(), durability=durability, max_group=64,
                 listeners=[lambda e: committed.append(e) if isinstance(e, TransitionCommitted)
                            else None])
    async with rt:
        await rt.submit(Process(0, "first"))  # the first commit also writes the checkpoint
        async with anyio.create_task_group() as tg:
            for n, (value, key) in enumerate(BAD_INPUTS):
                tg.start_soon(one, f"bad-{n}", value, key)
                if n < len(goods):
                    tg.start_soon(one, goods[n], Process(n, "ada"), goods[n])
        assert rt.running
        for n in range(len(BAD_INPUTS)):
            assert isinstance(outcomes[f"bad-{n}"], InvalidInput), (n, outcomes[f"bad-{n}"])
        seqs = {g: outcomes[g] for g in goods}
        assert all(isinstance(c, Committed) for c in seqs.values())
        assert max(e.group for e in committed) > 1  # the good ones did share a group
        assert (await rt.submit(Process(9, "after"))).seq == len(goods) + 2
    async with counter(Process, stores(), durability=durability) as again:
        assert again.seq == len(goods) + 2 and again.state.n == len(goods) + 2
        for g, c in seqs.items():
            assert isinstance(c, Committed)
            assert await again.submit(Process(0, "x"), idempotency_key=g) == Committed(
                c.seq, (), True)


async def test_a_bad_key_fails_alone_on_a_database(make_db: DatabaseFactory) -> None:
    """SQLite and PostgreSQL text cannot hold a lone surrogate, PostgreSQL text no NUL: before,
    the group's transaction failed and the runtime stopped for everyone."""
    await create_schema(make_db())
    db = make_db()

    async def pay(action: Payout, ctx: ActionContext) -> Paid:
        return Paid(f"ref-{action.payout_id}")

    async def ignore(notice: Notice) -> None:
        pass

    def runtime(database: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
        return Runtime(LedgerMachine(), database=database, executors={Payout: pay},
                       handlers={Notice: ignore})

    refused: list[BaseException] = []
    seqs: dict[str, int] = {}

    async def one(key: Any, value: Any) -> None:
        try:
            seqs[key] = (await rt.submit(value, idempotency_key=key)).seq
        except InvalidInput as e:
            refused.append(e)

    async with runtime(db) as rt:
        await rt.submit(Open("ada", 1), idempotency_key="open")
        async with anyio.create_task_group() as tg, db.lock():
            for n, bad in enumerate(["\ud800", "a\x00b", 7]):
                tg.start_soon(one, f"d{n}", Deposit("ada", 1))
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(one, bad, Deposit("ada", 100))
                await anyio.wait_all_tasks_blocked()
            tg.start_soon(one, "bad-value", Deposit("\ud800", 1))  # the same rule for values
        assert rt.running and len(refused) == 4
    assert await balances(make_db()) == {"ada": 4}
    async with runtime(make_db()) as rt:
        for key, seq in seqs.items():
            assert await rt.submit(Deposit("ada", 1), idempotency_key=key) == Committed(
                seq, (), True)


# -- 4. schema changes that drop data ------------------------------------------------------------


@dataclass
class Item:
    sku: str
    note: str = ""


@dataclass
class ShopV1:
    total: int = 0
    legacy: str = "kept"
    items: list[Item] = field(default_factory=list)


@dataclass
class ItemV2:
    sku: str


@dataclass
class ShopV2:
    total: int = 0
    items: list[ItemV2] = field(default_factory=list)


@dataclass
class ShopV2Items:
    total: int = 0
    legacy: str = "kept"
    items: list[ItemV2] = field(default_factory=list)


@dataclass(frozen=True)
class BuyV1:
    sku: str
    memo: str


@dataclass(frozen=True)
class BuyV2:
    sku: str


async def _shop_stf(self: Any, state: Any, input: Input[Any, Never, Never],
                    actions: ActionsContainer[Never, Never, Never]) -> None:
    assert isinstance(input, Normal)
    state.total += 1
    state.items.append((Item if isinstance(state, ShopV1) else ItemV2)(input.value.sku))


async def _shop_restore(self: Any, state: Any,
                        actions: ActionsContainer[Never, Never, Never]) -> None:
    pass


def shop(state: Any, input: Any, **attrs: Any) -> StateMachine[Any, Any, Any, Any, Any, Any]:
    """The same machine ("shop") as one version of the code or another: its state and input
    types, and class attributes such as ``dropped_fields`` or ``migrations``."""
    def body(ns: dict[str, Any]) -> None:
        ns.update(machine_name="shop", stf=_shop_stf, restore=_shop_restore, **attrs)

    cls = types.new_class("Shop", (StateMachine[state, input],), exec_body=body)
    return cls()  # type: ignore[no-any-return]


def disk_stores(tmp_path: Path) -> list[Callable[[], Store]]:
    return [lambda: FileStore(tmp_path / "fs"), lambda: SQLiteStore(tmp_path / "db.sqlite")]


@pytest.mark.parametrize("backend", ["file", "sqlite"])
async def test_a_removed_state_field_is_refused_until_declared(backend: str,
                                                               tmp_path: Path) -> None:
    """Before, the old fields loaded silently and the next checkpoint threw them away."""
    make_store = disk_stores(tmp_path)[backend == "sqlite"]
    async with Runtime(shop(ShopV1, BuyV1), initial_state=ShopV1, store=make_store(),
                       durability=Snapshot()) as rt:
        await rt.submit(BuyV1("tea", "gift"))
    with pytest.raises(IncompatibleRecord, match=r"legacy.*items\[0\]\.note|migration") as info:
        async with Runtime(shop(ShopV2, BuyV2), initial_state=ShopV2, store=make_store(),
                           durability=Snapshot()):
            pass
    assert "legacy" in str(info.value) and "items[0].note" in str(info.value)
    # The nested field alone, at any depth.
    with pytest.raises(IncompatibleRecord, match=r"items\[0\]\.note"):
        async with Runtime(shop(ShopV2Items, BuyV2), initial_state=ShopV2Items,
                           store=make_store(), durability=Snapshot()):
            pass
    declared = shop(ShopV2, BuyV2, dropped_fields={"state": ("legacy", "note")})
    async with Runtime(declared, initial_state=ShopV2, store=make_store(),
                       durability=Snapshot()) as rt:
        assert rt.state == ShopV2(1, [ItemV2("tea")])


async def test_a_removed_input_field_is_refused_at_replay(tmp_path: Path) -> None:
    async with Runtime(shop(ShopV1, BuyV1), initial_state=ShopV1,
                       store=FileStore(tmp_path)) as rt:
        await rt.submit(BuyV1("tea", "gift"))
        await rt.submit(BuyV1("jam", "self"))  # a journal entry after the first checkpoint
    keep = {"state": ("note",)}
    with pytest.raises(IncompatibleRecord, match=r"input has field\(s\) memo"):
        async with Runtime(shop(ShopV1, BuyV2, dropped_fields=keep), initial_state=ShopV1,
                           store=FileStore(tmp_path)):
            pass
    both = {"state": ("note",), "input": ("memo",)}
    async with Runtime(shop(ShopV1, BuyV2, dropped_fields=both), initial_state=ShopV1,
                       store=FileStore(tmp_path)) as rt:
        assert rt.seq == 2 and rt.state.total == 2


# -- 5. a migration that raises ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["file", "sqlite"])
async def test_a_migration_that_raises_is_a_typed_error(backend: str, tmp_path: Path) -> None:
    make_store = disk_stores(tmp_path)[backend == "sqlite"]
    async with Runtime(shop(ShopV1, BuyV1), initial_state=ShopV1, store=make_store(),
                       durability=Snapshot(), key="shop-1") as rt:
        await rt.submit(BuyV1("tea", "gift"))

    def broken(data: Any) -> Any:
        raise KeyError("price")

    machine = shop(ShopV1, BuyV1, schema_version=3,
                   migrations={1: lambda d: d, 2: broken})
    store = make_store()
    with pytest.raises(MigrationFailed) as info:
        async with Runtime(machine, initial_state=ShopV1, store=store, durability=Snapshot(),
                           key="shop-1"):
            pass
    error = info.value
    assert isinstance(error, IncompatibleRecord)
    assert (error.key, error.seq, error.from_version) == ("shop-1", 1, 2)
    assert error.store == store.description and "from schema version 2 to 3" in str(error)
    assert isinstance(error.__cause__, KeyError)



# -- 6. round trips keep types -----------------------------------------------------------------


@dataclass
class Bag:
    items: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Put:
    name: str
    value: Any


class Bagging(StateMachine[Bag, Put]):
    machine_name = "bagging"

    async def stf(self, state: Bag, input: Input[Put, Never, Never],
                  actions: ActionsContainer[Never, Never, Never]) -> None:
        assert isinstance(input, Normal)
        if not isinstance(input.value.value, (tuple, set, frozenset)):
            raise TypeError(f"the stf wants a container, got {input.value.value!r}")
        state.items[input.value.name] = input.value.value

    async def restore(self, state: Bag, actions: ActionsContainer[Never, Never, Never]) -> None:
        pass


@pytest.mark.parametrize("durability", [Journal(), Snapshot()], ids=["input", "state"])
async def test_tuples_and_sets_in_any_fields_survive_a_restart(stores: StoreFactory,
                                                               durability: Any) -> None:
    """Journal: the state comes back by replaying the journaled inputs (the input path);
    Snapshot: from the checkpoint (the state path). Before, both came back as lists, so the
    replay raised (NondeterminismError) or the state silently changed type."""
    values: dict[str, Any] = {"t": (1, "a", (2,)), "s": {"x", "y"}, "f": frozenset({3}),
                              "deep": ({"k": (4, 5)}, [frozenset({"z"})])}
    async with Runtime(Bagging(), initial_state=Bag, store=stores(),
                       durability=durability) as rt:
        for name, value in values.items():
            await rt.submit(Put(name, value))
    async with Runtime(Bagging(), initial_state=Bag, store=stores(),
                       durability=durability) as again:
        assert again.seq == len(values)
        assert again.state.items == values
        assert {k: type(v) for k, v in again.state.items.items()} == {
            k: type(v) for k, v in values.items()}
        assert type(again.state.items["deep"][0]["k"]) is tuple


def test_dropped_fields_is_checked_when_the_machine_is_defined() -> None:
    with pytest.raises(DefinitionError, match="dropped_fields"):
        shop(ShopV2, BuyV2, dropped_fields={"stat": ("legacy",)})
    with pytest.raises(DefinitionError, match="dropped_fields"):
        shop(ShopV2, BuyV2, dropped_fields={"state": "legacy"})  # a str, not a tuple of names
