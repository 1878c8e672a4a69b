"""The payments service over HTTP: Starlette + uvicorn, fasm on SQLite, a provider in another
process.

Start the provider, then the service (each its own process; kill -9 the service at any moment
and start it again with the same ``--data``):

    python -m examples.payments_http.provider --port 8001 --db provider.db
    python -m examples.payments_http.service --port 8000 --data service-data \\
        --provider http://127.0.0.1:8001

and talk to it:

    curl -s -X POST localhost:8000/payments -H 'Idempotency-Key: order-1' \\
        -H 'Content-Type: application/json' -d '{"account": "ada", "amount": 25}'
    curl -s localhost:8000/payments/0
    curl -s localhost:8000/health

``POST /payments`` answers 201 with ``{"id": ..., "status": "pending", ...}`` once the payment is
durable (the charge runs after the answer, through the runtime's executor); the same
``Idempotency-Key`` again answers 201 with the same payment, marked ``"replayed": true``, at any
later time (the key is kept in the machine's state). Errors are answered by
``fasm.web.http_error``: a refusal (unknown account, not enough credit, a key reused for another
payment) is 409, a body that is not a payment 422 (a missing key 400); when the runtime cannot
answer in time the outcome is unknown (504): retry with the same key; a runtime that is stopping
or has failed answers 503 (and ``fasm.web.lifespan`` then stops the server, which exits 1 for the
process manager to restart it). ``GET /payments/{id}`` and ``GET /health`` read committed state
(``Runtime.read``), never a transition a crash could still undo.

The executor calls the provider with one ``httpx.AsyncClient`` whose pool holds as many
connections as the executor may run calls at once (``--concurrency``), so no call waits for a
connection while holding an executor slot, and ``restore``'s re-sent charges after a crash go
out ``--concurrency`` at a time. The provider's idempotency key is the one fasm gives the
executor (``ActionContext.idempotency_key``), the same for every retry and restart of a charge,
so a charge re-sent after a kill -9 is never charged twice. That key begins with the store's
identity, made once with the data directory, then the machine's name, its key and the action id
(the payment id), so a fresh data directory never sends the key of an old charge again (should
a key ever come back with other parameters, the provider refuses it, 422, and the executor
records that payment as declined: nothing was charged for it).

The charges are bounded: at most ``--max-pending`` payments acknowledged and not yet settled
(``Executor(max_pending=...)``); past it a POST waits up to half a second for room, then answers
503 with Retry-After (``fasm.Overloaded``), so the backlog, and what a restart re-sends, stay
bounded by what the provider can settle.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fasm import web
from fasm.errors import FasmError
from fasm.persistence import SQLiteStore
from fasm.runtime import ActionContext, Executor, RetryPolicy, Runtime

from .machine import (
    AccountExists,
    Charge,
    Charged,
    CheckStatus,
    Declined,
    KeyReused,
    OpenAccount,
    Pay,
    Payment,
    PaymentResult,
    Payments,
    PaymentsMachine,
)

__all__ = ("ACCOUNTS", "ProviderError", "make_app")

ACCOUNTS = {"ada": 10**9, "bob": 10**9, "cyd": 10**9, "dee": 100}
"""The accounts the service opens on its first start (name -> credit)."""

PaymentsRuntime = Runtime[Payments, Any, int, Any, PaymentResult, Any]


class ProviderError(Exception):
    """The provider did not answer with an outcome (it failed, timed out or was unreachable);
    the runtime tries again with the same idempotency key."""


def payment_json(pid: int, p: Payment) -> dict[str, Any]:
    return {"id": pid, "account": p.account, "amount": p.amount, "status": p.status,
            "txn": p.txn}


def make_app(data: Path, provider: str, *, concurrency: int = 32,
             submit_timeout: float = 10.0, max_pending: int = 2_000,
             admission_timeout: float = 0.5) -> Starlette:
    """The service's ASGI app: its state in ``data/payments.db``, charges sent to ``provider``.

    Args:
        data: the data directory (made if missing).
        provider: the provider's base URL.
        concurrency: most charges in flight at once: the executor's ``concurrency`` and the
            size of the HTTP pool to the provider.
        submit_timeout: seconds a POST waits for its transition before answering 504
            (outcome unknown: retry with the same key).
        max_pending: most charges acknowledged and not yet settled; past it a POST waits for
            room (the backlog a restart re-sends, and how far the charges may fall behind).
        admission_timeout: seconds a POST waits for that room before answering 503 (nothing
            was queued: a retry is safe).
    """
    data.mkdir(parents=True, exist_ok=True)
    client: httpx.AsyncClient | None = None

    async def charge(action: Charge | CheckStatus, ctx: ActionContext) -> PaymentResult:
        """Charge and CheckStatus alike: the provider charges a key at most once and answers a
        key it knows with its recorded outcome."""
        assert client is not None
        try:
            response = await client.post(
                "/charges", headers={"Idempotency-Key": ctx.idempotency_key},
                json={"payment": ctx.action_id, "account": action.account,
                      "amount": action.amount})
        except httpx.HTTPError as e:
            raise ProviderError(f"provider unreachable: {e!r}") from e
        if response.status_code == 200:
            return Charged(str(response.json()["txn"]))
        if response.status_code == 402:
            return Declined(str(response.json()["reason"]))
        if response.status_code == 422:  # the key of another charge: this one was not charged
            return Declined(f"provider refused the charge: {response.json()['error']}")
        raise ProviderError(f"provider answered {response.status_code}")

    def make_runtime() -> PaymentsRuntime:
        # The attempt timeout starts when the call does; the pool has a connection for every
        # call the executor lets run, so no attempt spends its timeout waiting for one.
        executor = Executor(charge, concurrency=concurrency, max_pending=max_pending,
                            retry=RetryPolicy(initial_backoff=0.05, max_backoff=2.0,
                                              timeout=10.0))
        return Runtime(PaymentsMachine(), initial_state=Payments, key="payments",
                       store=SQLiteStore(data / "payments.db"),
                       admission_timeout=admission_timeout,
                       executors={Charge: executor, CheckStatus: executor})

    runtime_lifespan = web.lifespan(make_runtime)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # fasm.web.lifespan runs the runtime; around it, the HTTP client its executor uses
        # (opened first, closed last) and, once it runs, the accounts of a first start.
        nonlocal client
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=provider, limits=limits,
                                     timeout=httpx.Timeout(5.0)) as client, \
                runtime_lifespan(app) as state:
            runtime: PaymentsRuntime = state["runtime"]
            for account, credit in ACCOUNTS.items():
                try:
                    await runtime.submit(OpenAccount(account, credit),
                                         idempotency_key=f"open-{account}")
                except AccountExists:
                    pass  # opened by an earlier run
            yield state

    async def pay(request: Request) -> Response:
        runtime: PaymentsRuntime = request.state.runtime
        key = web.idempotency_key(request.headers)
        if key is None:
            return JSONResponse({"error": "MissingKey",
                                 "message": "an Idempotency-Key header is required"}, 400)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": "InvalidBody",
                                 "message": "the body must be a JSON object"}, 422)
        # Pay's fields are checked strictly by the runtime: a wrong type is InvalidInput (422).
        account: Any = body.get("account")
        amount: Any = body.get("amount")
        committed = await web.submit(runtime, Pay(account, amount, key), idempotency_key=key,
                                     timeout=submit_timeout)
        replayed = committed.duplicate or not committed.actions

        def made_by_key(s: Payments) -> dict[str, Any] | None:  # a copy, not the live object
            pid = s.requests.get(key)
            return None if pid is None else payment_json(pid, s.payments[pid])

        payment = await runtime.read(made_by_key)  # committed: our transition is in it
        assert payment is not None, "a committed Pay has its request key in the state"
        if (payment["account"], payment["amount"]) != (account, amount):
            # the runtime's window answered a duplicate key without running the stf
            raise KeyReused(f"Idempotency-Key {key!r} was used for another payment")
        return JSONResponse({**payment, "replayed": replayed}, 201)

    async def get_payment(request: Request) -> Response:
        runtime: PaymentsRuntime = request.state.runtime
        pid = request.path_params["pid"]

        def find(s: Payments) -> dict[str, Any] | None:
            payment = s.payments.get(pid)
            return None if payment is None else payment_json(pid, payment)

        payment = await runtime.read(find)
        if payment is None:
            return JSONResponse({"error": "NotFound", "message": f"no payment {pid}"}, 404)
        return JSONResponse(payment)

    async def health(request: Request) -> Response:
        runtime: PaymentsRuntime = request.state.runtime

        def counts(s: Payments) -> dict[str, int]:
            by_status = Counter(p.status for p in s.payments.values())
            return {"payments": len(s.payments), "pending": by_status["pending"],
                    "confirmed": by_status["confirmed"], "declined": by_status["declined"]}

        return JSONResponse({"status": "ok", **await runtime.read(counts)})

    async def fasm_error(request: Request, exc: Exception) -> Response:
        answer = web.http_error(exc)
        if answer is None:
            raise exc
        return JSONResponse(answer.body, answer.status, headers=answer.headers)

    return Starlette(routes=[Route("/payments", pay, methods=["POST"]),
                             Route("/payments/{pid:int}", get_payment, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     exception_handlers={FasmError: fasm_error}, lifespan=lifespan)


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--data", type=Path, default=Path("service-data"), help="data directory")
    ap.add_argument("--provider", default="http://127.0.0.1:8001", help="provider base URL")
    ap.add_argument("--concurrency", type=int, default=32, help="charges in flight at once")
    ap.add_argument("--max-pending", type=int, default=2_000,
                    help="charges acknowledged and unsettled before a POST waits, then gets 503")
    args = ap.parse_args()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s [%(fasm_context)s] "
                                           "%(message)s"))
    handler.addFilter(web.LogContext())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    app = make_app(args.data, args.provider, concurrency=args.concurrency,
                   max_pending=args.max_pending)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
