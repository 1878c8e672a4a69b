"""OpenTelemetry spans and metrics for a runtime: ``Runtime(..., listeners=[Telemetry()])``.

Optional: it needs the ``otel`` extra (``pip install 'fasm[otel]'``), and ``import fasm`` never
imports it or OpenTelemetry. :class:`Telemetry` is a plain runtime listener
(:mod:`fasm.runtime` events), so it runs inline in the runtime's loop and costs nothing when it
is not given.

Spans (all ``INTERNAL``):

- ``fasm.transition <InputType>``: one per input, from the moment it entered the runtime's queue
  (the ``submit`` call, or the executor's return for a tracked result) to its commit or
  rejection (or its answer, for a duplicate idempotency key: ``fasm.outcome`` ``duplicate``, the
  ``fasm.seq`` of the transition that first used the key). Its parent is the span that was
  current in the submitter's task when it called ``submit`` (so a web request's span is the
  parent of the transitions it submits).
- ``fasm.action <ActionType>``: one per tracked action, from its dispatch to the commit of its
  result, a child of the transition that emitted it. Its attempts are child spans
  ``fasm.attempt <ActionType>`` (an error status and the exception on a failed one, the retry
  delay as an attribute), a slow attempt adds a ``fasm.action.slow`` event.
- the result's transition (``fasm.transition TrackedActionCompleted``) is a child of the action
  span, with a link to the transition that emitted the action.

So one business object, say a payment whose ``Pay`` (transition N) emits a tracked ``Charge`` whose
result commits as transition M, is one trace: request -> transition N -> action -> attempts, and
action -> transition M. The span context is carried **in memory**, by this listener: an action
re-emitted by restore after a restart (its emitting transition ran in another process) starts a
new trace, marked ``fasm.action.restored``. Nothing is written to the store.

Metrics (``fasm.machine`` on all; counters also carry the input or action type):

- ``fasm.transitions`` (counter): inputs submitted, by ``fasm.outcome`` (``committed``,
  ``rejected`` for a :class:`~fasm.Rejected`, ``failed`` for an stf that raised anything else,
  ``duplicate`` for an idempotency key committed before: answered, nothing ran).
- ``fasm.commit.latency`` (histogram, seconds): from queue entry to commit, per committed input.
- ``fasm.queue.depth`` (observable gauge): inputs waiting in the runtimes' queues, as each
  runtime last reported it at a commit, summed per machine.
- ``fasm.actions.in_flight`` (up-down counter): tracked actions dispatched whose result has not
  committed yet (timers excluded); an id is counted once even if restore dispatches it again.
- ``fasm.action.retries`` (counter): failed attempts that are retried.

Keys (one per machine instance) are span attributes, never metric attributes: their number is
unbounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode, TracerProvider

from ._timer import Timer
from .runtime import (
    ActionCompleted,
    ActionContext,
    ActionDispatched,
    ActionFailed,
    ActionRetried,
    ActionSlow,
    DuplicateSubmitted,
    RuntimeEvent,
    TransitionCommitted,
    TransitionRejected,
)

__all__ = ("Telemetry",)

_SCOPE = "fasm"


@dataclass(eq=False, slots=True)
class _Action:
    full: tuple[str, str, Any]
    span: Span
    type: str
    emitted_by: SpanContext | None
    timer: bool
    attributes: dict[str, Any] = field(default_factory=dict)


class Telemetry:
    """A runtime listener that reports OpenTelemetry spans and metrics (see :mod:`fasm.otel`).

    One instance can serve any number of runtimes, of any machines, in one process: give it to
    each as ``listeners=[telemetry]``.

    Args:
        tracer_provider: where spans go; the global one (``opentelemetry.trace``) by default.
        meter_provider: where metrics go; the global one by default.
        max_remembered: at most how many span contexts it holds for linking (transitions whose
            actions have not been dispatched yet, actions whose result has not committed). The
            oldest are dropped first (an action dropped so has its span ended, marked
            ``fasm.action.abandoned``, and its result starts a trace of its own); it bounds the
            memory of actions a stopped runtime left in flight.
    """

    def __init__(self, *, tracer_provider: TracerProvider | None = None,
                 meter_provider: MeterProvider | None = None,
                 max_remembered: int = 10_000) -> None:
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self._max = max_remembered
        self._transitions = meter.create_counter(
            "fasm.transitions", unit="{transition}",
            description="Inputs run through the stf, by outcome")
        self._latency = meter.create_histogram(
            "fasm.commit.latency", unit="s",
            description="From an input's entry in the runtime's queue to its commit")
        self._in_flight = meter.create_up_down_counter(
            "fasm.actions.in_flight", unit="{action}",
            description="Tracked actions dispatched whose result has not committed")
        self._retries = meter.create_counter(
            "fasm.action.retries", unit="{attempt}",
            description="Failed executor attempts that are retried")
        meter.create_observable_gauge(
            "fasm.queue.depth", callbacks=[self._observe_queues], unit="{input}",
            description="Inputs waiting in the runtimes' queues (as last reported at a commit)")
        self._emitters: OrderedDict[tuple[str, str, int], SpanContext] = OrderedDict()
        self._actions: OrderedDict[tuple[str, str, Any], _Action] = OrderedDict()
        self._by_key: dict[tuple[str, Any], tuple[str, str, Any]] = {}
        self._queued: dict[tuple[str, str], int] = {}

    def __call__(self, event: RuntimeEvent) -> None:
        """Turn one runtime event into spans and metric points."""
        if isinstance(event, TransitionCommitted):
            self._committed(event)
        elif isinstance(event, TransitionRejected):
            self._rejected(event)
        elif isinstance(event, ActionDispatched):
            self._dispatched(event)
        elif isinstance(event, DuplicateSubmitted):
            span, _ = self._start(event.machine, event.key, event.input_kind,
                                  event.submitted_ns, event.context, None,
                                  {"fasm.seq": event.seq, "fasm.outcome": "duplicate"})
            span.end()
            self._transitions.add(1, {"fasm.machine": event.machine,
                                      "fasm.input.type": event.input_kind,
                                      "fasm.outcome": "duplicate"})
        elif isinstance(event, ActionRetried):
            self._retried(event)
        elif isinstance(event, ActionCompleted | ActionFailed):
            self._done(event)
        elif isinstance(event, ActionSlow):
            entry = self._actions.get((event.machine, event.key, event.action_id))
            if entry is not None:
                entry.span.add_event("fasm.action.slow", {"fasm.attempt": event.attempt,
                                                          "fasm.elapsed": event.elapsed})

    @contextmanager
    def action_span(self, ctx: ActionContext) -> Iterator[Span | None]:
        """Make the span of the tracked action ``ctx`` describes the current span while the
        block runs, so that what an executor calls (an instrumented HTTP client) is part of the
        payment's trace: ``with telemetry.action_span(ctx): ...``. Yields the span, or None when
        the action is not known (then nothing changes). When two machines share a key and an
        action id, the one dispatched last is used."""
        full = self._by_key.get((ctx.machine_key, ctx.action_id))
        entry = self._actions.get(full) if full is not None else None
        if entry is None:
            yield None
            return
        token = otel_context.attach(trace.set_span_in_context(entry.span))
        try:
            yield entry.span
        finally:
            otel_context.detach(token)

    # -- transitions ----------------------------------------------------------------------------

    def _start(self, machine: str, key: str, kind: str, submitted_ns: int, context: Any,
               action_id: Any, attributes: dict[str, Any]) -> tuple[Span, _Action | None]:
        """The span of one input, started when it was queued, under its submitter's span (a
        result: under its action's). ``attributes`` are given at the start: the SDK checks
        each call's attributes, so one call is cheaper than two."""
        attributes.update({"fasm.machine": machine, "fasm.key": key, "fasm.input.type": kind})
        parent = otel_context.Context()  # a root unless the submitter or the action has a span
        links: list[Link] = []
        entry = None
        if action_id is not None:
            attributes["fasm.action.id"] = str(action_id)
            entry = self._actions.get((machine, key, action_id))
            if entry is not None:
                parent = trace.set_span_in_context(entry.span)
                if entry.emitted_by is not None:
                    links.append(Link(entry.emitted_by))
        elif context is not None:
            parent = context.run(otel_context.get_current)
        span = self._tracer.start_span(f"fasm.transition {kind}", context=parent, links=links,
                                       attributes=attributes,
                                       start_time=submitted_ns or time.time_ns())
        return span, entry

    def _committed(self, event: TransitionCommitted) -> None:
        now = time.time_ns()
        span, entry = self._start(
            event.machine, event.key, event.input_kind, event.submitted_ns, event.context,
            event.action_id, {"fasm.seq": event.seq, "fasm.outcome": "committed",
                              "fasm.actions": event.actions, "fasm.group": event.group})
        span.end(end_time=now)
        metric = {"fasm.machine": event.machine, "fasm.input.type": event.input_kind}
        self._transitions.add(1, {**metric, "fasm.outcome": "committed"})
        if event.submitted_ns:
            self._latency.record(max(0, now - event.submitted_ns) / 1e9, metric)
        queue = (event.machine, event.key)
        if event.queued:
            self._queued[queue] = event.queued
        else:
            self._queued.pop(queue, None)
        if event.actions:
            self._remember(self._emitters, (event.machine, event.key, event.seq),
                           span.get_span_context())
        if event.action_id is not None:
            self._result_done(event.machine, event.key, event.action_id, entry, now, event.seq)

    def _rejected(self, event: TransitionRejected) -> None:
        now = time.time_ns()
        outcome = "rejected" if event.expected else "failed"
        attributes: dict[str, Any] = {"fasm.outcome": outcome}
        if event.expected:
            attributes["fasm.rejected"] = str(event.error)
        span, entry = self._start(event.machine, event.key, event.input_kind,
                                  event.submitted_ns, event.context, event.action_id, attributes)
        if not event.expected:
            span.record_exception(event.error.__cause__ or event.error)
            span.set_status(Status(StatusCode.ERROR, repr(event.error)))
        span.end(end_time=now)
        self._transitions.add(1, {"fasm.machine": event.machine,
                                  "fasm.input.type": event.input_kind, "fasm.outcome": outcome})
        if event.action_id is not None:
            # The runtime drops a refused result; restore re-emits the action at next start.
            self._result_done(event.machine, event.key, event.action_id, entry, now, None)

    # -- actions --------------------------------------------------------------------------------

    def _dispatched(self, event: ActionDispatched) -> None:
        full = (event.machine, event.key, event.action_id)
        old = self._actions.pop(full, None)
        if old is not None:  # a stopped runtime left it in flight; a new one dispatched it again
            self._abandon(old)
        emitted_by = (self._emitters.get((event.machine, event.key, event.seq))
                      if event.seq is not None else None)
        kind = type(event.action).__qualname__
        attributes: dict[str, Any] = {
            "fasm.machine": event.machine, "fasm.key": event.key,
            "fasm.action.id": str(event.action_id), "fasm.action.type": kind,
            "fasm.action.restored": event.seq is None}
        if event.seq is not None:
            attributes["fasm.emitted_by.seq"] = event.seq
        parent = (trace.set_span_in_context(trace.NonRecordingSpan(emitted_by))
                  if emitted_by is not None else otel_context.Context())
        span = self._tracer.start_span(f"fasm.action {kind}", context=parent,
                                       attributes=attributes)
        timer = isinstance(event.action, Timer)
        entry = _Action(full, span, kind, emitted_by, timer,
                        {"fasm.machine": event.machine, "fasm.action.type": kind})
        self._remember(self._actions, full, entry)
        self._by_key[(event.key, event.action_id)] = full
        if not timer:  # an old entry was taken off by _abandon: an id counts once
            self._in_flight.add(1, entry.attributes)

    def _attempt(self, entry: _Action, attributes: dict[str, Any], started_ns: int,
                 end_ns: int) -> Span:
        return self._tracer.start_span(
            f"fasm.attempt {entry.type}", context=trace.set_span_in_context(entry.span),
            attributes=attributes, start_time=started_ns or end_ns)

    def _retried(self, event: ActionRetried) -> None:
        now = time.time_ns()
        entry = self._actions.get((event.machine, event.key, event.action_id))
        self._retries.add(1, entry.attributes if entry is not None
                          else {"fasm.machine": event.machine})
        if entry is None:
            return
        span = self._attempt(entry, {"fasm.attempt": event.attempt,
                                     "fasm.retry.delay": event.delay}, event.started_ns, now)
        span.record_exception(event.error)
        span.set_status(Status(StatusCode.ERROR, repr(event.error)))
        span.end(end_time=now)
        entry.span.add_event("fasm.action.retried", {"fasm.attempt": event.attempt,
                                                     "fasm.retry.delay": event.delay,
                                                     "exception.type":
                                                         type(event.error).__qualname__})

    def _done(self, event: ActionCompleted | ActionFailed) -> None:
        now = time.time_ns()
        entry = self._actions.get((event.machine, event.key, event.action_id))
        if entry is None:
            return
        span = self._attempt(entry, {"fasm.attempt": event.attempts}, event.started_ns, now)
        if isinstance(event, ActionFailed):
            span.record_exception(event.error)
            span.set_status(Status(StatusCode.ERROR, repr(event.error)))
            entry.span.set_attribute("fasm.action.outcome", "exhausted")
        else:
            entry.span.set_attribute("fasm.action.outcome", "completed")
        span.end(end_time=now)
        entry.span.set_attribute("fasm.action.attempts", event.attempts)

    def _result_done(self, machine: str, key: str, action_id: Any, entry: _Action | None,
                     now: int, seq: int | None) -> None:
        """The result of an action committed (``seq``) or was refused (None): its span ends."""
        if entry is None:
            return
        self._actions.pop((machine, key, action_id), None)
        if self._by_key.get((key, action_id)) == entry.full:
            del self._by_key[(key, action_id)]
        if seq is not None:
            entry.span.set_attribute("fasm.result.seq", seq)
        else:
            entry.span.set_status(Status(StatusCode.ERROR, "the stf refused the result"))
        entry.span.end(end_time=now)
        if not entry.timer:
            self._in_flight.add(-1, entry.attributes)

    def _abandon(self, entry: _Action) -> None:
        _, key, action_id = entry.full
        if self._by_key.get((key, action_id)) == entry.full:
            del self._by_key[(key, action_id)]
        entry.span.set_attribute("fasm.action.abandoned", True)
        entry.span.end()
        if not entry.timer:
            self._in_flight.add(-1, entry.attributes)

    def _remember(self, table: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        table[key] = value
        while len(table) > self._max:
            _, old = table.popitem(last=False)
            if isinstance(old, _Action):
                self._abandon(old)

    def _observe_queues(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[str, int] = {}
        for (machine, _), depth in list(self._queued.items()):
            totals[machine] = totals.get(machine, 0) + depth
        return [Observation(depth, {"fasm.machine": machine})
                for machine, depth in totals.items()]
