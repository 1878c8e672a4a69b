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

from collections.abc import Mapping, Sequence
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

    Args:
        checkpoint_every: checkpoint after this many transitions since the last one.
        checkpoint_bytes: or after this many bytes of journal since the last one.
    """

    checkpoint_every: int = 10_000
    checkpoint_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.checkpoint_bytes < 1:
            raise ValueError("checkpoint_every and checkpoint_bytes must be >= 1")


Durability: TypeAlias = Snapshot | Journal


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """One store write: the arguments of :meth:`Store.commit` (besides the key)."""

    expected_seq: int
    seq: int
    entries: tuple[bytes, ...]
    checkpoint: bytes | None


class Writer:
    """Turns groups of committed inputs into store writes for one key (pure: no I/O)."""

    def __init__(self, codec: Codec, durability: Durability) -> None:
        self.codec = codec
        self.durability = durability
        self._since_transitions = 0
        self._since_bytes = 0

    def plan(
        self,
        expected_seq: int,
        entries: Sequence[tuple[int, Any, str | None]],
        state: Any,
        idempotency: Mapping[str, int],
        *,
        force_checkpoint: bool = False,
    ) -> CommitPlan:
        """Plan the write that moves the store from ``expected_seq`` past ``entries``.

        ``state`` must be the state after the last entry (or at ``expected_seq`` when there are
        none and a checkpoint is forced).
        """
        seq = entries[-1][0] if entries else expected_seq
        d = self.durability
        if isinstance(d, Snapshot):
            return CommitPlan(expected_seq, seq, (),
                              self.codec.encode_checkpoint(seq, state, idempotency))
        encoded = tuple(self.codec.encode_entry(s, i, k) for s, i, k in entries)
        self._since_transitions += len(encoded)
        self._since_bytes += sum(map(len, encoded))
        checkpoint = None
        if force_checkpoint or (
            self._since_transitions >= d.checkpoint_every
            or self._since_bytes >= d.checkpoint_bytes
        ):
            checkpoint = self.codec.encode_checkpoint(seq, state, idempotency)
            if not encoded:
                return CommitPlan(expected_seq, seq, (), checkpoint)
        return CommitPlan(expected_seq, seq, encoded, checkpoint)

    def recovered(self, entries: int, size: int) -> None:
        """Count a journal tail found at start toward the next checkpoint."""
        self._since_transitions = entries
        self._since_bytes = size

    def written(self, plan: CommitPlan) -> None:
        """The plan is durable: restart the checkpoint counters if it carried one."""
        if plan.checkpoint is not None:
            self._since_transitions = 0
            self._since_bytes = 0

    def failed(self, plan: CommitPlan) -> None:
        """The plan was not written: its entries no longer count toward the next checkpoint."""
        if plan.checkpoint is None:
            self._since_transitions -= len(plan.entries)
            self._since_bytes -= sum(map(len, plan.entries))


@dataclass(frozen=True, slots=True)
class Recovered:
    """Decoded records of one key: start from ``checkpoint`` (None: the initial state at seq 0)
    and replay ``journal``."""

    seq: int
    checkpoint: Checkpoint | None
    journal: tuple[JournalEntry, ...]


def decode_records(codec: Codec, records: StoredRecords, *, store: str, key: str) -> Recovered:
    """Decode and check everything a store returned for a key.

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
        journal = tuple(codec.decode_entry(data, seq) for seq, data in records.journal)
    except StoreCorrupt as e:
        raise e.located(store=store, key=key) from e
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
