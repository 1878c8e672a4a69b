"""The examples run, do what their output says, and stay true to the docs that quote them.

Each example's ``main()`` runs on asyncio and trio; focused tests pin the behaviour each example
exists to show (a rejection leaves state unchanged, a redemption is applied exactly once across a
crash, handlers are called, the runtime rolls back a careless stf); a subprocess run checks that
``python examples/x.py`` works as the README says; and the docs' code blocks are checked against
the example files they say they come from.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Never

import anyio
import pytest

from examples import coffee_shop as shop
from examples import csm
from fasm import ActionList, Normal, Rejected, Tracked, TrackedActionCompleted, Untracked
from fasm.persistence import MemoryStore
from fasm.runtime import Rollback, Runtime

ROOT = Path(__file__).resolve().parents[2]

# -- csm: the counter -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_csm_main_agrees_both_ways() -> None:
    report = await csm.main()
    assert report.direct.final == report.runtime.final == csm.Counter(3)
    assert report.direct.rejected == report.runtime.rejected == [
        csm.Decrement(by=10), csm.Decrement(by=1)]
    assert report.direct.changes == report.runtime.changes == [
        csm.Changed(0, 1), csm.Changed(1, 6), csm.Changed(6, 4), csm.Changed(4, 0),
        csm.Changed(0, 3)]
    # Five committed transitions, durable: a new Runtime on the same store loads them.
    assert (report.reopened, report.reopened_seq) == (csm.Counter(3), 5)


@pytest.mark.anyio
@pytest.mark.parametrize("value", [csm.Decrement(by=3), csm.Increment(by=-3)])
async def test_counter_underflow_is_rejected_and_state_unchanged(value: csm.CounterInput) -> None:
    machine, state = csm.CounterMachine(), csm.Counter(2)
    actions: ActionList[Never, Never, csm.Changed] = ActionList()
    with pytest.raises(csm.Underflow):
        await machine.stf(state, Normal(value), actions)
    assert state == csm.Counter(2)
    assert list(actions) == []


@pytest.mark.anyio
async def test_counter_underflow_through_the_runtime_moves_neither_state_nor_seq() -> None:
    seen: list[csm.Changed] = []

    async def display(change: csm.Changed) -> None:
        seen.append(change)

    async with Runtime(csm.CounterMachine(), initial_state=csm.Counter,
                       handlers={csm.Changed: display}) as rt:
        await rt.submit(csm.Increment(by=2))
        with pytest.raises(csm.Underflow):
            await rt.submit(csm.Decrement(by=5))
        assert (rt.state, rt.seq) == (csm.Counter(2), 1)
        committed = await rt.submit(csm.Decrement(by=2))  # still serving
        assert committed.seq == 2
        assert committed.actions == (Untracked(csm.Changed(2, 0)),)
        await rt.wait_idle()  # handlers run after the commit, on their own time
    assert seen == [csm.Changed(0, 2), csm.Changed(2, 0)]


@pytest.mark.anyio
async def test_counter_refuses_a_tracked_result_it_never_asked_for() -> None:
    actions: ActionList[Never, Never, csm.Changed] = ActionList()
    state = csm.Counter(1)
    bogus: Any = TrackedActionCompleted(1, None)
    with pytest.raises(TypeError):
        await csm.CounterMachine().stf(state, bogus, actions)
    assert state == csm.Counter(1)


# -- coffee_shop: the loyalty app -----------------------------------------------------------------


@pytest.mark.anyio
async def test_coffee_shop_main() -> None:
    report = await shop.main()

    assert report.direct.customers == {"ada": shop.Customer(points=25, free_coffees=1)}
    assert report.direct.pending == {}

    run = report.shop
    assert run.final.customers == {"ada": shop.Customer(points=25, free_coffees=1),
                                   "bob": shop.Customer(points=100, free_coffees=0)}
    assert run.final.pending == {}
    assert run.retries == 2 + 3  # ada: two failures then success; bob: four attempts
    assert run.rejected == ["InsufficientPoints", "UnknownCustomer"]
    assert run.rolled_back
    assert run.devices.notifications == ["ada: Your free coffee is ready"]
    assert "ada: Enjoy your free coffee! (FREE-0001)" in run.devices.screen
    assert any(line.startswith("bob: Sorry, no free coffee") for line in run.devices.screen)

    rec = report.recovery
    assert rec.at_crash.pending == {1: shop.Redemption("cy", 100)}
    assert rec.recovered.customers == {"cy": shop.Customer(points=0, free_coffees=1)}
    assert rec.recovered.pending == {}
    assert (rec.results_applied, rec.vouchers_issued) == (1, 1)
    assert rec.notifications == ["cy: Your free coffee is ready"]


def _state(**points: int) -> shop.LoyaltyApp:
    return shop.LoyaltyApp(customers={n: shop.Customer(points=p) for n, p in points.items()})


async def _stf(state: shop.LoyaltyApp, input: Any) -> list[Any]:
    actions: ActionList[int, shop.Redeem, shop.UiAction] = ActionList()
    await shop.LoyaltyMachine().stf(state, input, actions)
    return list(actions)


@pytest.mark.anyio
async def test_buying_coffee_earns_points_and_shows_a_stamp() -> None:
    state = shop.LoyaltyApp()
    assert await _stf(state, Normal(shop.BuyCoffee("ada"))) == [
        Untracked(shop.ShowStamp("ada", 25))]
    await _stf(state, Normal(shop.BuyCoffee("ada")))
    assert state.customers == {"ada": shop.Customer(points=50)}


@pytest.mark.anyio
async def test_redemption_holds_points_and_records_the_tracked_action_in_state() -> None:
    state = _state(ada=130)
    actions = await _stf(state, Normal(shop.RedeemFreeCoffee("ada")))
    assert actions[0] == Tracked(1, shop.Redeem("ada", 100))
    # The tracked action is in state, in the same transition: restore can find it.
    assert state.pending == {1: shop.Redemption("ada", 100)}
    assert (state.customers["ada"].points, state.next_redemption_id) == (30, 2)

    await _stf(state, TrackedActionCompleted(1, shop.Approved("V1")))
    assert state.customers["ada"] == shop.Customer(points=30, free_coffees=1)
    assert state.pending == {}

    # A second result for the same id is refused and changes nothing: applied once.
    before = copy.deepcopy(state)
    with pytest.raises(shop.UnknownRedemption):
        await _stf(state, TrackedActionCompleted(1, shop.Approved("V1")))
    assert state == before


@pytest.mark.anyio
async def test_declined_redemption_gives_the_points_back() -> None:
    state = _state(bob=100)
    await _stf(state, Normal(shop.RedeemFreeCoffee("bob")))
    actions = await _stf(state, TrackedActionCompleted(1, shop.Declined("down")))
    assert state.customers["bob"] == shop.Customer(points=100, free_coffees=0)
    assert state.pending == {}
    assert Untracked(shop.UpdatePoints("bob", 100)) in actions


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("make", "value", "error"),
    [
        (lambda: _state(ada=99), shop.RedeemFreeCoffee("ada"), shop.InsufficientPoints),
        (lambda: _state(ada=100), shop.RedeemFreeCoffee("zoe"), shop.UnknownCustomer),
        (lambda: shop.LoyaltyApp(customers={"ada": shop.Customer(points=200)},
                                 pending={1: shop.Redemption("ada", 100)}, next_redemption_id=2),
         shop.RedeemFreeCoffee("ada"), shop.RedemptionPending),
    ],
)
async def test_refused_redemptions_leave_state_unchanged(
    make: Callable[[], shop.LoyaltyApp], value: shop.ShopInput, error: type[Rejected]
) -> None:
    state = make()
    before = copy.deepcopy(state)
    with pytest.raises(error):
        await _stf(state, Normal(value))
    assert state == before


@pytest.mark.anyio
async def test_restore_re_emits_exactly_the_pending_redemptions_in_id_order() -> None:
    state = shop.LoyaltyApp(
        customers={"ada": shop.Customer(), "bob": shop.Customer()},
        pending={7: shop.Redemption("bob", 100), 3: shop.Redemption("ada", 100)},
        next_redemption_id=8)
    actions: ActionList[int, shop.Redeem, shop.UiAction] = ActionList()
    await shop.LoyaltyMachine().restore(state, actions)
    assert list(actions) == [Tracked(3, shop.Redeem("ada", 100)),
                             Tracked(7, shop.Redeem("bob", 100))]
    actions.clear()
    await shop.LoyaltyMachine().restore(_state(ada=500), actions)
    assert list(actions) == []


@pytest.mark.anyio
async def test_the_careless_gift_really_mutates_before_raising() -> None:
    """The premise of the rollback tests below: called directly, the stf leaves damage."""
    state = _state(ada=50)
    with pytest.raises(shop.UnknownCustomer):
        await _stf(state, Normal(shop.GiftPoints("ada", "zoe", 20)))
    assert state.customers["ada"].points == 30


async def _gift_to_a_stranger(rollback: Rollback) -> tuple[shop.LoyaltyApp, shop.LoyaltyApp]:
    devices = shop.Devices()
    async with Runtime(shop.LoyaltyMachine(), initial_state=shop.LoyaltyApp,
                       executors={shop.Redeem: shop.rewards_executor(shop.RewardsService())},
                       handlers=devices.handlers(), rollback=rollback) as rt:
        await rt.submit(shop.BuyCoffee("ada"))
        before = copy.deepcopy(rt.state)
        with pytest.raises(shop.UnknownCustomer):
            await rt.submit(shop.GiftPoints("ada", "zoe", 20))
        await rt.submit(shop.BuyCoffee("bob"))  # the next input sees the rolled-back state
        after = copy.deepcopy(rt.state)
    return before, after


@pytest.mark.anyio
@pytest.mark.parametrize("rollback", ["reload", "copy"])
async def test_runtime_rolls_back_an_stf_that_mutated_then_raised(rollback: Rollback) -> None:
    before, after = await _gift_to_a_stranger(rollback)
    assert before.customers["ada"] == shop.Customer(points=25)
    assert after.customers == {"ada": shop.Customer(points=25), "bob": shop.Customer(points=25)}


@pytest.mark.parametrize("rollback", ["trust", "trust-rejected"])
@pytest.mark.anyio
async def test_trust_rollback_keeps_the_damage_so_the_check_above_means_something(
        rollback: Rollback) -> None:
    # "trust-rejected" (the default) trusts a Rejected: a machine that raises one after
    # mutating keeps the damage, which fasm.testing's atomicity check reports.
    _, after = await _gift_to_a_stranger(rollback)
    assert after.customers["ada"] == shop.Customer(points=5)


@pytest.mark.anyio
async def test_untracked_actions_reach_their_handlers() -> None:
    devices = shop.Devices()
    service = shop.RewardsService()
    async with Runtime(shop.LoyaltyMachine(), initial_state=_state(ada=100),
                       executors={shop.Redeem: shop.rewards_executor(service)},
                       handlers=devices.handlers()) as rt:
        await rt.submit(shop.RedeemFreeCoffee("ada"))
        await rt.wait_idle()  # results committed and handlers done
    assert devices.screen == ["ada: Redeeming your free coffee...",
                              "ada: Enjoy your free coffee! (FREE-0001)"]
    assert devices.notifications == ["ada: Your free coffee is ready"]


@pytest.mark.anyio
async def test_crash_and_restart_applies_the_redemption_exactly_once() -> None:
    service = shop.RewardsService()
    rec = await shop.crash_and_recover(service)
    assert rec.at_crash.customers["cy"] == shop.Customer(points=0, free_coffees=0)
    assert rec.recovered.customers["cy"] == shop.Customer(points=0, free_coffees=1)
    assert rec.results_applied == 1
    # Sent twice (before the crash and by restore), with one idempotency key: one voucher.
    assert service.calls == 2
    assert list(service.vouchers.values()) == ["FREE-0001"]
    (key,) = service.vouchers
    identity, rest = key.split("/", 1)  # the store's identity, then machine, key and action id
    assert identity and rest == "examples.coffee_shop.LoyaltyMachine/default/1"


@pytest.mark.anyio
async def test_restart_on_the_same_store_object_after_a_crash() -> None:
    """Reusing the closed store object works as well as a new one over the same data."""
    store, service, devices = MemoryStore(), shop.RewardsService(), shop.Devices()

    def runtime() -> Any:
        return Runtime(shop.LoyaltyMachine(), initial_state=_state(dee=100), store=store,
                       executors={shop.Redeem: shop.rewards_executor(service)},
                       handlers=devices.handlers())

    service.lose_next_answer = True
    with anyio.CancelScope() as crash:
        async with runtime() as rt:
            await rt.submit(shop.RedeemFreeCoffee("dee"))
            await service.answer_lost.wait()
            crash.cancel()
            await anyio.sleep_forever()
    assert crash.cancelled_caught

    async with runtime() as rt:
        assert rt.seq == 1
        assert rt.in_flight == {1: shop.Redeem("dee", 100)}  # re-emitted by restore
        await rt.wait_idle()
        assert rt.state.customers["dee"] == shop.Customer(points=0, free_coffees=1)
    assert devices.notifications == ["dee: Your free coffee is ready"]
    assert len(service.vouchers) == 1

    async with runtime() as rt:  # and a third start finds nothing left to do
        assert rt.in_flight == {}
        assert rt.state.customers["dee"] == shop.Customer(points=0, free_coffees=1)


# -- the runtime behaviour the examples rely on ---------------------------------------------------


@pytest.mark.anyio
async def test_graceful_stop_lets_running_handlers_finish() -> None:
    """Leaving the block waits for a handler still running (it was cancelled silently before
    e394191), so the coffee shop's last notification is not lost at a clean stop."""
    seen: list[csm.Changed] = []

    async def slow_display(change: csm.Changed) -> None:
        await anyio.sleep(0.01)
        seen.append(change)

    async with Runtime(csm.CounterMachine(), initial_state=csm.Counter,
                       handlers={csm.Changed: slow_display}, shutdown_grace=5.0) as rt:
        await rt.submit(csm.Increment())
    assert seen == [csm.Changed(0, 1)]


# -- run as scripts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "line"),
    [
        ("csm.py", "Both ways agree: True"),
        ("coffee_shop.py", "results applied 1, vouchers issued 1"),
    ],
)
def test_example_runs_as_a_script(script: str, line: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert line in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
