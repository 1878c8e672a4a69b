"""The replay check: a store written by a real Runtime, replayed through changed machine code."""

from __future__ import annotations

from typing import Any

import pytest

from fasm import Input, Normal, Tracked, TrackedActionCompleted
from fasm.persistence import Journal, MemoryStore, Snapshot, Store
from fasm.runtime import ReplayReport, replay
from tests._ledger import (
    Actions,
    Charge,
    Charged,
    Deposit,
    Insufficient,
    Ledger,
    LedgerInput,
    LedgerMachine,
    Pay,
    Pending,
    Shout,
    TimerFired,
)
from tests.runtime.conftest import StoreFactory, make

pytestmark = pytest.mark.anyio


def initial() -> Ledger:
    return Ledger(balances={"a": 100})


async def record(store: Store, durability: Any) -> None:
    """seq 1 deposit, 2 keyed pay (tracked charge 0), 3 its result, 4 deposit, 5 shout, 6 pay
    (charge 1), 7 its result. Under EVERY4: checkpoints at seq 1 and 5, journal 6..7."""
    async with make(store=store, durability=durability) as rt:  # type: ignore[arg-type]
        await rt.submit(Deposit("a", 5))
        await rt.submit(Pay("a", 10), idempotency_key="pay-1")
        await rt.wait_idle()
        await rt.submit(Deposit("a", 1))
        await rt.submit(Shout("hi"))
        await rt.submit(Pay("a", 7))
        await rt.wait_idle()


async def check(machine: LedgerMachine, store: Store, **kw: Any) -> ReplayReport:
    await store.open()
    try:
        return await replay(machine, store, key="default", **kw)
    finally:
        await store.close()


# -- machines changed after the records were written ------------------------------------------


class Stricter(LedgerMachine):
    """Compatible: refuses a deposit of 0, which the records never hold."""

    machine_name = "LedgerMachine"

    async def stf(self, state: Ledger, input: Input[LedgerInput, int, Charged | TimerFired],
                  actions: Actions) -> None:
        if isinstance(input, Normal) and isinstance(input.value, Deposit) and \
                input.value.amount == 0:
            raise Insufficient("a deposit of nothing")
        await super().stf(state, input, actions)


class DoubleDeposit(LedgerMachine):
    """Incompatible state: a deposit counts twice (no action shows it)."""

    machine_name = "LedgerMachine"

    async def stf(self, state: Ledger, input: Input[LedgerInput, int, Charged | TimerFired],
                  actions: Actions) -> None:
        await super().stf(state, input, actions)
        if isinstance(input, Normal) and isinstance(input.value, Deposit):
            state.balances["a"] += input.value.amount


class Fee(LedgerMachine):
    """Incompatible actions: a payment charges one more."""

    machine_name = "LedgerMachine"

    async def stf(self, state: Ledger, input: Input[LedgerInput, int, Charged | TimerFired],
                  actions: Actions) -> None:
        if isinstance(input, Normal) and isinstance(input.value, Pay):
            pay = input.value
            pid = state.next_id
            state.next_id += 1
            state.balances[pay.account] -= pay.amount
            state.pending[pid] = Pending(pay.account, pay.amount)
            actions.add(Tracked(pid, Charge(pay.account, pay.amount + 1)))
            return
        await super().stf(state, input, actions)


class Renumbered(LedgerMachine):
    """Incompatible ids: the second charge is numbered 100, so its recorded result names no
    action."""

    machine_name = "LedgerMachine"

    async def stf(self, state: Ledger, input: Input[LedgerInput, int, Charged | TimerFired],
                  actions: Actions) -> None:
        if isinstance(input, Normal) and isinstance(input.value, Pay) and state.next_id >= 1:
            state.next_id = max(state.next_id, 100)
        if isinstance(input, TrackedActionCompleted) and input.id == 1:
            input = TrackedActionCompleted(100, input.result)
        await super().stf(state, input, actions)


class Capped(LedgerMachine):
    """Incompatible validation: payments above ``cap`` are refused now."""

    machine_name = "LedgerMachine"
    cap = 8

    async def stf(self, state: Ledger, input: Input[LedgerInput, int, Charged | TimerFired],
                  actions: Actions) -> None:
        if isinstance(input, Normal) and isinstance(input.value, Pay) and \
                input.value.amount > self.cap:
            raise Insufficient("above the cap")
        await super().stf(state, input, actions)


EVERY4 = Journal(checkpoint_every=4, checkpoint_ratio=1000.0, min_checkpoint_bytes=0)
KEEP = Journal(checkpoint_every=4, checkpoint_ratio=1000.0, min_checkpoint_bytes=0,
               keep_history=True)


async def test_the_same_code_replays_the_whole_history(stores: StoreFactory) -> None:
    await record(stores(), KEEP)
    report = await check(LedgerMachine(), stores(), initial_state=initial)
    assert report.ok, report
    assert (report.start_seq, report.replayed, report.seq) == (0, 7, 7)
    assert report.state_checked_at == 5
    assert report.outcomes_checked == 1
    assert "OK" in str(report)


async def test_a_compatible_change_replays(stores: StoreFactory) -> None:
    await record(stores(), KEEP)
    report = await check(Stricter(), stores(), initial_state=initial)
    assert report.ok, report


@pytest.mark.parametrize(("machine", "kind", "seq"), [
    (DoubleDeposit(), "state", 5),  # first seen where a state was recorded
    (Fee(), "actions", 2),
    (Renumbered(), "completion", 7),
    (Capped(), "raised", 2),
])
async def test_an_incompatible_change_names_the_first_differing_seq(
        stores: StoreFactory, machine: LedgerMachine, kind: str, seq: int) -> None:
    await record(stores(), KEEP)
    report = await check(machine, stores(), initial_state=initial)
    assert not report.ok
    assert report.difference is not None
    assert (report.difference.kind, report.difference.seq) == (kind, seq), report


async def test_without_kept_history_only_the_tail_is_replayed() -> None:
    store = MemoryStore()
    await record(store, EVERY4)
    report = await check(DoubleDeposit(), store, initial_state=initial)
    assert report.ok  # nothing recorded to compare the tail's state with
    assert (report.start_seq, report.replayed, report.state_checked_at) == (5, 2, None)
    # ... but a recorded result the new code cannot place is still found
    store2 = MemoryStore()
    await record(store2, EVERY4)
    report = await check(Renumbered(), store2)
    assert report.difference is not None and report.difference.kind == "completion"
    assert report.difference.seq == 7


async def test_the_history_is_kept_but_recovery_starts_at_the_checkpoint() -> None:
    store = MemoryStore()
    await record(store, KEEP)
    await store.open()
    records = await store.load("default")
    assert records is not None and records.checkpoint_seq == 5
    assert [s for s, _ in await store.history("default")] == list(range(1, 8))
    async with make(store=store, durability=KEEP) as rt:  # restarts from it
        assert rt.state.balances["a"] == 100 + 5 - 10 + 1 - 7


async def test_snapshot_records_only_decode() -> None:
    store = MemoryStore()
    await record(store, Snapshot())
    report = await check(DoubleDeposit(), store, initial_state=initial)
    assert report.ok and report.replayed == 0 and report.start_seq == 7


async def test_a_key_never_committed_is_a_key_error() -> None:
    store = MemoryStore()
    await store.open()
    with pytest.raises(KeyError, match="nope"):
        await replay(LedgerMachine(), store, key="nope")


# -- bounded history (Journal(keep_history=N)) --------------------------------------------------

BOUNDED = Journal(checkpoint_every=2, checkpoint_ratio=1000.0, min_checkpoint_bytes=0,
                  keep_history=3)


async def record_long(store: Store, deposits: int = 30) -> None:
    """``deposits`` deposits of 1, then a payment of 10 and its result; a checkpoint every two
    transitions."""
    async with make(store=store, durability=BOUNDED) as rt:  # type: ignore[arg-type]
        for _ in range(deposits):
            await rt.submit(Deposit("a", 1))
        await rt.submit(Pay("a", 10))
        await rt.wait_idle()


async def test_a_bounded_history_does_not_grow_past_its_bound(stores: StoreFactory) -> None:
    store = stores()
    await record_long(store)
    await store.open()
    try:
        records = await store.load("default")
        history = await store.history("default")
        base = await store.history_base("default")
    finally:
        await store.close()
    assert records is not None and records.seq == 32
    seqs = [s for s, _ in history]
    assert seqs[-1] == 32 and len(seqs) >= 3  # at least the last N kept...
    assert len(seqs) <= 3 + 2 * 2  # ...and at most N plus two checkpoint intervals
    assert base is not None and base[0] == seqs[0] - 1


async def test_a_bounded_history_replays_from_its_base(stores: StoreFactory) -> None:
    await record_long(stores())
    report = await check(LedgerMachine(), stores(), initial_state=initial)
    assert report.ok, report
    assert report.start_seq > 0 and report.replayed == 32 - report.start_seq
    assert report.state_checked_at is not None and report.state_checked_at > report.start_seq


@pytest.mark.parametrize(("machine", "kind"), [
    (DoubleDeposit(), "state"),  # a deposit inside the kept window
    (Capped(), "raised"),  # the payment of 10, the last but one entry
])
async def test_a_bounded_history_finds_an_incompatible_change_in_its_window(
        stores: StoreFactory, machine: LedgerMachine, kind: str) -> None:
    await record_long(stores())
    report = await check(machine, stores())  # no initial state needed: the base is a checkpoint
    assert report.difference is not None and report.difference.kind == kind, report
    assert report.start_seq > 0


async def test_the_bound_holds_across_restarts() -> None:
    store = MemoryStore()
    for _ in range(4):
        await record_long(store, deposits=5)
    await store.open()
    history = await store.history("default")
    assert len(history) <= 3 + 2 * 2
    assert (await store.history_base("default")) is not None


def test_keep_history_takes_a_bool_or_a_positive_int() -> None:
    for bad in (0, -1, 1.5, "3"):
        with pytest.raises(ValueError, match="keep_history"):
            Journal(keep_history=bad)  # type: ignore[arg-type]
    assert Journal(keep_history=True).keep_history is True
    assert Journal(keep_history=5).keep_history == 5
