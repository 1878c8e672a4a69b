"""Snapshot and journal: same guarantee. Both recover the same state from the same history, on
every store, and the journal checkpoints by growth."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from fasm.persistence import FileStore, Journal, MemoryStore, Snapshot, SQLiteStore, Store
from fasm.persistence._codec import Codec
from fasm.persistence._durability import Writer
from fasm.runtime import ActionContext, ManualClock, Runtime
from tests._ledger import Charge, Charged, Deposit, Explode, Ledger, LedgerMachine, Note, Pay

pytestmark = pytest.mark.anyio


async def charge(action: Charge, ctx: ActionContext) -> Charged:
    await anyio.lowlevel.checkpoint()
    return Charged(action.amount % 3 != 0)


async def quiet(note: Note) -> None:
    pass


def stores(tmp: Path) -> dict[str, Store]:
    tmp.mkdir(parents=True, exist_ok=True)
    return {"memory": MemoryStore(), "file": FileStore(tmp / "files"),
            "sqlite": SQLiteStore(tmp / "db.sqlite")}


def runtime(store: Store, durability: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
    return Runtime(LedgerMachine(), initial_state=lambda: Ledger(balances={"a": 10_000}),
                   store=store, durability=durability, executors={Charge: charge},
                   handlers={Note: quiet}, clock=ManualClock())


async def history(rt: Runtime[Any, Any, Any, Any, Any, Any], seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(120):
        r = rng.random()
        try:
            if r < 0.4:
                await rt.submit(Deposit("a", rng.randint(1, 50)))
            elif r < 0.9:
                await rt.submit(Pay("a", rng.randint(1, 80)))
            else:
                await rt.submit(Explode("a"))
        except Exception:
            pass
        if rng.random() < 0.3:
            await rt.wait_idle()
    await rt.wait_idle()


@pytest.mark.parametrize("kind", ["memory", "file", "sqlite"])
async def test_snapshot_and_journal_recover_identical_state(kind: str, tmp_path: Path) -> None:
    finals = {}
    recovered = {}
    for name, durability in (("snapshot", Snapshot()),
                             ("journal", Journal(min_checkpoint_bytes=500)),
                             ("journal-no-checkpoint", Journal(min_checkpoint_bytes=10**9,
                                                               checkpoint_every=None))):
        store = stores(tmp_path / name)[kind]
        rt = runtime(store, durability)
        async with rt:
            await history(rt, seed=42)
            finals[name] = (rt.seq, rt.state)
        again = runtime(store if kind != "memory" else MemoryStore(data=store.data),  # type: ignore[attr-defined]
                        durability)
        async with again:
            recovered[name] = (again.seq, again.state)
    assert finals["snapshot"] == finals["journal"] == finals["journal-no-checkpoint"]
    assert recovered == finals


def test_journal_checkpoints_after_growing_past_the_last_checkpoint() -> None:
    codec = Codec(LedgerMachine)
    writer = Writer(codec, Journal(checkpoint_ratio=1.0, min_checkpoint_bytes=0,
                                   checkpoint_every=None))
    writer.recovered(0, 0, checkpoint_size=1_000)
    entry = b"x" * 100
    due = []
    for _ in range(12):
        due.append(writer.checkpoint_due((entry,)))
        writer.written(writer.plan(0, 1, (entry,), None))
    assert due.index(True) == 9  # the 10th entry brings the journal to 1,000 bytes
    assert Writer(codec, Snapshot()).checkpoint_due(()) is True
    bounded = Writer(codec, Journal(checkpoint_every=3, min_checkpoint_bytes=10**9))
    assert [bounded.checkpoint_due((entry,) * n) for n in (1, 2, 3)] == [False, False, True]


def test_a_bounded_history_plans_a_base_at_least_n_entries_back() -> None:
    """keep_history=N: each kept checkpoint names, as the history base, the newest earlier one
    at least N entries back, and the writer remembers only the checkpoints after that base."""
    writer = Writer(Codec(LedgerMachine), Journal(keep_history=5))
    writer.recovered(0, 0, 0, checkpoint=(2, b"c2"))
    seq, bases = 2, []
    for step in (1, 3, 2, 1, 4, 2, 2, 3):  # checkpoints at uneven intervals
        plan = writer.plan(seq, seq + step, (b"e",) * step, f"c{seq + step}".encode())
        assert plan.keep_journal
        if plan.history_base is not None:
            assert plan.history_base[0] <= plan.seq - 5
            assert plan.history_base[1] == f"c{plan.history_base[0]}".encode()
        bases.append(None if plan.history_base is None else plan.history_base[0])
        writer.written(plan)
        seq += step
        assert len(writer._bases) <= 5  # checkpoints within the last N entries, plus the next
    assert bases == [None, None, 3, None, 8, 9, None, 15]  # checkpoints at 3 6 8 9 13 15 17 20
    unbounded = Writer(Codec(LedgerMachine), Journal(keep_history=True))
    assert unbounded.plan(0, 2, (b"a", b"b"), b"c2").history_base is None


@pytest.mark.parametrize("ratio", [0.5, 2.0])
async def test_journal_store_stays_bounded_by_state_size(ratio: float) -> None:
    store = MemoryStore()
    rt = runtime(store, Journal(checkpoint_ratio=ratio, min_checkpoint_bytes=0))
    async with rt:
        for i in range(300):
            await rt.submit(Deposit(f"acct-{i % 40}", 1))
    records = await _load(store)
    journal_bytes = sum(len(d) for _, d in records.journal)
    assert records.checkpoint is not None
    assert journal_bytes <= ratio * len(records.checkpoint) + 200  # one entry of slack


async def _load(store: MemoryStore) -> Any:
    await store.open()
    try:
        return await store.load("default")
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["file", "sqlite"])
@pytest.mark.parametrize("strategy", ["snapshot", "journal"])
async def test_a_deleted_checkpoint_stops_the_start_not_the_history(kind: str, strategy: str,
                                                                    tmp_path: Path) -> None:
    """The checkpoint deleted by hand: the runtime refuses to start (StoreCorrupt) instead of
    starting from the initial state (and writing over the history) or replaying half of it."""
    import sqlite3

    from fasm.errors import StoreCorrupt

    durability = Snapshot() if strategy == "snapshot" else Journal(min_checkpoint_bytes=500)
    store = stores(tmp_path)[kind]
    async with runtime(store, durability) as rt:
        await history(rt, seed=7)
        assert rt.seq > 0
    if kind == "file":
        for checkpoint in (tmp_path / "files").glob("*/ckpt-*"):
            checkpoint.unlink()
    else:
        with sqlite3.connect(tmp_path / "db.sqlite") as db:
            assert db.execute("DELETE FROM fasm_checkpoints").rowcount == 1
        db.close()
    with pytest.raises(StoreCorrupt, match="missing"):
        async with runtime(stores(tmp_path)[kind], durability):
            pass
