"""Shrinking one seeded failure, without hypothesis: record every random choice of the seed's
run, then replay it with arrivals dropped and choices set to 0 while the same check still fails.

The run's three streams (inputs, faults, executors) are recorded separately, and the inputs'
choices grouped by arrival, so dropping an arrival or zeroing a fault does not move the choices
of the other inputs. A choice of 0 means the plainest thing (no fault, the shortest latency, the
first outcome of a :class:`~fasm.testing.Weighted`); a replayed stream that runs past its record
draws 0 too.

The search is deterministic: string-seeded streams, lists in a fixed order, no hashing and no
clock in its decisions. Only ``budget`` and ``max_runs`` can stop it early, and the result says
so.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ._sim_config import Checks
from ._sim_report import Failure

if TYPE_CHECKING:
    from ._sim import Simulation

__all__ = ("Tape", "shrink_seed")

_ROUNDS = 3  # passes over the whole run while something still shrinks
# Which of the values seen at one place of the arrivals' choices lift tries, largest first (by
# rank, sparser further down: past the draws randint rejected, say, down to the middle).
_LIFTS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_VERIFY = 8  # candidates tried, newest first, when the fast search's last one fails otherwise
_CHECK_FIELD = {"invariant": "invariants"}  # a failure's check name -> its Checks field


def _only(checks: Checks, check: str) -> Checks:
    """``checks`` with only the one that failed left on (others off: the search runs faster,
    and a candidate is verified under all of them at the end)."""
    name = _CHECK_FIELD.get(check, check)
    if name not in Checks.__dataclass_fields__:
        return checks  # input, executor, effects: not switchable; keep the run as it is
    off = {f: False for f in Checks.__dataclass_fields__ if f != name}
    return Checks(**{**off, name: getattr(checks, name)})


class Tape(random.Random):
    """A ``Random`` that records another's choices, or replays a record (0 past its end).

    Everything ``random.Random`` offers goes through :meth:`random` and :meth:`getrandbits`, so
    recording those two records every choice, and replaying them replays the same run.
    """

    def __init__(self, source: random.Random | None = None, values: list[Any] | None = None,
                 blocks: dict[int, list[Any]] | None = None) -> None:
        super().__init__(0)
        self._source = source
        self.values: list[Any] = values if values is not None else []
        self.blocks = blocks  # per arrival (the input stream), or None
        self._cur = self.values
        self.pos = 0
        self.arrivals = 0

    def begin_arrival(self, n: int) -> None:
        """Arrival ``n`` starts: its choices are a block of their own."""
        if self.blocks is None:
            return
        self.arrivals = n + 1
        if self._source is not None:
            self._cur = self.blocks.setdefault(n, [])
        else:
            self._cur = self.blocks.get(n, [])
        self.pos = 0

    def _next(self) -> Any:
        cur, pos = self._cur, self.pos
        self.pos = pos + 1
        return cur[pos] if pos < len(cur) else 0.0

    def random(self) -> float:
        if self._source is not None:
            v = self._source.random()
            self._cur.append(v)
            return v
        v = self._next()
        if isinstance(v, tuple):
            k, x = v
            return min(x / (1 << k), 0.9999999999999999) if k else 0.0
        return float(v)

    def getrandbits(self, k: int, /) -> int:
        if self._source is not None:
            x = self._source.getrandbits(k)
            self._cur.append((k, x))
            return x
        v = self._next()
        if isinstance(v, tuple):
            k2, x = v
            return int(x if k2 == k else (x >> (k2 - k) if k2 > k else x << (k - k2)))
        return int(v * (1 << k))


@dataclass(frozen=True)
class _Candidate:
    blocks: dict[int, list[Any]]
    faults: list[Any]
    execs: list[Any]
    dropped: frozenset[int]
    arrivals: int  # the run's max_arrivals: one more than it reaches, so it never runs out
    reached: int  # arrivals the run reaches before it fails


def _key(failure: Failure, c: _Candidate) -> tuple[int, ...]:
    kept = c.reached - sum(1 for n in c.dropped if n < c.reached)
    return (failure.step, kept, _nonzero(c.faults), _nonzero(c.execs),
            sum(_nonzero(b) for n, b in c.blocks.items() if n not in c.dropped))


def _nonzero(values: list[Any]) -> int:
    return sum(1 for v in values if (v[1] if isinstance(v, tuple) else v))


def _is_zero(v: Any) -> bool:
    return not (v[1] if isinstance(v, tuple) else v)


def shrink_seed(sim: Simulation[Any, Any], seed: int, *, steps: int, budget: float,
                max_runs: int) -> Failure | None:
    """See :meth:`Simulation.shrink_seed`."""
    started = time.perf_counter()
    r_in, r_fault, r_exec = sim._rngs(seed)
    tapes = (Tape(r_in, blocks={}), Tape(r_fault), Tape(r_exec))
    first = sim.execute(tapes, sim._draw(tapes[0]), steps, seed=seed, trace_limit=0,
                        keep_trace=False)
    if first.failure is None:
        return None
    check = first.failure.check
    inputs, faults, execs = tapes
    assert inputs.blocks is not None
    best = _Candidate(inputs.blocks, faults.values, execs.values, frozenset(),
                      inputs.arrivals + 1, inputs.arrivals)
    best_failure = first.failure
    first_candidate = best
    best_key = _key(best_failure, best)
    runs = 0
    stopped = ""

    fast = _only(sim.checks, check)
    accepted: list[_Candidate] = []

    def attempt(c: _Candidate, trace: bool = False) -> tuple[Failure | None, _Candidate]:
        nonlocal runs
        runs += 1
        ts = (Tape(values=[], blocks=c.blocks), Tape(values=c.faults), Tape(values=c.execs))
        result = sim.execute(ts, sim._draw(ts[0]), steps, seed=seed,
                             trace_limit=None if trace else 0, keep_trace=False,
                             max_arrivals=c.arrivals, dropped=c.dropped,
                             checks=None if trace else fast)
        if result.failure is None or result.failure.check != check:
            return None, c
        # What the run did not reach (it stops at the failure) does not matter: cut it off.
        ins, fs, es = ts
        reached = ins.arrivals
        trimmed = _Candidate({n: b for n, b in c.blocks.items() if n < reached},
                             c.faults[:fs.pos], c.execs[:es.pos], c.dropped, c.arrivals,
                             reached)
        return result.failure, trimmed

    def out() -> bool:
        nonlocal stopped
        if runs >= max_runs:
            stopped = f"stopped after {max_runs} runs"
        elif time.perf_counter() - started >= budget:
            stopped = f"stopped by the {budget:g}s budget"
        return bool(stopped)

    def accept(c: _Candidate) -> bool:
        nonlocal best, best_failure, best_key
        failure, trimmed = attempt(c)
        if failure is None:
            return False
        key = _key(failure, trimmed)
        if key >= best_key:
            return False
        best, best_failure, best_key = trimmed, failure, key
        accepted.append(trimmed)
        return True

    def ddmin(items: Callable[[], list[int]], change: Callable[[list[int]], _Candidate]) -> bool:
        """Try the change on halves, quarters, ... of the items, then on single ones."""
        shrunk = False
        todo = items()
        size = max(1, len(todo) // 2)
        while todo and not out():
            i = 0
            while i < len(todo) and not out():
                part = todo[i:i + size]
                if accept(change(part)):
                    shrunk = True
                    todo = items()
                    i = next((j for j, x in enumerate(todo) if x >= part[0]), len(todo))
                else:
                    i += size
            if size == 1:
                break
            size = max(1, size // 2)
            todo = items()
        return shrunk

    def kept() -> list[int]:
        return [n for n in range(best.reached) if n not in best.dropped]

    def drop(part: list[int]) -> _Candidate:
        return replace(best, dropped=best.dropped | frozenset(part))

    def nonzero(values: list[Any]) -> list[int]:
        return [i for i, v in enumerate(values) if not _is_zero(v)]

    # A fault happens when its draw is at least 1 - p: only those draws are worth zeroing.
    plan = sim.faults
    likeliest = max(plan.crash, plan.store_failure, plan.fail, plan.timeout, plan.duplicate,
                    plan.late, plan.keyed, plan.resubmit, plan.busy)
    threshold = 1.0 - likeliest

    def fault_draws() -> list[int]:
        return [i for i, v in enumerate(best.faults)
                if not isinstance(v, tuple) and v and v >= threshold]

    def zero(values: list[Any], part: list[int]) -> list[Any]:
        chosen = set(part)
        return [0.0 if i in chosen else v for i, v in enumerate(values)]

    def plain_inputs(part: list[int]) -> _Candidate:
        blocks = dict(best.blocks)
        for n in part:
            blocks[n] = []
        return replace(best, blocks=blocks)

    def size(v: Any) -> float:
        return (v[1] / (1 << v[0]) if v[0] else 0.0) if isinstance(v, tuple) else float(v)

    def kind(v: Any) -> int | None:  # getrandbits' k, or None for a float
        return v[0] if isinstance(v, tuple) else None

    def lift() -> bool:
        """Raise the inputs' choices toward the largest made at the same place of an arrival
        (the largest amount drawn, say), one place and kind of draw at a time, trying the few
        largest values seen there (the largest may be draws ``randint`` rejected): a failure
        that needs many small inputs to add up then needs fewer. A lifted run is kept when it
        fails the same way sooner, with no more arrivals; the next round drops the rest."""
        nonlocal best, best_failure, best_key
        shrunk = False
        width = max((len(best.blocks.get(n, [])) for n in kept()), default=0)
        for j in range(width):
            kinds = sorted({kind(b[j]) for n in kept() if j < len(b := best.blocks.get(n, []))},
                           key=lambda k: -1 if k is None else k)
            for k in kinds:
                seen = {b[j] for n in kept() if j < len(b := best.blocks.get(n, []))
                        and kind(b[j]) == k}
                ranked = sorted(seen, key=size, reverse=True)
                for top in [ranked[i] for i in _LIFTS if i < len(ranked)]:
                    if out():
                        return shrunk
                    blocks = dict(best.blocks)
                    for n in kept():
                        b = blocks.get(n, [])
                        if j < len(b) and kind(b[j]) == k and size(b[j]) < size(top):
                            blocks[n] = [*b[:j], top, *b[j + 1:]]
                    failure, trimmed = attempt(replace(best, blocks=blocks))
                    if failure is None:
                        continue
                    key = _key(failure, trimmed)
                    if key[0] >= best_key[0] or key[1] > best_key[1]:
                        continue
                    best, best_failure, best_key = trimmed, failure, key
                    accepted.append(trimmed)
                    shrunk = True
                    break
        return shrunk

    for _ in range(_ROUNDS):
        shrunk = ddmin(kept, drop)
        shrunk |= lift()
        shrunk |= ddmin(fault_draws,
                        lambda part: replace(best, faults=zero(best.faults, part)))
        shrunk |= ddmin(lambda: nonzero(best.execs),
                        lambda part: replace(best, execs=zero(best.execs, part)))
        shrunk |= ddmin(lambda: [n for n in kept() if _nonzero(best.blocks.get(n, []))],
                        plain_inputs)
        if not shrunk or stopped:
            break
    # The search ran with only the failing check on: the result must fail the same way with
    # all of the simulation's checks (another could fail first, or the run take another path).
    final = None
    for candidate in [*reversed(accepted[-_VERIFY:]), first_candidate]:
        final, _ = attempt(candidate, trace=True)
        if final is not None:
            break
    if final is None:  # pragma: no cover - the recorded run itself fails that check
        final = first.failure
    note = (f" (shrunk from step {first.failure.step} to {final.step} in {runs} runs"
            + (f"; {stopped}: a faster machine may shrink further)" if stopped else ")"))
    return final.with_replay(f"sim.shrink_seed({seed}, steps={steps}){note}")
