"""Tasks of the Runtime that are not plain anyio: telling a process-stopping exception from a
failure, and starting the one task that no task group waits for."""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

__all__ = ("fatal", "leaves", "real_error", "spawn_detached")


def fatal(error: BaseException) -> bool:
    """True for what stops the process rather than fails an operation: a KeyboardInterrupt,
    a SystemExit, or any other non-``Exception`` that is not a cancellation (also inside an
    exception group)."""
    if isinstance(error, BaseExceptionGroup):
        return any(fatal(e) for e in leaves(error))
    return not isinstance(error, (Exception, anyio.get_cancelled_exc_class()))


def real_error(error: BaseException) -> BaseException:
    """The one exception an exception group of task groups carries besides cancellations."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    cancelled = anyio.get_cancelled_exc_class()
    real = [e for e in leaves(error) if not isinstance(e, cancelled)]
    return real[0] if len(real) == 1 else error


_DETACHED: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks


def spawn_detached(fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    """Start ``fn(*args)`` in a task that no task group waits for (the runtime's executors and
    handlers run there; see :meth:`Runtime.stop`). anyio has no portable way to do this, hence
    the one backend branch. ``fn`` must not raise: a trio system task that raises crashes the
    run."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass  # not in trio
        else:
            trio.lowlevel.spawn_system_task(fn, *args, context=contextvars.copy_context())
            return
    task = asyncio.get_running_loop().create_task(fn(*args))
    _DETACHED.add(task)
    task.add_done_callback(_DETACHED.discard)


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
