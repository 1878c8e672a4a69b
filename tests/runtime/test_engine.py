"""The sans-IO engine, driven directly: no store, no anyio, no tasks."""

from __future__ import annotations

import pytest

from fasm import Normal, RestoreFailed, Tracked, TrackedActionCompleted, TransitionFailed, Untracked
from fasm._remembered import Remembered
from fasm.errors import DefinitionError, InvalidInput, NondeterminismError
from fasm.runtime._engine import Accepted, Duplicate, Engine, Failed
from tests._ledger import (
    Charge,
    Charged,
    Deposit,
    Explode,
    Insufficient,
    Ledger,
    LedgerMachine,
    Note,
    Pay,
    Reemit,
)


def engine(rollback: str = "reload", **kw: object) -> Engine:
    return Engine(LedgerMachine(), state=Ledger(balances={"a": 100}), rollback=rollback,  # type: ignore[arg-type]
                  **kw)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_accepted_step_advances_seq_and_carries_actions() -> None:
    e = engine()
    step = await e.step(Normal(Pay("a", 30)))
    assert isinstance(step, Accepted) and step.seq == 1 and e.seq == 1
    assert step.actions == (Tracked(0, Charge("a", 30)), Untracked(Note("paying 30 from a")))
    assert e.committed_seq == 0 and e.in_flight == {}  # nothing released before the commit
    release = e.committed([step])
    assert release.tracked == [Tracked(0, Charge("a", 30))]
    assert release.untracked == [(1, Untracked(Note("paying 30 from a")))]
    assert e.committed_seq == 1 and set(e.in_flight) == {0}


@pytest.mark.anyio
async def test_completion_clears_in_flight_only_when_committed() -> None:
    e = engine()
    e.committed([await e.step(Normal(Pay("a", 30)))])
    done = await e.step(TrackedActionCompleted(0, Charged(True)))
    assert isinstance(done, Accepted) and set(e.in_flight) == {0}
    assert e.committed([done]).completed == [0]
    assert e.in_flight == {}


@pytest.mark.anyio
async def test_an_id_in_flight_is_never_released_twice() -> None:
    e = engine()
    e.committed([await e.step(Normal(Pay("a", 30)))])
    again = await e.step(Normal(Reemit(0)))
    release = e.committed([again])  # type: ignore[list-item]
    assert release.tracked == [] and release.already_in_flight == [Tracked(0, Charge("a", 30))]


@pytest.mark.anyio
async def test_rejection_is_returned_not_raised() -> None:
    e = engine()
    step = await e.step(Normal(Pay("a", 1000)))
    assert isinstance(step, Failed) and isinstance(step.error, Insufficient) and step.reload


@pytest.mark.anyio
async def test_unexpected_error_is_wrapped_with_cause() -> None:
    e = engine("copy")
    step = await e.step(Normal(Explode("a")))
    assert isinstance(step, Failed) and isinstance(step.error, TransitionFailed)
    assert isinstance(step.error.__cause__, RuntimeError)
    assert "Explode" in str(step.error)


@pytest.mark.anyio
async def test_copy_rollback_restores_state() -> None:
    e = engine("copy")
    await e.step(Normal(Explode("a")))
    assert e.state.balances == {"a": 100} and e.state.next_id == 0


@pytest.mark.anyio
async def test_trust_rollback_keeps_the_damage() -> None:
    e = engine("trust")
    step = await e.step(Normal(Explode("a")))
    assert isinstance(step, Failed) and not step.reload
    assert e.state.balances == {"a": -10**9}  # the documented cost of opting out


@pytest.mark.anyio
async def test_trust_rejected_reloads_only_after_unexpected_errors() -> None:
    e = engine("trust-rejected")
    rejected = await e.step(Normal(Pay("a", 10**6)))
    assert isinstance(rejected, Failed) and not rejected.reload  # no reload for a rejection
    assert isinstance(await e.step(Normal(Deposit("a", 1))), Accepted)
    exploded = await e.step(Normal(Explode("a")))
    assert isinstance(exploded, Failed) and exploded.reload  # a bug still reloads


@pytest.mark.anyio
async def test_reload_rollback_refuses_until_reset_then_reapplies_pending() -> None:
    e = engine("reload")
    first = await e.step(Normal(Deposit("a", 5)))
    assert isinstance(first, Accepted)
    failed = await e.step(Normal(Explode("a")))
    assert isinstance(failed, Failed) and failed.reload
    with pytest.raises(RuntimeError, match="reset"):
        await e.step(Normal(Deposit("a", 1)))
    # The caller loads the last committed state (seq 0) and resets: the accepted deposit is
    # re-applied on top, so the state is exactly what the last accepted step left.
    await e.reset(Ledger(balances={"a": 100}), 0, ())
    assert e.state.balances == {"a": 105} and e.seq == 1
    assert isinstance(await e.step(Normal(Deposit("a", 1))), Accepted)


@pytest.mark.anyio
async def test_commits_must_be_in_order() -> None:
    e = engine()
    s1 = await e.step(Normal(Deposit("a", 1)))
    s2 = await e.step(Normal(Deposit("a", 1)))
    with pytest.raises(RuntimeError, match="out of order"):
        e.committed([s2])  # type: ignore[list-item]
    e.committed([s1, s2])  # type: ignore[list-item]
    assert e.committed_seq == 2


@pytest.mark.anyio
async def test_idempotency_keys_deduplicate_and_are_bounded() -> None:
    e = engine(idempotency_window=2)
    s = await e.step(Normal(Deposit("a", 1)), "k1")
    assert isinstance(s, Accepted)
    dup = await e.step(Normal(Deposit("a", 1)), "k1")
    assert isinstance(dup, Duplicate) and (dup.seq, dup.idempotency_key) == (1, "k1")
    await e.step(Normal(Deposit("a", 1)), "k2")
    await e.step(Normal(Deposit("a", 1)), "k3")
    assert list(e.idempotency) == ["k2", "k3"]
    # A rejected submit is not recorded, so it may be retried with its key.
    assert isinstance(await e.step(Normal(Pay("a", 10**6)), "k4"), Failed)
    assert "k4" not in e.idempotency


@pytest.mark.anyio
async def test_restore_releases_tracked_and_refuses_untracked() -> None:
    e = engine()
    e.committed([await e.step(Normal(Pay("a", 10)))])
    fresh = Engine(LedgerMachine(), state=e.state, seq=1)
    release = await fresh.restore()
    assert release.tracked == [Tracked(0, Charge("a", 10))]

    class Noisy(LedgerMachine):
        async def restore(self, state: Ledger, actions: object) -> None:
            actions.add(Untracked(Note("hi")))  # type: ignore[attr-defined]

    with pytest.raises(RestoreFailed, match="only re-emit pending tracked"):
        await Engine(Noisy(), state=Ledger()).restore()


@pytest.mark.anyio
async def test_replay_detects_a_committed_input_that_now_fails() -> None:
    e = Engine(LedgerMachine(), state=Ledger())
    with pytest.raises(NondeterminismError, match="seq 1"):
        await e.replay([(1, Normal(Pay("nobody", 5)), None)])
    e2 = Engine(LedgerMachine(), state=Ledger())
    await e2.replay([(1, Normal(Deposit("a", 5)), "k")])
    assert e2.seq == e2.committed_seq == 1 and e2.idempotency == {"k": Remembered(1)}


@pytest.mark.anyio
async def test_a_duplicate_is_answered_with_the_original_actions() -> None:
    """A retried request must learn what its first submit did (its payment id): the duplicate
    carries the original transition's actions, and replay rebuilds them from the journal."""
    e = engine()
    first = await e.step(Normal(Pay("a", 10)), "pay-1")
    assert isinstance(first, Accepted) and first.actions
    e.committed([first])
    dup = await e.step(Normal(Pay("a", 10)), "pay-1")
    assert isinstance(dup, Duplicate) and dup.remembered is not None
    assert dup.remembered.actions == first.actions
    assert e.in_flight == {0: first.actions[0]}  # nothing released twice
    replayed = Engine(LedgerMachine(), state=Ledger(balances={"a": 100}))
    await replayed.replay([(1, Normal(Pay("a", 10)), "pay-1", 5.0)])
    again = await replayed.step(Normal(Pay("a", 10)), "pay-1")
    assert isinstance(again, Duplicate) and again.remembered is not None
    assert again.remembered.actions == first.actions and again.remembered.at == 5.0


@pytest.mark.anyio
async def test_keys_expire_after_the_ttl_of_the_callers_clock() -> None:
    e = engine(idempotency_ttl=60.0, idempotency_window=None)
    e.now = 1000.0
    e.committed([await e.step(Normal(Deposit("a", 1)), "k1")])  # type: ignore[list-item]
    e.now = 1030.0
    e.committed([await e.step(Normal(Deposit("a", 1)), "k2")])  # type: ignore[list-item]
    e.now = 1059.9
    assert isinstance(await e.step(Normal(Deposit("a", 1)), "k1"), Duplicate)
    e.now = 1060.0  # k1's window is over: the same key is a new submit
    again = await e.step(Normal(Deposit("a", 1)), "k1")
    assert isinstance(again, Accepted) and again.at == 1060.0
    e.committed([again])
    assert list(e.idempotency) == ["k2", "k1"]
    e.now = 1090.0  # committing k3 evicts k2 (expired at 1090)
    e.committed([await e.step(Normal(Deposit("a", 1)), "k3")])  # type: ignore[list-item]
    assert list(e.idempotency) == ["k1", "k3"]


@pytest.mark.anyio
async def test_undated_keys_of_an_older_fasm_get_a_full_window() -> None:
    old = Engine(LedgerMachine(), state=Ledger(balances={"a": 100}), seq=3,
                 idempotency=[("old", 2)], idempotency_ttl=60.0, idempotency_window=None)
    old.now = 5000.0
    old.committed([await old.step(Normal(Deposit("a", 1)), "new")])  # type: ignore[list-item]
    assert old.idempotency["old"].at == 5000.0
    old.now = 5059.0
    assert isinstance(await old.step(Normal(Deposit("a", 1)), "old"), Duplicate)
    old.now = 5060.0
    assert isinstance(await old.step(Normal(Deposit("a", 1)), "old"), Accepted)


def test_window_bounds_are_checked() -> None:
    with pytest.raises(DefinitionError, match="idempotency_ttl"):
        engine(idempotency_ttl=-1.0)
    with pytest.raises(DefinitionError, match="idempotency_window"):
        engine(idempotency_window=-1)


def test_validate_is_strict_and_typed() -> None:
    e = engine()
    assert e.validate(Deposit("a", 1)) == Deposit("a", 1)
    with pytest.raises(InvalidInput, match="not a valid input for LedgerMachine"):
        e.validate({"account": "a", "amount": 1})
    with pytest.raises(InvalidInput):
        e.validate("Deposit")


def test_bad_options_are_definition_errors() -> None:
    with pytest.raises(DefinitionError):
        engine("sometimes")
