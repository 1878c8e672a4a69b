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
   ``history`` returns every journal entry still stored, kept ones included, and
   ``history_base`` the older checkpoint the kept entries start after, if one was given.
4. ``acquire`` gives one store object exclusive use of a key until ``release`` or ``close``;
   another store object (in this or another process) that asks for it gets ``StoreConflict``.
5. ``keys`` lists every key that has committed (and no other), sorted by code point (Python's
   ``str`` order), a page at a time after a given key.
6. ``identity`` (after ``open``) is a random text made once, durably, when the store's data was
   first created (a UUID), the same every time the same data is opened again and different for
   every other store. The runtime puts it at the head of the idempotency keys it hands
   executors, so a fresh store (a new data directory) never reuses a key a provider already
   saw. A store written by an older fasm without one gets one at its first ``open``.
7. ``commit_many`` is one atomic, durable commit across keys: after a crash a later ``load``
   sees every key's part of it or none of it. It is fenced per key (one stale key refuses the
   whole group, naming the key) and every key must be held by the store object, by ``acquire``
   or by ``acquire_all``.
8. ``in_flight`` (on ``commit`` and :class:`KeyCommit`) sets or clears, in the same atomic
   commit, a durable mark saying that the key has tracked actions (or timers) in flight; None
   leaves it as it was. ``keys_in_flight`` lists the marked keys from an index the store keeps
   in the same commit, never by reading every key, so finding them at start-up costs the
   number of marked keys, not the number of keys stored.
9. ``acquire_all`` gives one store object exclusive use of every key at once (a keyed runtime
   holds a million keys without a lock each). It conflicts both ways with ``acquire`` of any
   key by another store object: :class:`~fasm.errors.StoreConflict`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import StoreConflict, StoreCorrupt

__all__ = ("KeyCommit", "Store", "StoredRecords")


@dataclass(frozen=True, slots=True)
class StoredRecords:
    """What a store holds for one key.

    Attributes:
        seq: the last committed sequence number.
        checkpoint: the encoded state as of ``checkpoint_seq``, or None if none was written.
        checkpoint_seq: the sequence number the checkpoint is at (0 without a checkpoint).
        journal: ``(seq, entry)`` pairs with ``checkpoint_seq < seq <= self.seq``, ascending and
            without gaps.
        in_flight: the key's in-flight mark (rule 8): set by the last commit that said
            ``in_flight=True`` unless a later one said ``False``.
    """

    seq: int
    checkpoint: bytes | None
    checkpoint_seq: int
    journal: tuple[tuple[int, bytes], ...]
    in_flight: bool = False


@dataclass(frozen=True, slots=True)
class KeyCommit:
    """One key's part of :meth:`Store.commit_many`: the arguments of :meth:`Store.commit`.

    Attributes:
        key: the machine key.
        expected_seq: the sequence number the writer believes is stored (0 for a new key).
        seq: the new sequence number, greater than ``expected_seq``.
        entries: journal entries numbered ``expected_seq + 1`` .. ``seq`` (or none with a
            checkpoint).
        checkpoint: the encoded state as of ``seq``, or None.
        in_flight: set (True) or clear (False) the key's in-flight mark; None leaves it.
        keep_journal: with a checkpoint, keep the journal entries it covers (see
            :meth:`Store.commit`).
        history_base: with ``keep_journal``, ``(seq, checkpoint)``: an older checkpoint that
            kept history now starts after (see :meth:`Store.commit`).
    """

    key: str
    expected_seq: int
    seq: int
    entries: Sequence[bytes] = ()
    checkpoint: bytes | None = None
    in_flight: bool | None = None
    keep_journal: bool = False
    history_base: tuple[int, bytes] | None = None


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
        """The store's identity (rule 6): made with the store's data, stable across reopens,
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
        for a key never committed. Takes no lock. After a commit with ``history_base`` at seq
        ``b`` the entries start at ``b + 1`` (or later, if none were kept after it).

        Raises:
            StoreCorrupt: a kept entry fails the backend's checks, or the kept entries have a gap.
            StoreUnavailable: the backend cannot be reached.
        """
        ...

    async def history_base(self, key: str) -> tuple[int, bytes] | None:
        """The checkpoint the kept history of ``key`` starts after, as ``(seq, checkpoint)``:
        the ``history_base`` of the last commit that gave one, or None (no commit gave one, a
        later checkpoint without ``keep_journal`` dropped it, or the key was never committed).
        Replaying :meth:`history` from it needs no older state. Takes no lock.

        Raises:
            StoreCorrupt: the stored base fails the backend's checks.
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

    async def load_many(self, keys: Sequence[str]) -> dict[str, StoredRecords | None]:
        """:meth:`load` of each of ``keys`` (distinct), in one call: a keyed runtime loads the
        idle keys of a group of inputs with it, so that loading many keys costs one trip to
        the backend's thread or server, not one per key. Each key's records are as
        :meth:`load` returns them (read in one snapshot per key at least).

        Raises:
            StoreCorrupt: a key's records fail the backend's checks (the runtime then loads the
                keys one by one, to refuse only that key's inputs).
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
        in_flight: bool | None = None,
        keep_journal: bool = False,
        history_base: tuple[int, bytes] | None = None,
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
            in_flight: True or False records, in the same atomic commit, whether the key has
                tracked actions (or timers) in flight after it (rule 8); None leaves the mark.
            keep_journal: with a checkpoint, keep the journal entries it covers (and write
                ``entries``, which must then be given) so that :meth:`history` still returns
                them. ``load`` never returns them. A later checkpoint without it drops them
                (and the history base).
            history_base: with ``keep_journal``, ``(b, checkpoint)``: the encoded state as of
                seq ``b`` (``0 < b <= expected_seq``, an older checkpoint of the key). It
                replaces the stored history base and the kept entries up to ``b`` are dropped,
                so the history is bounded and still replays from :meth:`history_base`.

        Raises:
            StoreConflict: the stored sequence number is not ``expected_seq``; nothing written.
            StoreUnavailable: the write could not be made durable; nothing was committed.
            ValueError: the arguments break the rules above.
        """
        ...

    async def commit_many(self, commits: Sequence[KeyCommit]) -> None:
        """Durably and atomically commit several keys at once (rule 7): one durable write for
        the group, all of it visible after a crash or none of it.

        Args:
            commits: one :class:`KeyCommit` per key, keys distinct, each following the rules
                of :meth:`commit`. An empty sequence does nothing.

        Raises:
            StoreConflict: some key's stored seq is not its ``expected_seq``, or some key is not
                held by this store object (by ``acquire`` or ``acquire_all``); the error names
                the key, and nothing of the group is written.
            StoreUnavailable: the write could not be made durable; nothing was committed.
            ValueError: a key appears twice, or a part breaks the rules of :meth:`commit`.
        """
        ...

    async def keys_in_flight(self) -> list[str]:
        """Every key whose in-flight mark is set, sorted, read from the store's index (rule 8).

        Raises:
            StoreUnavailable: the backend cannot be reached.
        """
        ...

    async def acquire_all(self) -> None:
        """Take exclusive use of every key, present and future, for this store object (rule 9).

        Raises:
            StoreConflict: another store object or process holds the whole store or a key.
            StoreUnavailable: the backend cannot be reached.
        """
        ...

    async def release_all(self) -> None:
        """Give up what :meth:`acquire_all` took. Doing it when not held does nothing."""
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
    keep_journal: bool = False, history_base: tuple[int, bytes] | None = None,
) -> None:
    """Validate the shape of a commit (shared by every backend)."""
    if history_base is not None:
        if not keep_journal:
            raise ValueError("history_base needs keep_journal")
        if not 0 < history_base[0] <= expected_seq:
            raise ValueError(f"history_base seq must be in 1..{expected_seq} (the expected_seq), "
                             f"got {history_base[0]}")
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


def check_many_args(commits: Sequence[KeyCommit]) -> None:
    """Validate the shape of a multi-key commit (shared by every backend)."""
    seen: set[str] = set()
    for c in commits:
        if not isinstance(c, KeyCommit):
            raise TypeError(f"commit_many takes KeyCommit objects, not {type(c).__name__}")
        if c.key in seen:
            raise ValueError(f"key {c.key!r} appears twice in one commit_many")
        seen.add(c.key)
        check_commit_args(c.expected_seq, c.seq, c.entries, c.checkpoint, c.keep_journal,
                          c.history_base)


def not_held(store: str, key: str, seq: int) -> StoreConflict:
    """The error for a ``commit_many`` part on a key the store object does not hold."""
    return StoreConflict("commit_many needs every key held by this store object (acquire it, "
                         "or acquire_all); nothing written", store=store, key=key, seq=seq)
