"""The payments demo: a small service on the embedded default store (SQLite).

    python examples/payments/service.py                # 40 payments, then a consistency report
    python examples/payments/service.py --forever      # keeps paying; kill -9 it, run it again

Each run reopens the same data directory (./demo-data by default): the machine's state is in
payments.db, the card provider's own ledger in provider.jsonl. Kill the service at any moment
(kill -9 included); the next run loads the state, ``restore`` asks the provider about every
payment still pending, and the report checks that every confirmed payment was charged exactly
once and no charge is missing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

if __package__ in (None, ""):  # run as a script: make `examples.payments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.payments"

from fasm.persistence import FileStore, SQLiteStore, Store
from fasm.runtime import Executor, RetryPolicy, Runtime

from .machine import (
    Charge,
    CheckStatus,
    InsufficientCredit,
    Notify,
    OpenAccount,
    Pay,
    Payments,
    PaymentsMachine,
    check_invariants,
)
from .provider import CardProvider

ACCOUNTS = {"ada": 5_000, "bob": 3_000, "cyd": 4_000}


def make_store(data: Path, kind: str) -> Store:
    if kind == "file":
        return FileStore(data / "files")
    return SQLiteStore(data / "payments.db")


async def run(data: Path, *, payments: int, forever: bool, store_kind: str, seed: int | None,
              quiet: bool) -> int:
    """Run the service; return 0 when the final report is consistent."""
    provider = CardProvider(data / "provider.jsonl", seed=seed)

    async def notify(n: Notify) -> None:
        if not quiet:
            print(f"  notify {n.account}: {n.message}", flush=True)

    charge = Executor(provider.charge, retry=RetryPolicy(initial_backoff=0.05, max_backoff=1.0,
                                                         timeout=5.0))
    runtime = Runtime(PaymentsMachine(), initial_state=Payments, key="payments",
                      store=make_store(data, store_kind),
                      executors={Charge: charge, CheckStatus: charge},
                      handlers={Notify: notify}, seed=seed)
    async with runtime as rt:
        pending = [pid for pid, p in rt.state.payments.items() if p.status == "pending"]
        print(f"started at seq {rt.seq}: {len(rt.state.payments)} payments on record, "
              f"restore re-dispatched {len(pending)} pending: {pending}", flush=True)
        for account, credit in ACCOUNTS.items():
            if account not in rt.state.credit:
                await rt.submit(OpenAccount(account, credit), idempotency_key=f"open-{account}")
        n = 0
        while forever or n < payments:
            number = len(rt.state.payments) + 1
            account = list(ACCOUNTS)[number % len(ACCOUNTS)]
            try:
                committed = await rt.submit(Pay(account, 10 + number % 90),
                                            idempotency_key=f"pay-{number}")
                print(f"committed seq {committed.seq}: payment {number - 1} by {account}",
                      flush=True)
            except InsufficientCredit as e:
                print(f"rejected: {e}", flush=True)
                if not forever:
                    break
            n += 1
            if forever:
                await anyio.sleep(0.02)
        await rt.wait_idle()
        return report(rt.state, provider)


def report(state: Payments, provider: CardProvider) -> int:
    """Compare the machine's state with the provider's ledger."""
    check_invariants(state, ACCOUNTS)
    by_status: dict[str, int] = {}
    for p in state.payments.values():
        by_status[p.status] = by_status.get(p.status, 0) + 1
    confirmed = sum(p.amount for p in state.payments.values() if p.status == "confirmed")
    charged = provider.total_charged()
    txns = [p.txn for p in state.payments.values() if p.txn]
    ok = confirmed == charged and len(txns) == len(set(txns)) and "pending" not in by_status
    print(f"report: {by_status}; confirmed {confirmed}, provider charged {charged}: "
          f"{'CONSISTENT' if ok else 'INCONSISTENT'}", flush=True)
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("demo-data"), help="data directory")
    ap.add_argument("--payments", type=int, default=40, help="payments to make this run")
    ap.add_argument("--forever", action="store_true", help="keep paying until killed")
    ap.add_argument("--store", choices=["sqlite", "file"], default="sqlite")
    ap.add_argument("--seed", type=int, default=None, help="seed the simulated provider")
    ap.add_argument("--quiet", action="store_true", help="do not print notifications")
    args = ap.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(name)s: %(message)s")
    sys.exit(anyio.run(lambda: run(args.data, payments=args.payments, forever=args.forever,
                                   store_kind=args.store, seed=args.seed, quiet=args.quiet)))


if __name__ == "__main__":
    main()
