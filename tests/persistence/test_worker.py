"""The stores' worker thread: calls run one at a time, in order, off the event loop; errors come
back; a cancelled caller still waits for its call; the thread ends at stop and a later call starts
a new one."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from fasm.persistence._worker import Worker

pytestmark = pytest.mark.anyio


async def test_calls_run_in_order_on_one_other_thread() -> None:
    worker = Worker("fasm-test")
    seen: list[tuple[int, int]] = []

    def record(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * 2

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(worker.run, record, i)
            await anyio.lowlevel.checkpoint()  # each call is queued before the next starts
    assert [i for i, _ in seen] == list(range(20))
    threads = {t for _, t in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert await worker.run(record, 21) == 42
    worker.stop()


async def test_an_error_is_raised_in_the_caller() -> None:
    worker = Worker("fasm-test")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await worker.run(fail)
    assert await worker.run(lambda: "still serving") == "still serving"
    worker.stop()


async def test_a_cancelled_caller_waits_for_its_call_to_end() -> None:
    worker = Worker("fasm-test")
    started, finished = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.2)
        finished.set()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, slow)
            await anyio.to_thread.run_sync(started.wait)
            scope.cancel()
    assert scope.cancelled_caught
    assert finished.is_set(), "the caller left before its call ended"
    worker.stop()


async def test_stop_ends_the_thread_and_a_later_call_starts_another() -> None:
    worker = Worker("fasm-test-restart")
    first = await worker.run(threading.get_ident)
    worker.stop()
    worker.stop()  # twice is fine
    for _ in range(100):
        if not any(t.ident == first for t in threading.enumerate()):
            break
        await anyio.sleep(0.01)
    else:
        pytest.fail("the worker thread did not end after stop")
    second = await worker.run(threading.get_ident)
    assert second != threading.get_ident()
    worker.stop()


def test_one_worker_serves_successive_event_loops() -> None:
    worker = Worker("fasm-test-loops")

    async def call() -> int:
        return await worker.run(lambda: 7)

    assert anyio.run(call) == 7
    assert anyio.run(call, backend="trio") == 7
    worker.stop()
