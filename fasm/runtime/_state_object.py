"""ObjectHost: state kept as a Python object, made durable through a Store after each group.

On open it loads the last checkpoint and replays the journal after it; each group is stepped
through the engine on the event loop (the stf never suspends on an object) and written in one
store commit (snapshot or journal, per the durability strategy); a failed input under the
``"reload"`` rollback policy reloads the committed state and lets the engine re-apply what the
group accepted so far.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread

from ..errors import FasmError, StoreError
from ..persistence._codec import Codec
from ..persistence._durability import Durability, Journal, Writer, decode_records
from ..persistence._memory import MemoryStore
from ..persistence._store import Store
from ._engine import Accepted, AnyMachine, Engine, Failed, Release, Rollback, Step
from ._host import GroupResult, Submitted

__all__ = ("ObjectHost",)


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
        idempotency_window: how many submit keys the engine remembers.
    """

    def __init__(self, machine: AnyMachine, *, key: str, initial_state: Any,
                 store: Store | None, durability: Durability | None, rollback: Rollback,
                 idempotency_window: int) -> None:
        self.machine = machine
        self.key = key
        self.store: Store = store if store is not None else MemoryStore()
        self.durability: Durability = durability if durability is not None else Journal()
        self._initial: Any | Callable[[], Any] = initial_state
        self._rollback: Rollback = rollback
        self._idempotency_window = idempotency_window
        self._codec: Codec | None = None
        self._writer: Writer | None = None
        self._needs_checkpoint = False
        self._last_checkpoint_size = 0

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
        codec = self._codec_()
        self._writer = Writer(codec, self.durability)
        records = await self.store.load(self.key)
        if records is None:
            self._needs_checkpoint = True
            return self._new_engine(self._fresh_initial(), 0, ())
        recovered = decode_records(codec, records, store=self.store.description, key=self.key)
        cp = recovered.checkpoint
        if cp is None:
            # A journal without a checkpoint was written from the initial state.
            self._needs_checkpoint = True
            engine = self._new_engine(self._fresh_initial(), 0, ())
        else:
            engine = self._new_engine(cp.state, cp.seq, cp.idempotency.items())
        await engine.replay((e.seq, e.input, e.idempotency_key) for e in recovered.journal)
        self._last_checkpoint_size = len(records.checkpoint or b"")
        self._writer.recovered(len(records.journal), sum(len(d) for _, d in records.journal),
                               self._last_checkpoint_size)
        return engine

    def _new_engine(self, state: Any, seq: int, keys: Any) -> Engine:
        return Engine(self.machine, state=state, seq=seq, idempotency=keys,
                      rollback=self._rollback, idempotency_window=self._idempotency_window)

    def _fresh_initial(self) -> Any:
        init = self._initial
        return init() if callable(init) else copy.deepcopy(init)

    def _codec_(self) -> Codec:
        if self._codec is None:
            self._codec = Codec(type(self.machine))
        return self._codec

    # -- a group --------------------------------------------------------------------------------

    async def run(self, engine: Engine, inputs: Sequence[Submitted]) -> GroupResult:
        """Step each input, reloading after a failure when the policy says so, then write the
        accepted ones in one store commit.

        Raises:
            StoreError: the commit failed (the runtime stops; nothing is acknowledged).
        """
        steps: list[Step | StoreError] = []
        accepted: list[Accepted] = []
        for input, key in inputs:
            step = await engine.step(input, key)
            if isinstance(step, Accepted):
                accepted.append(step)
            elif isinstance(step, Failed) and step.reload:
                await self._reload(engine)
            steps.append(step)
        if accepted:
            await self._flush(engine, accepted)
        return GroupResult(steps)

    async def _reload(self, engine: Engine) -> None:
        records = await self.store.load(self.key)
        if records is None or engine.committed_seq == 0:
            await engine.reset(self._fresh_initial(), 0, ())
            return
        recovered = decode_records(self._codec_(), records, store=self.store.description,
                                   key=self.key)
        cp = recovered.checkpoint
        fresh = self._new_engine(cp.state if cp else self._fresh_initial(), cp.seq if cp else 0,
                                 cp.idempotency.items() if cp else ())
        await fresh.replay((e.seq, e.input, e.idempotency_key) for e in recovered.journal)
        await engine.reset(fresh.state, fresh.seq, fresh.idempotency.items())

    async def _flush(self, engine: Engine, steps: list[Accepted]) -> None:
        writer = self._writer
        assert writer is not None
        encoded = writer.encode([(s.seq, s.input, s.idempotency_key) for s in steps])
        checkpoint = None
        if self._needs_checkpoint or writer.checkpoint_due(encoded):
            checkpoint = await self._encode_checkpoint(engine, steps[-1].seq)
        plan = writer.plan(engine.committed_seq, steps[-1].seq, encoded, checkpoint)
        try:
            await self.store.commit(self.key, expected_seq=plan.expected_seq, seq=plan.seq,
                                    entries=plan.entries, checkpoint=plan.checkpoint)
        except Exception as e:  # a KeyboardInterrupt or a cancellation goes on as itself
            error = e if isinstance(e, FasmError) else StoreError(
                f"store commit raised {e!r}", store=self.store.description, key=self.key,
                seq=plan.seq)
            if error is not e:
                raise error from e
            raise
        writer.written(plan)
        if plan.checkpoint is not None:
            self._needs_checkpoint = False

    async def _encode_checkpoint(self, engine: Engine, seq: int) -> bytes:
        """Encode the whole state as of ``seq``. A large state is encoded in a worker thread so
        the event loop keeps serving executors and submitters meanwhile; that is safe because
        only the runtime's driver runs stf, and it is waiting here."""
        codec = self._codec_()
        keys = dict(engine.idempotency)
        if self._last_checkpoint_size < 1_000_000:
            data = codec.encode_checkpoint(seq, engine.state, keys)
        else:
            data = await anyio.to_thread.run_sync(codec.encode_checkpoint, seq, engine.state, keys)
        self._last_checkpoint_size = len(data)
        return data
