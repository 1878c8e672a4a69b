"""The replay check: run a key's recorded history through the current machine code.

Before a deploy, ask whether the new code agrees with what the old code committed: every input
in the store's journal was accepted once, so the new ``stf`` must accept it again, emit the same
tracked actions (a later result names them by id), and reach the same state. This is Temporal's
replayer for fasm; run it in CI against a copy of production data or a staging store.

What a store records, and so what can be compared:

* a journal entry holds one committed input, its seq and its idempotency key: not the state after
  it nor the actions it emitted;
* a checkpoint holds the state as of its seq and, for each idempotency key it remembers, the
  actions that key's transition emitted.

:func:`replay` starts from the oldest state it has: the initial state at seq 0 when the store kept
the whole history (``Journal(keep_history=True)``) and ``initial_state`` is given, the history
base when the store kept a bounded history (``Journal(keep_history=N)``: the older checkpoint
the kept entries start after, :meth:`~fasm.persistence.Store.history_base`), else the last
checkpoint. It runs ``restore`` there (which says what was in flight), then steps every recorded
input through the engine with its actions kept, and reports the first seq where:

``decode``
    a checkpoint or entry does not decode under the current code and migrations;
``restore``
    ``restore`` raises on the starting state;
``raised``
    a recorded input now raises (a :class:`~fasm.errors.Rejected` too: it was accepted once);
``completion``
    a recorded ``TrackedActionCompleted`` names an id that is not in flight in the replayed run:
    the new code did not emit that tracked action (or emitted it under another id), so the old
    result would reach a machine that never asked for it (the runtime only commits results of
    actions in flight);
``actions``
    a keyed input emitted other actions than the checkpoint remembers for its key;
``state``
    at the checkpoint's seq, the replayed state differs from the checkpoint's (both written with
    the current codec and compared byte for byte).

Without kept history only the tail after the last checkpoint is replayed, so only the first three
kinds (and ``completion`` for results after the checkpoint) can show. Replay reads the store and
never takes the key's lock, so it runs beside a live runtime; it writes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from .._inputs import TrackedActionCompleted
from .._machine import StateMachine
from .._remembered import Remembered
from ..errors import RestoreFailed, StoreCorrupt
from ..persistence._codec import Codec, JournalEntry, Unencodable
from ..persistence._store import Store
from ._engine import Accepted, Engine, Failed

__all__ = ("DifferenceKind", "ReplayDifference", "ReplayReport", "replay")

DifferenceKind: TypeAlias = Literal["decode", "restore", "raised", "completion", "actions",
                                    "state"]


@dataclass(frozen=True, slots=True)
class ReplayDifference:
    """The first place where the current code disagrees with the record.

    Attributes:
        seq: the transition (the seq of the record that does not decode, of the input that
            raised or emitted other actions, of the checkpoint whose state differs).
        kind: what differs (see :mod:`fasm.runtime._replay`).
        message: what was recorded and what the current code did.
    """

    seq: int
    kind: DifferenceKind
    message: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind}: {self.message}"


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What :func:`replay` checked for one key.

    Attributes:
        key: the machine key.
        seq: the key's last committed seq.
        start_seq: the state replay started from (0: the initial state).
        replayed: how many recorded inputs were stepped through the current code.
        state_checked_at: the seq of the checkpoint the replayed state was compared with, or
            None (no checkpoint inside the replayed history).
        outcomes_checked: how many keyed inputs' actions were compared with the checkpoint's.
        difference: the first difference, or None.
    """

    key: str
    seq: int
    start_seq: int
    replayed: int
    state_checked_at: int | None
    outcomes_checked: int
    difference: ReplayDifference | None

    @property
    def ok(self) -> bool:
        """Whether the current code agrees with everything that was compared."""
        return self.difference is None

    def __str__(self) -> str:
        head = (f"key {self.key!r}: replayed {self.replayed} input(s) from seq {self.start_seq} "
                f"to {self.seq}")
        checked = []
        if self.state_checked_at is not None:
            checked.append(f"state at seq {self.state_checked_at}")
        if self.outcomes_checked:
            checked.append(f"{self.outcomes_checked} keyed outcome(s)")
        if checked:
            head += f", compared {' and '.join(checked)}"
        return f"{head}: {'OK' if self.ok else self.difference}"


async def replay(
    machine: StateMachine[Any, Any, Any, Any, Any, Any],
    store: Store,
    *,
    key: str = "default",
    initial_state: Any | Callable[[], Any] | None = None,
) -> ReplayReport:
    """Replay ``key``'s recorded history in ``store`` through ``machine`` (the current code, with
    its migrations) and report the first transition that differs from the record.

    Args:
        machine: an instance of the machine class as it is now.
        store: an open store (the caller opens and closes it). Only read: the key's lock is
            never taken, so a runtime may be running on it.
        key: the machine key.
        initial_state: the runtime's ``initial_state`` (a value or a zero-argument factory).
            With it, a store that kept the whole history is replayed from seq 0; without it,
            replay starts at the history base (a bounded history) or the last checkpoint.

    Returns:
        the report; ``report.ok`` is False when something differs.

    Raises:
        KeyError: the store has never committed ``key``.
        StoreError: the store cannot be read.
    """
    codec = Codec(type(machine))
    records = await store.load(key)
    if records is None:
        raise KeyError(f"{store.description} has no key {key!r}")
    base, history = await _history(store, key)
    from_base = base is not None
    from_start = bool(history) and history[0][0] == 1 and initial_state is not None
    whole = from_base or from_start
    start_seq = base[0] if base is not None else 0 if from_start else records.checkpoint_seq
    raw = history if whole else records.journal

    def report(replayed: int, difference: ReplayDifference | None, state_at: int | None = None,
               outcomes: int = 0) -> ReplayReport:
        return ReplayReport(key, records.seq, start_seq, replayed, state_at, outcomes, difference)

    checkpoint = None
    if records.checkpoint is not None:
        try:
            checkpoint = codec.decode_checkpoint(records.checkpoint, records.checkpoint_seq)
        except StoreCorrupt as e:
            return report(0, ReplayDifference(records.checkpoint_seq, "decode",
                                              f"the checkpoint does not decode: {e.message}"))
    entries: list[JournalEntry] = []
    for seq, data in raw:
        try:
            entries.append(codec.decode_entry(data, seq))
        except StoreCorrupt as e:
            return report(0, ReplayDifference(seq, "decode",
                                              f"the journal entry does not decode: {e.message}"))
    if base is not None:
        try:
            state = codec.decode_checkpoint(base[1], base[0]).state
        except StoreCorrupt as e:
            return report(0, ReplayDifference(base[0], "decode", "the history base checkpoint "
                                              f"does not decode: {e.message}"))
    elif from_start:
        state = initial_state() if callable(initial_state) else copy.deepcopy(initial_state)
    elif checkpoint is not None:
        state = checkpoint.state
    else:  # a journal without a checkpoint and no initial state to start it from
        return report(0, ReplayDifference(0, "decode", "the key has no checkpoint: pass "
                                          "initial_state to replay its journal from seq 0"))
    engine = Engine(machine, state=state, seq=start_seq, rollback="trust",
                    idempotency_window=None, idempotency_ttl=None)
    try:
        await engine.restore()
    except RestoreFailed as e:
        return report(0, ReplayDifference(start_seq, "restore", str(e)))
    # Outcomes the checkpoint remembers for keyed transitions inside the replayed range.
    recorded: dict[int, tuple[str, Remembered]] = {}
    compare_state = checkpoint is not None and whole and checkpoint.seq > start_seq
    if checkpoint is not None and whole:
        recorded = {r.seq: (k, r) for k, r in checkpoint.idempotency.items()
                    if r.seq > start_seq}
    outcomes = 0
    state_at: int | None = None
    for n, entry in enumerate(entries, 1):
        step = await engine.step(entry.input)
        if isinstance(step, Failed):
            return report(n - 1, ReplayDifference(
                entry.seq, "raised", f"the recorded input {entry.input!r} now raises "
                f"{step.error!r}"), state_at, outcomes)
        assert isinstance(step, Accepted)
        if isinstance(entry.input, TrackedActionCompleted) and \
                entry.input.id not in engine.in_flight:
            return report(n, ReplayDifference(
                entry.seq, "completion", f"the recorded result of tracked action "
                f"{entry.input.id!r} arrives, but the current code has no such action in "
                f"flight (in flight: {sorted(map(repr, engine.in_flight))})"), state_at, outcomes)
        engine.committed([step])
        found = recorded.get(entry.seq)
        if found is not None and entry.idempotency_key == found[0]:
            was = codec.outcome(found[1])
            if was is not None:
                outcomes += 1
                difference = _compare_actions(codec, entry.seq, was, step.actions)
                if difference is not None:
                    return report(n, difference, state_at, outcomes)
        if compare_state and checkpoint is not None and entry.seq == checkpoint.seq:
            state_at = entry.seq
            difference = _compare_state(codec, entry.seq, checkpoint.state, engine.state)
            if difference is not None:
                return report(n, difference, state_at, outcomes)
    return report(len(entries), None, state_at, outcomes)


async def _history(store: Store, key: str
                   ) -> tuple[tuple[int, bytes] | None, tuple[tuple[int, bytes], ...]]:
    """The key's history base (None when the kept history does not start right after one)
    and its history. The two are read apart, so a runtime trimming in between is met by reading
    again."""
    for _ in range(3):
        base = await store.history_base(key)
        history = await store.history(key)
        if base is None:
            return None, history
        if history and history[0][0] == base[0] + 1:
            return base, history
    return None, history


def _compare_actions(codec: Codec, seq: int, was: tuple[Any, ...],
                     now: tuple[Any, ...]) -> ReplayDifference | None:
    try:
        same = codec.pack_outcome(was) == codec.pack_outcome(now)
    except Unencodable as e:
        return ReplayDifference(seq, "actions", f"the actions emitted now do not encode: {e}")
    if same:
        return None
    return ReplayDifference(seq, "actions", f"recorded actions {_short(was)}, the current code "
                            f"emits {_short(now)}")


def _compare_state(codec: Codec, seq: int, was: Any, now: Any) -> ReplayDifference | None:
    try:
        same = codec.pack("state", was) == codec.pack("state", now)
    except (Unencodable, TypeError) as e:
        return ReplayDifference(seq, "state", f"the replayed state does not encode: {e}")
    if same:
        return None
    return ReplayDifference(seq, "state", f"the checkpoint holds {_short(was)}, replay reached "
                            f"{_short(now)}")


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
