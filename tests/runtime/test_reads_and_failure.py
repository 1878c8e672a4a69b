"""Committed reads (``Runtime.read``) and how a failure reaches the code inside
``async with runtime``: refused input, no cancelled body, ``wait_failed``, the error raised when the
block is left. Every test runs on asyncio and trio."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from fasm.errors import RuntimeClosed, StoreUnavailable
from fasm.persistence import MemoryStore
from fasm.runtime import ActionContext, ManualClock, Runtime
from tests._ledger import Charge, Charged, Deposit, Ledger, LedgerMachine, Note, Pay

pytestmark = pytest.mark.anyio


class HeldStore(MemoryStore):
    """A MemoryStore whose commits wait for a permit while ``holding`` is set, so a test can look
    at the runtime while a group is accepted but not yet durable."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.waiting = 0
        self._permits: list[anyio.Event] = []
        self._arrived = anyio.Event()

    async def commit(self, key: str, *, expected_seq: int, seq: int,
                     entries: Sequence[bytes] = (), checkpoint: bytes | None = None) -> None:
        if self.holding:
            permit = anyio.Event()
            self._permits.append(permit)
            self.waiting += 1
            self._arrived.set()
            await permit.wait()
            self.waiting -= 1
        await super().commit(key, expected_seq=expected_seq, seq=seq, entries=entries,
                             checkpoint=checkpoint)

    async def wait_held(self) -> None:
        while not self.waiting:
            self._arrived = anyio.Event()
            await self._arrived.wait()

    def let_one_commit(self) -> None:
        self._permits.pop(0).set()


async def ok_charge(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


async def quiet(note: Note) -> None:
    pass


def make(store: MemoryStore, **kw: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
    kw.setdefault("executors", {Charge: ok_charge})
    return Runtime(LedgerMachine(), initial_state=lambda: Ledger(balances={"a": 100}),
                   store=store, handlers={Note: quiet}, clock=ManualClock(), **kw)


def balance(state: Ledger) -> int:
    return state.balances["a"]


# -- reads ----------------------------------------------------------------------------------------


async def test_a_read_waits_out_a_commit_in_progress_and_never_sees_it_undone() -> None:
    store = HeldStore()
    async with make(store) as rt:
        await rt.submit(Deposit("a", 1))
        assert await rt.read(balance) == 101  # idle: runs at once
        store.holding = True
        seen: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.submit, Deposit("a", 5))
            await store.wait_held()
            assert rt.state.balances["a"] == 106  # live: accepted, not durable

            async def reader() -> None:
                seen.append(await rt.read(balance))

            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            assert seen == []  # the read did not show the uncommitted deposit
            store.let_one_commit()
        assert seen == [106] and rt.seq == 2


async def test_a_read_queued_behind_a_commit_that_fails_is_refused() -> None:
    store = HeldStore()
    outcome: list[BaseException] = []
    with pytest.raises(StoreUnavailable):
        async with make(store) as rt:
            await rt.submit(Deposit("a", 1))
            store.holding = True
            store.fail_next_commits = 1

            async def submit() -> None:
                with pytest.raises(StoreUnavailable):
                    await rt.submit(Deposit("a", 5))

            async def reader() -> None:
                try:
                    outcome.append(AssertionError(await rt.read(balance)))
                except RuntimeClosed as e:
                    outcome.append(e)

            async with anyio.create_task_group() as tg:
                tg.start_soon(submit)
                await store.wait_held()
                tg.start_soon(reader)
                await anyio.wait_all_tasks_blocked()
                assert rt.state.balances["a"] == 106  # what a GET of rt.state would have shown
                store.let_one_commit()
            with pytest.raises(RuntimeClosed):
                await rt.read(balance)
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeClosed)
    assert isinstance(outcome[0].__cause__, StoreUnavailable)
    async with make(store) as again:
        assert await again.read(balance) == 101  # the deposit was never durable


async def test_reads_do_not_starve_behind_a_long_queue() -> None:
    store = HeldStore()
    async with make(store, max_group=1) as rt:
        store.holding = True
        seen: list[tuple[int, int]] = []
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(rt.submit, Deposit("a", 1))
            await store.wait_held()

            async def reader() -> None:
                seen.append(await rt.read(lambda s: (s.balances["a"], len(s.pending))))

            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            store.let_one_commit()  # one group commits; nine inputs are still queued
            await anyio.wait_all_tasks_blocked()
            assert seen == [(101, 0)]
            store.holding = False
            while store.waiting:
                store.let_one_commit()
                await anyio.wait_all_tasks_blocked()
        assert await rt.read(balance) == 110


async def test_an_error_in_the_read_reaches_the_reader_only() -> None:
    async with make(MemoryStore()) as rt:
        with pytest.raises(KeyError):
            await rt.read(lambda s: s.balances["nobody"])
        assert (await rt.submit(Deposit("a", 1))).seq == 1


async def test_a_read_before_start_is_refused() -> None:
    with pytest.raises(RuntimeClosed, match="not been started"):
        await make(MemoryStore()).read(balance)


# -- failure ----------------------------------------------------------------------------------


async def test_a_store_failure_does_not_cancel_the_block_and_is_raised_when_it_is_left() -> None:
    store = MemoryStore()
    reached: list[str] = []
    with pytest.raises(StoreUnavailable, match="injected") as raised:
        async with make(store) as rt:
            await rt.submit(Deposit("a", 1))
            store.fail_next_commits = 1
            with pytest.raises(StoreUnavailable):
                await rt.submit(Deposit("a", 1000))
            await anyio.lowlevel.checkpoint()  # the old runtime cancelled the block here
            reached.append("after the failure")
            assert not rt.running and rt.failure is not None
            with pytest.raises(RuntimeClosed) as closed:
                await rt.submit(Deposit("a", 1))
            assert closed.value.__cause__ is rt.failure
    assert reached == ["after the failure"] and raised.value is rt.failure


async def test_wait_failed_reports_a_failure_in_the_background_at_once() -> None:
    store = MemoryStore()
    release = anyio.Event()

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        await release.wait()
        store.fail_next_commits = 1  # the result's commit fails
        return Charged(True)

    with pytest.raises(StoreUnavailable):
        async with make(store, executors={Charge: charge}) as rt:
            await rt.submit(Pay("a", 10))
            release.set()
            failure = await rt.wait_failed()  # nothing else is waiting on the runtime
            assert isinstance(failure, StoreUnavailable) and failure is rt.failure
            with pytest.raises(RuntimeClosed):
                await rt.submit(Deposit("a", 1))
    async with make(store) as again:  # the charge was not lost: restore dispatches it again
        await again.wait_idle()
        assert await again.read(lambda s: s.applied) == {0: 1}


async def test_wait_failed_returns_none_after_a_normal_stop() -> None:
    got: list[BaseException | None] = []
    async with anyio.create_task_group() as tg, make(MemoryStore()) as rt:

        async def watch() -> None:
            got.append(await rt.wait_failed())

        tg.start_soon(watch)
        await rt.submit(Deposit("a", 1))
    assert got == [None] and rt.failure is None
    assert await rt.read(balance) == 101  # a stopped runtime still answers reads
