"""A coffee shop loyalty app: the Rust crate's ``coffee_shop`` example, in fasm.

Customers earn points for every coffee they buy; 100 points buy a free coffee. The example shows
each kind of thing a fasm machine emits and each guarantee the runtime adds:

* **Tracked action**: redeeming a free coffee calls the chain's rewards service (an outside API
  that issues a voucher). The stf records the redemption in state and emits ``Redeem``; the
  voucher comes back later as ``TrackedActionCompleted(id, Approved(voucher))``.
* **Untracked actions**: screen updates and push notifications, handled by handlers,
  fire-and-forget.
* **Restore**: after a crash, ``restore`` re-emits every redemption that state says is pending.
  The executor passes the action's idempotency key to the rewards service, so a re-sent request
  gets the first voucher back instead of a second one, and the result is applied exactly once.
* **Atomicity**: a refused input leaves state as it was. ``GiftPoints`` is written carelessly on
  purpose (it mutates, then raises): the Runtime rolls that back, a plain loop does not.

It is driven three ways: by calling ``stf`` and ``restore`` directly, through a Runtime with real
(in-process) executors and handlers including a flaky rewards service and a retry policy, and
through a crash: a Runtime is cancelled while a redemption is in flight, and a new one on the
same store finishes it.

Run it: ``python examples/coffee_shop.py``. tests/core/test_examples.py runs it too.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import anyio

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
from fasm.runtime import (
    ActionContext,
    ActionRetried,
    Executor,
    Handler,
    RetryPolicy,
    Runtime,
    RuntimeEvent,
    TransitionCommitted,
)

POINTS_PER_COFFEE = 25
FREE_COFFEE_POINTS = 100

# -- state ----------------------------------------------------------------------------------------


@dataclass
class Customer:
    points: int = 0
    free_coffees: int = 0


@dataclass
class Redemption:
    """A free coffee asked of the rewards service and not yet answered. Its points are held."""

    customer: str
    points: int


@dataclass
class LoyaltyApp:
    customers: dict[str, Customer] = field(default_factory=dict)
    # Every tracked action in flight is recorded here, by id: restore reads nothing else.
    pending: dict[int, Redemption] = field(default_factory=dict)
    # Ids come from this counter, never from randomness, so a replay derives the same ones.
    next_redemption_id: int = 1


# -- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuyCoffee:
    customer: str


@dataclass(frozen=True)
class RedeemFreeCoffee:
    customer: str


@dataclass(frozen=True)
class GiftPoints:
    sender: str
    recipient: str
    points: int


ShopInput = BuyCoffee | RedeemFreeCoffee | GiftPoints

# -- tracked action: the rewards service ----------------------------------------------------------


@dataclass(frozen=True)
class Redeem:
    """Ask the rewards service for a free-coffee voucher."""

    customer: str
    points: int


@dataclass(frozen=True)
class Approved:
    voucher: str


@dataclass(frozen=True)
class Declined:
    reason: str


RedemptionResult = Approved | Declined

# -- untracked actions: the screen and the phone --------------------------------------------------


@dataclass(frozen=True)
class ShowStamp:
    customer: str
    points: int


@dataclass(frozen=True)
class UpdatePoints:
    customer: str
    points: int


@dataclass(frozen=True)
class ShowMessage:
    customer: str
    text: str


@dataclass(frozen=True)
class PushNotification:
    customer: str
    text: str


ScreenUpdate = ShowStamp | UpdatePoints | ShowMessage
UiAction = ScreenUpdate | PushNotification

# -- rejections -----------------------------------------------------------------------------------


class UnknownCustomer(Rejected):
    pass


class InsufficientPoints(Rejected):
    pass


class RedemptionPending(Rejected):
    pass


class UnknownRedemption(Rejected):
    """A result for a redemption that is not pending (a late duplicate): the runtime logs and
    drops it, and state is unchanged."""


# -- the machine ----------------------------------------------------------------------------------

Actions = ActionsContainer[int, Redeem, UiAction]


class LoyaltyMachine(
    StateMachine[LoyaltyApp, ShopInput, int, Redeem, RedemptionResult, UiAction]
):
    # The name stored with every record; set so that it does not depend on whether this file
    # runs as ``__main__`` or is imported.
    machine_name = "examples.coffee_shop.LoyaltyMachine"

    async def stf(
        self,
        state: LoyaltyApp,
        input: Input[ShopInput, int, RedemptionResult],
        actions: Actions,
    ) -> None:
        match input:
            case Normal(BuyCoffee(customer=name)):
                buy_coffee(state, name, actions)
            case Normal(RedeemFreeCoffee(customer=name)):
                request_redemption(state, name, actions)
            case Normal(GiftPoints(sender=sender, recipient=recipient, points=points)):
                gift_points_carelessly(state, sender, recipient, points)
            case TrackedActionCompleted(id=redemption_id, result=result):
                complete_redemption(state, redemption_id, result, actions)

    async def restore(self, state: LoyaltyApp, actions: Actions) -> None:
        # In id order, however the dict was built (a decoded checkpoint, a migration).
        for redemption_id, redemption in sorted(state.pending.items()):
            actions.add(Tracked(redemption_id, Redeem(redemption.customer, redemption.points)))


def buy_coffee(state: LoyaltyApp, name: str, actions: Actions) -> None:
    points = state.customers[name].points if name in state.customers else 0
    actions.add(Untracked(ShowStamp(name, points + POINTS_PER_COFFEE)))
    customer = state.customers.setdefault(name, Customer())
    customer.points += POINTS_PER_COFFEE


def request_redemption(state: LoyaltyApp, name: str, actions: Actions) -> None:
    # 1. Validate: every check before any change.
    customer = state.customers.get(name)
    if customer is None:
        raise UnknownCustomer(name)
    if any(r.customer == name for r in state.pending.values()):
        raise RedemptionPending(f"{name} already has a free coffee on its way")
    if customer.points < FREE_COFFEE_POINTS:
        raise InsufficientPoints(f"{name} has {customer.points} points, needs "
                                 f"{FREE_COFFEE_POINTS}")

    # 2. Prepare: the id comes from state.
    redemption_id = state.next_redemption_id

    # 3. Fallible operations first.
    actions.add(Tracked(redemption_id, Redeem(name, FREE_COFFEE_POINTS)))
    actions.add(Untracked(ShowMessage(name, "Redeeming your free coffee...")))

    # 4. Mutate last, recording the tracked action in the transition that emits it.
    state.next_redemption_id += 1
    state.pending[redemption_id] = Redemption(name, FREE_COFFEE_POINTS)
    customer.points -= FREE_COFFEE_POINTS


def complete_redemption(
    state: LoyaltyApp, redemption_id: int, result: RedemptionResult, actions: Actions
) -> None:
    redemption = state.pending.get(redemption_id)
    if redemption is None:
        raise UnknownRedemption(f"redemption {redemption_id} is not pending")
    name = redemption.customer
    customer = state.customers[name]
    match result:
        case Approved(voucher=voucher):
            actions.add(Untracked(ShowMessage(name, f"Enjoy your free coffee! ({voucher})")))
            actions.add(Untracked(PushNotification(name, "Your free coffee is ready")))
            del state.pending[redemption_id]
            customer.free_coffees += 1
        case Declined(reason=reason):
            refunded = customer.points + redemption.points
            actions.add(Untracked(ShowMessage(name, f"Sorry, no free coffee: {reason}")))
            actions.add(Untracked(UpdatePoints(name, refunded)))
            del state.pending[redemption_id]
            customer.points = refunded


def gift_points_carelessly(state: LoyaltyApp, sender: str, recipient: str, points: int) -> None:
    """Move points between customers. WRONG ORDER ON PURPOSE: it takes the sender's points before
    it checks the recipient, so a gift to a stranger raises after a mutation. The Runtime's
    rollback hides this from the next input; fasm.testing's atomicity check reports it."""
    giver = state.customers.get(sender)
    if giver is None:
        raise UnknownCustomer(sender)
    if giver.points < points:
        raise InsufficientPoints(f"{sender} has {giver.points} points")
    giver.points -= points  # mutated ...
    receiver = state.customers.get(recipient)
    if receiver is None:
        raise UnknownCustomer(recipient)  # ... then raised
    receiver.points += points


# -- the outside world ----------------------------------------------------------------------------


class RewardsService:
    """Stands in for the chain's rewards API. It outlives our process, like any outside system.

    It honours idempotency keys the way payment and rewards APIs do: a request with a key it has
    seen gets the first answer and issues nothing new. That is what makes it safe for restore to
    send a redemption again after a crash.
    """

    def __init__(self) -> None:
        self.vouchers: dict[str, str] = {}  # idempotency key -> voucher
        self.calls = 0
        self.fail_next = 0  # calls that fail before reaching the service (flaky network)
        self.lose_next_answer = False  # issue the voucher, then never answer (the crash window)
        self.answer_lost = anyio.Event()

    async def redeem(self, idempotency_key: str, customer: str, points: int) -> str:
        self.calls += 1
        await anyio.sleep(0.002)  # network latency
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError("rewards service unreachable")
        voucher = self.vouchers.get(idempotency_key)
        if voucher is None:
            voucher = self.vouchers[idempotency_key] = f"FREE-{len(self.vouchers) + 1:04d}"
        if self.lose_next_answer:
            self.lose_next_answer = False
            self.answer_lost.set()
            await anyio.sleep_forever()
        return voucher


def rewards_executor(service: RewardsService) -> Executor[Redeem, RedemptionResult]:
    """The executor for ``Redeem``: retried with backoff; if the service stays down, the failure
    becomes a ``Declined`` result, so the redemption never silently vanishes."""

    async def redeem(action: Redeem, ctx: ActionContext) -> RedemptionResult:
        print(f"  [rewards] redeem {action.points} points for {action.customer} "
              f"(id {ctx.action_id}, attempt {ctx.attempt})")
        return Approved(await service.redeem(ctx.idempotency_key, action.customer,
                                             action.points))

    return Executor(
        redeem,
        retry=RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05, timeout=5.0),
        on_exhausted=lambda action, error: Declined(f"rewards service unavailable ({error})"),
    )


@dataclass
class Devices:
    """The screen and the customers' phones: where untracked actions end up."""

    screen: list[str] = field(default_factory=list)
    notifications: list[str] = field(default_factory=list)

    async def show(self, update: ScreenUpdate) -> None:
        match update:
            case ShowStamp(customer=name, points=points):
                line = f"{name}: stamp! {points} points"
            case UpdatePoints(customer=name, points=points):
                line = f"{name}: {points} points"
            case ShowMessage(customer=name, text=text):
                line = f"{name}: {text}"
        self.screen.append(line)
        print(f"  [screen] {line}")

    async def push(self, note: PushNotification) -> None:
        await anyio.sleep(0.001)  # a call to the push service
        self.notifications.append(f"{note.customer}: {note.text}")
        print(f"  [phone] {note.customer}: {note.text}")

    def handlers(self) -> dict[type[Any], Handler]:
        return {ShowStamp: self.show, UpdatePoints: self.show, ShowMessage: self.show,
                PushNotification: self.push}



# -- 1. calling stf and restore directly ----------------------------------------------------------


def describe(actions: ActionList[int, Redeem, UiAction]) -> None:
    for action in actions:
        match action:
            case Tracked(id=action_id, action=request):
                print(f"    [tracked {action_id}] {request}")
            case Untracked(action=ui):
                print(f"    [untracked] {ui}")


async def run_directly() -> LoyaltyApp:
    """Drive the stf by hand, the way the Rust example does and a unit test would: the caller
    plays the rewards service and feeds its answer back as ``TrackedActionCompleted``."""
    machine = LoyaltyMachine()
    state = LoyaltyApp()
    actions: ActionList[int, Redeem, UiAction] = ActionList()

    for _ in range(5):
        actions.clear()
        await machine.stf(state, Normal(BuyCoffee("ada")), actions)
    print(f"  ada bought 5 coffees: {state.customers['ada'].points} points")

    actions.clear()
    await machine.stf(state, Normal(RedeemFreeCoffee("ada")), actions)
    print(f"  ada redeems: {state.customers['ada'].points} points left, pending {state.pending}")
    describe(actions)

    actions.clear()
    await machine.stf(state, TrackedActionCompleted(1, Approved("FREE-0001")), actions)
    print(f"  the rewards service approves: ada has {state.customers['ada'].free_coffees} "
          f"free coffee(s), pending {state.pending}")
    describe(actions)

    before = copy.deepcopy(state)
    actions.clear()
    try:
        await machine.stf(state, Normal(RedeemFreeCoffee("ada")), actions)
    except InsufficientPoints as e:
        print(f"  ada redeems again: rejected ({e}); state unchanged: {state == before}")

    # A plain loop has no rollback: the careless stf leaves its damage behind (on a scratch copy
    # here). Through the Runtime the same input changes nothing; see run_shop.
    scratch = copy.deepcopy(state)
    try:
        await machine.stf(scratch, Normal(GiftPoints("ada", "zoe", 20)), actions)
    except UnknownCustomer as e:
        print(f"  ada gifts 20 points to {e}, who is no customer: rejected, yet ada now has "
              f"{scratch.customers['ada'].points} points instead of "
              f"{state.customers['ada'].points}")

    crashed = LoyaltyApp(customers={"ada": Customer(points=0)},
                         pending={2: Redemption("ada", 100)}, next_redemption_id=3)
    actions.clear()
    await machine.restore(crashed, actions)
    print(f"  restore on a state with redemption 2 pending emits {len(actions)} action(s):")
    describe(actions)
    return state


# -- 2. through the Runtime -----------------------------------------------------------------------


@dataclass
class ShopRun:
    final: LoyaltyApp
    devices: Devices
    retries: int
    rejected: list[str]
    rolled_back: bool


async def run_shop(service: RewardsService) -> ShopRun:
    """Real executors and handlers: a flaky rewards service retried with backoff, one that stays
    down and is mapped to ``Declined``, refused inputs, and the runtime's rollback."""
    devices = Devices()
    events: list[RuntimeEvent] = []
    rejected: list[str] = []
    runtime = Runtime(
        LoyaltyMachine(),
        initial_state=LoyaltyApp,
        store=MemoryStore(),
        executors={Redeem: rewards_executor(service)},
        handlers=devices.handlers(),
        listeners=[events.append],
        seed=0,  # fixes the retry jitter, so the demo prints the same every run
        # The careless gift raises a Rejected *after* mutating, which breaks the promise the
        # default rollback ("trust-rejected") relies on; "reload" undoes it at a store read.
        rollback="reload",
    )
    async with runtime as rt:
        for name in ["ada"] * 5 + ["bob"] * 4:
            await rt.submit(BuyCoffee(name))
        await rt.wait_idle()  # the stamps are on the screen: wait_idle waits for handlers too

        service.fail_next = 2  # the first two calls fail: the retry policy takes over
        committed = await rt.submit(RedeemFreeCoffee("ada"))
        print(f"  ada's redemption committed at seq {committed.seq}; in flight: {rt.in_flight}")
        await rt.wait_idle()  # the voucher came back, its transition is committed, ada is told
        print(f"  ada: {rt.state.customers['ada']}")

        service.fail_next = 10  # down for longer than the policy's 4 attempts
        await rt.submit(RedeemFreeCoffee("bob"))
        await rt.wait_idle()
        print(f"  bob: {rt.state.customers['bob']} (the points came back)")

        seq, before = rt.seq, copy.deepcopy(rt.state)
        for value in (RedeemFreeCoffee("ada"), GiftPoints("ada", "zoe", 20)):
            try:
                await rt.submit(value)
            except Rejected as e:
                rejected.append(type(e).__name__)
                print(f"  {value}: rejected ({type(e).__name__}: {e})")
        rolled_back = rt.seq == seq and rt.state == before
        print(f"  after both refusals: seq {rt.seq} (was {seq}), ada has "
              f"{rt.state.customers['ada'].points} points: state unchanged = {rolled_back}")
        final = copy.deepcopy(rt.state)
    retries = sum(isinstance(e, ActionRetried) for e in events)
    return ShopRun(final, devices, retries, rejected, rolled_back)


# -- 3. a crash with a redemption in flight, and the restart --------------------------------------


@dataclass
class Recovery:
    at_crash: LoyaltyApp
    recovered: LoyaltyApp
    results_applied: int  # commits of TrackedActionCompleted, both runtimes together
    vouchers_issued: int
    notifications: list[str]


async def crash_and_recover(service: RewardsService) -> Recovery:
    """Cancel a Runtime abruptly while the rewards service holds the answer to a redemption, then
    start a new Runtime on the same store: restore re-sends the redemption with the same
    idempotency key, the service answers with the voucher it already issued, and the result is
    committed once."""
    store = MemoryStore()
    devices = Devices()
    events: list[RuntimeEvent] = []

    def runtime(
        store: MemoryStore,
    ) -> Runtime[LoyaltyApp, ShopInput, int, Redeem, RedemptionResult, UiAction]:
        return Runtime(LoyaltyMachine(), initial_state=LoyaltyApp, store=store,
                       executors={Redeem: rewards_executor(service)},
                       handlers=devices.handlers(), listeners=[events.append], seed=0)

    service.lose_next_answer = True
    with anyio.CancelScope() as crash:
        async with runtime(store) as rt:
            for _ in range(4):
                await rt.submit(BuyCoffee("cy"))
            await rt.submit(RedeemFreeCoffee("cy"))
            await service.answer_lost.wait()  # the voucher is issued; its answer never comes
            at_crash = copy.deepcopy(rt.state)
            print(f"  crash! redemption in flight {rt.in_flight}, vouchers issued "
                  f"{len(service.vouchers)}")
            crash.cancel()
            await anyio.sleep_forever()

    # A new store object over the same data, as a new process would open the same database.
    async with runtime(MemoryStore(data=store.data)) as rt:
        print(f"  restarted at seq {rt.seq}; restore re-sent: {rt.in_flight}")
        await rt.wait_idle()
        recovered = copy.deepcopy(rt.state)
    applied = sum(isinstance(e, TransitionCommitted) and e.input_kind.startswith(
        "TrackedActionCompleted") for e in events)
    print(f"  cy: {recovered.customers['cy']}, pending {recovered.pending}; results applied "
          f"{applied}, vouchers issued {len(service.vouchers)}")
    return Recovery(at_crash, recovered, applied, len(service.vouchers), devices.notifications)


@dataclass
class Report:
    """What ``main`` found, for tests to check."""

    direct: LoyaltyApp
    shop: ShopRun
    recovery: Recovery


async def main() -> Report:
    print("=== 1. Calling stf and restore directly ===")
    direct = await run_directly()
    print("\n=== 2. Through the Runtime, with executors and handlers ===")
    shop = await run_shop(RewardsService())
    print("\n=== 3. Crash with a redemption in flight, then restart ===")
    recovery = await crash_and_recover(RewardsService())
    return Report(direct, shop, recovery)


if __name__ == "__main__":
    # Show the runtime's warnings (retries, given-up actions) in line with the demo's output.
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="  [log] %(message)s")
    asyncio.run(main())
