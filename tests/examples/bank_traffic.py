"""Load for the bank tests (tests/examples/test_bank.py, tests/persistence/test_txn_keyed.py):
random transfers and cash withdrawals between accounts from 8 concurrent clients."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import anyio

from examples.bank.machine import Transfer, Withdraw
from fasm import Rejected
from fasm.runtime import Runtime


async def traffic(rt: Runtime[Any, Any, Any, Any, Any, Any], keys: Sequence[str], seed: int,
                  n: int) -> int:
    """``n`` random transfers and withdrawals (one in five) among ``keys``, from 8 concurrent
    clients; returns how many were refused. Ids are unique per seed."""
    rng = random.Random(seed)
    plan = [(rng.choice(keys), rng.choice(keys), rng.randint(1, 60), rng.random() < 0.2)
            for _ in range(n)]
    refused = 0

    async def client(part: list[tuple[str, str, int, bool]], c: int) -> None:
        nonlocal refused
        for i, (src, dst, amount, cash) in enumerate(part):
            value = (Withdraw(f"w{seed}-{c}-{i}", amount) if cash
                     else Transfer(f"t{seed}-{c}-{i}", dst, amount))
            try:
                await rt.submit(value, key=src)
            except Rejected:
                refused += 1

    async with anyio.create_task_group() as tg:
        for c in range(8):
            tg.start_soon(client, plan[c::8], c)
    return refused
