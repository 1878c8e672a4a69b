"""One thread per store for its blocking calls, with the cheapest hand-off back to the event loop.

Why not ``anyio.to_thread.run_sync``: on this project's machines (virtual, 2 cores) a call through
it costs 120 to 200 us of hand-off alone, most of a durable commit's budget; a thread of our own fed
by a ``SimpleQueue``, which wakes the waiting task with the loop's own thread-safe call, costs
about 40 us less, and what remains is nearly all the kernel waking the loop's idle CPU after the
disk returned (bench/bench_persistence.py measures it beside a raw commit). That is the price of
keeping the disk off the event loop; stores offer ``inline=True`` for processes that would rather
block the loop than pay it.

One thread also gives what the stores need from it: their calls run one at a time, in the order
they were made, on a connection only that thread touches.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

__all__ = ("Worker",)

_T = TypeVar("_T")
_STOP = None


def _poster() -> Callable[[Callable[[], object]], object]:
    """The running event loop's thread-safe "call this soon" (fire and forget).

    anyio's own ``from_thread.run_sync`` would block the worker until the loop ran the call; the
    native calls below do not, so the worker can take its next job at once."""
    native = anyio.lowlevel.current_token().native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        return native.call_soon_threadsafe
    return native.run_sync_soon  # type: ignore[attr-defined, no-any-return]  # a TrioToken


class _Call:
    __slots__ = ("args", "done", "error", "fn", "post", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 post: Callable[[Callable[[], object]], object]) -> None:
        self.fn, self.args, self.post = fn, args, post
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:
            self.error = e
        try:
            self.post(self.done.set)
        except RuntimeError:
            pass  # the loop that asked has closed: nobody is waiting any more


class Worker:
    """A thread that runs blocking calls one at a time, in order, for async callers.

    The thread starts on the first call and ends at :meth:`stop` (a later call starts a new one),
    so a store can be closed and opened again, under another event loop too.

    Args:
        name: the thread's name (shown by debuggers and ``py-spy``).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Call | None] | None = None
        self._guard = threading.Lock()

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the worker thread and return its result (or raise its error).

        A cancelled caller still waits for the call to end before the cancellation goes on (as
        ``anyio.to_thread.run_sync`` does by default): the call runs to its end either way, and
        a caller that left early could not tell a commit that happened from one that did not.
        """
        call = _Call(fn, args, _poster())
        self._jobs().put(call)
        try:
            await call.done.wait()
        except BaseException:
            # Cancelled (the only way out of the wait): shielding only here keeps the common
            # path free of a cancel scope, which costs as much as the rest of the hand-off.
            with anyio.CancelScope(shield=True):
                await call.done.wait()
            raise
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[no-any-return]

    def stop(self) -> None:
        """Let the thread finish the calls it has and end. Safe to call twice."""
        with self._guard:
            jobs, self._queue = self._queue, None
        if jobs is not None:
            jobs.put(_STOP)

    def _jobs(self) -> queue.SimpleQueue[_Call | None]:
        jobs = self._queue
        if jobs is not None:
            return jobs
        with self._guard:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                threading.Thread(target=_serve, args=(self._queue,), name=self._name,
                                 daemon=True).start()
            return self._queue


def _serve(jobs: queue.SimpleQueue[_Call | None]) -> None:
    # A daemon thread: a process that exits without closing its store is not held up, and what
    # it was writing is left as after a crash, which every store recovers from.
    while (call := jobs.get()) is not _STOP:
        call.run()
