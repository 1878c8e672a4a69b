"""One simulated run of a keyed machine: many instances, one per key, in one simulated process.

It is the one-key :class:`~fasm.testing._sim_world.Run` with a lane per key: each key has its
own engine, writer and bookkeeping (what is committed and in flight, its idempotency keys), and
the run switches lanes as it works on a key, so every check of a one-key run (atomicity,
determinism, restore, results absorbed, duplicates, idempotency, ids, encodable, liveness) runs
per key unchanged. What it adds, as the keyed Runtime does it (fasm/runtime/_runtime.py and
``ObjectHost.run``):

* a batch holds inputs of several keys, stepped each on its key's engine, and is written in one
  ``commit_many`` (``commit`` when it touches one key) that also sets or clears each key's
  in-flight mark; a crash may come before it or after it, as for one key;
* at a start, only the keys the store's in-flight index lists are loaded and restored; any other
  key is loaded on its first input, without restore. A key with committed tracked actions in
  flight that the index does not list is reported (check ``restore``): nothing would ever run
  its actions;
* after each batch the least recently used idle keys beyond ``max_active`` are passivated (their
  engine dropped), as the Runtime's ``_passivate`` does, and loaded again when next used;
* :class:`~fasm.Send` is the built-in executor: the message goes to the receiving key's queue
  with its message key (``fasm:msg/<machine>/<from>/<id>``), and the sender gets
  :class:`~fasm.Delivered` once that transition is committed (or answered as a duplicate), or
  :class:`~fasm.Refused` when the receiver refused it. A crash loses messages in transit; the
  sender's restore sends them again and the receiver's idempotency keys drop the second copy
  (check ``idempotency`` reports a message applied twice);
* global invariants over the states of all keys run after every store write and every start.
"""

from __future__ import annotations

import contextlib
import heapq
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from .._inputs import Normal, TrackedActionCompleted
from .._machine import StateMachine
from .._send import Delivered, Refused, Send, message_key
from ..errors import DefinitionError, InvalidInput, StoreUnavailable
from ..persistence._codec import Unencodable
from ..persistence._durability import Durability
from ..persistence._store import KeyCommit
from ..runtime._engine import Accepted, Failed, Rollback, Step
from ..runtime._state_object import _in_flight_after
from ._checks import Violation, check_invariants, run_sync, short
from ._sim import Simulation
from ._sim_config import Checks, ExecutorSpec, FaultPlan
from ._sim_world import (
    _ARRIVE,
    _ATTEMPT_END,
    _DELIVER,
    _RETRY,
    _TIMER,
    Run,
    _Item,
)

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = ("KeyedConfig", "KeyedInputSource", "KeyedRun", "KeyedSimulation", "States")

S = TypeVar("S")
I = TypeVar("I")

_SEND = 5  # event kind: a message reaches its receiving key's queue

# What a lane holds: the attributes of a one-key Run that belong to one key; its ledgers (dicts
# that outlive a crash or a passivation) and what a crash or a passivation drops.
_LEDGERS = ("durable", "live", "owed", "done", "completions", "failing", "refused",
            "keys_durable", "keys_live")
_LOADED = ("engine", "writer", "shadow", "snap")
_LANE = ("key", "needs_checkpoint", "marked", *_LOADED, *_LEDGERS)


@dataclass(frozen=True, eq=False)
class KeyedConfig:
    """What a keyed simulation adds to a one-key one (see ``KeyedSimulation``)."""

    keys: tuple[str, ...]
    global_invariants: tuple[Callable[[Mapping[str, Any]], object], ...]
    max_active: int


def _fresh_lane(key: str) -> dict[str, Any]:
    return {"key": key, "needs_checkpoint": False, "marked": False,
            **dict.fromkeys(_LOADED), **{name: {} for name in _LEDGERS}}


def _unload(lane: dict[str, Any]) -> None:
    """Drop what a lane holds only while its key is loaded (a crash, a passivation)."""
    lane.update(dict.fromkeys(_LOADED))


class States(Mapping[str, Any]):
    """The current state of every key a keyed simulation knows (its ``keys`` and any other key
    that received an input), as an input source and the global invariants see it: an active
    key's live state, an idle one's committed state, loaded when first asked for. Read it; do
    not change the states."""

    def __init__(self, run: KeyedRun) -> None:
        self._run = run

    def __getitem__(self, key: str) -> Any:
        return self._run.state_of(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._run.known_keys())

    def __len__(self) -> int:
        return len(self._run.known_keys())


class KeyedRun(Run):
    """One seed's run of a keyed machine (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        keyed = self.s.keyed
        assert keyed is not None
        self.kc: KeyedConfig = keyed
        self.lanes: dict[str, dict[str, Any]] = {}
        self.cached: dict[str, Any] = {}  # committed states of idle keys
        self.active: OrderedDict[str, None] = OrderedDict()  # loaded keys, least recent first
        self.key = ""  # no lane entered yet
        self.states = States(self)
        self._known: list[str] | None = None

    def acquire(self) -> None:
        run_sync(self.store.acquire_all(), "MemoryStore.acquire_all")

    # -- lanes ------------------------------------------------------------------------------------

    def enter(self, key: str) -> None:
        """Make ``key`` the one the run works on (its lane's attributes become the run's)."""
        if key == self.key:
            return
        self.enter_none()
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = _fresh_lane(key)
            self._known = None
        for name in _LANE:
            setattr(self, name, lane[name])

    def where(self) -> str:
        return self.key

    def field(self, key: str, name: str) -> Any:
        return getattr(self, name) if key == self.key else self.lanes[key][name]

    def activate(self) -> None:
        """Load the current key if it is idle (``Runtime._activated``): no restore."""
        if self.engine is not None:
            self.active.move_to_end(self.key)
            return
        self.cached.pop(self.key, None)
        self.active[self.key] = None
        self.load_key()
        self.replica()
        self.live = dict(self.durable)
        self.keys_live = dict(self.keys_durable)
        self.count("activations")
        if self.durable and self.checks.restore:
            raise Violation("restore", f"key {self.key!r} has committed tracked actions in "
                            f"flight ({short(list(self.durable.values()), 200)}) but was not "
                            "restored at the start: the store's in-flight index does not list "
                            "it, so nothing runs them until the key happens to get an input")

    def passivate(self) -> None:
        """Evict the least recently used idle keys beyond ``max_active`` (``Runtime._passivate``:
        a key with tracked actions in flight is kept, and moved to the recent end)."""
        active = self.active
        excess = len(active) - self.kc.max_active
        if excess <= 0:
            return
        self.enter_none()
        for _ in range(len(active)):
            if excess <= 0:
                break
            key = next(iter(active))
            lane = self.lanes[key]
            engine = lane["engine"]
            if engine.in_flight or engine.pending:
                active.move_to_end(key)
                continue
            del active[key]
            self.cached[key] = engine.state
            _unload(lane)
            self.count("passivations")
            excess -= 1

    def known_keys(self) -> list[str]:
        if self._known is None:
            self._known = sorted({*self.kc.keys, *self.lanes})
        return self._known

    def state_of(self, key: str) -> Any:
        engine = self.field(key, "engine") if key in self.lanes else None
        if engine is not None:
            return engine.state
        found = self.cached.get(key)
        if found is None and key not in self.cached:
            found = self.cached[key] = self.peek(key)
        return found

    def peek(self, key: str) -> Any:
        """The committed state of an idle key, loaded from the store (``ObjectHost.peek``)."""
        current = self.key
        self.enter(key)
        try:
            return self.recovered_engine()[0].state
        finally:
            if current:
                self.enter(current)

    def final_state(self) -> Any:
        return {k: self.state_of(k) for k in self.known_keys()}

    def check_global(self) -> None:
        if self.checks.invariants and self.kc.global_invariants:
            check_invariants(self.kc.global_invariants, self.states)

    # -- start ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.inc += 1
        self.queue.clear()
        self.enter_none()
        for lane in self.lanes.values():
            _unload(lane)
        self.cached.clear()
        self.active.clear()
        marked = run_sync(self.store.keys_in_flight(), "MemoryStore.keys_in_flight")
        self.count("starts")
        for key in marked:
            self.enter(key)
            self.active[key] = None
            self.start_key()
        self.enter_none()
        if self.checks.restore:
            for key, lane in self.lanes.items():
                if lane["engine"] is None and lane["durable"]:
                    self.enter(key)
                    self.activate()  # raises: the index missed it
        self.check_global()
        self.resend()

    def enter_none(self) -> None:
        if self.key:
            lane = self.lanes[self.key]
            for name in _LANE:
                lane[name] = getattr(self, name)
            self.key = ""

    def start_key(self) -> None:
        with self.naming_the_key():
            super().start_key()

    def one(self, item: _Item, accepted: list[tuple[_Item, Accepted]],
            answered: list[_Item]) -> Step:
        with self.naming_the_key():
            return super().one(item, accepted, answered)

    def release(self, accepted: list[tuple[_Item, Accepted]]) -> None:
        with self.naming_the_key():
            super().release(accepted)

    @contextlib.contextmanager
    def naming_the_key(self) -> Iterator[None]:
        """A check that fails in here says which key it failed on."""
        try:
            yield
        except Violation as v:
            if v.message.startswith("key "):
                raise
            raise Violation(v.check, f"key {self.key!r}: {v.message}") from v

    def next_input(self) -> tuple[Any, str]:
        got = self.draw_input(self.states)
        if got is None:
            return None, ""
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], str)):
            raise Violation("input", f"the input source of a keyed simulation returns (key, "
                                     f"value) or None, not {short(got)}")
        key, value = got
        if key not in self.lanes:
            self._known = None
        return value, key

    # -- events -----------------------------------------------------------------------------------

    def push(self, t: float, kind: int, payload: Any = None) -> None:
        super().push(t, kind, payload if kind == _ARRIVE else (self.key, payload))

    def advance(self) -> bool:
        if not self.heap:
            return False
        t, _, kind, payload = heapq.heappop(self.heap)
        self.now = max(self.now, t)
        if kind == _ARRIVE:
            self.handle(kind, payload)
            return True
        key, inner = payload
        if kind in (_ATTEMPT_END, _RETRY, _TIMER, _SEND) and inner[0] != self.inc:
            return True  # of a process that crashed
        self.enter(key)
        if kind == _DELIVER:
            self.activate()  # a late or duplicated result may reach an idle key
        if kind == _SEND:
            self.send(*inner[1:])
        else:
            self.handle(kind, inner)
        return True

    def late(self, t: float, payload: Any, old: int) -> None:
        key, inner = payload
        self.enter(key)  # the result goes to the key whose action computed it
        super().late(t, inner, old)

    def attempt(self, action_id: Any, action: Any, attempt: int) -> None:
        if isinstance(action, Send):
            low, high = self.plan.latency
            self.push(self.now + self.rng_exec.uniform(low, high), _SEND,
                      (self.inc, action_id, action))
            return
        super().attempt(action_id, action, attempt)

    def send(self, action_id: Any, send: Send[Any]) -> None:
        """The built-in executor of Send (``Runtime._send_message``): submit the input to the
        receiving key with the message key; answered after the receiving commit."""
        try:
            if not isinstance(send.to, str) or not send.to:
                raise InvalidInput(f"Send.to must be a non-empty key, not {send.to!r}")
            value = self.s.validator.validate(send.input)
            packed = self.s.codec.pack("input", value)
        except (InvalidInput, Unencodable) as e:
            self.deliver(action_id, Refused(str(send.to), str(e)), "refused")
            return
        normal = Normal(value)
        object.__setattr__(normal, "_packed", packed)
        self.count("messages")
        self.note("message", send.to, send.input)
        if send.to not in self.lanes:
            self._known = None
        self.queue.append(_Item(normal, message_key(self.s.machine_name, self.key, action_id),
                                0, "message", send.to, (self.key, action_id)))

    def answer(self, item: _Item, result: Any) -> None:
        """Feed a message's result back to its sender's queue."""
        assert item.origin is not None
        sender, action_id = item.origin
        self.queue.append(_Item(TrackedActionCompleted(action_id, result), target=sender))

    # -- a batch ----------------------------------------------------------------------------------

    def batch(self) -> None:
        queue = self.queue
        k = min(len(queue), self.plan.max_batch)
        if k > 1:
            k = self.rng.randint(1, k)
        groups: dict[str, list[tuple[_Item, Accepted]]] = {}
        answered: list[_Item] = []
        refused: list[_Item] = []
        for _ in range(k):
            item = queue.popleft()
            self.enter(item.target)
            try:
                self.activate()
            except KeyRefused as e:
                # As ObjectHost._fresh_initial: the factory refused the key, so its input is
                # refused (InvalidInput to a client, Refused to a message's sender); nothing of
                # the key exists.
                self.count("keys refused")
                self.note("failed", e)
                self.active.pop(item.target, None)
                self.enter_none()
                del self.lanes[item.target]
                self._known = None
                if item.origin is not None:
                    refused.append(item)
                else:
                    answered.append(item)
                continue
            step = self.one(item, groups.setdefault(item.target, []), answered)
            if item.origin is not None and isinstance(step, Failed):
                answered.remove(item)
                refused.append(item)
        groups = {key: accepted for key, accepted in groups.items() if accepted}
        if groups and self.flush_many(groups):
            return
        self.ack(answered)
        for item in answered:
            if item.origin is not None:  # a duplicate message: applied before
                seq = self.field(item.target, "keys_live").get(item.key, 0)
                self.answer(item, Delivered(item.target, seq, duplicate=True))
        for item in refused:
            self.answer(item, Refused(item.target, "the receiving stf refused it"))
        if self.plan.crash and "in-flight" in self.plan.crash_points \
                and any(self.field(key, "durable") for key in self.lanes) \
                and self.chance(self.plan.crash):
            self.crash("in-flight")
            return
        self.passivate()

    def flush_many(self, groups: dict[str, list[tuple[_Item, Accepted]]]) -> bool:
        """One store write for the accepted steps of every key in the batch (``ObjectHost.run``),
        then release. True when the process crashed on the way."""
        every = [pair for accepted in groups.values() for pair in accepted]
        many = len(groups) > 1
        if self.crash_before_commit(every):
            if many:
                self.count("crashes at a group commit")
            return True
        planned: list[tuple[str, Any, list[Accepted], bool]] = []
        commits: list[KeyCommit] = []
        for key, accepted in groups.items():
            self.enter(key)
            steps = [s for _, s in accepted]
            write = self.plan_write(steps)
            mark = _in_flight_after(self.engine, steps)
            planned.append((key, write, steps, mark))
            commits.append(KeyCommit(key, write.expected_seq, write.seq, write.entries,
                                     write.checkpoint, None if mark == self.marked else mark,
                                     write.keep_journal, write.history_base))
        if self.chance(self.plan.store_failure):
            self.store.fail_next_commits = 1
        try:
            if len(commits) == 1:
                c = commits[0]
                run_sync(self.store.commit(c.key, expected_seq=c.expected_seq, seq=c.seq,
                                           entries=c.entries, checkpoint=c.checkpoint,
                                           in_flight=c.in_flight, keep_journal=c.keep_journal,
                                           history_base=c.history_base), "MemoryStore.commit")
            else:
                run_sync(self.store.commit_many(commits), "MemoryStore.commit_many")
                self.count("group commits")
        except StoreUnavailable:
            self.count("store failures")
            if many:
                self.count("crashes at a group commit")
            self.crash("store-failure")
            return True
        for key, write, steps, mark in planned:
            self.enter(key)
            self.written(write, steps)
            self.marked = mark
        if self.crash_after_commit([s for _, _, steps, _ in planned for s in steps]):
            if many:
                self.count("crashes at a group commit")
            return True
        for key, accepted in groups.items():
            self.enter(key)
            self.release(accepted)
            for item, step in accepted:
                if item.origin is not None:
                    self.answer(item, Delivered(key, step.seq))
        self.check_global()
        return False

    # -- the end: liveness (Run.drain, over every key) ------------------------------------------

    def drain_keys(self) -> list[str]:
        return list(self.lanes)

    def report_stuck(self, waiting: dict[tuple[str, Any], Any], events: int) -> None:
        first = min(k for k, _ in waiting)
        self.enter(first)
        with self.naming_the_key():
            self.activate()
            self.stuck({i: a for (k, i), a in waiting.items() if k == first}, events)

    def settled(self) -> None:
        for key in sorted(self.lanes):
            self.enter(key)
            with self.naming_the_key():
                self.activate()
                self.check_settled()
        self.check_global()


KeyedInputSource: TypeAlias = Callable[[random.Random, Mapping[str, S]], "tuple[str, I] | None"]
"""``fn(rng, states) -> (key, input)`` (or None for "nothing this time"): the next input and the
key it is for, chosen with ``rng`` (and only ``rng``) from the current states of the keys
(a read-only mapping of key -> state), which it must not change."""


class KeyedSimulation(Simulation[S, I]):
    """A deterministic simulation of a keyed machine: many instances, one per key, in one
    simulated process, under the real engine, with crashes and faults.

    What :class:`Simulation` does for one instance, over many keys as the keyed
    :class:`~fasm.runtime.Runtime` hosts them: inputs go to keys the input source chooses;
    a batch of inputs of several keys is written in one multi-key commit, and a crash may come
    before or after it; at a start only the keys the store lists as in flight are restored;
    idle keys beyond ``max_active`` are passivated and loaded again; :class:`~fasm.Send` messages
    travel between keys through the built-in executor (lost in a crash, sent again by the
    sender's restore, dropped as duplicates by the receiver). Every check of :class:`Checks`
    runs per key, the ``invariants`` on each key's state, and the ``global_invariants`` on the
    states of all keys (total money, say) after every store write and every start. ``run``,
    ``run_seed``, ``replay``, ``shrink_seed``, ``hypothesis_test`` and ``shrink`` work as for one
    instance; ``SeedResult.state`` is a dict of key -> state.

    Args:
        machine: the machine instance (the same object the keyed Runtime would host).
        initial_state: the factory of a key's initial state, given the key (as the keyed
            Runtime's ``initial_state``).
        keys: the keys the global invariants and the input source see from the start (any other
            key an input or a message reaches joins them).
        inputs: ``fn(rng, states) -> (key, value) or None`` (see :data:`KeyedInputSource`), or a
            hypothesis strategy of ``(key, value)`` pairs.
        executors: as :class:`Simulation`'s; ``Send`` and ``Timer`` need none.
        invariants: functions of one key's state, run on every key.
        global_invariants: functions of the mapping key -> state of every key, that raise, or
            return False or a message, when the states together are wrong.
        faults, checks, durability, rollback, steps, idempotency_window, name: as
            :class:`Simulation`'s.
        max_active: as the keyed Runtime's: after each batch the least recently used idle keys
            beyond it are evicted (their engine dropped, loaded again from the store when next
            used). Small by default, so that a run evicts and reloads keys often.

    Raises:
        DefinitionError: as :class:`Simulation`, or ``max_active`` is below 1.
    """

    _run_type = KeyedRun

    def __init__(
        self,
        machine: StateMachine[S, I, Any, Any, Any, Any],
        *,
        initial_state: Callable[[str], S],
        keys: Iterable[str],
        inputs: KeyedInputSource[S, I] | SearchStrategy[tuple[str, I]],
        executors: Mapping[type[Any], ExecutorSpec] | None = None,
        invariants: Sequence[Callable[[S], object]] = (),
        global_invariants: Sequence[Callable[[Mapping[str, S]], object]] = (),
        faults: FaultPlan | None = None,
        checks: Checks | None = None,
        durability: Durability | None = None,
        rollback: Rollback = "trust",
        steps: int = 200,
        idempotency_window: int = 1000,
        max_active: int = 3,
        name: str | None = None,
    ) -> None:
        if max_active < 1:
            raise DefinitionError(f"max_active must be >= 1, got {max_active}")
        if not callable(initial_state):
            raise DefinitionError("initial_state of a KeyedSimulation is a factory of the key, "
                                  "as the keyed Runtime's")
        super().__init__(machine, initial_state=_no_state, inputs=inputs,  # type: ignore[arg-type]
                         executors=executors, invariants=invariants, faults=faults,
                         checks=checks, durability=durability, rollback=rollback, steps=steps,
                         key="", idempotency_window=idempotency_window, name=name)
        self.keys = tuple(keys)
        setup = self._setup
        setup.initial = _refusing(initial_state)
        setup.keyed = KeyedConfig(self.keys, tuple(global_invariants), max_active)


def _no_state() -> None:  # replaced by the key's factory
    return None


class KeyRefused(InvalidInput):
    """``initial_state(key)`` raised: the key cannot be started (its inputs are refused)."""


def _refusing(factory: Callable[[str], Any]) -> Callable[[str], Any]:
    def initial(key: str) -> Any:
        try:
            return factory(key)
        except Exception as e:
            raise KeyRefused(f"initial_state({key!r}) raised {e!r}; key {key!r} cannot be "
                             "started") from e

    return initial
