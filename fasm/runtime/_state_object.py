"""ObjectHost: state kept as a Python object, made durable through a Store after each group.

On open it loads the last checkpoint and replays the journal after it; each group is stepped
through the engine on the event loop (the stf never suspends on an object) and written in one
store commit (snapshot or journal, per the durability strategy); a failed input under the
``"reload"`` rollback policy reloads the committed state and lets the engine re-apply what the
group accepted so far.

State that cannot be encoded (a transition put a value in it the codec cannot write) never stops
the runtime, and never makes the store unreadable:

* under :class:`Journal` the due checkpoint is skipped and the group is committed as journal
  entries alone (durable, and recovered by replay). The first failure finds the culprit
  transition (rebuild from the last checkpoint, replay the journal tail encoding the state after
  each step), reports it once (a :class:`CheckpointFailed` event and an ERROR log), and the next
  attempt waits another checkpoint interval (:meth:`Writer.postpone`). A later transition that
  makes the state encodable again lets checkpoints resume.
* under :class:`Snapshot` the state is encoded every commit, so the input of the group whose
  transition made it unencodable is refused alone (:class:`TransitionFailed` naming the field;
  a tracked result is dropped like one the stf refuses), the engine goes back to the committed
  state and the group's other inputs are run again and committed.
* an initial state that does not encode is a :class:`DefinitionError` at start.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread

from ..errors import DefinitionError, FasmError, StoreError, TransitionFailed
from ..persistence._codec import Codec, Unencodable
from ..persistence._durability import Durability, Journal, Snapshot, Writer, decode_records
from ..persistence._locate import Location, locate, unencodable_path
from ..persistence._memory import MemoryStore
from ..persistence._store import Store
from ._engine import (
    Accepted,
    AnyMachine,
    Engine,
    Failed,
    Release,
    Rollback,
    Step,
    _describe,
    input_kind,
)
from ._events import CheckpointFailed, RuntimeEvent
from ._host import GroupResult, Submitted

__all__ = ("ObjectHost",)

log = logging.getLogger("fasm.runtime")


class ObjectHost:
    """The state-object path of the :class:`~fasm.runtime.Runtime` (see the module docstring).

    Args:
        machine: the machine instance.
        key: the machine key in the store.
        initial_state: the state of a key the store has never seen (a value, deep-copied, or a
            zero-argument factory).
        store: where records are kept (default: a fresh MemoryStore).
        durability: snapshot or journal (default: journal).
        rollback: the engine's rollback policy.
        idempotency_window: at most how many submit keys the engine remembers (None: no bound).
        idempotency_ttl: how long (seconds) a submit key is remembered (None: no bound).
    """

    def __init__(self, machine: AnyMachine, *, key: str, initial_state: Any,
                 store: Store | None, durability: Durability | None, rollback: Rollback,
                 idempotency_window: int | None, idempotency_ttl: float | None = None) -> None:
        self.machine = machine
        self.key = key
        self.store: Store = store if store is not None else MemoryStore()
        self.durability: Durability = durability if durability is not None else Journal()
        self._initial: Any | Callable[[], Any] = initial_state
        self._rollback: Rollback = rollback
        self._idempotency_window = idempotency_window
        self._idempotency_ttl = idempotency_ttl
        self.codec = Codec(type(machine))
        """Encodes the records (made with the host; its adapters are built at need)."""
        self._writer: Writer | None = None
        self._needs_checkpoint = False
        self._last_checkpoint_size = 0
        # (culprit seq, path) of the unencodable state last reported; None while checkpoints
        # succeed. While it is set, ``_watch`` is where the bad value sits, looked at after each
        # accepted step (cheap: one path, one leaf): while it stays bad, a later failed attempt
        # has the same culprit and needs no search.
        self._unencodable: tuple[int | None, str] | None = None
        self._watch: Location | None = None

    @property
    def description(self) -> str:
        """The store's description."""
        return self.store.description

    # -- open and restore -----------------------------------------------------------------------

    async def open(self) -> Engine:
        """Open the store, take the key, load the checkpoint and replay the journal after it.

        Raises:
            StoreError: the store cannot be opened or read, or another runtime holds the key.
            NondeterminismError: a journaled input raised on replay.
        """
        await self.store.open()
        await self.store.acquire(self.key)
        return await self._recover()

    async def restore(self, engine: Engine) -> Release:
        """Run restore on the recovered state object."""
        return await engine.restore()

    async def close(self) -> None:
        """Release the key and close the store."""
        try:
            await self.store.release(self.key)
        finally:
            await self.store.close()

    async def _recover(self) -> Engine:
        codec = self.codec
        self._writer = Writer(codec, self.durability)
        records = await self.store.load(self.key)
        if records is None:
            self._needs_checkpoint = True
            initial = self._fresh_initial()
            self._check_initial(codec, initial)
            return self._new_engine(initial, 0, ())
        recovered = decode_records(codec, records, store=self.store.description, key=self.key)
        cp = recovered.checkpoint
        if cp is None:
            # A journal without a checkpoint was written from the initial state.
            self._needs_checkpoint = True
            engine = self._new_engine(self._fresh_initial(), 0, ())
        else:
            engine = self._new_engine(cp.state, cp.seq, cp.idempotency.items())
        await engine.replay((e.seq, e.input, e.idempotency_key, e.at) for e in recovered.journal)
        self._last_checkpoint_size = len(records.checkpoint or b"")
        self._writer.recovered(len(records.journal), sum(len(d) for _, d in records.journal),
                               self._last_checkpoint_size,
                               None if records.checkpoint is None
                               else (records.checkpoint_seq, records.checkpoint))
        return engine

    def _new_engine(self, state: Any, seq: int, keys: Any) -> Engine:
        return Engine(self.machine, state=state, seq=seq, idempotency=keys,
                      rollback=self._rollback, idempotency_window=self._idempotency_window,
                      idempotency_ttl=self._idempotency_ttl)

    def _check_initial(self, codec: Codec, state: Any) -> None:
        """A fresh key's initial state must encode: every commit under Snapshot, and the first
        checkpoint under Journal, would otherwise fail with no transition to blame. Encoded once,
        at the start of a key the store has never seen."""
        try:
            codec.encode_checkpoint(0, state, {})
        except Unencodable as e:
            path = e.path or unencodable_path(state)
            where = f" at {path}" if path else ""
            raise DefinitionError(
                f"initial_state of {type(self.machine).__qualname__} cannot be encoded{where}: "
                f"{e.reason}; the store could never write it (key {self.key!r}, "
                f"{self.store.description})") from e

    def _fresh_initial(self) -> Any:
        init = self._initial
        return init() if callable(init) else copy.deepcopy(init)

    # -- a group --------------------------------------------------------------------------------

    async def run(self, engine: Engine, inputs: Sequence[Submitted]) -> GroupResult:
        """Step each input, reloading after a failure when the policy says so, then write the
        accepted ones in one store commit.

        Under Snapshot, an input whose transition leaves a state that does not encode is refused
        (a :class:`Failed` step with a :class:`TransitionFailed`) and the group is run again
        without it, from the committed state; each round refuses one more input, so this ends.

        Raises:
            StoreError: the commit failed (the runtime stops; nothing is acknowledged).
        """
        refused: dict[int, Failed] = {}
        events: list[RuntimeEvent] = []
        while True:
            steps: list[Step | StoreError] = []
            accepted: list[Accepted] = []
            positions: list[int] = []
            for i, (input, key) in enumerate(inputs):
                if i in refused:
                    steps.append(refused[i])
                    continue
                step = await engine.step(input, key)
                if isinstance(step, Accepted):
                    accepted.append(step)
                    positions.append(i)
                    if self._watch is not None and not self._watch.fails_in(engine.state):
                        self._watch = None  # the value moved or went: the next failure searches
                elif isinstance(step, Failed) and step.reload:
                    await self._reload(engine)
                steps.append(step)
            if accepted:
                culprit = await self._flush(engine, accepted, events)
                if culprit is not None:
                    index, error = culprit
                    refused[positions[index]] = self._refuse(accepted[index], error, events)
                    # Back to the committed state, then the group again without the culprit.
                    engine.abandon(())
                    await self._reload(engine)
                    continue
            return GroupResult(steps, events=events)

    async def _reload(self, engine: Engine) -> None:
        records = await self.store.load(self.key)
        if records is None or engine.committed_seq == 0:
            await engine.reset(self._fresh_initial(), 0, ())
            return
        recovered = decode_records(self.codec, records, store=self.store.description,
                                   key=self.key)
        cp = recovered.checkpoint
        fresh = self._new_engine(cp.state if cp else self._fresh_initial(), cp.seq if cp else 0,
                                 cp.idempotency.items() if cp else ())
        await fresh.replay((e.seq, e.input, e.idempotency_key, e.at) for e in recovered.journal)
        await engine.reset(fresh.state, fresh.seq, fresh.all_keys())

    async def _flush(self, engine: Engine, steps: list[Accepted],
                     events: list[RuntimeEvent]) -> tuple[int, Unencodable] | None:
        """Write the accepted steps in one commit. Returns None when written, or (Snapshot only,
        nothing written) the index in ``steps`` of the first one whose state does not encode."""
        writer = self._writer
        assert writer is not None
        encoded = writer.encode([(s.seq, s.input, s.idempotency_key, s.at) for s in steps])
        checkpoint = None
        skipped = False
        if self._needs_checkpoint or writer.checkpoint_due(encoded):
            try:
                checkpoint = await self._encode_checkpoint(engine, steps[-1].seq)
            except Unencodable as e:
                if isinstance(self.durability, Snapshot):
                    return await self._first_unencodable(engine, steps, e)
                await self._checkpoint_skipped(engine, steps, e, events)
                skipped = True
        plan = writer.plan(engine.committed_seq, steps[-1].seq, encoded, checkpoint)
        try:
            # keep_journal only when asked for, so a store written before it existed still works
            keep: dict[str, Any] = {"keep_journal": True} if plan.keep_journal else {}
            if plan.history_base is not None:
                keep["history_base"] = plan.history_base
            await self.store.commit(self.key, expected_seq=plan.expected_seq, seq=plan.seq,
                                    entries=plan.entries, checkpoint=plan.checkpoint, **keep)
        except Exception as e:  # a KeyboardInterrupt or a cancellation goes on as itself
            error = e if isinstance(e, FasmError) else StoreError(
                f"store commit raised {e!r}", store=self.store.description, key=self.key,
                seq=plan.seq)
            if error is not e:
                raise error from e
            raise
        writer.written(plan)
        if skipped:
            writer.postpone()  # the next attempt comes a whole interval after this commit
        if plan.checkpoint is not None:
            self._needs_checkpoint = False
            if self._unencodable is not None:
                self._unencodable = self._watch = None
                log.info("state encodes again: checkpoint written at seq %d", plan.seq,
                         extra={"fasm_key": self.key, "fasm_seq": plan.seq})
        return None

    # -- state that cannot be encoded (paid only when an encode failed) ------------------------

    async def _checkpoint_skipped(self, engine: Engine, steps: list[Accepted], error: Unencodable,
                                  events: list[RuntimeEvent]) -> None:
        """Journal: the commit goes ahead without the checkpoint (the caller then postpones the
        next attempt by a whole interval); report the culprit once."""
        # A journal without a checkpoint is recovered from the initial state: still readable.
        self._needs_checkpoint = False
        seq = steps[-1].seq
        # Searched again unless the value reported last time stayed in place since (then the
        # culprit is the same), so a new culprit is told even at the same place as the last one.
        known = self._unencodable
        if known is not None and self._watch is not None and self._watch.fails_in(engine.state):
            self._still_unencodable(known, seq)
            return
        location = locate(engine.state)
        found = await self._culprit(steps, error, location)
        self._watch = location
        if found is not None:
            culprit_seq, kind, error = found[0].seq, input_kind(found[0].input), found[1]
        else:
            culprit_seq, kind = None, "?"
        path = error.path or (location.path if location is not None else "")
        if known == (culprit_seq, path):
            self._still_unencodable(known, seq)
            return
        self._unencodable = (culprit_seq, path)
        events.append(CheckpointFailed(self.key, seq, culprit_seq, kind, path, error))
        log.error(
            "state cannot be encoded at %s since seq %s (%s): %s; checkpoint at seq %d skipped. "
            "Every transition stays committed in the journal (recovered by replay); checkpoints "
            "resume once a transition makes the state encodable, and the journal grows until "
            "then", path or "(the whole state)", culprit_seq, kind, error.reason, seq,
            extra={"fasm_key": self.key, "fasm_seq": seq, "fasm_culprit_seq": culprit_seq,
                   "fasm_input_kind": kind, "fasm_path": path})

    def _still_unencodable(self, known: tuple[int | None, str], seq: int) -> None:
        culprit_seq, path = known
        log.warning("state still cannot be encoded at %s (since seq %s); checkpoint at seq %d "
                    "skipped again, the journal keeps growing", path or "(the whole state)",
                    culprit_seq, seq,
                    extra={"fasm_key": self.key, "fasm_seq": seq, "fasm_path": path})

    async def _first_unencodable(self, engine: Engine, steps: list[Accepted],
                                 error: Unencodable) -> tuple[int, Unencodable]:
        """Snapshot: which accepted step of the group left the state that does not encode.

        Raises:
            StoreError: none does when replayed from the committed state (the live state
                diverged from what the accepted steps produce); nothing is acknowledged.
        """
        found = await self._culprit(steps, error, locate(engine.state))
        if found is not None and not any(found[0] is s for s in steps):
            found = None  # the committed state itself does not encode: blame the group's first
        if found is None:
            found = await self._first_failing(steps)
        if found is None:
            raise StoreError(f"state does not encode ({error}), but no transition of the group "
                             "leaves it so when replayed from the committed state",
                             store=self.store.description, key=self.key, seq=steps[-1].seq)
        step, e = found
        return next(i for i, s in enumerate(steps) if s is step), e

    async def _rebuilt(self) -> tuple[Engine, list[Accepted]]:
        """A new engine at the last checkpoint (or the initial state), and the committed journal
        after it, as steps to replay."""
        codec = self.codec
        records = await self.store.load(self.key)
        if records is None or records.seq == 0:
            return self._new_engine(self._fresh_initial(), 0, ()), []
        recovered = decode_records(codec, records, store=self.store.description, key=self.key)
        cp = recovered.checkpoint
        fresh = self._new_engine(cp.state if cp else self._fresh_initial(), cp.seq if cp else 0,
                                 cp.idempotency.items() if cp else ())
        return fresh, [Accepted(e.seq, e.input, (), e.idempotency_key, e.at)
                       for e in recovered.journal]

    async def _culprit(self, steps: list[Accepted], error: Unencodable,
                       location: Location | None) -> tuple[Accepted, Unencodable] | None:
        """The transition (of the committed journal tail or ``steps``) that put the value that
        does not encode where it is now, with ``error``'s path filled in: rebuild from the last
        checkpoint, replay, and after each step look at that one place (cheap), or encode the
        whole state when no single place is to blame. The culprit begins the run of bad states
        that reaches the end, so a value put and removed again before is not blamed. None when
        no replayed state is bad (the live state diverged). ``location``: where the live state
        fails (None: nowhere in particular)."""
        fresh, tail = await self._rebuilt()
        start: Accepted | None = None
        for step in [*tail, *steps]:
            await fresh.replay([(step.seq, step.input, step.idempotency_key, step.at)])
            if location is not None:
                bad = location.fails_in(fresh.state)
            else:
                bad = await self._encodes(step.seq, fresh) is not None
            if not bad:
                start = None
            elif start is None:
                start = step
        if start is None:
            return None
        path = error.path or (location.path if location is not None else "")
        return start, error if path == error.path else Unencodable(error.what, path, error.reason)

    async def _first_failing(self, steps: list[Accepted]) -> tuple[Accepted, Unencodable] | None:
        """The first of ``steps`` whose state, replayed from the committed one, does not encode
        (encoding the whole state after each)."""
        fresh, tail = await self._rebuilt()
        await fresh.replay((s.seq, s.input, s.idempotency_key, s.at) for s in tail)
        for step in steps:
            await fresh.replay([(step.seq, step.input, step.idempotency_key, step.at)])
            e = await self._encodes(step.seq, fresh)
            if e is not None:
                path = e.path or unencodable_path(fresh.state)
                return step, e if path == e.path else Unencodable(e.what, path, e.reason)
        return None

    async def _encodes(self, seq: int, engine: Engine) -> Unencodable | None:
        """None when the engine's state encodes, else the codec's error."""
        try:
            await self._encode(seq, engine)
        except Unencodable as e:
            return e
        return None

    def _refuse(self, step: Accepted, error: Unencodable,
                events: list[RuntimeEvent]) -> Failed:
        """Snapshot: the step's input is refused, as if its stf had raised."""
        kind = input_kind(step.input)
        where = f" at {error.path}" if error.path else ""
        refusal = TransitionFailed(
            f"the state after {_describe(step.input)} cannot be encoded{where}: {error.reason}; "
            "the input is refused and state is unchanged")
        refusal.__cause__ = error
        events.append(CheckpointFailed(self.key, step.seq, step.seq, kind, error.path, error,
                                       refused=True))
        log.error("state after %s would not encode at %s: %s; that input is refused, the rest "
                  "of its group is committed", _describe(step.input),
                  error.path or "(the whole state)", error.reason,
                  extra={"fasm_key": self.key, "fasm_culprit_seq": step.seq,
                         "fasm_input_kind": kind, "fasm_path": error.path})
        return Failed(step.input, refusal, False)

    async def _encode_checkpoint(self, engine: Engine, seq: int) -> bytes:
        """Encode the whole state as of ``seq``."""
        data = await self._encode(seq, engine)
        self._last_checkpoint_size = len(data)
        return data

    async def _encode(self, seq: int, engine: Engine) -> bytes:
        """A large state is encoded in a worker thread so the event loop keeps serving executors
        and submitters meanwhile; that is safe because only the runtime's driver runs stf, and
        it is waiting here."""
        codec = self.codec
        keys = dict(engine.all_keys())
        if self._last_checkpoint_size < 1_000_000:
            return codec.encode_checkpoint(seq, engine.state, keys)
        return await anyio.to_thread.run_sync(codec.encode_checkpoint, seq, engine.state, keys)
