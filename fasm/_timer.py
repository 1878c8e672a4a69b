"""Durable timers: a built-in tracked action that the runtime's timer executor completes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("Timer", "TimerFired")


@dataclass(frozen=True, slots=True)
class Timer:
    """Ask to be woken at clock time ``at`` (seconds, the runtime clock's epoch).

    Emit it as a tracked action, ``Tracked(id, Timer(at=deadline))``, and record it in state like
    any tracked action: ``restore`` re-emits it after a crash, so the timer survives restarts. Add
    ``Timer`` to the machine's tracked-action type and :class:`TimerFired` to its result type; the
    runtime provides the executor.
    """

    at: float


@dataclass(frozen=True, slots=True)
class TimerFired:
    """The result of a :class:`Timer`: it was due at ``at`` and fired at clock time ``now``."""

    at: float
    now: float
