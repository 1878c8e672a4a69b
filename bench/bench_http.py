"""The payments service over HTTP (examples/payments_http) on SQLite: requests/s, latency, and how
far the charges keep up.

    python bench/bench_http.py [--quick] [--seconds 20] [--clients 1,32] [--concurrency 32]

For each client count it starts a fresh provider and a fresh service (uvicorn child processes on
127.0.0.1, new data directories), runs that many clients for ``--seconds``, each POSTing payments
one after another with its own Idempotency-Key, and prints one table row:

* requests/s and p50/p99 latency of acknowledged POSTs (201: the payment is durable);
* at the end of the run: payments acknowledged, charges settled (confirmed or declined by the
  provider), and the backlog (acknowledged, still pending);
* how long the service then took to settle that backlog (``drain s``; capped at ``--drain``).

A second table repeats the largest client count, then kills the service with SIGKILL when the load
stops and restarts it with its backlog: how long until it answers, until the backlog is settled,
and until a graceful stop after that, and how many charges the provider received twice (and
charged once).

The provider answers in 2-20 ms and fails 5 % of calls (retried under the same key). Clients,
service and provider share this machine's cores, so the figures are for this machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.payments_http.run import provider_server, service_server


async def clients_run(url: str, clients: int, seconds: float) -> tuple[list[float], int]:
    """Latencies (s) of acknowledged POSTs and the count of other answers. Each client has its
    own connection (httpx's pool costs CPU per request in proportion to its size, and this
    process shares the cores with the service)."""
    latencies: list[float] = []
    other = 0
    stop_at = time.perf_counter() + seconds

    async def one(worker: int) -> None:
        nonlocal other
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
            n = 0
            while time.perf_counter() < stop_at:
                n += 1
                start = time.perf_counter()
                r = await client.post("/payments", json={"account": "ada", "amount": 1},
                                      headers={"Idempotency-Key": f"c{worker}-{n}"})
                if r.status_code == 201:
                    latencies.append(time.perf_counter() - start)
                else:
                    other += 1

    await asyncio.gather(*(one(i) for i in range(clients)))
    return latencies, other


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def drain_backlog(client: httpx.Client, drain: float) -> tuple[dict[str, int], float]:
    """Poll ``/health`` until nothing is pending (at most ``drain`` s): the last health and the
    seconds it took."""
    start = time.perf_counter()
    health: dict[str, int] = client.get("/health").json()
    while health["pending"] and time.perf_counter() - start < drain:
        time.sleep(0.1)
        health = client.get("/health").json()
    return health, time.perf_counter() - start


def seconds_text(value: float, pending: int, cap: float) -> str:
    return f"{value:>8.1f}" if not pending else f"{'>' + format(cap, 'g'):>8}"


def run_one(tmp: Path, clients: int, seconds: float, concurrency: int, drain: float,
            restart: bool) -> str:
    """One run; with ``restart``, kill -9 the service when the load stops and time its restart
    with the backlog (the second table), else let it drain (the first)."""
    with provider_server(tmp / "provider.db", seed=1, failure_rate=0.05,
                         log=tmp / "provider.log") as provider:
        provider.start()
        with service_server(tmp / "service", provider.url, concurrency=concurrency,
                            log=tmp / "service.log") as service:
            service.start()
            start = time.perf_counter()
            latencies, other = asyncio.run(clients_run(service.url, clients, seconds))
            elapsed = time.perf_counter() - start
            with httpx.Client(base_url=service.url, timeout=30.0) as client:
                end = client.get("/health").json()
                if restart:
                    service.kill()
                    restart_start = time.perf_counter()
                    service.start(timeout=120.0)
                    ready = time.perf_counter() - restart_start
                    at_restart = client.get("/health").json()
                health, drained = drain_backlog(client, drain)
                stop_start = time.perf_counter()
            service.stop()
            stopped = time.perf_counter() - stop_start
            charges = httpx.get(provider.url + "/charges").json()
    if restart:
        resent = sum(c["requests"] - 1 for c in charges)
        charged = sum(1 for c in charges if c["ok"])
        once = "yes" if charged == health["confirmed"] and not health["pending"] else "NO"
        return (f"{clients:>7} {end['payments']:>12,} {at_restart['pending']:>8,} "
                f"{ready:>7.1f} {seconds_text(drained, health['pending'], drain)} "
                f"{stopped:>6.1f} {resent:>7,} {once:>12}")
    settled = end["confirmed"] + end["declined"]
    return (f"{clients:>7} {len(latencies) / elapsed:>10,.0f} "
            f"{percentile(latencies, 0.50) * 1000:>8.1f} "
            f"{percentile(latencies, 0.99) * 1000:>8.1f} {other:>6} {end['payments']:>12,} "
            f"{settled:>9,} {end['pending']:>8,} "
            f"{seconds_text(drained, health['pending'], drain)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke test: 2 s per run")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of load per run")
    ap.add_argument("--clients", default="1,32", help="comma-separated client counts")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="the executor's concurrency (and HTTP pool size to the provider)")
    ap.add_argument("--drain", type=float, default=60.0, help="most seconds to wait for backlog")
    ap.add_argument("--dir", type=Path, default=None, help="where to make the data directories")
    args = ap.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    drain = 20.0 if args.quick else args.drain
    print(f"payments over HTTP on SQLite: {seconds:g} s per run, executor concurrency "
          f"{args.concurrency}, {os.cpu_count()} cores shared by clients, service and provider "
          f"(load average {os.getloadavg()[0]:.1f} at the start)")
    header = (f"{'clients':>7} {'requests/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>6} "
              f"{'acknowledged':>12} {'settled':>9} {'backlog':>8} {'drain s':>8}")
    print(header)
    print("-" * len(header))
    counts = [int(c) for c in args.clients.split(",")]
    for clients in counts:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            print(run_one(Path(tmp), clients, seconds, args.concurrency, drain, False),
                  flush=True)
    print("acknowledged: 201s (durable payments); settled: charged or declined by the provider at "
          "the end of the load;\nbacklog: acknowledged and not yet settled then; drain s: time "
          "to settle it after the load stopped.")
    print(f"\nkill -9 when the load stops, restart with the backlog ({max(counts)} clients)")
    header = (f"{'clients':>7} {'acknowledged':>12} {'pending':>8} {'ready s':>7} "
              f"{'drain s':>8} {'stop s':>6} {'re-sent':>7} {'charged once':>12}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(run_one(Path(tmp), max(counts), seconds, args.concurrency, drain, True), flush=True)
    print("pending: payments restore re-sent; ready s: from the restart until /health answered; "
          "drain s: until none was\npending; stop s: the graceful stop (SIGTERM) after the "
          "drain; re-sent: charges the provider got again\nunder a key it knew (retries and "
          "restore); charged once: the provider's charges are exactly the confirmed payments.")


if __name__ == "__main__":
    main()
