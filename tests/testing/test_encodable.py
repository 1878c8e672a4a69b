"""The simulation flags state that cannot be encoded at the step that put it there (check
``encodable``), naming the field, with the seed, step and replay line of any other failure; never
as a crash of the run, and not only when a checkpoint is next due."""

from __future__ import annotations

from fasm.persistence import Snapshot
from fasm.testing import Checks
from tests.testing.machines import Actions, Desk, DeskMachine, desk_sim


class OverflowsCounter(DeskMachine):
    """Once 5 orders are placed, ids jump to 2**64: an int msgpack cannot write."""

    def place(self, state: Desk, qty: int, customer: str, actions: Actions) -> None:
        super().place(state, qty, customer, actions)
        if state.next_id == 5:
            state.next_id = 2**64


class WaitsWithSurrogate(DeskMachine):
    """Keeps a waiting customer's name with a lone surrogate (which UTF-8 cannot write)."""

    async def stf(self, state: Desk, input: object, actions: Actions) -> None:
        await super().stf(state, input, actions)  # type: ignore[arg-type]
        if state.waiting:
            state.waiting.add("\ud800")


def test_unencodable_state_is_flagged_at_the_step_that_made_it() -> None:
    report = desk_sim(OverflowsCounter()).run(seeds=3)
    assert not report.ok
    failure = report.failures[0]
    assert failure.check == "encodable", str(failure)
    assert "next_id" in failure.message and "cannot be encoded" in failure.message
    # The step that placed the fifth order, not a later checkpoint: it is the last one traced.
    accepted = [line for line in failure.trace if "-> seq" in line]
    seq = accepted[-1].split("-> seq ")[1].split(":")[0]
    assert f"(seq {seq})" in failure.message
    assert failure.seed is not None and "replay" in str(failure)
    again = desk_sim(OverflowsCounter()).replay(failure.seed)
    assert again.failure is not None
    assert (again.failure.check, again.failure.step, again.failure.message) == \
        (failure.check, failure.step, failure.message)


def test_unencodable_state_names_the_field_under_snapshot_too() -> None:
    report = desk_sim(WaitsWithSurrogate(), durability=Snapshot()).run(seeds=3)
    failure = report.failures[0]
    assert failure.check == "encodable", str(failure)
    assert "waiting" in failure.message


def test_with_the_check_off_a_due_checkpoint_still_reports_instead_of_crashing() -> None:
    report = desk_sim(OverflowsCounter(), durability=Snapshot(),
                      checks=Checks(encodable=False)).run(seeds=3)
    failure = report.failures[0]
    assert failure.check == "encodable", str(failure)
    assert "when a checkpoint was due" in failure.message and "next_id" in failure.message
