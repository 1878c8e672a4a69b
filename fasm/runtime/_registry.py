"""Which executor serves a tracked action and which handler an untracked one: the tables a
runtime checks against its machine's declared action types when it is made."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_origin

from .._machine import type_members
from .._timer import Timer, TimerFired
from ..errors import DefinitionError
from ._clock import Clock
from ._executors import Executor, ExecutorFn, Handler

__all__ = ("check_executors", "check_handlers", "lookup", "registered")


async def _timer_executor(clock: Clock, action: Timer) -> TimerFired:
    """The built-in timer executor. The runtime fires its timers from one heap instead
    (:class:`~fasm.runtime._dispatch.TimerHeap`); this runs only a ``Timer`` subclass."""
    await clock.sleep_until(action.at)
    return TimerFired(at=action.at, now=clock.now())


def check_executors(
    machine: str, tracked_action: Any,
    given: Mapping[type[Any], Executor[Any, Any] | ExecutorFn[Any, Any]], clock: Clock,
) -> tuple[dict[type[Any], Executor[Any, Any]], Executor[Any, Any] | None]:
    """The executor table of a machine (named ``machine``) whose tracked-action type is
    ``tracked_action``, and the built-in timer executor in it (None when the machine declares
    no ``Timer`` or one is registered).

    Raises:
        DefinitionError: an executor is registered for a class the machine does not declare,
            or a declared class has none.
    """
    declared = [m for m in (get_origin(m) or m for m in type_members(tracked_action))
                if isinstance(m, type)]  # Send[Credit] is declared as Send
    table: dict[type[Any], Executor[Any, Any]] = {}
    for cls, spec in given.items():
        if not any(issubclass(m, cls) for m in declared):
            raise DefinitionError(
                f"executor registered for {cls.__qualname__}, which is not in "
                f"{machine}'s tracked-action type"
            )
        table[cls] = spec if isinstance(spec, Executor) else Executor(spec)
    builtin_timer: Executor[Any, Any] | None = None
    if Timer in declared and not any(issubclass(Timer, c) for c in table):
        table[Timer] = builtin_timer = Executor(lambda a, _ctx: _timer_executor(clock, a))
    missing = [m.__qualname__ for m in declared if lookup(table, m) is None]
    if missing:
        raise DefinitionError(
            f"no executor for tracked action type(s) {', '.join(missing)} of "
            f"{machine}: pass executors={{Type: fn}}"
        )
    return table, builtin_timer


def check_handlers(machine: str, untracked: Any,
                   given: dict[type[Any], Handler]) -> dict[type[Any], Handler]:
    """``given``, checked against the machine's untracked type ``untracked``.

    Raises:
        DefinitionError: a handler is registered for a class the machine does not declare,
            or a declared class has none.
    """
    declared = [m for m in type_members(untracked) if isinstance(m, type)]
    for cls in given:
        if not any(issubclass(m, cls) for m in declared):
            raise DefinitionError(
                f"handler registered for {cls.__qualname__}, which is not in "
                f"{machine}'s untracked-action type"
            )
    missing = [m.__qualname__ for m in declared if lookup(given, m) is None]
    if missing:
        raise DefinitionError(
            f"no handler for untracked action type(s) {', '.join(missing)} of "
            f"{machine}: pass handlers={{Type: fn}}"
        )
    return given


def registered(table: Mapping[type[Any], Any], cls: type[Any]) -> type[Any] | None:
    """The class ``cls`` is registered under in ``table`` (itself or its nearest base)."""
    for c in cls.__mro__:
        if c in table:
            return c
    return None


def lookup(table: Mapping[type[Any], Any], cls: type[Any]) -> Any:
    """What ``table`` holds for ``cls`` or its nearest base with an entry, or None."""
    found = table.get(cls)
    if found is not None:
        return found
    for base in cls.__mro__[1:]:
        found = table.get(base)
        if found is not None:
            return found
    return None
