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

from .._actions import Tracked
from .._inputs import TrackedActionCompleted
from ..errors import DefinitionError, FasmError, InvalidInput, StoreError, TransitionFailed
from ..persistence._codec import Codec, Unencodable
from ..persistence._durability import (
    CommitPlan,
    Durability,
    Journal,
    Snapshot,
    Writer,
    decode_records,
)
from ..persistence._locate import Location, locate, unencodable_path
from ..persistence._memory import MemoryStore
from ..persistence._store import KeyCommit, Store, StoredRecords
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
from ._host import GroupResult, KeyGroup, Submitted

__all__ = ("ObjectHost",)

log = logging.getLogger("fasm.runtime")


class _KeyLog:
    """What the host keeps for one active key besides its engine: the writer's checkpoint
    accounting, and the state of its unencodable-state reporting."""

    __slots__ = ("last_checkpoint_size", "marked", "needs_checkpoint", "unencodable", "watch",
                 "writer")

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.needs_checkpoint = False
        self.last_checkpoint_size = 0
        self.marked = False
        """The key's in-flight mark as stored (rule 8 of the store): written only when it
        changes."""
        # (culprit seq, path) of the unencodable state last reported; None while checkpoints
        # succeed. While it is set, ``watch`` is where the bad value sits, looked at after each
        # accepted step (cheap: one path, one leaf): while it stays bad, a later failed attempt
        # has the same culprit and needs no search.
        self.unencodable: tuple[int | None, str] | None = None
        self.watch: Location | None = None


class ObjectHost:
    """The state-object path of the :class:`~fasm.runtime.Runtime` (see the module docstring).

    Args:
        machine: the machine instance.
        key: the machine key of a single-instance runtime, which takes that key alone from the
            store; None for a keyed runtime, which takes every key (``acquire_all``).
        initial_state: the state of a key the store has never seen (a value, deep-copied, or a
            factory: of no arguments for a single instance, of the key for a keyed runtime).
        store: where records are kept (default: a fresh MemoryStore).
        durability: snapshot or journal (default: journal).
        rollback: the engine's rollback policy.
        idempotency_window: at most how many submit keys the engine remembers (None: no bound).
        idempotency_ttl: how long (seconds) a submit key is remembered (None: no bound).
    """

    def __init__(self, machine: AnyMachine, *, key: str | None, initial_state: Any,
                 store: Store | None, durability: Durability | None, rollback: Rollback,
                 idempotency_window: int | None, idempotency_ttl: float | None = None) -> None:
        self.machine = machine
        self.key = key
        self.store: Store = store if store is not None else MemoryStore()
        self.durability: Durability = durability if durability is not None else Journal()
        self._initial: Any | Callable[..., Any] = initial_state
        self._rollback: Rollback = rollback
        self._idempotency_window = idempotency_window
        self._idempotency_ttl = idempotency_ttl
        self.codec = Codec(type(machine))
        """Encodes the records (made with the host; its adapters are built at need)."""
        self._logs: dict[str, _KeyLog] = {}

    @property
    def description(self) -> str:
        """The store's description."""
        return self.store.description

    # -- open, activation and restore -----------------------------------------------------------

    async def open(self) -> None:
        """Open the store and take the key (every key, for a keyed runtime).

        Raises:
            StoreError: the store cannot be opened, or another runtime holds the key.
        """
        await self.store.open()
        if self.key is None:
            await self.store.acquire_all()
        else:
            await self.store.acquire(self.key)

    async def keys_to_restore(self) -> list[str]:
        """The keys to activate and restore at start: the one key, or every key the store marks
        as having tracked actions in flight."""
        if self.key is not None:
            return [self.key]
        return await self.store.keys_in_flight()

    async def activate(self, key: str) -> Engine:
        """Load ``key``: its last checkpoint and the journal after it, replayed.

        Raises:
            StoreError: the store cannot be read.
            NondeterminismError: a journaled input raised on replay.
        """
        log_ = _KeyLog(Writer(self.codec, self.durability))
        engine = await self._recover(key, log_)
        self._logs[key] = log_
        return engine

    async def activate_many(self, keys: Sequence[str]) -> dict[str, Engine | Exception]:
        """:meth:`activate` of each key, their records read in one store call
        (``Store.load_many``). A key that cannot be loaded maps to its error, and the others
        are loaded all the same (one by one, when the group read failed)."""
        records: dict[str, StoredRecords | None] | None
        try:
            records = await self.store.load_many(keys)
        except Exception:
            records = None  # find the key that fails, and load the others
        out: dict[str, Engine | Exception] = {}
        for key in keys:
            try:
                if records is None:
                    out[key] = await self.activate(key)
                else:
                    log_ = _KeyLog(Writer(self.codec, self.durability))
                    out[key] = await self._recovered(key, log_, records[key])
                    self._logs[key] = log_
            except Exception as e:
                out[key] = e
        return out

    def passivate(self, key: str) -> None:
        """Forget what was kept for ``key`` (evicted: idle, and nothing of it in flight)."""
        self._logs.pop(key, None)

    async def peek(self, key: str) -> Any:
        """The committed state of ``key`` without activating it (a read of an idle key).

        Raises:
            StoreError: the store cannot be read.
        """
        return (await self._recover(key, _KeyLog(Writer(self.codec, self.durability)))).state

    async def restore(self, key: str, engine: Engine) -> Release:
        """Run restore on the recovered state object."""
        return await engine.restore()

    async def close(self) -> None:
        """Release the key (or every key) and close the store."""
        try:
            if self.key is None:
                await self.store.release_all()
            else:
                await self.store.release(self.key)
        finally:
            self._logs.clear()
            await self.store.close()

    async def _recover(self, key: str, log_: _KeyLog) -> Engine:
        return await self._recovered(key, log_, await self.store.load(key))

    async def _recovered(self, key: str, log_: _KeyLog, records: StoredRecords | None) -> Engine:
        codec = self.codec
        if records is None:
            log_.needs_checkpoint = True
            initial = self._fresh_initial(key)
            self._check_initial(codec, initial, key)
            return self._new_engine(initial, 0, ())
        recovered = decode_records(codec, records, store=self.store.description, key=key)
        cp = recovered.checkpoint
        if cp is None:
            # A journal without a checkpoint was written from the initial state.
            log_.needs_checkpoint = True
            engine = self._new_engine(self._fresh_initial(key), 0, ())
        else:
            engine = self._new_engine(cp.state, cp.seq, cp.idempotency.items())
        await engine.replay((e.seq, e.input, e.idempotency_key, e.at) for e in recovered.journal)
        log_.last_checkpoint_size = len(records.checkpoint or b"")
        log_.marked = records.in_flight
        log_.writer.recovered(len(records.journal), sum(len(d) for _, d in records.journal),
                              log_.last_checkpoint_size,
                              None if records.checkpoint is None
                              else (records.checkpoint_seq, records.checkpoint))
        return engine

    def _new_engine(self, state: Any, seq: int, keys: Any) -> Engine:
        return Engine(self.machine, state=state, seq=seq, idempotency=keys,
                      rollback=self._rollback, idempotency_window=self._idempotency_window,
                      idempotency_ttl=self._idempotency_ttl)

    def _check_initial(self, codec: Codec, state: Any, key: str) -> None:
        """A fresh key's initial state must encode: every commit under Snapshot, and the first
        checkpoint under Journal, would otherwise fail with no transition to blame. Encoded once,
        when a key the store has never seen is first used."""
        try:
            codec.encode_checkpoint(0, state, {})
        except Unencodable as e:
            path = e.path or unencodable_path(state)
            where = f" at {path}" if path else ""
            raise DefinitionError(
                f"initial_state of {type(self.machine).__qualname__} cannot be encoded{where}: "
                f"{e.reason}; the store could never write it (key {key!r}, "
                f"{self.store.description})") from e

    def _fresh_initial(self, key: str) -> Any:
        init = self._initial
        if not callable(init):
            return copy.deepcopy(init)
        if self.key is not None:
            return init()
        try:
            return init(key)
        except Exception as e:
            # The factory refused this key (or has a bug): the key's inputs are refused, the
            # other keys go on.
            raise InvalidInput(f"initial_state({key!r}) raised {e!r}; key {key!r} cannot be "
                               "started") from e

    # -- a group --------------------------------------------------------------------------------

    async def run(self, groups: Sequence[KeyGroup]) -> list[GroupResult]:
        """Step each key's inputs, reloading after a failure when the policy says so, then write
        the accepted ones of every key in one store commit (``commit_many`` when the group
        spans several keys).

        Under Snapshot, an input whose transition leaves a state that does not encode is refused
        (a :class:`Failed` step with a :class:`TransitionFailed`) and its key's inputs are run
        again without it, from the committed state; each round refuses one more input, so this
        ends.

        Raises:
            StoreError: the commit failed (the runtime stops; nothing is acknowledged).
        """
        results: list[GroupResult] = []
        plans: list[tuple[_KeyLog, CommitPlan, bool, bool]] = []
        commits: list[KeyCommit] = []
        for key, engine, inputs in groups:
            result, planned = await self._prepare(key, engine, inputs)
            results.append(result)
            if planned is not None:
                log_, plan, skipped, mark = planned
                plans.append(planned)
                commits.append(KeyCommit(
                    key, plan.expected_seq, plan.seq, plan.entries, plan.checkpoint,
                    None if mark == log_.marked else mark, plan.keep_journal, plan.history_base))
        if not commits:
            return results
        try:
            if len(commits) == 1:
                c = commits[0]
                # keep_journal and in_flight only when asked for, so that a store written
                # before they existed still works
                extra: dict[str, Any] = {}
                if c.keep_journal:
                    extra["keep_journal"] = True
                if c.history_base is not None:
                    extra["history_base"] = c.history_base
                if c.in_flight is not None:
                    extra["in_flight"] = c.in_flight
                await self.store.commit(c.key, expected_seq=c.expected_seq, seq=c.seq,
                                        entries=c.entries, checkpoint=c.checkpoint, **extra)
            else:
                await self.store.commit_many(commits)
        except Exception as e:  # a KeyboardInterrupt or a cancellation goes on as itself
            error = e if isinstance(e, FasmError) else StoreError(
                f"store commit raised {e!r}", store=self.store.description,
                key=commits[0].key if len(commits) == 1 else None,
                seq=commits[0].seq if len(commits) == 1 else None)
            if error is not e:
                raise error from e
            raise
        for (log_, plan, skipped, mark), c in zip(plans, commits, strict=True):
            self._written(c.key, log_, plan, skipped)
            log_.marked = mark
        return results

    async def _prepare(self, key: str, engine: Engine, inputs: Sequence[Submitted],
                       ) -> tuple[GroupResult, tuple[_KeyLog, CommitPlan, bool, bool] | None]:
        """Step one key's inputs and plan its write (None: nothing accepted)."""
        log_ = self._logs[key]
        refused: dict[int, Failed] = {}
        events: list[RuntimeEvent] = []
        while True:
            steps: list[Step | StoreError] = []
            accepted: list[Accepted] = []
            positions: list[int] = []
            for i, (input, idem) in enumerate(inputs):
                if i in refused:
                    steps.append(refused[i])
                    continue
                step = await engine.step(input, idem)
                if isinstance(step, Accepted):
                    accepted.append(step)
                    positions.append(i)
                    if log_.watch is not None and not log_.watch.fails_in(engine.state):
                        log_.watch = None  # the value moved or went: the next failure searches
                elif isinstance(step, Failed) and step.reload:
                    await self._reload(key, engine)
                steps.append(step)
            if not accepted:
                return GroupResult(steps, events=events), None
            planned = await self._plan(key, log_, engine, accepted, events)
            if isinstance(planned, tuple):
                index, error = planned
                refused[positions[index]] = self._refuse(key, accepted[index], error, events)
                # Back to the committed state, then the key's inputs again without the culprit.
                engine.abandon(())
                await self._reload(key, engine)
                continue
            plan, skipped = planned.plan, planned.skipped
            return GroupResult(steps, events=events), (log_, plan, skipped,
                                                       _in_flight_after(engine, accepted))

    async def _reload(self, key: str, engine: Engine) -> None:
        records = await self.store.load(key)
        if records is None or engine.committed_seq == 0:
            await engine.reset(self._fresh_initial(key), 0, ())
            return
        recovered = decode_records(self.codec, records, store=self.store.description, key=key)
        cp = recovered.checkpoint
        fresh = self._new_engine(cp.state if cp else self._fresh_initial(key),
                                 cp.seq if cp else 0, cp.idempotency.items() if cp else ())
        await fresh.replay((e.seq, e.input, e.idempotency_key, e.at) for e in recovered.journal)
        await engine.reset(fresh.state, fresh.seq, fresh.all_keys())

    async def _plan(self, key: str, log_: _KeyLog, engine: Engine, steps: list[Accepted],
                    events: list[RuntimeEvent]) -> _Planned | tuple[int, Unencodable]:
        """The write of the accepted steps of one key. Returns the plan, or (Snapshot only,
        nothing to write) the index in ``steps`` of the first one whose state does not
        encode."""
        writer = log_.writer
        encoded = writer.encode([(s.seq, s.input, s.idempotency_key, s.at) for s in steps])
        checkpoint = None
        skipped = False
        if log_.needs_checkpoint or writer.checkpoint_due(encoded):
            try:
                checkpoint = await self._encode_checkpoint(log_, engine, steps[-1].seq)
            except Unencodable as e:
                if isinstance(self.durability, Snapshot):
                    return await self._first_unencodable(key, engine, steps, e)
                await self._checkpoint_skipped(key, log_, engine, steps, e, events)
                skipped = True
        return _Planned(writer.plan(engine.committed_seq, steps[-1].seq, encoded, checkpoint),
                        skipped)

    def _written(self, key: str, log_: _KeyLog, plan: CommitPlan, skipped: bool) -> None:
        log_.writer.written(plan)
        if skipped:
            log_.writer.postpone()  # the next attempt comes a whole interval after this commit
        if plan.checkpoint is not None:
            log_.needs_checkpoint = False
            if log_.unencodable is not None:
                log_.unencodable = log_.watch = None
                log.info("state encodes again: checkpoint written at seq %d", plan.seq,
                         extra={"fasm_key": key, "fasm_seq": plan.seq})

    # -- state that cannot be encoded (paid only when an encode failed) ------------------------

    async def _checkpoint_skipped(self, key: str, log_: _KeyLog, engine: Engine,
                                  steps: list[Accepted], error: Unencodable,
                                  events: list[RuntimeEvent]) -> None:
        """Journal: the commit goes ahead without the checkpoint (the caller then postpones the
        next attempt by a whole interval); report the culprit once."""
        # A journal without a checkpoint is recovered from the initial state: still readable.
        log_.needs_checkpoint = False
        seq = steps[-1].seq
        # Searched again unless the value reported last time stayed in place since (then the
        # culprit is the same), so a new culprit is told even at the same place as the last one.
        known = log_.unencodable
        if known is not None and log_.watch is not None and log_.watch.fails_in(engine.state):
            self._still_unencodable(key, known, seq)
            return
        location = locate(engine.state)
        found = await self._culprit(key, steps, error, location)
        log_.watch = location
        if found is not None:
            culprit_seq, kind, error = found[0].seq, input_kind(found[0].input), found[1]
        else:
            culprit_seq, kind = None, "?"
        path = error.path or (location.path if location is not None else "")
        if known == (culprit_seq, path):
            self._still_unencodable(key, known, seq)
            return
        log_.unencodable = (culprit_seq, path)
        events.append(CheckpointFailed(key, seq, culprit_seq, kind, path, error))
        log.error(
            "state cannot be encoded at %s since seq %s (%s): %s; checkpoint at seq %d skipped. "
            "Every transition stays committed in the journal (recovered by replay); checkpoints "
            "resume once a transition makes the state encodable, and the journal grows until "
            "then", path or "(the whole state)", culprit_seq, kind, error.reason, seq,
            extra={"fasm_key": key, "fasm_seq": seq, "fasm_culprit_seq": culprit_seq,
                   "fasm_input_kind": kind, "fasm_path": path})

    def _still_unencodable(self, key: str, known: tuple[int | None, str], seq: int) -> None:
        culprit_seq, path = known
        log.warning("state still cannot be encoded at %s (since seq %s); checkpoint at seq %d "
                    "skipped again, the journal keeps growing", path or "(the whole state)",
                    culprit_seq, seq,
                    extra={"fasm_key": key, "fasm_seq": seq, "fasm_path": path})

    async def _first_unencodable(self, key: str, engine: Engine, steps: list[Accepted],
                                 error: Unencodable) -> tuple[int, Unencodable]:
        """Snapshot: which accepted step of the group left the state that does not encode.

        Raises:
            StoreError: none does when replayed from the committed state (the live state
                diverged from what the accepted steps produce); nothing is acknowledged.
        """
        found = await self._culprit(key, steps, error, locate(engine.state))
        if found is not None and not any(found[0] is s for s in steps):
            found = None  # the committed state itself does not encode: blame the group's first
        if found is None:
            found = await self._first_failing(key, steps)
        if found is None:
            raise StoreError(f"state does not encode ({error}), but no transition of the group "
                             "leaves it so when replayed from the committed state",
                             store=self.store.description, key=key, seq=steps[-1].seq)
        step, e = found
        return next(i for i, s in enumerate(steps) if s is step), e

    async def _rebuilt(self, key: str) -> tuple[Engine, list[Accepted]]:
        """A new engine at the last checkpoint (or the initial state), and the committed journal
        after it, as steps to replay."""
        codec = self.codec
        records = await self.store.load(key)
        if records is None or records.seq == 0:
            return self._new_engine(self._fresh_initial(key), 0, ()), []
        recovered = decode_records(codec, records, store=self.store.description, key=key)
        cp = recovered.checkpoint
        fresh = self._new_engine(cp.state if cp else self._fresh_initial(key), cp.seq if cp else 0,
                                 cp.idempotency.items() if cp else ())
        return fresh, [Accepted(e.seq, e.input, (), e.idempotency_key, e.at)
                       for e in recovered.journal]

    async def _culprit(self, key: str, steps: list[Accepted], error: Unencodable,
                       location: Location | None) -> tuple[Accepted, Unencodable] | None:
        """The transition (of the committed journal tail or ``steps``) that put the value that
        does not encode where it is now, with ``error``'s path filled in: rebuild from the last
        checkpoint, replay, and after each step look at that one place (cheap), or encode the
        whole state when no single place is to blame. The culprit begins the run of bad states
        that reaches the end, so a value put and removed again before is not blamed. None when
        no replayed state is bad (the live state diverged). ``location``: where the live state
        fails (None: nowhere in particular)."""
        fresh, tail = await self._rebuilt(key)
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

    async def _first_failing(self, key: str,
                             steps: list[Accepted]) -> tuple[Accepted, Unencodable] | None:
        """The first of ``steps`` whose state, replayed from the committed one, does not encode
        (encoding the whole state after each)."""
        fresh, tail = await self._rebuilt(key)
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

    def _refuse(self, key: str, step: Accepted, error: Unencodable,
                events: list[RuntimeEvent]) -> Failed:
        """Snapshot: the step's input is refused, as if its stf had raised."""
        kind = input_kind(step.input)
        where = f" at {error.path}" if error.path else ""
        refusal = TransitionFailed(
            f"the state after {_describe(step.input)} cannot be encoded{where}: {error.reason}; "
            "the input is refused and state is unchanged")
        refusal.__cause__ = error
        events.append(CheckpointFailed(key, step.seq, step.seq, kind, error.path, error,
                                       refused=True))
        log.error("state after %s would not encode at %s: %s; that input is refused, the rest "
                  "of its group is committed", _describe(step.input),
                  error.path or "(the whole state)", error.reason,
                  extra={"fasm_key": key, "fasm_culprit_seq": step.seq,
                         "fasm_input_kind": kind, "fasm_path": error.path})
        return Failed(step.input, refusal, False)

    async def _encode_checkpoint(self, log_: _KeyLog, engine: Engine, seq: int) -> bytes:
        """Encode the whole state as of ``seq``."""
        data = await self._encode(seq, engine, log_.last_checkpoint_size)
        log_.last_checkpoint_size = len(data)
        return data

    async def _encode(self, seq: int, engine: Engine, size: int = 0) -> bytes:
        """A large state is encoded in a worker thread so the event loop keeps serving executors
        and submitters meanwhile; that is safe because only the runtime's driver runs stf, and
        it is waiting here."""
        codec = self.codec
        keys = dict(engine.all_keys())
        if size < 1_000_000:
            return codec.encode_checkpoint(seq, engine.state, keys)
        return await anyio.to_thread.run_sync(codec.encode_checkpoint, seq, engine.state, keys)


class _Planned:
    """One key's planned write, and whether its due checkpoint was skipped (unencodable)."""

    __slots__ = ("plan", "skipped")

    def __init__(self, plan: CommitPlan, skipped: bool) -> None:
        self.plan = plan
        self.skipped = skipped


def _in_flight_after(engine: Engine, accepted: Sequence[Accepted]) -> bool:
    """Whether the key has tracked actions in flight once ``accepted`` is committed (its
    in-flight mark), in O(group): the engine's table is still the one before the group, which
    completions only shrink and emitted actions only grow (an action emitted now cannot also
    complete in the same group: it is dispatched after the commit)."""
    in_flight = engine.in_flight
    done: set[Any] = set()
    for step in accepted:
        for action in step.actions:
            if isinstance(action, Tracked):
                return True
        if isinstance(step.input, TrackedActionCompleted) and step.input.id in in_flight:
            done.add(step.input.id)
    return len(in_flight) > len(done)
