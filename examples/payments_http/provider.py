"""A card provider in its own process: a small Starlette app that charges at most once per key.

    python -m examples.payments_http.provider --port 8001 --db provider.db

``POST /charges`` with a JSON body ``{"payment": 7, "account": "ada", "amount": 25}`` and an
``Idempotency-Key`` header charges the card, or declines it, and records the outcome under the
key in its own SQLite file; a request with a key it has seen returns the recorded outcome and
charges nothing (the way real providers treat idempotency keys), and a known key sent with other
parameters is refused (422) rather than answered with another charge's outcome. Every request is
counted, so a test can see that re-sent charges arrived and were not charged again.
``GET /charges`` lists what it recorded, ``GET /health`` answers once it has started.

It imitates a real provider's manners: some latency (``--latency``), some transient failures
(``--failure-rate``, answered 503, some before anything is recorded and some after the
charge, as when an answer is lost on the way back: only the key makes that retry safe) and some
declines (``--decline-rate``). Decisions come from a seeded RNG, so runs are reproducible up to
the interleaving of requests.

The ledger is written in the event loop with no await between the look-up and the insert, so
concurrent requests with one key cannot both charge. It uses WAL with ``synchronous=NORMAL``:
a committed charge survives the process being killed (the service's kill -9 test never kills
the provider, but it could), not a power cut.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    key TEXT PRIMARY KEY,
    payment INTEGER NOT NULL,
    account TEXT NOT NULL,
    amount INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    txn TEXT,
    reason TEXT,
    requests INTEGER NOT NULL
)
"""


class Ledger:
    """The provider's durable record: one row per idempotency key."""

    def __init__(self, path: Path, *, seed: int | None, failure_rate: float,
                 decline_rate: float) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(SCHEMA)
        self.rng = random.Random(seed)
        self.failure_rate = failure_rate
        self.decline_rate = decline_rate
        (self.issued,) = self.db.execute("SELECT COUNT(*) FROM charges").fetchone()

    def charge(self, key: str, payment: int, account: str, amount: int) -> dict[str, Any] | None:
        """The recorded outcome for ``key``, charging first if it is new; None: a transient
        failure, before the charge (nothing recorded) or after it (the answer lost).

        Raises:
            KeyError: ``key`` was recorded for a charge with other parameters.
        """
        row = self.db.execute("SELECT ok, txn, reason, payment, account, amount FROM charges "
                              "WHERE key = ?", (key,)).fetchone()
        if row is not None and tuple(row[3:]) != (payment, account, amount):
            raise KeyError(key)  # the key of another charge: refuse, as real providers do
        if row is not None:
            self.db.execute("UPDATE charges SET requests = requests + 1 WHERE key = ?", (key,))
            return {"ok": bool(row[0]), "txn": row[1], "reason": row[2], "replayed": True}
        if self.rng.random() < self.failure_rate:
            return None
        ok = self.rng.random() >= self.decline_rate
        self.issued += 1
        txn = f"txn-{self.issued:07d}" if ok else None
        reason = None if ok else "card declined"
        self.db.execute("INSERT INTO charges VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                        (key, payment, account, amount, int(ok), txn, reason))
        if self.rng.random() < self.failure_rate:
            return None  # charged, but the answer is lost: only the key makes a retry safe
        return {"ok": ok, "txn": txn, "reason": reason, "replayed": False}

    def rows(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT key, payment, account, amount, ok, txn, reason, requests "
                              "FROM charges ORDER BY rowid")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def make_app(db: Path, *, seed: int | None = None, failure_rate: float = 0.05,
             decline_rate: float = 0.05, latency: tuple[float, float] = (0.002, 0.02)
             ) -> Starlette:
    """The provider's ASGI app, its ledger in the SQLite file ``db``."""
    ledger: Ledger | None = None
    rng = random.Random(seed)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal ledger
        ledger = Ledger(db, seed=seed, failure_rate=failure_rate, decline_rate=decline_rate)
        try:
            yield
        finally:
            ledger.db.close()

    async def charge(request: Request) -> JSONResponse:
        key = request.headers.get("idempotency-key")
        body = await request.json()
        if not key or not isinstance(body, dict):
            return JSONResponse({"error": "an Idempotency-Key header and a JSON object"}, 400)
        await asyncio.sleep(rng.uniform(*latency))
        assert ledger is not None
        try:
            outcome = ledger.charge(key, int(body["payment"]), str(body["account"]),
                                    int(body["amount"]))
        except KeyError:
            return JSONResponse({"error": f"Idempotency-Key {key!r} was used for another "
                                          "charge"}, 422)
        if outcome is None:
            return JSONResponse({"error": "try again"}, 503)
        return JSONResponse(outcome, 200 if outcome["ok"] else 402)

    async def charges(request: Request) -> JSONResponse:
        assert ledger is not None
        return JSONResponse(ledger.rows())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/charges", charge, methods=["POST"]),
                             Route("/charges", charges, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     lifespan=lifespan)


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--db", type=Path, default=Path("provider.db"), help="the ledger's file")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--failure-rate", type=float, default=0.05)
    ap.add_argument("--decline-rate", type=float, default=0.05)
    ap.add_argument("--latency", type=float, nargs=2, default=(0.002, 0.02),
                    metavar=("MIN", "MAX"), help="seconds before each answer")
    args = ap.parse_args()
    app = make_app(args.db, seed=args.seed, failure_rate=args.failure_rate,
                   decline_rate=args.decline_rate, latency=tuple(args.latency))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
