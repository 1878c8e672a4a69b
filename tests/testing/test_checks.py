"""fasm.testing._checks: the helpers the simulation's checks share."""

from __future__ import annotations

import datetime
import enum
import random
from dataclasses import dataclass, field
from typing import Any

import pydantic

from fasm import Input, Normal, StateMachine, Timer, TimerFired
from fasm.testing import Checks, FaultPlan, Simulation
from fasm.testing._checks import deeply_immutable


@dataclass(frozen=True)
class Point:
    x: int
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class HoldsList:
    items: list[int] = field(default_factory=list)


@dataclass
class Plain:
    x: int = 0


class Frozen(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)
    x: int


class Thawed(pydantic.BaseModel):
    x: int


class Colour(enum.Enum):
    RED = 1


def test_deeply_immutable_accepts_only_what_cannot_change_in_place() -> None:
    for value in (1, "a", None, 1.5, b"x", Colour.RED, datetime.date(2026, 1, 1),
                  (1, ("a", None)), frozenset({1}), Point(1, ("a",)), Frozen(x=1)):
        assert deeply_immutable(value), value
    for value in ([1], {}, {1}, (1, [2]), HoldsList(), Plain(), Thawed(x=1),
                  Point(1, ([1],)), object()):  # type: ignore[arg-type]
        assert not deeply_immutable(value), value


# A machine whose stf changes its (mutable) input in place: the simulation must decode such an
# input afresh at every restart, as a new process would, and not hand the replay the object an
# earlier replay changed (the determinism check then sees no difference between runs).


@dataclass
class Add:
    amounts: list[int]


@dataclass
class Total:
    value: int = 0
    seen: int = 0


class ConsumesItsInput(StateMachine[Total, Add, int, Timer, TimerFired]):
    machine_name = "tests.ConsumesItsInput"

    async def stf(self, state: Total, input: Input[Add, int, TimerFired], actions: Any) -> None:
        match input:
            case Normal(Add(amounts=amounts)):
                while amounts:
                    state.value += amounts.pop()
                state.seen += 1

    async def restore(self, state: Total, actions: Any) -> None:
        pass


def consumes_its_input(faults: FaultPlan) -> Simulation[Total, Add]:
    def inputs(rng: random.Random, state: Total) -> Add:
        return Add([rng.randint(1, 5) for _ in range(3)])

    def total_grows(state: Total) -> bool:
        return state.value >= 3 * state.seen

    return Simulation(ConsumesItsInput(), initial_state=Total, inputs=inputs,
                      invariants=[total_grows], checks=Checks.invariants_only(), faults=faults,
                      steps=150)


def test_a_resent_submit_is_a_fresh_copy_of_what_the_client_sent() -> None:
    """After a crash a client resends the submits it got no answer for (and, with
    ``resubmit``, some it did): the stf that consumed its input in place before the crash must
    get the input as sent, not the object it emptied."""
    report = consumes_its_input(FaultPlan(crash=0.2, keyed=1.0, resubmit=0.2)).run(seeds=5)
    assert report.ok, report
    assert report.counts["resent"] > 10


def test_a_mutated_mutable_input_is_decoded_afresh_at_every_restart() -> None:
    report = consumes_its_input(FaultPlan(crash=0.2, keyed=0.0, resubmit=0.0)).run(seeds=5)
    assert report.ok, report
    assert report.counts["crashes"] > 10
