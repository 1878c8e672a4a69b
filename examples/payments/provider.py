"""A stand-in for a card provider: an outside system with its own durable ledger (a JSON-lines
file), honouring idempotency keys the way real providers do. It survives our kill -9, so the demo
can show that no charge is ever made twice and none is lost."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import anyio

from fasm.runtime import ActionContext

from .machine import Charge, Charged, CheckStatus, Declined, PaymentResult


class FlakyProvider(Exception):
    """A transient provider error; the runtime retries."""


class CardProvider:
    """Charges at most once per idempotency key; sometimes slow, sometimes failing."""

    def __init__(self, path: Path, *, seed: int | None = None, failure_rate: float = 0.1,
                 decline_rate: float = 0.05, latency: tuple[float, float] = (0.01, 0.2)) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.failure_rate = failure_rate
        self.decline_rate = decline_rate
        self.latency = latency
        self.charges: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.charges[record["key"]] = record
        self.issued = len(self.charges)

    def _record(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.charges[str(record["key"])] = record

    def _outcome(self, key: str) -> PaymentResult:
        record = self.charges[key]
        if record["ok"]:
            return Charged(str(record["txn"]))
        return Declined(str(record["reason"]))

    async def charge(self, action: Charge | CheckStatus, ctx: ActionContext) -> PaymentResult:
        """The executor for both ``Charge`` and ``CheckStatus``: idempotent by ``ctx``'s key."""
        await anyio.sleep(self.rng.uniform(*self.latency))
        if ctx.idempotency_key in self.charges:
            return self._outcome(ctx.idempotency_key)  # seen before: same answer, no new charge
        if self.rng.random() < self.failure_rate:
            raise FlakyProvider(f"provider timeout on attempt {ctx.attempt}")
        ok = self.rng.random() >= self.decline_rate
        self.issued += 1  # taken before the await: concurrent charges get distinct numbers
        record = {"key": ctx.idempotency_key, "account": action.account,
                  "amount": action.amount, "ok": ok,
                  "txn": f"txn-{self.issued:06d}" if ok else None,
                  "reason": None if ok else "card declined"}
        await anyio.to_thread.run_sync(self._record, record)
        return self._outcome(ctx.idempotency_key)

    def total_charged(self, account: str | None = None) -> int:
        return sum(int(r["amount"]) for r in self.charges.values()
                   if r["ok"] and (account is None or r["account"] == account))
