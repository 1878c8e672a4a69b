"""Durability strategies: what is written after committed transitions, and how state comes back.

Both strategies give the same guarantee (a commit that returned survives a crash); they differ in
cost:

* :class:`Snapshot` writes the whole state each commit: O(state) per commit, trivial recovery.
* :class:`Journal` appends each committed input: O(input) per commit, plus a checkpoint of the
  whole state every ``checkpoint_every`` transitions or ``checkpoint_bytes`` of journal. Recovery
  is the last checkpoint plus a deterministic replay of the journal tail through ``stf``.

A group of transitions committed together (group commit) is one store write either way: one
snapshot of the state after the group, or one append of all its entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..errors import StoreCorrupt
from ._codec import Checkpoint, Codec, JournalEntry
from ._store import StoredRecords

__all__ = ("Durability", "Journal", "Snapshot")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Write the whole state after every commit. Best for small states."""


@dataclass(frozen=True, slots=True)
class Journal:
    """Append each committed input; checkpoint the whole state now and then.

    A checkpoint is written when the journal since the last one has grown to ``checkpoint_ratio``
    times the size of that checkpoint (as an append-only log is rewritten once it outgrows its
    base). Writing a checkpoint costs O(state), and it comes after O(state) bytes of journal, so
    its cost per transition stays O(input) at any state size, and replay at start never reads
    more than about ``checkpoint_ratio`` states' worth of journal.

    Args:
        checkpoint_ratio: journal bytes since the last checkpoint, as a multiple of its size.
        checkpoint_every: also checkpoint after this many transitions (bounds replay time for a
            machine whose stf is slow compared with its input size); None for no bound.
        min_checkpoint_bytes: never checkpoint before this many journal bytes (so a tiny state
            is not rewritten after every few inputs).
        keep_history: keep the journal entries a checkpoint covers instead of dropping them, so
            that the key's whole history since it was made (or since this was turned on) stays
            in the store for :func:`fasm.runtime.replay`, which checks new code against it
            before a deploy. Recovery still starts at the last checkpoint; the store grows by
            every input ever committed (a staging or canary store, or one that a retention job
            trims by writing a checkpoint without it). An int ``N`` bounds it instead: at
            least the last ``N`` entries stay, and at each checkpoint the history is trimmed to
            start right after the newest checkpoint this runtime wrote at least ``N`` entries
            earlier, which the store keeps as the history base (:meth:`Store.history_base`)
            for replay to start from. So the history holds at most ``N`` plus two checkpoint
            intervals of entries, and the runtime holds in memory the checkpoints it wrote in
            the last ``N`` entries (after a restart, the checkpoint it recovered from).
    """

    checkpoint_ratio: float = 1.0
    checkpoint_every: int | None = 100_000
    min_checkpoint_bytes: int = 64 * 1024
    keep_history: bool | int = False

    def __post_init__(self) -> None:
        if not isinstance(self.keep_history, bool) and (
                not isinstance(self.keep_history, int) or self.keep_history < 1):
            raise ValueError("keep_history must be True, False or an int >= 1")
        if self.checkpoint_ratio <= 0:
            raise ValueError("checkpoint_ratio must be > 0")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1 or None")
        if self.min_checkpoint_bytes < 0:
            raise ValueError("min_checkpoint_bytes must be >= 0")


Durability: TypeAlias = Snapshot | Journal


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """One store write: the arguments of :meth:`Store.commit` (besides the key)."""

    expected_seq: int
    seq: int
    entries: tuple[bytes, ...]
    checkpoint: bytes | None
    keep_journal: bool = False
    history_base: tuple[int, bytes] | None = None


class Writer:
    """Turns groups of committed inputs into store writes for one key (pure: no I/O)."""

    def __init__(self, codec: Codec, durability: Durability) -> None:
        self.codec = codec
        self.durability = durability
        self._since_transitions = 0
        self._since_bytes = 0
        self._checkpoint_size = 0
        # Bounded history: checkpoints written since the last history base, oldest first.
        self._bases: list[tuple[int, bytes]] = []

    def encode(self, entries: Sequence[tuple[Any, ...]]) -> tuple[bytes, ...]:
        """Journal entries for ``(seq, input, idempotency_key)`` or
        ``(seq, input, idempotency_key, at)`` (none under Snapshot)."""
        if isinstance(self.durability, Snapshot):
            return ()
        return tuple(self.codec.encode_entry(s, i, k, *t) for s, i, k, *t in entries)

    def checkpoint_due(self, encoded: Sequence[bytes]) -> bool:
        """Whether the write carrying ``encoded`` must also carry a checkpoint."""
        d = self.durability
        if isinstance(d, Snapshot):
            return True
        grown = self._since_bytes + sum(map(len, encoded))
        if d.checkpoint_every is not None and (
            self._since_transitions + len(encoded) >= d.checkpoint_every
        ):
            return True
        return grown >= max(d.min_checkpoint_bytes, d.checkpoint_ratio * self._checkpoint_size)

    def plan(
        self,
        expected_seq: int,
        seq: int,
        encoded: tuple[bytes, ...],
        checkpoint: bytes | None,
    ) -> CommitPlan:
        """The write that moves the store from ``expected_seq`` to ``seq``."""
        if checkpoint is not None:
            keep = self.durability.keep_history if isinstance(self.durability, Journal) else False
            if keep and encoded:
                base = None
                if keep is not True:  # keep at least the last ``keep`` entries
                    old = [b for b in self._bases if b[0] <= seq - keep and b[0] <= expected_seq]
                    base = old[-1] if old else None
                return CommitPlan(expected_seq, seq, encoded, checkpoint, keep_journal=True,
                                  history_base=base)
            return CommitPlan(expected_seq, seq, (), checkpoint)
        return CommitPlan(expected_seq, seq, encoded, None)

    def recovered(self, entries: int, size: int, checkpoint_size: int,
                  checkpoint: tuple[int, bytes] | None = None) -> None:
        """Count what was found at start toward the next checkpoint; ``checkpoint`` (the
        loaded one, every entry after it stored) may become a history base."""
        self._since_transitions = entries
        self._since_bytes = size
        self._checkpoint_size = checkpoint_size
        self._bases = [checkpoint] if checkpoint is not None and checkpoint[0] > 0 else []

    def postpone(self) -> None:
        """A due checkpoint could not be written (the state does not encode) and the commit goes
        ahead with journal entries alone: count from zero again, so the next attempt waits a
        whole checkpoint interval instead of encoding a large state at every commit."""
        self._since_transitions = 0
        self._since_bytes = 0

    def written(self, plan: CommitPlan) -> None:
        """The plan is durable: count it toward the next checkpoint, or restart the count."""
        if plan.checkpoint is not None:
            self._since_transitions = 0
            self._since_bytes = 0
            self._checkpoint_size = len(plan.checkpoint)
            d = self.durability
            if plan.keep_journal and isinstance(d, Journal) and d.keep_history is not True:
                if plan.history_base is not None:
                    self._bases = [b for b in self._bases if b[0] > plan.history_base[0]]
                self._bases.append((plan.seq, plan.checkpoint))
            else:
                self._bases = []
        else:
            self._since_transitions += len(plan.entries)
            self._since_bytes += sum(map(len, plan.entries))


@dataclass(frozen=True, slots=True)
class Recovered:
    """Decoded records of one key: start from ``checkpoint`` (None: the initial state at seq 0)
    and replay ``journal``."""

    seq: int
    checkpoint: Checkpoint | None
    journal: tuple[JournalEntry, ...]


def decode_records(codec: Codec, records: StoredRecords, *, store: str, key: str,
                   decode_entry: Callable[[bytes, int], JournalEntry] | None = None
                   ) -> Recovered:
    """Decode and check everything a store returned for a key.

    ``decode_entry`` replaces ``codec.decode_entry`` (the simulation passes one that reuses
    what it decoded from the same bytes before, as it restarts hundreds of times).

    Raises:
        StoreCorrupt: a record fails its checks, or the journal has a gap (the message names the
            store, key and seq).
    """
    try:
        checkpoint = (
            codec.decode_checkpoint(records.checkpoint, records.checkpoint_seq)
            if records.checkpoint is not None
            else None
        )
        decode = codec.decode_entry if decode_entry is None else decode_entry
        journal = tuple(decode(data, seq) for seq, data in records.journal)
    except StoreCorrupt as e:
        raise e.located(store=store, key=key) from e.__cause__  # the located copy replaces e
    expected = records.checkpoint_seq + 1
    for entry in journal:
        if entry.seq != expected:
            raise StoreCorrupt(f"journal gap: entry {entry.seq} where {expected} was due",
                               store=store, key=key, seq=entry.seq)
        expected += 1
    if expected - 1 != records.seq:
        raise StoreCorrupt(f"records end at seq {expected - 1} but the store says {records.seq}",
                           store=store, key=key, seq=records.seq)
    return Recovered(records.seq, checkpoint, journal)
