"""The outside world of the clinic: a card processor and the patients' inboxes, and the executor
and handlers that connect them to the runtime.

The processor stands in for a real payment API. It outlives our process, and it honours
idempotency keys the way real processors do: a pre-authorisation sent again with a key it has seen
gets the first answer and authorises nothing new. That is what makes it safe for ``restore`` to
send a pre-authorisation again after a crash.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio

from fasm.runtime import ActionContext, Executor, Handler, RetryPolicy

from .machine import Authorized, Declined, Notify, PreAuthorize, VoidAuthorization


class ProcessorDown(ConnectionError):
    """A transient failure before the request reached the processor; the runtime retries."""


@dataclass
class Authorization:
    user: str
    amount: int
    code: str | None  # None: declined
    reason: str | None = None
    voided: bool = False


class CardProcessor:
    """Pre-authorises card payments, at most once per idempotency key.

    Args:
        declined: users whose card is declined.
        flaky: chance that a call fails before reaching the processor (retried).
        seed: seeds the flakiness.
        latency: seconds each call takes.
    """

    def __init__(self, *, declined: Iterable[str] = (), flaky: float = 0.0, seed: int = 0,
                 latency: float = 0.002) -> None:
        self.authorizations: dict[str, Authorization] = {}  # by idempotency key
        self.declined = set(declined)
        self.flaky = flaky
        self.latency = latency
        self.calls = 0
        self._rng = random.Random(seed)
        # Users whose bank does not answer: their calls wait until ``bank_back`` is set.
        self.silent: set[str] = set()
        self.bank_back = anyio.Event()
        # Authorise the next request, then never answer it (the window a crash falls into).
        self.lose_next_answer = False
        self.answer_lost = anyio.Event()

    async def authorize(self, key: str, user: str, amount: int) -> Authorization:
        """Authorise ``amount`` on ``user``'s card, or give the answer ``key`` got before.

        Raises:
            ProcessorDown: the call did not reach the processor (try again).
        """
        self.calls += 1
        await anyio.sleep(self.latency)
        if self.flaky and self._rng.random() < self.flaky:
            raise ProcessorDown("card processor unreachable")
        if user in self.silent:
            await self.bank_back.wait()
        found = self.authorizations.get(key)
        if found is None:
            if user in self.declined:
                found = Authorization(user, amount, None, "card declined")
            else:
                code = f"AUTH-{len(self.authorizations) + 1:04d}"
                found = Authorization(user, amount, code)
            self.authorizations[key] = found
        if self.lose_next_answer:
            self.lose_next_answer = False
            self.answer_lost.set()
            await anyio.sleep_forever()
        return found

    def void(self, code: str) -> None:
        for auth in self.authorizations.values():
            if auth.code == code:
                auth.voided = True

    def held(self) -> dict[str, int]:
        """Money authorised and not voided, by user (what patients see on their statements)."""
        out: dict[str, int] = {}
        for auth in self.authorizations.values():
            if auth.code is not None and not auth.voided:
                out[auth.user] = out.get(auth.user, 0) + auth.amount
        return out


def preauthorize_executor(processor: CardProcessor) -> Executor[PreAuthorize,
                                                                Authorized | Declined]:
    """The executor for ``PreAuthorize``: the idempotency key the runtime derives from the action
    id goes to the processor, so a retry or a re-send after a restart authorises once. After
    five failed attempts the failure becomes a ``Declined`` result, so the hold never waits on a
    processor that is down for good (the payment timeout bounds it anyway)."""

    async def preauthorize(action: PreAuthorize, ctx: ActionContext) -> Authorized | Declined:
        auth = await processor.authorize(ctx.idempotency_key, action.user, action.amount)
        if auth.code is None:
            return Declined(auth.reason or "declined")
        return Authorized(auth.code)

    return Executor(
        preauthorize,
        retry=RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=1.0, timeout=30.0),
        on_exhausted=lambda action, error: Declined(f"card processor unavailable ({error})"),
    )


@dataclass
class Inboxes:
    """Where notifications land; ``echo`` prints them as they arrive (the demo does)."""

    echo: bool = False
    messages: list[str] = field(default_factory=list)

    def of(self, user: str) -> list[str]:
        return [m.split(": ", 1)[1] for m in self.messages if m.startswith(f"{user}: ")]

    def handlers(self, processor: CardProcessor) -> dict[type, Handler]:
        async def notify(note: Notify) -> None:
            self.messages.append(f"{note.user}: {note.message}")
            if self.echo:
                print(f"    -> {note.user}: {note.message}")

        async def void(v: VoidAuthorization) -> None:
            processor.void(v.auth)

        return {Notify: notify, VoidAuthorization: void}
