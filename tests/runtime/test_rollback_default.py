"""The default rollback of a state-object runtime is ``"trust-rejected"``: a ``Rejected`` costs
nothing (no store reload: the live state object is kept), anything else the stf raises is still
rolled back by a reload. On asyncio and trio."""

from __future__ import annotations

import pytest

from fasm.errors import TransitionFailed
from fasm.persistence import MemoryStore
from fasm.persistence._store import StoredRecords
from fasm.runtime import Runtime
from tests._ledger import Charge, Charged, Explode, Insufficient, Ledger, LedgerMachine, Note, Pay

pytestmark = pytest.mark.anyio


async def charge(action: Charge, ctx: object) -> Charged:
    return Charged(True)


async def quiet(note: Note) -> None:
    pass


class CountingStore(MemoryStore):
    loads = 0

    async def load(self, key: str) -> StoredRecords | None:
        self.loads += 1
        return await super().load(key)


async def test_a_rejection_reloads_nothing_and_an_error_is_still_rolled_back() -> None:
    store = CountingStore()
    async with Runtime(LedgerMachine(), initial_state=lambda: Ledger(balances={"a": 100}),
                       store=store, executors={Charge: charge}, handlers={Note: quiet}) as rt:
        await rt.submit(Pay("a", 10))
        state, loads = rt.state, store.loads
        for _ in range(3):
            with pytest.raises(Insufficient):
                await rt.submit(Pay("a", 1000))
        assert store.loads == loads and rt.state is state  # proportional to the input
        with pytest.raises(TransitionFailed):
            await rt.submit(Explode("a"))  # mutates, then raises a bug: reloaded
        assert store.loads == loads + 1
        assert rt.state.balances["a"] == 90 and rt.state.next_id == 1
