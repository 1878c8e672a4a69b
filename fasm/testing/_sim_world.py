"""One simulated run: the real engine, a simulated store, clock, executors and crashes.

The run performs, against simulated parts, exactly the engine calls that the
production Runtime's state-object host makes (``ObjectHost._recover``, ``run``, ``_reload`` and
``_flush`` in fasm/runtime/_state_object.py):

* start: load the store, decode the records, ``Engine.replay`` the journal tail, ``Engine.restore``,
  dispatch what restore released;
* a batch: ``Engine.step`` each queued input; after a failed step, the rollback the engine asks for
  (``reload``: load the store, replay, ``Engine.reset``); then one store write for the accepted
  steps (planned by the production ``Writer``), ``Engine.committed``, dispatch.

A state that does not encode is not ridden out as the Runtime does (ObjectHost skips the
checkpoint under Journal, refuses the input under Snapshot): it is a bug in the machine, so the
simulation fails check ``encodable`` at the step that made it, or at the commit where a checkpoint
was due when that check is off.

A crash may come between any two of these. It drops the engine, the queue and every executor
running in the process; only what the store holds survives, through the same codec, so a restart
loses exactly what production would lose. Time is virtual: it jumps to the next event.

Every choice (which input, how long an attempt takes, whether it fails, how many inputs share a
commit, whether to crash here) is made by seeded ``random.Random`` streams, so a seed is a run.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic

from .._actions import ActionList, Tracked
from .._inputs import Input, Normal, TrackedActionCompleted
from .._timer import Timer, TimerFired
from ..errors import (
    InvalidInput,
    NondeterminismError,
    Rejected,
    RestoreFailed,
    StoreUnavailable,
)
from ..persistence._codec import JournalEntry, Unencodable
from ..persistence._durability import Writer, decode_records
from ..persistence._memory import MemoryStore
from ..runtime._engine import Accepted, Duplicate, Engine, Failed, Release, Step
from ..runtime._executors import ActionContext
from ._checks import (
    Violation,
    check_invariants,
    deeply_immutable,
    diff,
    name_of,
    perturb_sets,
    run_sync,
    short,
    unencodable_message,
)
from ._sim_config import CrashPoint
from ._sim_report import Effects
from ._sim_setup import Setup
from ._sim_verify import Verifier

__all__ = ("Run", "Setup")

# Event kinds on the virtual-time heap.
_ARRIVE, _ATTEMPT_END, _RETRY, _DELIVER, _TIMER = range(5)
_EXHAUSTED = 1000  # this many None inputs in a row end the input phase
# The liveness phase gives up (work never finishes) after this many failed attempts in a row of
# one action, or this many events in all, with faults off.
DRAIN_FAILED_ATTEMPTS = 50
DRAIN_EVENTS = 20_000
_SETTLE_EVENTS = 2_000  # events spent finishing work emitted during the liveness phase


@dataclass(slots=True, eq=False)
class _Item:
    """A queued input: a submit (``n`` is its submit number) or a delivered result."""

    input: Input[Any, Any, Any]
    key: str | None = None
    n: int = 0
    tag: str = ""
    target: str = ""  # the machine key it is for (a keyed run; "" in a one-key run)
    origin: tuple[str, Any] | None = None  # a message: (sending key, its Send's action id)


class Run(Verifier):
    """One seed's run. Call :meth:`run`; read ``counts``, ``trace`` and ``faults`` after.

    Args:
        setup: the simulation's fixed parts.
        rngs: (inputs, faults, executors) random streams; one object for all three is fine.
        draw_input: ``fn(state) -> input value or None`` (None: nothing arrives this time).
        steps: how many transitions (``Engine.step`` calls) the main phase runs.
        trace_limit: keep at most this many trace lines (None: all).
    """

    def __init__(
        self,
        setup: Setup,
        rngs: tuple[random.Random, random.Random, random.Random],
        draw_input: Callable[[Any], Any],
        steps: int,
        *,
        trace_limit: int | None = 400,
        skip: float = 0.0,
        max_arrivals: int | None = None,
        dropped: frozenset[int] = frozenset(),
    ) -> None:
        self.s = setup
        self.plan = setup.plan
        self.checks = setup.checks
        self.rng_inputs, self.rng, self.rng_exec = rngs
        self.draw_input = draw_input
        self.steps = steps
        self.skip = skip
        self.arrivals_left = max_arrivals
        # Shrinking: arrivals (numbered from 0) that bring no input, and the input stream's hook
        # told where each arrival's draws begin.
        self.dropped = dropped
        self.arrivals = 0
        self.begin_arrival: Callable[[int], None] | None = getattr(self.rng_inputs,
                                                                    "begin_arrival", None)
        self.nones = 0
        self.exhausted = False
        self.key = setup.key  # the machine key the run is working on now
        self.store = MemoryStore()
        run_sync(self.store.open(), "MemoryStore.open")
        self.acquire()
        self.now = 0.0
        self.step = 0
        self.phase = "main"
        self.inc = 0
        self.counter = 0
        self.submits = 0
        self.heap: list[tuple[float, int, int, Any]] = []
        self.queue: deque[_Item] = deque()
        self.counts: dict[str, int] = {}
        self.trace: deque[tuple[int, float, str, Any, Any]] = deque(maxlen=trace_limit)
        self.faults: list[tuple[int, float, str]] = []
        # Tracked actions emitted by committed transitions and not completed: what restore must
        # re-emit. ``live`` is the same over accepted (not yet committed) transitions too.
        self.durable: dict[Any, Any] = {}
        self.live: dict[Any, Any] = {}
        # The same as ``durable`` but by the store's truth alone, not reset from what restore
        # re-emits: what liveness waits for when the restore check is off. ``done`` is the step
        # at which each tracked action's result was committed.
        self.owed: dict[Any, Any] = {}
        self.done: dict[Any, int] = {}
        self.completions: dict[Any, int] = {}  # results committed, per id
        self.failing: dict[Any, tuple[int, str]] = {}  # action id -> failed attempts in a row
        # Untracked actions: committed (seq, action), and those whose handler ran.
        self.emitted_untracked: list[tuple[int, Any]] = []
        self.handled_untracked: list[tuple[int, Any]] = []
        self.lost_untracked: list[tuple[int, Any]] = []
        self.refused: dict[Any, int] = {}
        self.keys_durable: dict[str, int] = {}
        self.keys_live: dict[str, int] = {}
        self.unacked: dict[str, _Item] = {}
        self.acked: deque[_Item] = deque(maxlen=16)
        self.engine: Engine
        self.writer: Writer
        self.needs_checkpoint = False
        self.marked = False  # the key's in-flight mark as stored
        self.shadow: Any = None
        self.snap: Any = None  # plain data of engine.state as it is now, when known
        # Journal entries decoded at a restart, by their bytes, when sharing them between
        # replays is safe (see decode_entry).
        self.decoded: dict[bytes, JournalEntry] = {}

    # -- bookkeeping ------------------------------------------------------------------------------

    def acquire(self) -> None:
        run_sync(self.store.acquire(self.s.key), "MemoryStore.acquire")

    def where(self) -> str:
        """The key the trace names (none in a one-key run)."""
        return ""

    def final_state(self) -> Any:
        """The state a :class:`SeedResult` reports (None when the first start itself failed)."""
        engine = getattr(self, "engine", None)
        return engine.state if engine is not None else None

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def note(self, kind: str, a: Any = None, b: Any = None) -> None:
        self.trace.append((self.step, self.now, kind, a, b))

    def fault(self, text: str) -> None:
        self.faults.append((self.step, self.now, text))

    def chance(self, p: float) -> bool:
        # Written so that a shrinking RNG (hypothesis: random() -> 0.0) means "no fault".
        return p > 0.0 and self.rng.random() >= 1.0 - p

    def busy(self) -> bool:
        """Whether the simulated driver is still busy, so that another event happens before it
        takes the queue (several inputs then share one commit, as under load)."""
        return (len(self.queue) < self.plan.max_batch and bool(self.heap)
                and self.chance(self.plan.busy))

    def push(self, t: float, kind: int, payload: Any = None) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (t, self.counter, kind, payload))

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the main phase, then the liveness phase.

        Raises:
            Violation: a check failed (the run stops there).
        """
        self.start()
        self.push(self.now + self.rng_inputs.uniform(*self.plan.input_interval), _ARRIVE)
        while self.step < self.steps and not (self.exhausted and not self.queue):
            if self.queue and not self.busy():
                self.batch()
            elif not self.advance():
                break
        if self.checks.liveness:
            self.drain()
        if self.s.effects:
            self.check_effects()

    def advance(self) -> bool:
        """Move time to the next event and handle it; False when there is none."""
        if not self.heap:
            return False
        t, _, kind, payload = heapq.heappop(self.heap)
        self.now = max(self.now, t)
        self.handle(kind, payload)
        return True

    def handle(self, kind: int, payload: Any) -> None:
        if kind == _ARRIVE:
            self.arrive()
        elif kind == _ATTEMPT_END:
            inc, action_id, action, attempt, outcome, value = payload
            if inc == self.inc:
                self.attempt_ended(action_id, action, attempt, outcome, value)
        elif kind == _RETRY:
            inc, action_id, action, attempt = payload
            if inc == self.inc:
                self.attempt(action_id, action, attempt)
        elif kind == _TIMER:
            inc, action_id, timer = payload
            if inc == self.inc:
                self.count("results:timer")
                self.deliver(action_id, TimerFired(at=timer.at, now=self.now), "")
        else:
            action_id, result, tag = payload
            self.count(f"results:{tag}")
            self.deliver(action_id, result, tag)

    def arrive(self) -> None:
        if self.phase != "main" or self.exhausted:
            return
        n = self.arrivals
        self.arrivals = n + 1
        if self.begin_arrival is not None:
            self.begin_arrival(n)
        self.push(self.now + self.rng_inputs.uniform(*self.plan.input_interval), _ARRIVE)
        if self.arrivals_left is not None:
            self.arrivals_left -= 1
            self.exhausted = self.arrivals_left <= 0
        if n in self.dropped:
            return
        # ``skip`` is only used under hypothesis: random() shrinks to 0.0, so a shrunk run keeps
        # only the inputs the failure needs.
        if self.skip and self.rng_inputs.random() < self.skip:
            return
        value, target = self.next_input()
        if value is None:
            # A source that keeps returning None has run out of inputs.
            self.nones += 1
            self.exhausted = self.exhausted or self.nones >= _EXHAUSTED
            return
        self.nones = 0
        try:
            value = self.s.validator.validate(value)
            packed = self.s.codec.pack("input", value)  # as Runtime.submit: refused if it
        except (InvalidInput, Unencodable) as e:        # cannot be written
            raise Violation("input", f"the input source produced {short(value)}, which the "
                                     f"machine does not accept: {e}") from e
        normal = Normal(value)
        # As Runtime._checked: the journal entry reuses the bytes made here.
        object.__setattr__(normal, "_packed", packed)
        self.submits += 1
        key = f"k{self.submits}" if self.chance(self.plan.keyed) else None
        item = _Item(normal, key, self.submits, target=target)
        if key is not None:
            self.unacked[key] = item
        self.count("inputs")
        self.queue.append(item)
        if self.acked and self.chance(self.plan.resubmit):
            again = self.rng.choice(self.acked)
            self.fault(f"client resends submit #{again.n} (key {again.key!r}) after a lost reply")
            self.queue.append(_Item(self.fresh(again.input), again.key, again.n, "resent",
                                    again.target))

    def next_input(self) -> tuple[Any, str]:
        """The input source's next value (None: nothing this time) and the key it is for."""
        return self.draw_input(self.engine.state), ""

    def deliver(self, action_id: Any, result: Any, tag: str) -> None:
        self.queue.append(_Item(TrackedActionCompleted(action_id, result), tag=tag,
                                target=self.where()))

    # -- executors --------------------------------------------------------------------------------

    def dispatch(self, release: Release) -> None:
        if release.tracked:
            self.count("dispatched", len(release.tracked))
        for tracked in release.tracked:
            action = tracked.action
            if isinstance(action, Timer):
                self.push(max(self.now, action.at), _TIMER, (self.inc, tracked.id, action))
            else:
                self.attempt(tracked.id, action, 1)
        if release.untracked:
            self.count("untracked", len(release.untracked))
            self.handled_untracked.extend((seq, u.action) for seq, u in release.untracked)

    def attempt(self, action_id: Any, action: Any, attempt: int) -> None:
        spec = self.s.executor_for(type(action))
        rng = self.rng_exec
        low, high = spec.latency or self.plan.latency
        limit = spec.retry.timeout
        outcome: str
        value: Any
        if self.chance(self.plan.timeout):
            took = limit if limit is not None else self.plan.hang
            outcome, value = "timeout", TimeoutError("injected: the attempt hung")
        elif self.chance(self.plan.fail):
            took = rng.uniform(low, high)
            outcome, value = "fail", ConnectionError("injected failure")
        else:
            took = rng.uniform(low, high)
            if limit is not None and took > limit:
                took, outcome, value = limit, "timeout", TimeoutError("slower than its timeout")
            else:
                ctx = ActionContext(
                    machine_key=self.key, action_id=action_id,
                    idempotency_key=f"sim/{self.s.machine_name}/{self.key}/{action_id}",
                    attempt=attempt, deadline=None if limit is None else self.now + limit)
                try:
                    outcome, value = "ok", spec.produce(action, rng, ctx)
                except Exception as e:  # as in production: a failed attempt, retried
                    outcome, value = "raised", e
        self.push(self.now + took, _ATTEMPT_END,
                  (self.inc, action_id, action, attempt, outcome, value))

    def attempt_ended(self, action_id: Any, action: Any, attempt: int, outcome: str,
                      value: Any) -> None:
        if outcome == "ok":
            self.failing.pop(action_id, None)
            self.count("results:ok")
            self.check_result(action, value)
            self.deliver(action_id, value, "")
            if self.chance(self.plan.duplicate):
                self.fault(f"result of {action_id!r} will be delivered twice")
                low, high = self.plan.latency
                self.push(self.now + self.rng.uniform(low, high), _DELIVER,
                          (action_id, value, "duplicate"))
            return
        self.count(f"results:{outcome}")
        kind = type(action).__qualname__
        if outcome == "raised":
            self.note("raised", action_id, value)
        else:
            self.fault(f"{kind} {action_id!r} attempt {attempt}: {outcome}")
        n = self.failing.get(action_id, (0, ""))[0] + 1
        self.failing[action_id] = (n, f"{outcome}: {short(value, 80)}")
        spec = self.s.executor_for(type(action))
        policy = spec.retry
        if policy.max_attempts is not None and attempt >= policy.max_attempts:
            assert spec.on_exhausted is not None
            result = spec.on_exhausted(action, value)
            self.check_result(action, result)
            self.count("results:exhausted")
            self.failing.pop(action_id, None)
            self.note("exhausted", action_id, result)
            self.deliver(action_id, result, "")
            return
        delay = policy.delay(attempt, self.rng)
        self.count("retries")
        self.note("retry", action_id, (attempt, outcome, delay))
        self.push(self.now + delay, _RETRY, (self.inc, action_id, action, attempt + 1))

    def check_result(self, action: Any, result: Any) -> None:
        s = self.s
        if s.results is None or s.result_known_valid(result):
            return
        try:
            s.results.validate_python(result, strict=True)
            s.codec.pack("tracked_result", result)  # as the Runtime checks results
            s.remember_valid_result(result)
        except pydantic.ValidationError as e:
            raise Violation("executor", f"the simulated executor for {short(action)} returned "
                                        f"{short(result)}, not the machine's tracked result "
                                        f"type: {s.results.describe(e)}") from e
        except Unencodable as e:
            raise Violation("executor", f"the simulated executor for {short(action)} returned "
                                        f"{short(result)}, which cannot be committed: {e}") from e

    # -- start and crash (ObjectHost._recover, then restore) --------------------------------------

    def new_engine(self, state: Any, seq: int, keys: Any) -> Engine:
        return Engine(self.s.machine, state=state, seq=seq, idempotency=keys,
                      rollback=self.s.rollback, idempotency_window=self.s.idempotency_window)

    def recovered_engine(self) -> tuple[Engine, tuple[int, int, int], bool, bool]:
        """A new engine at the store's committed seq (what ``ObjectHost._recover`` builds).

        Returns the engine, what ``Writer.recovered`` is told (journal entries, journal bytes,
        checkpoint bytes), whether the next write must carry a checkpoint, and the key's
        in-flight mark as stored.
        """
        s = self.s
        records = run_sync(self.store.load(self.key), "MemoryStore.load")
        if records is None:
            return self.new_engine(s.initial(self.key), 0, ()), (0, 0, 0), True, False
        recovered = decode_records(s.codec, records, store=self.store.description, key=self.key,
                                   decode_entry=self.decode_entry)
        cp = recovered.checkpoint
        if cp is None:
            engine, force = self.new_engine(s.initial(self.key), 0, ()), True
        else:
            engine, force = self.new_engine(cp.state, cp.seq, cp.idempotency.items()), False
        try:
            run_sync(engine.replay((e.seq, e.input, e.idempotency_key) for e in recovered.journal),
                     "stf (replay)")
        except NondeterminismError as e:
            raise Violation("determinism", f"replaying the committed journal failed: {e}") from e
        sizes = (len(records.journal), sum(len(d) for _, d in records.journal),
                 len(records.checkpoint or b""))
        return engine, sizes, force, records.in_flight

    def decode_entry(self, data: bytes, seq: int) -> JournalEntry:
        """``Codec.decode_entry``, once per record: the same bytes decode to the same entry, so
        a restart reuses the entry an earlier one decoded, when its input cannot be changed in
        place (an input the stf could mutate is decoded afresh, as a new process would)."""
        entry = self.decoded.get(data)
        if entry is None:
            entry = self.s.codec.decode_entry(data, seq)
            inp = entry.input
            if deeply_immutable(inp.value if isinstance(inp, Normal) else (inp.id, inp.result)):
                self.decoded[data] = entry
        return entry

    def start(self) -> None:
        self.inc += 1
        self.queue.clear()
        self.count("starts")
        self.start_key()
        self.resend()

    def load_key(self) -> Engine:
        """Load the current key from the store (``ObjectHost._recover``): its engine, writer and
        the determinism check's replica."""
        self.writer = Writer(self.s.codec, self.s.durability)
        engine, sizes, self.needs_checkpoint, self.marked = self.recovered_engine()
        self.writer.recovered(*sizes)
        self.engine = engine
        return engine

    def replica(self) -> None:
        """The determinism check's replica: the state as a new process would load it."""
        tools = self.s.tools
        self.snap = None
        self.shadow = tools.loaded(tools.encode(self.engine.state)) if self.checks.determinism \
            else None

    def start_key(self) -> None:
        """Load the current key, run restore and dispatch what it re-emitted."""
        engine = self.load_key()
        try:
            release = run_sync(engine.restore(), "restore")
        except RestoreFailed as e:
            raise Violation("restore", str(e)) from e
        emitted = [*release.tracked, *release.already_in_flight]
        if self.checks.restore and self.inc > 1:
            self.compare_restore(emitted, f"after the restart at t={self.now:.3f}")
        self.replica()
        self.durable = {a.id: a.action for a in emitted}
        self.live = dict(self.durable)
        self.keys_live = dict(self.keys_durable)
        self.note("start", (engine.seq, self.where()), emitted)
        if self.checks.invariants:
            check_invariants(self.s.invariants, engine.state)
        if self.s.effects and self.inc > 1:
            self.check_effects()
        self.dispatch(release)

    def resend(self) -> None:
        """A client resends, with its key, every submit it got no answer for."""
        for item in sorted(self.unacked.values(), key=lambda i: i.n):
            self.count("resent")
            self.queue.append(_Item(self.fresh(item.input), item.key, item.n, "resent",
                                    item.target))

    def fresh(self, input: Input[Any, Any, Any]) -> Input[Any, Any, Any]:
        """The input as a client sending it again would: new objects decoded from its bytes
        (the stf may have changed the first copy in place), or the same object when nothing in
        it can be changed."""
        if not isinstance(input, Normal) or deeply_immutable(input.value):
            return input
        codec = self.s.codec
        again = codec.decode_entry(codec.encode_entry(0, input, None), 0).input
        packed = getattr(input, "_packed", None)
        if packed is not None:
            object.__setattr__(again, "_packed", packed)
        return again

    def crash(self, point: CrashPoint | str) -> None:
        self.count("crashes")
        self.count(f"crash:{point}")
        self.fault(f"crash {point}")
        self.note("crash", point)
        old = self.inc
        self.now += self.rng.uniform(*self.plan.restart_delay)
        # Results an executor of the dead process was about to return are lost, unless the
        # plan says they still arrive (computed elsewhere and delivered after the restart).
        if self.plan.late > 0:
            for t, _, kind, payload in sorted(self.heap):
                if kind == _ATTEMPT_END:
                    self.late(t, payload, old)
        self.start()

    def late(self, t: float, payload: Any, old: int) -> None:
        """Perhaps deliver after the restart the result an attempt of the dead process (its
        incarnation ``old``) was computing when it crashed."""
        if payload[0] == old and payload[4] == "ok" and self.chance(self.plan.late):
            self.fault(f"result of {payload[1]!r} arrives after the restart")
            self.push(max(t, self.now), _DELIVER, (payload[1], payload[5], "late"))

    # -- a batch (ObjectHost.run and _flush) ------------------------------------------------------

    def batch(self) -> None:
        queue = self.queue
        k = min(len(queue), self.plan.max_batch)
        if k > 1:
            k = self.rng.randint(1, k)
        accepted: list[tuple[_Item, Accepted]] = []
        answered: list[_Item] = []
        for _ in range(k):
            self.one(queue.popleft(), accepted, answered)
        if accepted and self.flush(accepted):
            return
        self.ack(answered)
        if self.engine.in_flight and "in-flight" in self.plan.crash_points \
                and self.chance(self.plan.crash):
            self.crash("in-flight")

    def ack(self, items: list[_Item]) -> None:
        for item in items:
            if item.key is not None and self.unacked.pop(item.key, None) is not None:
                self.acked.append(item)

    def one(self, item: _Item, accepted: list[tuple[_Item, Accepted]],
            answered: list[_Item]) -> Step:
        """Step one queued input on the current key's engine, with the per-step checks."""
        engine, checks, tools = self.engine, self.checks, self.s.tools
        inp = item.input
        is_result = isinstance(inp, TrackedActionCompleted)
        pending = is_result and inp.id in self.live  # type: ignore[union-attr]
        before = self.snap
        pre = None
        if is_result and (checks.absorbed or checks.duplicates):
            pre = before if before is not None else tools.plain(engine.state)
        self.snap = None
        if self.shadow is not None and tools.has_sets:
            # Another process would iterate these sets in another order: make the re-run's
            # copy do so too, before every step.
            self.shadow = perturb_sets(self.shadow)
        self.step += 1
        counts = self.counts
        counts["steps"] = counts.get("steps", 0) + 1
        self.trace.append((self.step, self.now, "input", inp, item))
        step = run_sync(engine.step(inp, item.key), "stf")
        if isinstance(step, Accepted):
            self.trace.append((self.step, self.now, "accepted", step.seq, step.actions))
            post = self.rerun(inp, step) if self.shadow is not None else None
            if pre is not None:
                post = post if post is not None else tools.plain(engine.state)
                self.check_result_step(inp, pending, pre, post)
            self.snap = post
            if is_result:
                self.live.pop(inp.id, None)  # type: ignore[union-attr]
            for action in step.actions:
                if isinstance(action, Tracked):
                    if checks.ids:
                        self.check_id(action, inp)
                    self.live[action.id] = action.action
            if item.key is not None:
                if checks.idempotency and item.key in self.keys_live:
                    what = (f"submit #{item.n} was resent with key" if item.origin is None
                            else f"the message from key {item.origin[0]!r} was sent again with")
                    raise Violation("idempotency", f"{what} {item.key!r}, committed at seq "
                                    f"{self.keys_live[item.key]}, and ran again")
                self.keys_live[item.key] = step.seq
            if checks.invariants:
                check_invariants(self.s.invariants, engine.state)
            if checks.encodable:
                tools.check_encodable(engine.state, f"after {short(inp)} (seq {step.seq})")
            accepted.append((item, step))
            return step
        elif isinstance(step, Duplicate):
            self.snap = before
            self.count("duplicate submits")
            self.note("duplicate", step.seq)
            if checks.idempotency and self.keys_live.get(step.idempotency_key) != step.seq:
                raise Violation("idempotency", f"key {step.idempotency_key!r} was answered as a "
                                f"duplicate of seq {step.seq}, but it ran at seq "
                                f"{self.keys_live.get(step.idempotency_key)}")
            answered.append(item)
            return step
        else:
            self.failed(item, step, pending, pre, before)
            answered.append(item)
        return step

    def check_id(self, action: Tracked[Any, Any], inp: Any) -> None:
        """An emitted tracked id must not be in flight: not released and uncompleted, nor
        emitted by an accepted step not yet committed (the engine would not dispatch it)."""
        engine = self.engine
        flying = action.id in engine.in_flight
        for step in engine.pending:
            if isinstance(step.input, TrackedActionCompleted) and step.input.id == action.id:
                flying = False
            for other in step.actions:
                if other is action:
                    break
                if isinstance(other, Tracked) and other.id == action.id:
                    flying = True
        if flying:
            raise Violation("ids", f"id collision: {short(inp)} emitted {short(action)}, but a "
                            f"tracked action with id {action.id!r} is already in flight "
                            f"({short(self.live.get(action.id, engine.in_flight.get(action.id)))})"
                            ". The Runtime does not dispatch an id that is in flight, so this "
                            "action never runs: give every tracked action a fresh id")

    def failed(self, item: _Item, step: Failed, pending: bool, pre: Any, before: Any) -> None:
        engine, checks, tools = self.engine, self.checks, self.s.tools
        inp = item.input
        error = step.error
        cause = error if isinstance(error, Rejected) else (error.__cause__ or error)
        self.count("rejections" if isinstance(error, Rejected) else "errors")
        self.note("failed", cause)
        mutated = tools.plain(engine.state) if checks.atomicity else None
        if isinstance(inp, TrackedActionCompleted):
            # As the Runtime does: a refused result is dropped and its id no longer waited on.
            engine.forget(inp.id)
            self.refused[inp.id] = self.step
        if step.reload:
            self.reload()
        if mutated is not None:
            if before is not None:
                expected = before
            elif not step.reload and self.s.rollback != "copy":
                # "trust", and "trust-rejected" after a Rejected: the engine kept whatever the
                # stf left, so compare with the last accepted state, rebuilt from the store.
                expected = tools.plain(self.last_accepted_state())
            else:  # the engine rolled back ("reload" above, or "copy" by itself)
                expected = tools.plain(engine.state)
            if mutated != expected:
                changes = "; ".join(diff(expected, mutated))
                raise Violation("atomicity", f"stf raised {cause!r} on {short(inp)} after "
                                f"changing state ({changes}). The Runtime's rollback hides this; "
                                "with rollback='trust', or state that is not rolled back, the "
                                "change is kept")
            self.snap = expected
        if self.shadow is not None:
            self.rerun_failed(inp, step, checked=mutated is not None)
        if pre is not None:
            self.check_result_step(inp, pending, pre, None, cause)
        if checks.errors and not isinstance(error, Rejected):
            raise Violation("errors", f"stf raised {type(cause).__qualname__} ({cause}) on "
                            f"{short(inp)}: an exception that is not a fasm.Rejected is a bug, "
                            "not a refusal (subclass Rejected for expected refusals)")

    def reload(self) -> None:
        """ObjectHost._reload: back to the last committed state, then re-apply the accepted steps
        not yet committed (``Engine.reset``)."""
        engine = self.engine
        keys: tuple[tuple[str, Any], ...] = ()
        if engine.committed_seq == 0:
            state, seq = self.s.initial(self.key), 0
        else:
            fresh = self.recovered_engine()[0]
            state, seq, keys = fresh.state, fresh.seq, tuple(fresh.idempotency.items())
        try:
            run_sync(engine.reset(state, seq, keys), "stf (reset)")
        except NondeterminismError as e:
            raise Violation("determinism", f"re-applying accepted inputs after a rollback "
                                           f"failed: {e}") from e
        self.count("reloads")

    def last_accepted_state(self) -> Any:
        """The state as the last accepted step left it, rebuilt from the store (for
        ``rollback='trust'``, where the engine itself keeps whatever the stf left)."""
        fresh = self.recovered_engine()[0]
        run_sync(fresh.replay((s.seq, s.input, s.idempotency_key) for s in self.engine.pending),
                 "stf (replay)")
        return fresh.state

    def flush(self, accepted: list[tuple[_Item, Accepted]]) -> bool:
        """One store write for the accepted steps, then release. True when the process
        crashed on the way."""
        if self.crash_before_commit(accepted):
            return True
        steps = [s for _, s in accepted]
        write = self.plan_write(steps)
        if self.chance(self.plan.store_failure):
            self.store.fail_next_commits = 1
        try:
            run_sync(self.store.commit(self.key, expected_seq=write.expected_seq, seq=write.seq,
                                       entries=write.entries, checkpoint=write.checkpoint,
                                       keep_journal=write.keep_journal,
                                       history_base=write.history_base),
                     "MemoryStore.commit")
        except StoreUnavailable:
            # The Runtime stops on a store failure; its process is restarted.
            self.count("store failures")
            self.crash("store-failure")
            return True
        self.written(write, steps)
        if self.crash_after_commit(steps):
            return True
        self.release(accepted)
        return False

    def crash_before_commit(self, accepted: list[tuple[_Item, Accepted]]) -> bool:
        """Perhaps crash with the accepted steps not written (True: crashed)."""
        plan = self.plan
        if plan.crash:
            point: CrashPoint = "before-commit"
            for _, s in accepted:
                if isinstance(s.input, TrackedActionCompleted):
                    point = "result-uncommitted"
                    break
            if point in plan.crash_points and self.chance(plan.crash):
                self.crash(point)
                return True
        return False

    def plan_write(self, steps: list[Accepted]) -> Any:
        """As ObjectHost._flush: encode the entries, add a checkpoint when due, plan one write
        of the current key."""
        engine, writer = self.engine, self.writer
        encoded = writer.encode([(s.seq, s.input, s.idempotency_key) for s in steps])
        checkpoint = None
        if self.needs_checkpoint or writer.checkpoint_due(encoded):
            try:
                checkpoint = self.s.codec.encode_checkpoint(steps[-1].seq, engine.state,
                                                            dict(engine.all_keys()))
            except Unencodable as e:
                raise Violation("encodable", unencodable_message(
                    e, engine.state, f"at seq {steps[-1].seq}, when a checkpoint was due,")
                    + " (Checks(encodable=True) finds the transition that put it there)") from e
        return writer.plan(engine.committed_seq, steps[-1].seq, encoded, checkpoint)

    def written(self, write: Any, steps: list[Accepted]) -> None:
        """The current key's write is durable: what the run knows to be committed."""
        self.writer.written(write)
        if write.checkpoint is not None:
            self.needs_checkpoint = False
        counts = self.counts
        counts["commits"] = counts.get("commits", 0) + 1
        counts["transitions"] = counts.get("transitions", 0) + len(steps)
        self.note("commit", (write.expected_seq, write.seq, self.where()),
                  write.checkpoint is not None)
        owed, done = self.owed, self.done
        for step in steps:
            if isinstance(step.input, TrackedActionCompleted):
                self.durable.pop(step.input.id, None)
                if owed.pop(step.input.id, None) is not None:
                    done[step.input.id] = self.step
                    self.completions[step.input.id] = self.completions.get(step.input.id, 0) + 1
            for action in step.actions:
                if isinstance(action, Tracked):
                    self.durable[action.id] = action.action
                    owed[action.id] = action.action
                else:
                    self.emitted_untracked.append((step.seq, action.action))
            if step.idempotency_key is not None:
                self.keys_durable[step.idempotency_key] = step.seq

    def crash_after_commit(self, steps: list[Accepted]) -> bool:
        """Perhaps crash between the commit and the handlers (True: crashed): the committed
        untracked actions are lost."""
        if "after-commit" in self.plan.crash_points and self.chance(self.plan.crash):
            lost = [(s.seq, a.action) for s in steps for a in s.actions
                    if not isinstance(a, Tracked)]
            if lost:
                self.lost_untracked.extend(lost)
                self.fault(f"{len(lost)} untracked action(s) lost: "
                           f"{short([a for _, a in lost], 120)}")
            self.crash("after-commit")
            return True
        return False

    def release(self, accepted: list[tuple[_Item, Accepted]]) -> None:
        """After the commit: release the current key's actions and answer its submits."""
        release = self.engine.committed([s for _, s in accepted])
        self.ack([item for item, _ in accepted])
        self.dispatch(release)
        if self.checks.restore:
            self.probe_restore()

    def effects(self) -> Effects:
        """The untracked actions of the run so far, for the user's effect checks."""
        return Effects(tuple(self.emitted_untracked), tuple(self.handled_untracked),
                       tuple(self.lost_untracked), self.engine.state)

    def check_effects(self) -> None:
        effects = self.effects()
        for fn in self.s.effects:
            try:
                verdict = fn(effects)
            except Exception as e:
                raise Violation("effects", f"{name_of(fn)} raised {e!r}") from e
            if verdict is None or verdict is True:
                continue
            raise Violation("effects", f"{name_of(fn)} returned False" if verdict is False
                            else f"{name_of(fn)}: {verdict}")

    # -- the end: liveness ------------------------------------------------------------------------

    def drain_keys(self) -> list[str]:
        """The keys whose work the liveness phase waits for: the one key here."""
        return [self.key]

    def field(self, key: str, name: str) -> Any:
        """One of ``key``'s ledgers (``owed``, ``completions``, ``failing`` ...): in a one-key
        run, the run's own."""
        return getattr(self, name)

    def drain(self) -> None:
        """Faults off, no new inputs, clock forward: everything pending must complete, and the
        final state must hold no pending work that nothing executes.

        Gives up, as a liveness failure, when one action fails ``DRAIN_FAILED_ATTEMPTS``
        attempts in a row or ``DRAIN_EVENTS`` events pass (work that never finishes)."""
        self.phase = "drain"
        self.plan = self.plan.quiet
        field = self.field
        # (key, action id) -> action, and how many results were committed for each so far: an
        # action completes when a result for it is committed, even if that transition emits the
        # same id again (a timer re-armed under its own id).
        waiting: dict[tuple[str, Any], Any] = {}
        base: dict[tuple[str, Any], int] = {}
        for key in self.drain_keys():
            completions = field(key, "completions")
            for i, action in {**field(key, "owed"), **field(key, "durable")}.items():
                waiting[(key, i)] = action
                base[(key, i)] = completions.get(i, 0)
            field(key, "failing").clear()
        self.note("drain", len(waiting))
        self.heap = [e for e in self.heap if e[2] != _ARRIVE]
        heapq.heapify(self.heap)
        events = 0
        while waiting and (self.queue or self.heap):
            if events >= DRAIN_EVENTS or any(
                    n >= DRAIN_FAILED_ATTEMPTS and (k, i) in waiting
                    for k in self.drain_keys() for i, (n, _) in field(k, "failing").items()):
                break
            events += 1
            if self.queue and not self.busy():
                self.batch()
            else:
                self.advance()
            for w in [w for w in waiting if field(w[0], "completions").get(w[1], 0) > base[w]
                      or (w[1] not in field(w[0], "owed") and w[1] not in field(w[0], "durable"))]:
                del waiting[w]
        if waiting:
            self.report_stuck(waiting, events)
        # Let work emitted during the phase finish too (not judged: a periodic timer never does),
        # so that the final state is as settled as the machine lets it be.
        while (self.queue or any(field(k, "owed") for k in self.drain_keys())) \
                and (self.queue or self.heap) and events < DRAIN_EVENTS + _SETTLE_EVENTS:
            events += 1
            if self.queue and not self.busy():
                self.batch()
            else:
                self.advance()
        self.settled()

    def report_stuck(self, waiting: dict[tuple[str, Any], Any], events: int) -> None:
        """The liveness failure for the actions that never completed."""
        self.stuck({i: a for (_, i), a in waiting.items()}, events)

    def settled(self) -> None:
        """The end of the liveness phase: the checks on the final state."""
        self.check_settled()

    def stuck(self, waiting: dict[Any, Any], events: int) -> None:
        lines = []
        for action_id, action in waiting.items():
            failing = self.failing.get(action_id)
            if action_id in self.refused:
                why = (f"its result was refused at step {self.refused[action_id]} and the "
                       "Runtime dropped it")
            elif action_id not in self.engine.in_flight:
                why = ("nothing is executing it (not in flight): restore did not re-emit it "
                       "after a restart" if self.inc > 1 else
                       "nothing is executing it (not in flight)")
            elif failing is not None and failing[0] >= DRAIN_FAILED_ATTEMPTS:
                why = (f"work never finishes: {failing[0]} attempts in a row failed with faults "
                       f"off (last: {failing[1]}); an attempt timeout shorter than the "
                       "executor's latency, or an executor that always raises, retried forever")
            elif failing is not None:
                why = (f"still in flight after {events} events, {failing[0]} failed attempt(s) "
                       f"in a row (last: {failing[1]})")
            else:
                why = f"still in flight when the drain gave up after {events} events"
            lines.append(f"{action_id!r} ({short(action)}): {why}")
        raise Violation("liveness", "with faults off and the clock run forward, these tracked "
                                    "actions never completed (work never finishes):\n"
                        + "\n".join(lines))

    def check_settled(self) -> None:
        """Restore on the final state must re-emit only work still in flight: an action whose
        result was committed but that the state still holds as pending is work that only a
        restart re-sends, and then every time."""
        actions: ActionList[Any, Any, Any] = ActionList()
        try:
            run_sync(self.s.machine.restore(self.engine.state, actions), "restore")
        except Exception as e:
            raise Violation("liveness", f"restore raised {e!r} on the final state") from e
        stale = [a for a in actions if isinstance(a, Tracked) and a.id not in self.owed
                 and a.id not in self.engine.in_flight]
        if stale:
            lines = []
            for a in stale:
                when = (f"its result was committed at step {self.done[a.id]}"
                        if a.id in self.done else "it was never emitted")
                lines.append(f"{a.id!r} ({short(a.action)}): {when}, yet the state still holds "
                             "it as pending, so it never finishes (restore re-sends it after "
                             "every restart)")
            raise Violation("liveness", "after the liveness phase, restore on the final state "
                            "re-emits tracked actions that nothing is waiting for:\n"
                            + "\n".join(lines))
