"""The executor attempt loop: one dispatched tracked action's attempts, each under its
deadline, retried with backoff until it returns a result (or ``on_exhausted`` gives one), and
the watchdog that reports attempts running slow."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pydantic

from .._actions import Tracked
from .._timer import Timer
from ..persistence._codec import Codec, Unencodable
from ._clock import Clock
from ._engine import StrictValidator, _strict_adapter
from ._events import ActionCompleted, ActionFailed, ActionRetried, ActionSlow, RuntimeEvent
from ._executors import ActionContext, Executor, with_deadline

__all__ = ("Attempts",)

log = logging.getLogger("fasm.runtime")  # the runtime's logger: records are the runtime's


@dataclass(eq=False, slots=True)
class _Call:
    """An executor call running now: reported slow at ``report_at`` (clock time)."""

    attempt: int
    started: float
    report_at: float


class Attempts:
    """Runs executor attempts for one runtime and watches them for slowness.

    Args:
        clock: time for deadlines, backoff and slowness.
        machine_name: the machine's name (for events).
        slow_action_after: see ``Runtime``; None turns the watchdog off.
        rng: the retry jitter's random source.
        emit: sends a runtime event to the listeners.
        timed: whether events carry wall-clock start times (only when there are listeners).
        result_type: the machine's tracked-result type, which every result must validate as.
        codec: the runtime's codec, which every result must be written by.

    ``identity`` (the store's or database's, part of every executor idempotency key) is set
    at start, before any attempt runs.
    """

    def __init__(self, clock: Clock, *, machine_name: str,
                 slow_action_after: float | None, rng: random.Random,
                 emit: Callable[[RuntimeEvent], None], timed: bool,
                 result_type: Any, codec: Callable[[], Codec]) -> None:
        self._clock = clock
        self._machine_name = machine_name
        self.slow_action_after = slow_action_after
        self._rng = rng
        self._emit = emit
        self._timed = timed
        self._result_type = result_type
        self._result_adapter: StrictValidator | None = None
        self._codec = codec
        self.identity = ""
        self.calls: dict[tuple[str, Any], _Call] = {}
        """Executor calls running now, by (machine key, action id): for the watchdog, and so
        that a stop that abandons them can say which."""
        self._watch_wake: anyio.Event | None = None  # the watchdog waits for a first call
        self._watch_sleep: anyio.CancelScope | None = None  # ... or sleeps until _watch_due
        self._watch_due = math.inf

    async def run(self, key: str, tracked: Tracked[Any, Any], spec: Executor[Any, Any]) -> Any:
        """Attempt ``tracked`` (emitted by machine key ``key``) until it gives a result; return
        the result."""
        policy = spec.retry
        attempt = 0
        extra: dict[str, Any] = {"fasm_key": key, "fasm_action_id": tracked.id}
        while True:
            attempt += 1
            started_ns = time.time_ns() if self._timed else 0
            deadline = None if policy.timeout is None else self._clock.now() + policy.timeout
            try:
                result = await self._attempt(key, tracked, spec, attempt, deadline)
                self._check_result(result)
            except Exception as e:
                if policy.max_attempts is not None and attempt >= policy.max_attempts:
                    assert spec.on_exhausted is not None
                    try:
                        result = spec.on_exhausted(tracked.action, e)
                        self._check_result(result)
                    except Exception as mapping_error:
                        log.error("on_exhausted for %r raised %r; retrying the action",
                                  tracked.id, mapping_error, extra=extra)
                    else:
                        log.warning("tracked action %r gave up after %d attempts: %r",
                                    tracked.id, attempt, e, extra=extra)
                        self._emit(ActionFailed(key, tracked.id, attempt, e, result,
                                                self._machine_name, started_ns))
                        return result
                delay = policy.delay(attempt, self._rng)
                # Proportionate: a WARNING for the first failure and at attempts 10, 100, 1000,
                # ... (an outage of a day logs a handful of lines), DEBUG otherwise; listeners
                # still get every ActionRetried.
                level = logging.WARNING if _loud_attempt(attempt) else logging.DEBUG
                log.log(level, "tracked action %r attempt %d failed: %r; retry in %.3fs",
                        tracked.id, attempt, e, delay, extra=extra)
                self._emit(ActionRetried(key, tracked.id, attempt, e, delay,
                                         self._machine_name, started_ns))
                await self._clock.sleep_until(self._clock.now() + delay)
                continue
            self._emit(ActionCompleted(key, tracked.id, attempt, self._machine_name,
                                       started_ns))
            return result

    async def _attempt(self, key: str, tracked: Tracked[Any, Any], spec: Executor[Any, Any],
                       attempt: int, deadline: float | None) -> Any:
        """One executor call, under its deadline, listed in ``calls`` while it runs."""
        now = self._clock.now()
        after = None if type(tracked.action) is Timer else self.slow_action_after
        call = _Call(attempt, now, now + after if after is not None else math.inf)
        ident = (key, tracked.id)
        self.calls[ident] = call
        if self._watch_wake is not None:
            self._watch_wake.set()
        elif call.report_at < self._watch_due and self._watch_sleep is not None:
            self._watch_sleep.cancel()
        try:
            result = await with_deadline(
                self._clock, deadline,
                spec.fn(tracked.action, self._context(key, tracked.id, attempt, deadline)))
        except Exception:
            # A call that ignored a stop's cancellation and ended late reports nothing more.
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise
        finally:
            del self.calls[ident]
            if not self.calls and self._watch_sleep is not None:
                self._watch_sleep.cancel()  # nothing to watch: leave no deadline on the clock
        await anyio.lowlevel.checkpoint_if_cancelled()
        return result

    async def watch_slow(self, after: float) -> None:
        """One task watches every running executor call: a call that has run ``after`` seconds
        (clock time) is reported (``_slow``), then again each time its running time doubles.
        It sleeps only while calls run, until the next report is due."""
        clock = self._clock
        while True:
            now = clock.now()
            for (key, action_id), call in list(self.calls.items()):
                if call.report_at <= now:
                    self._slow(key, action_id, call.attempt, now - call.started)
                    while call.report_at <= now:
                        call.report_at = call.started + 2 * (call.report_at - call.started)
            due = min((call.report_at for call in self.calls.values()), default=math.inf)
            if due == math.inf:  # no calls, or only timers (not watched)
                self._watch_wake = wake = anyio.Event()
                await wake.wait()
                self._watch_wake = None
                continue
            self._watch_due = due
            with anyio.CancelScope() as self._watch_sleep:
                await clock.sleep_until(self._watch_due)
            self._watch_sleep, self._watch_due = None, math.inf

    def _slow(self, key: str, action_id: Any, attempt: int, elapsed: float) -> None:
        log.warning("tracked action %r attempt %d has been running for %.1fs (slow_action_after="
                    "%ss); it is not cancelled", action_id, attempt, elapsed,
                    self.slow_action_after, extra={"fasm_key": key, "fasm_action_id": action_id})
        self._emit(ActionSlow(key, action_id, attempt, elapsed, self._machine_name))

    def _check_result(self, result: Any) -> None:
        """A result that does not validate field for field, or cannot be written as a record,
        fails its attempt (retried like an executor exception) instead of reaching the store."""
        if self._result_adapter is None:
            self._result_adapter = _strict_adapter(self._result_type)
        try:
            self._result_adapter.validate_python(result, strict=True)
        except pydantic.ValidationError as e:
            raise TypeError(
                f"executor returned {type(result).__qualname__}, not the machine's tracked "
                f"result type: {self._result_adapter.describe(e)}"
            ) from e
        try:
            self._codec().pack("tracked_result", result)
        except Unencodable as e:
            raise TypeError(f"executor returned {type(result).__qualname__}, which cannot be "
                            f"committed: {e}") from e

    def _context(self, key: str, action_id: Any, attempt: int,
                 deadline: float | None) -> ActionContext:
        return ActionContext(
            machine_key=key,
            action_id=action_id,
            idempotency_key=f"{self.identity}/{self._machine_name}/{key}/{action_id}",
            attempt=attempt,
            deadline=deadline,
        )


def _loud_attempt(attempt: int) -> bool:
    """Whether a failed attempt is logged at WARNING: the first, then 10, 100, 1000, ..."""
    while attempt >= 10 and attempt % 10 == 0:
        attempt //= 10
    return attempt == 1
