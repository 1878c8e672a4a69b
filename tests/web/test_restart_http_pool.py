"""A restart with a backlog of charges sent over HTTP: 1,500 pending charges go through an
``httpx.AsyncClient`` pool of 64 connections to a real server on 127.0.0.1 (a small HTTP/1.1
server on anyio, in-process), within the executor's concurrency, and the runtime stops within
its grace period both in the middle of the backlog (the calls on the wire are cancelled, the
rest stays pending) and after it. On asyncio and trio. A guard, not a benchmark: nothing here is
timed but against generous bounds."""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from fasm.persistence import MemoryStore
from fasm.runtime import ActionContext, Executor, Runtime
from tests._ledger import Charge, Charged, Deposit, Ledger, LedgerMachine, Note, Pay

pytestmark = pytest.mark.anyio

PENDING = 1_500
POOL = 64


class Provider:
    """A payment provider: ``POST /charge`` answers ``{"ok": true}`` after a millisecond, on
    keep-alive connections; it counts requests and the connections open at once."""

    def __init__(self) -> None:
        self.requests = 0
        self.keys: set[str] = set()
        self.open = 0
        self.most_open = 0
        self.port = 0

    async def handle(self, stream: SocketStream) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        reader = BufferedByteReceiveStream(stream)
        try:
            async with stream:
                while True:
                    head = await reader.receive_until(b"\r\n\r\n", 65_536)
                    lines = head.decode("latin-1").split("\r\n")
                    headers = {k.strip().lower(): v.strip() for k, _, v in
                               (line.partition(":") for line in lines[1:])}
                    length = int(headers.get("content-length", "0"))
                    body = await reader.receive_exactly(length) if length else b""
                    self.requests += 1
                    self.keys.add(json.loads(body)["key"])
                    await anyio.sleep(0.001)
                    answer = b'{"ok": true}'
                    await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                anyio.ClosedResourceError, ConnectionError):
            pass  # the client closed the connection
        finally:
            self.open -= 1


class Body(httpx.AsyncByteStream):
    """A request body iterated by a plain object. httpx's own (0.29) is an async generator,
    which trio reports with a ResourceWarning when a request is cancelled while it is sent
    (encode/httpx#3686); a stop cancels requests on the wire."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> Body:  # type: ignore[override]
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


async def quiet(note: Note) -> None:
    pass


async def never(action: Charge, ctx: ActionContext) -> Charged:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


def ledger(store: MemoryStore, charge: Any, **kw: Any) -> Runtime[Ledger, Any, Any, Any, Any, Any]:
    return Runtime(LedgerMachine(), initial_state=lambda: Ledger(balances={"a": 0}), store=store,
                   executors={Charge: charge}, handlers={Note: quiet}, **kw)


async def test_1500_pending_charges_restart_through_a_64_connection_pool(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fasm.runtime")
    store = MemoryStore()
    async with ledger(store, never, shutdown_grace=0.0) as rt:
        await rt.submit(Deposit("a", PENDING))
        for _ in range(PENDING):
            await rt.submit(Pay("a", 1))
    assert len(rt.in_flight) == PENDING  # the provider never answered: all pending at restart

    provider = Provider()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    provider.port = listener.extra(SocketAttribute.local_port)
    limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL)
    async with anyio.create_task_group() as server:
        server.start_soon(listener.serve, provider.handle)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{provider.port}",
                                     limits=limits, timeout=30.0) as http:
            done = 0
            enough = anyio.Event()

            async def charge(action: Charge, ctx: ActionContext) -> Charged:
                nonlocal done
                body = json.dumps({"key": ctx.idempotency_key, "amount": action.amount})
                request = http.build_request("POST", "/charge", content=body.encode())
                request.stream = Body(body.encode())
                r = await http.send(request)
                r.raise_for_status()
                done += 1
                if done == 300:
                    enough.set()
                return Charged(bool(r.json()["ok"]))

            executor = Executor(charge, concurrency=POOL)
            grace = 0.5
            # 1. Restart, and stop in the middle of the backlog: the calls on the wire are
            # cancelled within the grace, the rest stays pending for the next start.
            with anyio.fail_after(60):
                async with ledger(store, executor, shutdown_grace=grace) as rt:
                    await enough.wait()
                    with anyio.fail_after(grace + 5):
                        await rt.stop()
            left = len(rt.in_flight)
            assert 0 < left <= PENDING - 300
            assert len(rt.state.applied) == PENDING - left
            # 2. Restart again: the rest goes through, then a graceful stop.
            with anyio.fail_after(120):
                async with ledger(store, executor, shutdown_grace=grace) as rt:
                    await rt.wait_idle()
                    assert not rt.in_flight and len(rt.state.applied) == PENDING
                    assert set(rt.state.applied.values()) == {1}
                    with anyio.fail_after(grace + 5):
                        await rt.stop()
        server.cancel_scope.cancel()
    await listener.aclose()
    # Every charge reached the provider (a call cancelled on the wire is re-sent under its key),
    # never through more connections than the pool has.
    assert len(provider.keys) == PENDING and provider.requests >= PENDING
    assert provider.most_open <= POOL
    assert not [r for r in caplog.records if "abandoned" in r.getMessage()]
