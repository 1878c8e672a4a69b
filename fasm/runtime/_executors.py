"""Executors: how tracked actions are performed, retried, timed out, and given up on."""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

import anyio

from ..errors import DefinitionError
from ._clock import Clock, SystemClock

__all__ = ("ActionContext", "Executor", "ExecutorFn", "Handler", "HandlerContext", "RetryPolicy")

A = TypeVar("A")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What an executor knows about the call it is making.

    Attributes:
        machine_key: the key of the machine instance that emitted the action.
        action_id: the tracked action's id.
        idempotency_key: ``"<store identity>/<machine_name>/<machine_key>/<action_id>"`` (the
            store's or database's ``identity``, a UUID made with its data): stable across retries
            and restarts, so pass it to the outside system (a payment provider's idempotency key)
            to make a re-sent action safe.
        attempt: 1 for the first call, 2 for the first retry, ... (restarts start again at 1).
        deadline: the clock time this attempt is cancelled at, or None without a timeout.
    """

    machine_key: str
    action_id: Any
    idempotency_key: str
    attempt: int
    deadline: float | None


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """What a handler of untracked actions knows about the action it handles, given to a
    handler that takes a second argument (``async def handler(action, ctx)``).

    Attributes:
        machine_key: the key of the machine instance that emitted the action.
        seq: the sequence number of the transition that emitted it.
    """

    machine_key: str
    seq: int


ExecutorFn: TypeAlias = Callable[[A, ActionContext], Awaitable[R]]
Handler: TypeAlias = (Callable[[Any], Awaitable[None]]
                      | Callable[[Any, HandlerContext], Awaitable[None]])
"""``async fn(action)``, or ``async fn(action, ctx)`` to be given a :class:`HandlerContext`."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a failed executor call is tried again.

    The delay before attempt ``n + 1`` is ``min(max_backoff, initial_backoff * multiplier**(n-1))``
    scaled by a random factor in ``[1 - jitter, 1 + jitter]``, for any ``n``: once the growth
    passes ``max_backoff`` it stays there, however many attempts fail (retries that never stop
    never overflow).

    Args:
        max_attempts: give up after this many attempts (needs ``on_exhausted`` on the executor,
            which turns the failure into a result). None: never give up; retries go on at
            ``max_backoff`` and each failure is reported to listeners.
        timeout: seconds an attempt may take (clock time), after which it is cancelled and
            retried; None (the default) for no limit. There is no default because a retry
            re-sends the call: safe only when the outside system honours
            ``ctx.idempotency_key`` (a slow provider that succeeds would otherwise charge twice).
            The runtime's ``slow_action_after`` reports long attempts without cancelling them.
    """

    max_attempts: int | None = None
    initial_backoff: float = 0.1
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise DefinitionError("max_attempts must be >= 1 or None")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise DefinitionError("need 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise DefinitionError("need multiplier >= 1 and 0 <= jitter <= 1")
        if self.timeout is not None and self.timeout <= 0:
            raise DefinitionError("timeout must be > 0 or None")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The pause after failed attempt number ``attempt`` (1 or more; any size)."""
        try:
            growth = self.multiplier ** (attempt - 1)
        except OverflowError:  # 2.0 ** 1024 does not fit a float; it is past any cap anyway
            growth = math.inf
        base = min(self.max_backoff, self.initial_backoff * growth) if self.initial_backoff else 0.0
        return max(0.0, base * (1 + rng.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True, slots=True)
class Executor(Generic[A, R]):
    """An executor function with its policy.

    Args:
        fn: ``async def fn(action, ctx) -> result``. Raising means "try again" (per ``retry``).
        retry: the retry policy.
        on_exhausted: ``fn(action, error) -> result`` called when ``retry.max_attempts`` is
            reached; its return value is fed back to the stf as the action's result, so the
            action never silently vanishes. Required when ``max_attempts`` is set.
        concurrency: at most this many calls of this executor at once (default 64, below the
            connection pools of common HTTP clients: httpx and aiohttp allow 100; None: only the
            runtime's ``max_in_flight``). Keep it no larger than the pool of the client the
            executor calls through: calls beyond the pool wait inside it while their attempt
            timeout runs, time out unsent and are retried, whereas calls beyond ``concurrency``
            wait in the runtime, before their timeout starts.
        max_pending: at most this many actions of this executor in flight (emitted, committed
            and not yet completed, running or waiting) before submits wait (backpressure; see
            ``Runtime(max_pending_actions=...)``). None: only the runtime's overall limit.
    """

    fn: ExecutorFn[A, R]
    retry: RetryPolicy = RetryPolicy()
    on_exhausted: Callable[[A, BaseException], R] | None = None
    concurrency: int | None = 64
    max_pending: int | None = None

    def __post_init__(self) -> None:
        if self.retry.max_attempts is not None and self.on_exhausted is None:
            raise DefinitionError(
                "an executor with retry.max_attempts needs on_exhausted, which turns the final "
                "failure into a result for the stf; without it the tracked action would vanish"
            )
        if self.concurrency is not None and self.concurrency < 1:
            raise DefinitionError("concurrency must be >= 1 or None")
        if self.max_pending is not None and self.max_pending < 1:
            raise DefinitionError("max_pending must be >= 1 or None")


async def with_deadline(clock: Clock, deadline: float | None, awaitable: Any) -> Any:
    """Await ``awaitable``, cancelling it at clock time ``deadline`` (TimeoutError)."""
    if deadline is None:
        return await awaitable
    if isinstance(clock, SystemClock):
        with anyio.fail_after(max(0.0, deadline - clock.now())):
            return await awaitable
    timed_out = False
    result: Any = None
    error: Exception | None = None
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def watchdog() -> None:
                nonlocal timed_out
                await clock.sleep_until(deadline)
                timed_out = True
                scope.cancel()

            tg.start_soon(watchdog)
            try:
                result = await awaitable
            except Exception as e:
                error = e  # raised bare below, not wrapped in the task group's ExceptionGroup
            finally:
                tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if timed_out:
        raise TimeoutError(f"deadline {deadline} passed")
    return result


