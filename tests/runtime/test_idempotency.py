"""Submit idempotency keys through the Runtime, on every store and both durabilities: a retry
within ``idempotency_ttl`` (clock time, durably, across restarts) is answered with the original
outcome (its seq and actions) and runs nothing; after the window it runs again; the count bound
only bounds memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fasm import Tracked, Untracked
from fasm.persistence import (
    Journal,
    Snapshot,
)
from fasm.runtime import ManualClock
from tests._ledger import Charge, Deposit, Note, Pay
from tests.runtime.conftest import StoreFactory, make

pytestmark = pytest.mark.anyio

DURABILITIES = {"journal": Journal, "checkpointed": lambda: Journal(checkpoint_every=1),
                "snapshot": Snapshot}


@pytest.fixture(params=list(DURABILITIES))
def durability(request: pytest.FixtureRequest) -> Callable[[], Any]:
    return DURABILITIES[request.param]  # type: ignore[return-value]


def runtime(stores: StoreFactory, durability: Callable[[], Any], now: float,
            **kw: Any) -> Any:
    return make(store=stores(), durability=durability(), clock=ManualClock(now), **kw)  # type: ignore[arg-type]


async def test_a_retry_gets_the_original_outcome_after_a_restart(
        stores: StoreFactory, durability: Callable[[], Any]) -> None:
    async with runtime(stores, durability, 1000.0) as rt:
        first = await rt.submit(Pay("a", 10), idempotency_key="pay-1")
        assert first.actions == (Tracked(0, Charge("a", 10)),
                                 Untracked(Note("paying 10 from a")))
        await rt.submit(Deposit("a", 1), idempotency_key="dep-1")
        await rt.wait_idle()
        same_run = await rt.submit(Pay("a", 10), idempotency_key="pay-1")
        assert same_run.duplicate and same_run.actions == first.actions
    async with runtime(stores, durability, 1030.0) as rt:
        again = await rt.submit(Pay("a", 10), idempotency_key="pay-1")
        assert again.duplicate and again.seq == first.seq
        assert again.actions == first.actions  # the retried request learns its payment id
        assert rt.state.balances["a"] == 91 and rt.state.next_id == 1  # nothing ran twice
        assert rt.in_flight == {}  # nor was the charge released again


async def test_a_key_is_remembered_for_the_ttl_of_clock_time_across_restarts(
        stores: StoreFactory, durability: Callable[[], Any]) -> None:
    async with runtime(stores, durability, 1000.0, idempotency_ttl=60.0) as rt:
        await rt.submit(Deposit("a", 5), idempotency_key="dep-1")
    async with runtime(stores, durability, 1059.0, idempotency_ttl=60.0) as rt:
        assert (await rt.submit(Deposit("a", 5), idempotency_key="dep-1")).duplicate
        await rt.submit(Deposit("a", 1))  # another commit, so that the next restart recovers
    async with runtime(stores, durability, 1061.0, idempotency_ttl=60.0) as rt:
        late = await rt.submit(Deposit("a", 5), idempotency_key="dep-1")
        assert not late.duplicate  # the window is over: a new submit
        assert rt.state.balances["a"] == 111
    async with runtime(stores, durability, 1062.0, idempotency_ttl=60.0) as rt:
        # ... and the new one is remembered from its own commit on
        assert (await rt.submit(Deposit("a", 5), idempotency_key="dep-1")).seq == late.seq


async def test_many_keys_within_the_ttl_are_all_remembered(
        stores: StoreFactory, durability: Callable[[], Any]) -> None:
    """The old window counted 1,000 keys (2.5 s of traffic at 400 requests/s): a retry of the
    first of 1,500 requests ran again and was charged twice. Now the window is time."""
    async with runtime(stores, durability, 1000.0) as rt:
        for n in range(1500):
            await rt.submit(Deposit("a", 1), idempotency_key=f"req-{n}")
        assert (await rt.submit(Deposit("a", 1), idempotency_key="req-0")).duplicate
    async with runtime(stores, durability, 1300.0) as rt:
        retried = await rt.submit(Deposit("a", 1), idempotency_key="req-0")
        assert retried.duplicate and retried.seq == 1
        assert rt.state.balances["a"] == 1600


async def test_the_count_bound_forgets_the_oldest_first(stores: StoreFactory) -> None:
    async with runtime(stores, Journal, 0.0, idempotency_window=2) as rt:
        for n in range(3):
            await rt.submit(Deposit("a", 1), idempotency_key=f"req-{n}")
    async with runtime(stores, Journal, 1.0, idempotency_window=2) as rt:
        assert not (await rt.submit(Deposit("a", 1), idempotency_key="req-0")).duplicate
        assert (await rt.submit(Deposit("a", 1), idempotency_key="req-2")).duplicate
