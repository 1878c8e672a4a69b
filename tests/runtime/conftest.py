"""Helpers for runtime tests: virtual time that jumps to the next deadline."""

from __future__ import annotations

import math
from collections.abc import Callable

from anyio import wait_all_tasks_blocked

from fasm.runtime import ManualClock


async def run_clock(clock: ManualClock, until: Callable[[], bool], *, limit: int = 1000) -> None:
    """Let every task run until blocked, then jump the clock to the next deadline; repeat until
    ``until()`` holds. Fails instead of hanging."""
    for _ in range(limit):
        await wait_all_tasks_blocked()
        if until():
            return
        if clock.next_deadline == math.inf:
            await wait_all_tasks_blocked()
            if until():
                return
            raise AssertionError("nothing left to wait for, and the condition does not hold")
        clock.advance_to(clock.next_deadline)
    raise AssertionError(f"condition still false after {limit} clock jumps")
