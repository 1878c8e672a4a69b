"""KeyedSimulation: many keys in one simulated run, messages between them, crashes at the
multi-key commit, per-key checks and global invariants, shrinking and replay. Broken banks of our
own show that each check finds its bug; the correct bank passes."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import strategies as st

from examples.bank.machine import (
    Account,
    Bank,
    BankInput,
    Deposit,
    Dispense,
    Dispensed,
    Freeze,
    Transfer,
    Withdraw,
    money,
    open_account,
)
from fasm import (
    DefinitionError,
    Delivered,
    Input,
    Rejected,
    StateMachine,
    Timer,
    TimerFired,
    Tracked,
    TrackedActionCompleted,
)
from fasm.persistence import MemoryStore
from fasm.testing import Checks, FaultPlan, KeyedSimulation, Simulation

KEYS = [f"acct-{i}" for i in range(6)]


def bank_inputs(rng: random.Random, states: Mapping[str, Account]) -> tuple[str, BankInput]:
    key = rng.choice(KEYS)
    roll = rng.random()
    if roll < 0.3:
        return key, Deposit(rng.randint(1, 50))
    if roll < 0.8:
        # Transfers mostly within what the account holds, so that most are accepted.
        amount = max(1, min(rng.randint(1, 40), states[key].balance))
        return key, Transfer(f"t{rng.getrandbits(32)}", rng.choice(KEYS), amount)
    if roll < 0.95:
        return key, Withdraw(f"w{rng.getrandbits(32)}", rng.randint(1, 20))
    return key, Freeze()


def conserved(states: Mapping[str, Account]) -> object:
    m = money(states.values())
    return m.conserved() or f"money made or lost: {m}"


def not_negative(account: Account) -> object:
    return account.balance >= 0 or f"{account.key} is overdrawn: {account.balance}"


def bank_sim(machine: Bank | None = None, **options: Any) -> KeyedSimulation[Account, BankInput]:
    return KeyedSimulation(machine or Bank(), initial_state=open_account, keys=KEYS,
                           inputs=options.pop("inputs", bank_inputs),
                           executors={Dispense: lambda a: Dispensed(a.id)},
                           invariants=[not_negative], global_invariants=[conserved], **options)


def test_the_bank_conserves_money_under_crashes_at_group_commits() -> None:
    report = bank_sim().run(seeds=30, steps=300)
    assert report.ok, report
    c = report.counts
    # Everything the simulation claims to exercise happened.
    assert c["group commits"] > 100 and c["crashes at a group commit"] > 10, c
    assert c["messages"] > 500 and c["duplicate submits"] > 10, c
    assert c["passivations"] > 50 and c["activations"] > 100, c
    for point in ("before-commit", "after-commit", "in-flight", "result-uncommitted"):
        assert c[f"crash:{point}"] > 0, point


def test_a_seed_is_one_exact_run_and_its_state_is_every_key() -> None:
    sim = bank_sim()
    first, again = sim.run_seed(3), sim.replay(3)
    assert first.trace[-50:] == again.trace[-50:] and first.counts == again.counts
    state = first.state
    assert isinstance(state, dict) and set(KEYS) <= set(state)
    # After the liveness phase nothing is in flight on any key, and money is exactly conserved.
    assert all(not a.sending and not a.dispensing for a in state.values())
    m = money(state.values())
    assert m.held == m.deposited > 0


class ForgetfulBank(Bank):
    """restore forgets the transfers in flight: a crash strands their money."""

    @staticmethod
    async def restore(state: Account, actions: Any) -> None:
        for ident, dispense in state.dispensing.items():
            actions.add(Tracked(ident, dispense))


class GenerousBank(Bank):
    """Refunds a transfer whose message was delivered as a duplicate (a resend after a crash):
    the money is credited at the receiver and given back to the sender."""

    @staticmethod
    async def stf(state: Account, input: Any, actions: Any) -> None:
        if isinstance(input, TrackedActionCompleted) and isinstance(input.result, Delivered) \
                and input.result.duplicate:
            send = state.sending.pop(input.id, None)
            if send is not None:
                state.balance += send.input.amount
            return
        await Bank.stf(state, input, actions)


def test_restore_that_forgets_a_transfer_is_found() -> None:
    report = bank_sim(ForgetfulBank()).run(seeds=20, steps=300)
    assert not report.ok
    failure = report.failures[0]
    assert failure.check == "restore" and "Send" in failure.message, failure


def test_money_made_by_a_duplicate_delivery_breaks_the_global_invariant() -> None:
    report = bank_sim(GenerousBank()).run(seeds=40, steps=300)
    assert not report.ok
    failure = report.failures[0]
    assert failure.check == "invariant" and "money made or lost" in failure.message, failure


def test_a_message_applied_twice_is_found() -> None:
    # Remembering no message keys, the receiver applies a message sent again after a crash.
    report = bank_sim(idempotency_window=0).run(seeds=40, steps=300)
    assert not report.ok
    failure = report.failures[0]
    assert failure.check == "idempotency" and "message from key" in failure.message, failure


def test_a_store_whose_in_flight_index_misses_keys_is_found(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def nothing(self: MemoryStore) -> list[str]:
        return []

    monkeypatch.setattr(MemoryStore, "keys_in_flight", nothing)
    report = bank_sim().run(seeds=20, steps=300)
    assert not report.ok
    failure = report.failures[0]
    assert failure.check == "restore" and "in-flight index" in failure.message, failure


def test_the_liveness_check_alone_finds_a_stranded_transfer() -> None:
    checks = Checks(restore=False)
    report = bank_sim(ForgetfulBank(), checks=checks).run(seeds=20, steps=300)
    assert not report.ok
    assert report.failures[0].check == "liveness", report.failures[0]


def test_a_keyed_failure_shrinks_to_the_same_short_run_every_time() -> None:
    sim = bank_sim(GenerousBank())
    seed = next(s for s in range(100) if not sim.run_seed(s, steps=300).ok)
    shrunk = sim.shrink_seed(seed, steps=300, budget=30)
    assert shrunk is not None and shrunk.check == "invariant"
    assert shrunk.step <= 30, shrunk
    again = sim.shrink_seed(seed, steps=300, budget=30)
    assert again is not None and again.step == shrunk.step and again.trace == shrunk.trace


def test_inputs_from_a_hypothesis_strategy_of_key_value_pairs() -> None:
    values = st.one_of(st.builds(Deposit, st.integers(1, 50)),
                       st.builds(Transfer, st.text("abc", min_size=4, max_size=8),
                                 st.sampled_from(KEYS), st.integers(1, 30)))
    sim = bank_sim(inputs=st.tuples(st.sampled_from(KEYS), values))
    report = sim.run(seeds=5, steps=100)
    assert report.ok, report
    assert report.counts["messages"] > 0


def test_bad_definitions_and_inputs_are_refused() -> None:
    with pytest.raises(DefinitionError, match="KeyedSimulation"):
        Simulation(Bank(), initial_state=open_account("a"), inputs=lambda rng, s: Deposit(1),
                   executors={Dispense: lambda a: Dispensed(a.id)})
    with pytest.raises(DefinitionError, match="max_active"):
        bank_sim(max_active=0)
    report = bank_sim(inputs=lambda rng, states: Deposit(1)).run(seeds=1)
    assert report.failures[0].check == "input"
    assert "(key, value)" in report.failures[0].message


def test_a_refused_message_is_refunded_and_faults_can_be_off() -> None:
    sim = KeyedSimulation(
        Bank(), initial_state=open_account, keys=["a", "b"], faults=FaultPlan.none(),
        inputs=_script([("b", Freeze()), ("a", Deposit(10)), ("a", Transfer("t1", "b", 4))]),
        executors={Dispense: lambda a: Dispensed(a.id)}, global_invariants=[conserved])
    result = sim.run_seed(0, steps=20)
    assert result.ok, result.failure
    a, b = result.state["a"], result.state["b"]
    assert (a.balance, a.refunded, b.balance) == (10, 4, 0)
    assert any("Refused" in line for line in result.trace)


def _script(items: list[tuple[str, BankInput]]) -> Any:
    it = iter(items)
    return lambda rng, states: next(it, None)


# -- timers per key -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    id: str
    until: float


@dataclass
class Holds:
    key: str
    open: dict[str, float] = field(default_factory=dict)
    placed: int = 0
    expired: int = 0


class HoldMachine(StateMachine[Holds, Hold, str, Timer, TimerFired]):
    """Each key keeps holds that expire by a durable timer."""

    machine_name = "tests.keyed.holds"

    async def stf(self, state: Holds, input: Input[Hold, str, TimerFired], actions: Any) -> None:
        if isinstance(input, TrackedActionCompleted):
            if state.open.pop(input.id, None) is not None:
                state.expired += 1
            return
        hold = input.value
        if hold.id in state.open:
            raise Rejected(f"{hold.id} is held already")
        state.open[hold.id] = hold.until
        state.placed += 1
        actions.add(Tracked(hold.id, Timer(at=hold.until)))

    async def restore(self, state: Holds, actions: Any) -> None:
        for ident, until in state.open.items():
            actions.add(Tracked(ident, Timer(at=until)))


class ForgetsTimers(HoldMachine):
    async def restore(self, state: Holds, actions: Any) -> None:
        pass


def holds_sim(machine: HoldMachine, **options: Any) -> KeyedSimulation[Holds, Hold]:
    def inputs(rng: random.Random, states: Mapping[str, Holds]) -> tuple[str, Hold]:
        return rng.choice(KEYS), Hold(f"h{rng.getrandbits(32)}", rng.uniform(0.0, 300.0))

    def counted(states: Mapping[str, Holds]) -> object:
        placed = sum(s.placed for s in states.values())
        left = sum(len(s.open) + s.expired for s in states.values())
        return placed == left or f"{placed} holds placed, {left} open or expired"

    return KeyedSimulation(machine, initial_state=Holds, keys=KEYS, inputs=inputs,
                           global_invariants=[counted], **options)


def test_timers_of_many_keys_survive_crashes() -> None:
    report = holds_sim(HoldMachine()).run(seeds=20, steps=200)
    assert report.ok, report
    assert report.counts["results:timer"] > 100 and report.counts["crashes"] > 20
    state = holds_sim(HoldMachine()).run_seed(1, steps=200).state
    assert all(not s.open for s in state.values())  # every hold expired by the end


def test_a_restore_that_forgets_timers_is_found_on_its_key() -> None:
    report = holds_sim(ForgetsTimers()).run(seeds=10, steps=200)
    assert not report.ok and report.failures[0].check == "restore", report
    report = holds_sim(ForgetsTimers(), checks=Checks(restore=False)).run(seeds=10, steps=200)
    assert not report.ok and report.failures[0].check == "liveness", report
    assert "key 'acct-" in report.failures[0].message


def test_a_key_the_factory_refuses_refuses_its_inputs_and_messages() -> None:
    def picky(key: str) -> Account:
        if key.startswith("x"):
            raise ValueError("no x accounts")
        return open_account(key)

    def inputs(rng: random.Random, states: Mapping[str, Account]) -> tuple[str, BankInput]:
        key, value = bank_inputs(rng, states)
        if isinstance(value, Transfer) and rng.random() < 0.3:
            value = Transfer(value.id, "x-nobody", value.amount)  # refused, then refunded
        return ("x-client" if rng.random() < 0.05 else key), value

    sim = KeyedSimulation(Bank(), initial_state=picky, keys=KEYS, inputs=inputs,
                          executors={Dispense: lambda a: Dispensed(a.id)},
                          global_invariants=[conserved])
    report = sim.run(seeds=10, steps=200)
    assert report.ok, report
    assert report.counts["keys refused"] > 20
    state = sim.run_seed(0, steps=200).state
    assert not any(k.startswith("x") for k in state)
    assert sum(a.refunded for a in state.values()) > 0


class CarelessBank(Bank):
    """Counts cash as paid out on every Dispensed, pending or not: a duplicated or late result
    pays it out twice."""

    @staticmethod
    async def stf(state: Account, input: Any, actions: Any) -> None:
        if isinstance(input, TrackedActionCompleted) and isinstance(input.result, Dispensed) \
                and input.id not in state.dispensing:
            state.paid_out += 1
            return
        await Bank.stf(state, input, actions)


def test_duplicated_and_late_results_reach_their_key() -> None:
    plan = FaultPlan.at_least_once()
    report = bank_sim(faults=plan).run(seeds=20, steps=300)
    assert report.ok, report
    assert report.counts["results:late"] > 5 and report.counts["results:duplicate"] > 5
    report = bank_sim(CarelessBank(), faults=plan).run(seeds=20, steps=300)
    assert not report.ok
    assert report.failures[0].check in ("duplicates", "invariant"), report.failures[0]
