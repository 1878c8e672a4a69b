"""MemoryStore: the reference backend, for tests and simulation. Nothing survives the process."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import StoreConflict, StoreCorrupt, StoreUnavailable
from ._store import (
    KeyCommit,
    StoredRecords,
    check_commit_args,
    check_keys_args,
    check_many_args,
    contiguous,
    not_held,
    page_of,
)

__all__ = ("MemoryStore",)


@dataclass(slots=True)
class _Key:
    seq: int = 0
    checkpoint: bytes | None = None
    checkpoint_seq: int = 0
    journal: list[tuple[int, bytes]] = field(default_factory=list)
    kept: list[tuple[int, bytes]] = field(default_factory=list)  # covered by the checkpoint
    base: tuple[int, bytes] | None = None  # the history base (Store.history_base)


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
        self._all = False
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

    def _marked(self) -> set[str]:
        """The in-flight index: the keys whose mark is set."""
        return self.data.setdefault("in_flight", set())  # type: ignore[return-value]

    async def open(self) -> None:
        self.data.setdefault("identity", str(uuid.uuid4()))
        self._open = True

    async def close(self) -> None:
        for key in list(self._held):
            await self.release(key)
        await self.release_all()
        self._open = False

    def _check_open(self, key: str | None = None) -> None:
        if not self._open:
            raise StoreUnavailable("store is not open", store=self.description, key=key)

    async def acquire(self, key: str) -> None:
        self._check_open(key)
        owners = self._owners()
        owner = owners.get(key)
        whole = self.data.get("all")
        if (owner is not None and owner != id(self)) or (whole is not None
                                                         and whole != id(self)):
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

    async def acquire_all(self) -> None:
        self._check_open()
        whole = self.data.get("all")
        if whole == id(self):
            return
        if whole is not None or any(o != id(self) for o in self._owners().values()):
            raise StoreConflict("the store or one of its keys is held by another store object",
                                store=self.description)
        self.data["all"] = id(self)
        self._all = True

    async def release_all(self) -> None:
        if self.data.get("all") == id(self):
            del self.data["all"]
        self._all = False

    async def keys_in_flight(self) -> list[str]:
        self._check_open()
        return sorted(self._marked())

    async def load_many(self, keys: Sequence[str]) -> dict[str, StoredRecords | None]:
        return {key: await self.load(key) for key in keys}

    async def load(self, key: str) -> StoredRecords | None:
        self._check_open(key)
        k = self._keys().get(key)
        if k is None:
            return None
        if k.checkpoint is None and k.checkpoint_seq:  # only a test that damages ``data``
            raise StoreCorrupt(f"the checkpoint at seq {k.checkpoint_seq} is missing",
                               store=self.description, key=key, seq=k.checkpoint_seq)
        return StoredRecords(k.seq, k.checkpoint, k.checkpoint_seq, tuple(k.journal),
                             key in self._marked())

    async def history(self, key: str) -> tuple[tuple[int, bytes], ...]:
        self._check_open(key)
        k = self._keys().get(key)
        if k is None:
            return ()
        return contiguous([*k.kept, *k.journal], key, self.description, k.seq)

    async def history_base(self, key: str) -> tuple[int, bytes] | None:
        self._check_open(key)
        k = self._keys().get(key)
        return None if k is None else k.base

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
        self._check_open(key)
        check_commit_args(expected_seq, seq, entries, checkpoint, keep_journal, history_base)
        self._inject_failure(key, seq)
        self._fence(key, expected_seq, seq)
        self._apply(KeyCommit(key, expected_seq, seq, entries, checkpoint, in_flight,
                              keep_journal, history_base))

    async def commit_many(self, commits: Sequence[KeyCommit]) -> None:
        """All parts are checked before any is applied, so a refused group writes nothing."""
        self._check_open()
        check_many_args(commits)
        if not commits:
            return
        owners = self._owners()
        for c in commits:
            if not self._all and owners.get(c.key) != id(self):
                raise not_held(self.description, c.key, c.seq)
        self._inject_failure(commits[0].key, commits[0].seq)
        for c in commits:
            self._fence(c.key, c.expected_seq, c.seq)
        for c in commits:
            self._apply(c)

    def _inject_failure(self, key: str, seq: int) -> None:
        if self.fail_next_commits > 0:
            self.fail_next_commits -= 1
            raise StoreUnavailable("injected commit failure", store=self.description, key=key,
                                   seq=seq)

    def _fence(self, key: str, expected_seq: int, seq: int) -> None:
        k = self._keys().get(key)
        current = k.seq if k is not None else 0
        if current != expected_seq:
            raise StoreConflict(f"stale writer: stored seq is {current}, writer expected "
                                f"{expected_seq}", store=self.description, key=key, seq=seq)

    def _apply(self, c: KeyCommit) -> None:
        key, expected_seq, seq, entries, checkpoint = (c.key, c.expected_seq, c.seq, c.entries,
                                                       c.checkpoint)
        keys = self._keys()
        k = keys.get(key)
        if c.in_flight is True:
            self._marked().add(key)
        elif c.in_flight is False:
            self._marked().discard(key)
        if k is None:
            k = keys[key] = _Key()
        if checkpoint is not None:
            k.checkpoint = bytes(checkpoint)
            k.checkpoint_seq = seq
            if c.keep_journal:
                k.kept += [*k.journal, *zip(range(expected_seq + 1, seq + 1),
                                            map(bytes, entries), strict=True)]
                if c.history_base is not None:
                    b = c.history_base[0]
                    k.base = (b, bytes(c.history_base[1]))
                    k.kept = [e for e in k.kept if e[0] > b]
            else:
                k.kept = []
                k.base = None
            k.journal = []
        else:
            k.journal.extend(zip(range(expected_seq + 1, seq + 1), map(bytes, entries),
                                 strict=True))
        k.seq = seq
