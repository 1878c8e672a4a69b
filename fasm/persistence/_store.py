"""The store seam: what every backend implements, keyed by machine key.

A store keeps, per machine key, a sequence number, an optional checkpoint (the encoded state as of
some sequence number) and a journal of encoded entries after that checkpoint. Records are opaque
bytes to the store; the codec puts a checksummed envelope around each, so a flipped byte is caught
on decode even where the backend does not check. The two durability strategies map onto it:

* snapshot: every commit carries a checkpoint and no entries;
* journal: every commit appends entries; now and then one also carries a checkpoint, which lets the
  store drop the entries it covers (or, with ``keep_journal``, keep them as history for the replay
  check, :func:`fasm.runtime.replay`).

Rules every store keeps (the conformance suite in :mod:`fasm.testing` checks them):

1. ``commit`` is atomic and durable when it returns: after a crash, a later ``load`` sees all of
   it or (if it raised or never returned) none of it. A torn write is never loaded as data.
2. ``commit`` is fenced: when the key's sequence number is not ``expected_seq`` it raises
   :class:`~fasm.errors.StoreConflict` and writes nothing. A new key has sequence number 0.
3. ``load`` returns the checkpoint and exactly the journal entries after it, in order;
   ``history`` returns every journal entry still stored, kept ones included.
4. ``acquire`` gives one store object exclusive use of a key until ``release`` or ``close``;
   another store object (in this or another process) that asks for it gets ``StoreConflict``.
5. ``keys`` lists every key that has committed (and no other), sorted by code point (Python's
   ``str`` order), a page at a time after a given key.
6. ``identity`` (after ``open``) is a random text made once, durably, when the store's data was
   first created (a UUID), the same every time the same data is opened again and different for
   every other store. The runtime puts it at the head of the idempotency keys it hands
   executors, so a fresh store (a new data directory) never reuses a key a provider already
   saw. A store written by an older fasm without one gets one at its first ``open``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import StoreCorrupt

__all__ = ("Store", "StoredRecords")


@dataclass(frozen=True, slots=True)
class StoredRecords:
    """What a store holds for one key.

    Attributes:
        seq: the last committed sequence number.
        checkpoint: the encoded state as of ``checkpoint_seq``, or None if none was written.
        checkpoint_seq: the sequence number the checkpoint is at (0 without a checkpoint).
        journal: ``(seq, entry)`` pairs with ``checkpoint_seq < seq <= self.seq``, ascending and
            without gaps.
    """

    seq: int
    checkpoint: bytes | None
    checkpoint_seq: int
    journal: tuple[tuple[int, bytes], ...]


@runtime_checkable
class Store(Protocol):
    """A durable home for machine records. Implement it to add a backend, then run
    :func:`fasm.testing.check_store` against it."""

    @property
    def description(self) -> str:
        """A short text naming the backend and where it keeps data, used in error messages."""
        ...

    @property
    def identity(self) -> str:
        """The store's identity (rule 5): made with the store's data, stable across reopens,
        distinct between stores. Available after :meth:`open`.

        Raises:
            StoreUnavailable: the store is not open.
        """
        ...

    async def open(self) -> None:
        """Connect, create what is missing (tables, directories).

        Raises:
            StoreUnavailable: the backend cannot be reached or prepared.
            StoreCorrupt: what is there is not a fasm store this code can read.
        """
        ...

    async def close(self) -> None:
        """Release every key this object holds and disconnect. Safe to call twice."""
        ...

    async def keys(self, after: str | None = None, limit: int = 1000) -> list[str]:
        """Up to ``limit`` committed keys greater than ``after`` (all when None), sorted by code
        point. Page through a store with ``after=page[-1]`` until a page comes back short.
        Takes no lock: an operator's tool can list a store a runtime is writing.

        Raises:
            ValueError: ``limit`` is not positive.
            StoreUnavailable: the store is not open or cannot be read.
        """
        ...

    async def history(self, key: str) -> tuple[tuple[int, bytes], ...]:
        """Every journal entry still stored for ``key`` as ``(seq, entry)``, ascending and
        without gaps, ending at the key's seq (or at its checkpoint when the journal after it is
        empty): those ``load`` returns, after those checkpoints kept (``keep_journal``). Empty
        for a key never committed. Takes no lock.

        Raises:
            StoreCorrupt: a kept entry fails the backend's checks, or the kept entries have a gap.
            StoreUnavailable: the backend cannot be reached.
        """
        ...

    async def acquire(self, key: str) -> None:
        """Take exclusive use of ``key`` for this store object.

        Raises:
            StoreConflict: another store object or process holds the key.
            StoreUnavailable: the backend cannot be reached.
        """
        ...

    async def release(self, key: str) -> None:
        """Give up ``key``. Releasing a key that is not held does nothing."""
        ...

    async def load(self, key: str) -> StoredRecords | None:
        """Everything stored for ``key``, or None for a key never committed.

        Raises:
            StoreCorrupt: the stored records fail the backend's own checks (torn, truncated).
            StoreUnavailable: the backend cannot be reached.
        """
        ...

    async def commit(
        self,
        key: str,
        *,
        expected_seq: int,
        seq: int,
        entries: Sequence[bytes] = (),
        checkpoint: bytes | None = None,
        keep_journal: bool = False,
    ) -> None:
        """Durably and atomically move ``key`` from ``expected_seq`` to ``seq``.

        Args:
            key: the machine key.
            expected_seq: the sequence number the writer believes is stored (0 for a new key).
            seq: the new sequence number, greater than ``expected_seq``.
            entries: journal entries numbered ``expected_seq + 1`` .. ``seq``. Either exactly
                ``seq - expected_seq`` of them, or none when ``checkpoint`` is given.
            checkpoint: the encoded state as of ``seq``. When given, it replaces the stored
                checkpoint and every journal entry up to ``seq`` may be dropped.
            keep_journal: with a checkpoint, keep the journal entries it covers (and write
                ``entries``, which must then be given) so that :meth:`history` still returns
                them. ``load`` never returns them. A later checkpoint without it drops them.

        Raises:
            StoreConflict: the stored sequence number is not ``expected_seq``; nothing written.
            StoreUnavailable: the write could not be made durable; nothing was committed.
            ValueError: the arguments break the rules above.
        """
        ...


def check_keys_args(limit: int) -> None:
    """Validate the arguments of :meth:`Store.keys` (shared by every backend)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")


def contiguous(entries: Iterable[tuple[int, bytes]], key: str, store: str,
               end: int) -> tuple[tuple[int, bytes], ...]:
    """Check that ``entries`` (ascending) number consecutively up to ``end`` (shared by every
    backend's :meth:`Store.history`).

    Raises:
        StoreCorrupt: they have a gap or do not end at ``end``.
    """
    out = tuple(entries)
    for (a, _), (b, _) in itertools.pairwise(out):
        if b != a + 1:
            raise StoreCorrupt(f"kept journal has seq {b} after {a}", store=store, key=key,
                               seq=b)
    if out and out[-1][0] != end:
        raise StoreCorrupt(f"kept journal ends at seq {out[-1][0]}, not at {end}", store=store,
                           key=key, seq=end)
    return out


def page_of(keys: Iterable[str], after: str | None, limit: int) -> list[str]:
    """The page :meth:`Store.keys` returns, from an unsorted collection of every key."""
    return sorted(k for k in keys if after is None or k > after)[:limit]


def check_commit_args(
    expected_seq: int, seq: int, entries: Sequence[bytes], checkpoint: bytes | None,
    keep_journal: bool = False,
) -> None:
    """Validate the shape of a commit (shared by every backend)."""
    if keep_journal and (checkpoint is None or len(entries) != seq - expected_seq):
        raise ValueError("keep_journal needs a checkpoint and the commit's journal entries")
    if expected_seq < 0 or seq <= expected_seq:
        raise ValueError(f"seq must be greater than expected_seq >= 0 (got {expected_seq}->{seq})")
    if entries and len(entries) != seq - expected_seq:
        raise ValueError(
            f"{len(entries)} entries cannot number {expected_seq + 1}..{seq}"
        )
    if not entries and checkpoint is None:
        raise ValueError("a commit needs journal entries, a checkpoint, or both")
