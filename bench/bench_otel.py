"""What listeners cost: in-memory transitions per second with no listener, a no-op listener, and
fasm.otel.Telemetry on the SDK (spans to a dropping exporter, metrics to an in-memory reader).

    python bench/bench_otel.py [--quick] [--backend asyncio|trio]

Prints one table; every figure comes from this run (best of three). Each Pay emits a tracked
charge whose result commits too, so a payment is two transitions, one action, one attempt.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from bench._ledger import Charge, Charged, LedgerMachine, Pay, new_ledger
from fasm.otel import Telemetry
from fasm.persistence import MemoryStore
from fasm.runtime import ActionContext, Listener, Runtime


class Dropping(SpanExporter):
    """Counts spans and keeps none (the cost measured is fasm's and the SDK's, not an export)."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


async def charge(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


async def run(n: int, submitters: int, listeners: Callable[[], list[Listener]]) -> float:
    rt = Runtime(LedgerMachine(), initial_state=lambda: new_ledger(100), store=MemoryStore(),
                 executors={Charge: charge}, queue_size=4096, listeners=listeners())
    per = n // submitters
    async with rt:
        await rt.submit(Pay(0, 1))  # the first commit writes the initial checkpoint; not timed
        start = time.perf_counter()

        async def one(k: int) -> None:
            for i in range(per):
                await rt.submit(Pay((k * per + i) % 100, 1, True))

        async with anyio.create_task_group() as tg:
            for k in range(submitters):
                tg.start_soon(one, k)
        await rt.wait_idle()
        elapsed = time.perf_counter() - start
    return per * submitters / elapsed


def telemetry() -> list[Listener]:
    traces = TracerProvider()
    traces.add_span_processor(SimpleSpanProcessor(Dropping()))
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return [Telemetry(tracer_provider=traces, meter_provider=meters)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = ap.parse_args()
    n = 2_000 if args.quick else 10_000
    cases: list[tuple[str, Callable[[], list[Listener]]]] = [
        ("no listener", list),
        ("no-op listener", lambda: [lambda event: None]),
        ("fasm.otel.Telemetry (SDK)", telemetry),
    ]
    print(f"fasm listener cost: backend={args.backend}, {n:,} payments per run (each: 2 "
          "transitions, 1 tracked action), 16 submitters, MemoryStore, best of 3")
    header = f"{'listeners':<28} {'payments/s':>12} {'us/payment':>12} {'vs none':>8}"
    print(header)
    print("-" * len(header))
    base = None
    for label, make in cases:
        rates = []
        for _ in range(3):
            gc.collect()
            rates.append(anyio.run(run, n, 16, make, backend=args.backend))
        rate = max(rates)
        base = base or rate
        print(f"{label:<28} {rate:>12,.0f} {1e6 / rate:>12.1f} {rate / base:>8.2f}")


if __name__ == "__main__":
    main()
