"""A counter state machine: the Rust crate's ``csm`` example, in fasm.

The smallest machine worth having. It shows the shape every fasm machine has, without tracked
actions to distract from it:

* the stf validates first, adds its action descriptions next (``add`` is the fallible step), and
  mutates state last, so a refused input leaves the counter exactly as it was;
* an expected refusal (going below zero) is its own :class:`~fasm.Rejected` subclass, so a caller
  can tell "no" from a bug;
* the stf never prints: it *describes* the change (an untracked ``Changed``) and whoever drives
  the machine decides what to do with the description.

It is driven twice, with the same script: by calling ``stf`` in a plain loop with an
:class:`~fasm.ActionList` (what a unit test or a simulation does), and through the
:class:`~fasm.runtime.Runtime` on a memory store (what a service does). Both must end in the same
state, which is what determinism buys.

Run it: ``python examples/csm.py``. tests/core/test_examples.py runs it too.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Never

from fasm import (
    ActionList,
    ActionsContainer,
    Input,
    Normal,
    Rejected,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
    Untracked,
)
from fasm.persistence import MemoryStore
from fasm.runtime import Runtime

# -- the machine ----------------------------------------------------------------------------------


@dataclass
class Counter:
    """The state: one number that never goes below zero."""

    value: int = 0


@dataclass(frozen=True)
class Increment:
    by: int = 1


@dataclass(frozen=True)
class Decrement:
    by: int = 1


@dataclass(frozen=True)
class Reset:
    pass


CounterInput = Increment | Decrement | Reset


@dataclass(frozen=True)
class Changed:
    """Untracked action: "the counter went from ``before`` to ``after``" (Rust: ``Incremented``).

    Fire-and-forget: a display that misses one after a crash shows the next one.
    """

    before: int
    after: int


class Underflow(Rejected):
    """The input would take the counter below zero. Expected, so not a bug: a Rejected."""


Actions = ActionsContainer[Never, Never, Changed]


class CounterMachine(StateMachine[Counter, CounterInput, Never, Never, Never, Changed]):
    """No tracked actions (the three ``Never``), one untracked action type."""

    # The name stored with every record. Set it, so that the records do not depend on whether
    # this file runs as ``__main__`` or is imported as a module.
    machine_name = "examples.csm.CounterMachine"

    async def stf(
        self, state: Counter, input: Input[CounterInput, Never, Never], actions: Actions
    ) -> None:
        # 1. Validate and prepare: compute the new value without touching state.
        match input:
            case Normal(Increment(by=by)):
                after = state.value + by
            case Normal(Decrement(by=by)):
                after = state.value - by
            case Normal(Reset()):
                after = 0
            case TrackedActionCompleted():
                raise TypeError("the counter emits no tracked actions, so no result can arrive")
        if after < 0:
            raise Underflow(f"{state.value} - {state.value - after} would be {after}")

        # 2. Fallible operations first: add may raise (a bounded container that is full).
        actions.add(Untracked(Changed(before=state.value, after=after)))

        # 3. Mutate state last: the point of no return.
        state.value = after

    async def restore(self, state: Counter, actions: Actions) -> None:
        """Nothing is ever pending: a counter has no tracked actions to emit again."""


# -- driving it -----------------------------------------------------------------------------------

SCRIPT: tuple[CounterInput, ...] = (
    Increment(),
    Increment(by=5),
    Decrement(by=2),
    Decrement(by=10),  # 4 - 10: refused
    Reset(),
    Decrement(),  # 0 - 1: refused
    Increment(by=3),
)


@dataclass
class Run:
    """What one way of driving the machine ended with."""

    final: Counter
    changes: list[Changed] = field(default_factory=list)
    rejected: list[CounterInput] = field(default_factory=list)


async def drive_directly(script: tuple[CounterInput, ...] = SCRIPT) -> Run:
    """Call ``stf`` in a plain loop: the caller clears the container before each call and acts on
    its contents only when the call succeeded, which is what the Runtime does for you."""
    machine = CounterMachine()
    state = Counter()
    actions: ActionList[Never, Never, Changed] = ActionList()
    run = Run(final=state)
    for value in script:
        actions.clear()
        before = copy.deepcopy(state)
        try:
            await machine.stf(state, Normal(value), actions)
        except Underflow as e:
            # Nothing to undo: the stf validated before it mutated. Check it anyway; a plain loop
            # has no rollback, so an stf that broke the rule would leave its damage here.
            assert state == before, "the stf changed state before it raised"
            run.rejected.append(value)
            print(f"  {value}: rejected ({e}); counter stays {state.value}")
            continue
        for action in actions:
            match action:
                case Untracked(Changed() as change):
                    run.changes.append(change)
                    print(f"  {value}: changed from {change.before} to {change.after}")
                case Tracked():
                    raise AssertionError("the counter never emits tracked actions")
    return run


async def drive_through_runtime(
    store: MemoryStore, script: tuple[CounterInput, ...] = SCRIPT
) -> Run:
    """Submit the script to a Runtime: each ``submit`` returns once the transition is committed to
    the store, or raises the rejection, in which case neither state nor seq moved."""
    changes: list[Changed] = []

    async def display(change: Changed) -> None:
        # An untracked handler: the runtime calls it after the commit, fire-and-forget.
        changes.append(change)

    rejected: list[CounterInput] = []
    async with Runtime(
        CounterMachine(), initial_state=Counter, store=store, handlers={Changed: display}
    ) as rt:
        for value in script:
            try:
                committed = await rt.submit(value)
            except Underflow as e:
                rejected.append(value)
                print(f"  {value}: rejected ({e}); counter stays {rt.state.value}, "
                      f"seq stays {rt.seq}")
                continue
            print(f"  {value}: committed at seq {committed.seq}, counter = {rt.state.value}")
        final = copy.deepcopy(rt.state)
    print(f"  the display handler saw: {[(c.before, c.after) for c in changes]}")
    return Run(final=final, changes=changes, rejected=rejected)


async def reopen(store: MemoryStore) -> tuple[Counter, int]:
    """Start a new Runtime on the same store: it loads what was committed, so ``initial_state``
    is not used."""
    async with Runtime(
        CounterMachine(), initial_state=Counter, store=store, handlers={Changed: _ignore}
    ) as rt:
        return copy.deepcopy(rt.state), rt.seq


async def _ignore(change: Changed) -> None:
    pass


@dataclass
class Report:
    """What ``main`` found, for tests to check."""

    direct: Run
    runtime: Run
    reopened: Counter
    reopened_seq: int


async def main() -> Report:
    print("Counter driven by calling stf directly:")
    direct = await drive_directly()
    print(f"  final counter: {direct.final.value}")

    print("\nCounter driven through the Runtime (memory store):")
    store = MemoryStore()
    runtime = await drive_through_runtime(store)
    print(f"  final counter: {runtime.final.value}")

    reopened, seq = await reopen(store)
    print(f"\nA new Runtime on the same store starts at counter {reopened.value}, seq {seq}")

    same = direct.final == runtime.final and direct.changes == runtime.changes
    print(f"\nBoth ways agree: {same}")
    return Report(direct, runtime, reopened, seq)


if __name__ == "__main__":
    asyncio.run(main())
