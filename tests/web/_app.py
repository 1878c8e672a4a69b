"""A small Starlette service on :mod:`fasm.web`, for the tests: the test ledger over HTTP.

``build(...)`` makes one for an in-process server; ``app`` (module level) is the one a uvicorn
subprocess serves (``uvicorn tests.web._app:app``), with the default failure handling: SIGTERM,
then exit status 1. ``POST /break`` makes every later commit fail: the store is down for good.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fasm import web
from fasm.errors import FasmError
from fasm.persistence import MemoryStore
from fasm.runtime import ActionContext, Runtime
from tests._ledger import Charge, Charged, Deposit, Ledger, LedgerMachine, Note, Pay


async def charge(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


async def quiet(note: Note) -> None:
    pass


def build(store: MemoryStore, *, timeout: float = 5.0, **options: Any) -> Starlette:
    """The service on ``store``; ``options`` go to :func:`fasm.web.lifespan`."""

    def make_runtime() -> Runtime[Any, Any, Any, Any, Any, Any]:
        return Runtime(LedgerMachine(), initial_state=lambda: Ledger(balances={"a": 100}),
                       store=store, executors={Charge: charge}, handlers={Note: quiet})

    async def balance(request: Request) -> Response:
        rt: Runtime[Ledger, Any, Any, Any, Any, Any] = request.state.runtime
        return JSONResponse({"a": await rt.read(lambda s: s.balances["a"])})

    def posting(make: Callable[[int], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            rt = request.state.runtime
            body = await request.json()
            key = web.idempotency_key(request.headers, scope=request.url.path)
            done = await web.submit(rt, make(int(body["amount"])), idempotency_key=key,
                                    timeout=timeout)
            return JSONResponse({"seq": done.seq, "duplicate": done.duplicate})
        return endpoint

    async def break_store(request: Request) -> Response:
        store.fail_next_commits = 10**9
        return JSONResponse({})

    async def fasm_error(request: Request, exc: Exception) -> Response:
        answer = web.http_error(exc)
        if answer is None:
            raise exc
        return JSONResponse(answer.body, answer.status, headers=answer.headers)

    return Starlette(
        routes=[Route("/balance", balance),
                Route("/deposit", posting(lambda n: Deposit("a", n)), methods=["POST"]),
                Route("/pay", posting(lambda n: Pay("a", n)), methods=["POST"]),
                Route("/break", break_store, methods=["POST"])],
        exception_handlers={FasmError: fasm_error},
        lifespan=web.lifespan(make_runtime, **options),
    )


app = build(MemoryStore(), shutdown_grace=1.0)
