"""A simulated card provider: holds deposits, idempotently, and declines some cards."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from fasm.runtime import ActionContext

from .machine import Authorized, Declined, PaymentResult, PreAuthorize


@dataclass
class CardProvider:
    """Pre-authorises deposits. A request with an idempotency key it has seen gets the first
    answer again, so an action re-sent after a crash never holds a deposit twice."""

    declines: frozenset[str] = frozenset()
    latency: float = 0.005
    holds: dict[str, str] = field(default_factory=dict)  # idempotency key -> auth code
    calls: int = 0

    async def preauthorize(self, action: PreAuthorize, ctx: ActionContext) -> PaymentResult:
        self.calls += 1
        await anyio.sleep(self.latency)
        if action.patient in self.declines:
            return Declined("card declined")
        code = self.holds.get(ctx.idempotency_key)
        if code is None:
            code = self.holds[ctx.idempotency_key] = f"AUTH-{len(self.holds) + 1:04d}"
        return Authorized(code)
