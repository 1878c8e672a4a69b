"""fasm.otel: spans and metrics of a real runtime on SQLite, read back with the SDK's in-memory
exporter and reader (a payment whose charge fails once, then succeeds, is one trace)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from fasm import Rejected
from fasm.errors import TransitionFailed
from fasm.otel import Telemetry
from fasm.persistence import SQLiteStore
from fasm.runtime import ActionContext, Executor, RetryPolicy, Runtime, TransitionCommitted
from tests._ledger import Charge, Charged, Explode, Ledger, LedgerMachine, Note, Pay

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(initial_backoff=0.001, max_backoff=0.001, jitter=0.0)


class Otel:
    """An SDK tracer and meter provider exporting to memory."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(tracer_provider=self.tracer_provider,
                                   meter_provider=self.meter_provider)

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [point for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name == f"fasm.{metric}" for point in m.data.data_points]

    def value(self, metric: str, **attributes: Any) -> Any:
        """The sum (counters) or count (histograms) of the points with these attributes."""
        found = [p for p in self.points(metric)
                 if all(p.attributes.get(f"fasm.{k}".replace("_", ".")) == v
                        for k, v in attributes.items())]
        return sum(getattr(p, "value", None) if hasattr(p, "value") else p.count
                   for p in found)


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()


def make(path: Path, otel: Otel, **kw: Any) -> Runtime[Any, Any, Any, Any, Any, Any]:
    async def quiet(note: Note) -> None:
        pass

    kw.setdefault("handlers", {Note: quiet})
    kw.setdefault("listeners", [otel.telemetry])
    return Runtime(LedgerMachine(), initial_state=lambda: Ledger(balances={"a": 100}),
                   store=SQLiteStore(path / "db.sqlite"), key="shop-1", **kw)


async def test_a_payment_is_one_trace_across_its_transitions(tmp_path: Path, otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    in_flight_during_attempt: list[int] = []
    inner: list[Any] = []

    async def charge(action: Charge, ctx: ActionContext) -> Charged:
        in_flight_during_attempt.append(otel.value("actions.in_flight"))
        if ctx.attempt == 1:
            raise ConnectionError("provider down")
        with otel.telemetry.action_span(ctx) as span:
            assert span is not None
            with tracer.start_as_current_span("http POST /charges") as http:
                inner.append(http)
        return Charged(True)

    async with make(tmp_path, otel, executors={Charge: Executor(charge, retry=QUICK)}) as rt:
        with tracer.start_as_current_span("POST /pay") as request:
            outcome = await rt.submit(Pay("a", 10))
        await rt.wait_idle()
    assert outcome.seq == 1

    (pay,) = otel.named("fasm.transition Pay")
    (action,) = otel.named("fasm.action Charge")
    attempts = sorted(otel.named("fasm.attempt Charge"), key=lambda s: s.start_time or 0)
    (result,) = otel.named("fasm.transition TrackedActionCompleted")
    (http,) = otel.named("http POST /charges")
    request_ctx = request.get_span_context()
    # One trace: request -> Pay (N) -> Charge -> attempts, and Charge -> its result (M).
    for span in (pay, action, *attempts, result, http):
        assert span.context is not None
        assert span.context.trace_id == request_ctx.trace_id
    assert pay.parent is not None and pay.parent.span_id == request_ctx.span_id
    assert pay.context is not None and action.context is not None
    assert action.parent is not None and action.parent.span_id == pay.context.span_id
    assert [a.parent.span_id for a in attempts if a.parent] == [action.context.span_id] * 2
    assert result.parent is not None and result.parent.span_id == action.context.span_id
    assert [link.context.span_id for link in result.links] == [pay.context.span_id]
    assert http.parent is not None and http.parent.span_id == action.context.span_id

    assert dict(pay.attributes or {}) == {
        "fasm.machine": LedgerMachine.machine_name, "fasm.key": "shop-1",
        "fasm.input.type": "Pay", "fasm.seq": 1, "fasm.outcome": "committed",
        "fasm.actions": 2, "fasm.group": 1}
    assert (result.attributes or {})["fasm.seq"] == 2
    assert (result.attributes or {})["fasm.action.id"] == "0"
    assert (action.attributes or {})["fasm.action.attempts"] == 2
    assert (action.attributes or {})["fasm.action.outcome"] == "completed"
    assert (action.attributes or {})["fasm.emitted_by.seq"] == 1
    assert (action.attributes or {})["fasm.result.seq"] == 2
    assert (action.attributes or {})["fasm.action.restored"] is False
    assert [e.name for e in action.events] == ["fasm.action.retried"]
    first, second = attempts
    assert (first.attributes or {})["fasm.attempt"] == 1
    assert first.status.status_code is StatusCode.ERROR
    assert [e.name for e in first.events] == ["exception"]
    assert (first.attributes or {})["fasm.retry.delay"] == 0.001
    assert (second.attributes or {})["fasm.attempt"] == 2
    assert second.status.status_code is StatusCode.UNSET
    # Times nest: the action runs from the Pay commit to its result's commit.
    assert pay.end_time is not None and action.start_time is not None
    assert pay.end_time <= action.start_time
    assert first.end_time is not None and second.start_time is not None
    assert first.end_time <= second.start_time
    assert result.end_time == action.end_time

    assert otel.value("transitions", outcome="committed", input_type="Pay") == 1
    assert otel.value("transitions", outcome="committed",
                      input_type="TrackedActionCompleted") == 1
    assert otel.value("commit.latency") == 2  # two committed inputs measured
    assert otel.value("action.retries", action_type="Charge") == 1
    assert in_flight_during_attempt == [1, 1]
    assert otel.value("actions.in_flight") == 0


async def test_rejected_and_failed_inputs(tmp_path: Path, otel: Otel) -> None:
    async with make(tmp_path, otel, executors={Charge: Executor(_ok)}) as rt:
        with pytest.raises(Rejected):
            await rt.submit(Pay("a", 1000))
        with pytest.raises(TransitionFailed):
            await rt.submit(Explode("a"))
    (rejected,) = otel.named("fasm.transition Pay")
    (failed,) = otel.named("fasm.transition Explode")
    assert (rejected.attributes or {})["fasm.outcome"] == "rejected"
    assert rejected.status.status_code is StatusCode.UNSET
    assert (failed.attributes or {})["fasm.outcome"] == "failed"
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert otel.value("transitions", outcome="rejected") == 1
    assert otel.value("transitions", outcome="failed") == 1
    assert otel.value("commit.latency") == 0  # nothing committed


async def _ok(action: Charge, ctx: ActionContext) -> Charged:
    return Charged(True)


async def test_an_action_restore_re_emits_starts_a_trace_of_its_own(tmp_path: Path,
                                                                    otel: Otel) -> None:
    started = anyio.Event()

    async def hang(action: Charge, ctx: ActionContext) -> Charged:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError

    async with make(tmp_path, otel, executors={Charge: hang}, shutdown_grace=0.01) as rt:
        await rt.submit(Pay("a", 10))
        await started.wait()
    assert otel.value("actions.in_flight") == 1
    assert otel.named("fasm.action Charge") == []  # not ended: its result is still to come

    async with make(tmp_path, otel, executors={Charge: _ok}) as rt:
        await rt.wait_idle()
    old, new = sorted(otel.named("fasm.action Charge"), key=lambda s: s.start_time or 0)
    assert (old.attributes or {})["fasm.action.abandoned"] is True
    assert (new.attributes or {})["fasm.action.restored"] is True
    assert new.parent is None and new.context is not None
    (result,) = otel.named("fasm.transition TrackedActionCompleted")
    assert result.parent is not None and result.parent.span_id == new.context.span_id
    assert result.links == ()
    assert otel.value("actions.in_flight") == 0  # counted once across the restart


async def test_queue_depth_gauge_reports_what_waits(tmp_path: Path, otel: Otel) -> None:
    seen: list[tuple[int, int]] = []

    def sample(event: Any) -> None:
        if isinstance(event, TransitionCommitted) and event.queued:
            seen.append((event.queued, otel.value("queue.depth")))

    # sample comes after Telemetry, so it reads what Telemetry just took from the event
    rt = make(tmp_path, otel, executors={Charge: _ok}, max_group=2,
              listeners=[otel.telemetry, sample])
    async with rt, anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(rt.submit, Pay("a", 1))
    assert seen and all(queued == gauge for queued, gauge in seen)
    assert otel.value("queue.depth") == 0  # the last commit saw an empty queue


def test_import_fasm_never_imports_opentelemetry() -> None:
    code = ("import sys, fasm, fasm.runtime, fasm.persistence, fasm.testing, fasm.web; "
            "bad = sorted(m for m in sys.modules if m.startswith('opentelemetry')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


async def test_an_exhausted_action_ends_with_its_on_exhausted_result(tmp_path: Path,
                                                                     otel: Otel) -> None:
    async def down(action: Charge, ctx: ActionContext) -> Charged:
        raise ConnectionError("provider down")

    policy = RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.001, jitter=0.0)
    spec = Executor(down, retry=policy, on_exhausted=lambda action, error: Charged(False))
    async with make(tmp_path, otel, executors={Charge: spec}) as rt:
        await rt.submit(Pay("a", 10))
        await rt.wait_idle()
        assert rt.state.balances == {"a": 100}  # refunded
    (action,) = otel.named("fasm.action Charge")
    assert (action.attributes or {})["fasm.action.outcome"] == "exhausted"
    assert (action.attributes or {})["fasm.action.attempts"] == 2
    attempts = otel.named("fasm.attempt Charge")
    assert sorted((a.attributes or {})["fasm.attempt"] for a in attempts) == [1, 2]
    assert all(a.status.status_code is StatusCode.ERROR for a in attempts)
    assert otel.value("action.retries") == 1  # the second failure is not retried
    assert otel.value("actions.in_flight") == 0


async def test_a_slow_attempt_is_an_event_on_its_action(tmp_path: Path, otel: Otel) -> None:
    async def slow(action: Charge, ctx: ActionContext) -> Charged:
        await anyio.sleep(0.2)
        return Charged(True)

    async with make(tmp_path, otel, executors={Charge: slow}, slow_action_after=0.02) as rt:
        await rt.submit(Pay("a", 10))
        await rt.wait_idle()
    (action,) = otel.named("fasm.action Charge")
    slow_events = [e for e in action.events if e.name == "fasm.action.slow"]
    assert slow_events and (slow_events[0].attributes or {})["fasm.attempt"] == 1


async def test_a_duplicate_submit_is_a_span_with_the_first_seq(tmp_path: Path,
                                                               otel: Otel) -> None:
    async with make(tmp_path, otel, executors={Charge: _ok}) as rt:
        first = await rt.submit(Pay("a", 10), idempotency_key="pay-1")
        again = await rt.submit(Pay("a", 10), idempotency_key="pay-1")
        await rt.wait_idle()
    assert again.duplicate and again.seq == first.seq
    committed, duplicate = sorted(otel.named("fasm.transition Pay"),
                                  key=lambda s: (s.attributes or {})["fasm.outcome"])
    assert (duplicate.attributes or {})["fasm.outcome"] == "duplicate"
    assert (duplicate.attributes or {})["fasm.seq"] == first.seq
    assert (committed.attributes or {})["fasm.outcome"] == "committed"
    assert otel.value("transitions", outcome="duplicate") == 1
    assert otel.value("transitions", outcome="committed", input_type="Pay") == 1
    assert len(otel.named("fasm.action Charge")) == 1  # nothing ran again
