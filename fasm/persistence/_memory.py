"""MemoryStore: the reference backend, for tests and simulation. Nothing survives the process."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import StoreConflict, StoreCorrupt, StoreUnavailable
from ._store import StoredRecords, check_commit_args, check_keys_args, contiguous, page_of

__all__ = ("MemoryStore",)


@dataclass(slots=True)
class _Key:
    seq: int = 0
    checkpoint: bytes | None = None
    checkpoint_seq: int = 0
    journal: list[tuple[int, bytes]] = field(default_factory=list)
    kept: list[tuple[int, bytes]] = field(default_factory=list)  # covered by the checkpoint


class MemoryStore:
    """A store in a dict. Records are bytes, like every other backend's, so a reload never
    aliases live state and a test sees the same codec path production uses.

    Several ``MemoryStore`` objects may share one ``data`` mapping (``MemoryStore(data=a.data)``)
    to stand for processes sharing a disk: keys are then exclusive between them, as on a real
    backend.

    ``fail_next_commits`` makes the next N commits raise :class:`StoreUnavailable` without writing,
    for tests of a store failing mid-run.
    """

    def __init__(self, *, data: dict[str, object] | None = None) -> None:
        self.data: dict[str, object] = data if data is not None else {}
        self._held: set[str] = set()
        self._open = False
        self.fail_next_commits = 0

    @property
    def description(self) -> str:
        return f"memory:{id(self.data):x}"

    @property
    def identity(self) -> str:
        """Made at the first ``open`` of this ``data`` mapping (shared by the store objects that
        share it, as by processes sharing a disk).

        Raises:
            StoreUnavailable: the store is not open.
        """
        self._check_open()
        return self.data["identity"]  # type: ignore[return-value]

    def _keys(self) -> dict[str, _Key]:
        return self.data.setdefault("keys", {})  # type: ignore[return-value]

    def _owners(self) -> dict[str, int]:
        return self.data.setdefault("owners", {})  # type: ignore[return-value]

    async def open(self) -> None:
        self.data.setdefault("identity", str(uuid.uuid4()))
        self._open = True

    async def close(self) -> None:
        for key in list(self._held):
            await self.release(key)
        self._open = False

    def _check_open(self, key: str | None = None) -> None:
        if not self._open:
            raise StoreUnavailable("store is not open", store=self.description, key=key)

    async def acquire(self, key: str) -> None:
        self._check_open(key)
        owners = self._owners()
        owner = owners.get(key)
        if owner is not None and owner != id(self):
            raise StoreConflict("key is held by another store object", store=self.description,
                                key=key)
        owners[key] = id(self)
        self._held.add(key)

    async def release(self, key: str) -> None:
        owners = self._owners()
        if owners.get(key) == id(self):
            del owners[key]
        self._held.discard(key)

    async def keys(self, after: str | None = None, limit: int = 1000) -> list[str]:
        check_keys_args(limit)
        self._check_open()
        return page_of((k for k, v in self._keys().items() if v.seq > 0), after, limit)

    async def load(self, key: str) -> StoredRecords | None:
        self._check_open(key)
        k = self._keys().get(key)
        if k is None:
            return None
        if k.checkpoint is None and k.checkpoint_seq:  # only a test that damages ``data``
            raise StoreCorrupt(f"the checkpoint at seq {k.checkpoint_seq} is missing",
                               store=self.description, key=key, seq=k.checkpoint_seq)
        return StoredRecords(k.seq, k.checkpoint, k.checkpoint_seq, tuple(k.journal))

    async def history(self, key: str) -> tuple[tuple[int, bytes], ...]:
        self._check_open(key)
        k = self._keys().get(key)
        if k is None:
            return ()
        return contiguous([*k.kept, *k.journal], key, self.description, k.seq)

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
        self._check_open(key)
        check_commit_args(expected_seq, seq, entries, checkpoint, keep_journal)
        if self.fail_next_commits > 0:
            self.fail_next_commits -= 1
            raise StoreUnavailable("injected commit failure", store=self.description, key=key,
                                   seq=seq)
        keys = self._keys()
        k = keys.get(key)
        current = k.seq if k is not None else 0
        if current != expected_seq:
            raise StoreConflict(f"stale writer: stored seq is {current}, writer expected "
                                f"{expected_seq}", store=self.description, key=key, seq=seq)
        if k is None:
            k = keys[key] = _Key()
        if checkpoint is not None:
            k.checkpoint = bytes(checkpoint)
            k.checkpoint_seq = seq
            if keep_journal:
                k.kept += [*k.journal, *zip(range(expected_seq + 1, seq + 1),
                                            map(bytes, entries), strict=True)]
            else:
                k.kept = []
            k.journal = []
        else:
            k.journal.extend(zip(range(expected_seq + 1, seq + 1), map(bytes, entries),
                                 strict=True))
        k.seq = seq
