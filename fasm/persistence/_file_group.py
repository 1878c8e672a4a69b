"""The file store's group commits: a redo record makes several keys' commits one, its replay
finishes a group a crash interrupted, and the in-flight index is updated with it.

:mod:`._file` (its notes) says what the record guarantees; :mod:`._file_redo` holds its
format. These functions run on the store's worker thread with what :class:`GroupHost` names of
the store: they change its held keys' tails under its locks, as its own commits do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import StoreConflict, StoreCorrupt, StoreUnavailable
from ._file_format import (
    Disk,
    FilesMissing,
    Tail,
    append,
    datasync,
    key_file_name,
    scan_key,
    update_manifest,
    write_base,
    write_checkpoint,
)
from ._file_locks import Hold, check_hold, take, take_shared, unflock
from ._file_redo import decode_group, encode_group
from ._store import KeyCommit, not_held

__all__ = ("GROUP_LOCK", "IN_FLIGHT", "REDO", "GroupHost", "group_sync", "replay", "write_redo")

GROUP_LOCK = "FASM-STORE-GROUP"  # flock'd by a group commit and by the replay of its record
REDO = "FASM-STORE-REDO"  # the record of the group commit being applied
IN_FLIGHT = "FASM-STORE-IN-FLIGHT"  # the in-flight index: one file per marked key


class GroupHost(Disk, Protocol):
    """What a group commit uses of its store (a :class:`~fasm.persistence.FileStore`)."""

    _root: Path
    _state: threading.Lock  # guards _held and _tails
    _held: dict[str, Hold]
    _tails: dict[str, Tail]
    _stripes: list[threading.Lock]
    _shared: int | None
    _all: int | None
    _group: threading.Lock

    def _check_open(self, key: str | None) -> None: ...

    def _key_dir(self, key: str, *, create: bool) -> Path: ...

    def _write_redo(self, commits: Sequence[KeyCommit]) -> None: ...


@dataclass(slots=True)
class Part:
    """One key's part of a group commit while it is made."""

    commit: KeyCommit
    kdir: Path
    hold: Hold | None
    temporary: Hold | None
    locked: bool = False
    old: Tail | None = None
    tail: Tail | None = None
    new: Tail | None = None

    def finish(self) -> None:
        old, new = self.old, self.new
        if old is not None and (new is None or old.fd != new.fd):
            old.close()
        if new is not None and self.temporary is not None:
            new.close()
        if self.locked and self.hold is not None:
            try:
                fcntl.flock(self.hold.dir_fd, fcntl.LOCK_UN)
            except OSError:
                pass
        if self.temporary is not None:
            self.temporary.close()


@contextlib.contextmanager
def group_locked(store: GroupHost) -> Iterator[None]:
    """One group commit or replay at a time, across store objects and processes."""
    with store._group:
        fd = os.open(store._root / GROUP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def group_sync(store: GroupHost, commits: Sequence[KeyCommit], require_held: bool) -> None:
    store._check_open(commits[0].key)
    if require_held:
        for c in commits:
            if store._all is None and c.key not in store._held:
                raise not_held(store.description, c.key, c.seq)
    try:
        with group_locked(store):
            replay_locked(store)
            stripes = sorted({hash(c.key) % len(store._stripes) for c in commits})
            for i in stripes:
                store._stripes[i].acquire()
            try:
                group_commit(store, commits)
            finally:
                for i in reversed(stripes):
                    store._stripes[i].release()
    except FilesMissing as e:
        raise StoreCorrupt(e.message, store=store.description, key=e.key, seq=e.seq) from None
    except OSError as e:
        raise StoreUnavailable(f"commit failed, nothing committed: {e}",
                               store=store.description) from e


def group_commit(store: GroupHost, commits: Sequence[KeyCommit]) -> None:
    """Under the group lock and the keys' mutexes: fence, record, apply, forget."""
    parts: list[Part] = []
    shared: int | None = None
    try:
        if store._all is None and store._shared is None:
            shared = take_shared(store._root, store.description, commits[0].key)
        for c in commits:
            kdir = store._key_dir(c.key, create=True)
            hold = store._held.get(c.key)
            part = Part(c, kdir, hold, None)
            if hold is None:
                part.hold = part.temporary = take(kdir)
                if part.hold is None:
                    raise StoreConflict("key is held by another store object or process",
                                        store=store.description, key=c.key, seq=c.seq)
            parts.append(part)
            held = part.hold
            assert held is not None
            fcntl.flock(held.dir_fd, fcntl.LOCK_EX)
            part.locked = True
            check_hold(store.description, c.key, held, c.seq)
            with store._state:
                part.old = store._tails.pop(c.key, None)
            part.tail = (part.old if part.old is not None
                         else scan_key(store.description, c.key, kdir, for_write=True).tail)
            if part.tail.seq != c.expected_seq:
                raise StoreConflict(f"stale writer: stored seq is {part.tail.seq}, writer "
                                    f"expected {c.expected_seq}", store=store.description,
                                    key=c.key, seq=c.seq)
        store._write_redo(commits)  # the commit point
        try:
            for part in parts:
                assert part.tail is not None
                part.new = apply(store, part.commit, part.kdir, part.tail, sync=False)
            for part in parts:
                if part.new is not None and part.new.fd is not None and store._fsync:
                    datasync(part.new.fd)
            set_marks(store, commits)
        except (OSError, StoreUnavailable) as e:
            for part in parts:
                part.new = None  # rescan at the next commit
            raise StoreUnavailable(
                f"the group commit is recorded but applying it failed ({e}): it will be "
                "applied by the next open, acquire or group commit, as after a crash",
                store=store.description) from e
        try:
            os.unlink(store._root / REDO)  # applied and durable: the record is not needed
        except OSError:
            pass  # replaying it changes nothing: every part is at its seq already
        for part in parts:
            assert part.new is not None
            update_manifest(store, part.kdir, part.new)
            if part.temporary is None:
                with store._state:
                    store._tails[part.commit.key] = part.new
    finally:
        for part in parts:
            part.finish()
        if shared is not None:
            unflock(shared)


def apply(store: GroupHost, c: KeyCommit, kdir: Path, tail: Tail, *, sync: bool) -> Tail:
    if c.checkpoint is not None and c.keep_journal:
        # Synced here, not with the group's appends: the checkpoint after it closes it.
        appended = append(store, c.key, tail, kdir, c.expected_seq, c.entries)
        if tail.fd == appended.fd:
            tail.fd = None  # closed once, below, never twice
        appended.close()
        new = write_checkpoint(store, c.key, kdir, c.seq, c.checkpoint, keep_journal=True)
        if c.history_base is not None:
            write_base(store, kdir, *c.history_base)
    elif c.checkpoint is not None:
        new = write_checkpoint(store, c.key, kdir, c.seq, c.checkpoint)
    else:
        new = append(store, c.key, tail, kdir, c.expected_seq, c.entries, sync=sync)
    if new.manifest is None:
        new.manifest = tail.manifest
    return new


def write_redo(store: GroupHost, commits: Sequence[KeyCommit]) -> None:
    """Write the group's redo record whole (tmp, fsync, rename, root fsync'd): the commit
    point."""
    head, payload = encode_group(commits)
    tmp = store._root / f"{REDO}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        store._write_at(fd, head, 0)
        store._write_at(fd, payload, len(head))
        if store._fsync:
            os.fsync(fd)
    except OSError:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, store._root / REDO)
    store._sync_dir(store._root)


def set_marks(store: GroupHost, commits: Sequence[KeyCommit]) -> None:
    """Make the in-flight index say what the group's parts say (idempotent)."""
    index = store._root / IN_FLIGHT
    changed = False
    for c in commits:
        path = index / key_file_name(c.key)
        if c.in_flight is True and not path.exists():
            tmp = index / f"{path.name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                store._write_at(fd, c.key.encode("utf-8"), 0)
                if store._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            changed = True
        elif c.in_flight is False and path.exists():
            path.unlink()
            changed = True
    if changed:
        store._sync_dir(index)


def replay(store: GroupHost) -> None:
    """Take the group lock and finish the group a crash interrupted, if any."""
    with group_locked(store):
        replay_locked(store)


def replay_locked(store: GroupHost) -> None:
    """Under the group lock: apply the group commit a crash interrupted after its commit
    point, if any, and delete its record (idempotent: a crash here is replayed again)."""
    path = store._root / REDO
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        try:
            os.unlink(store._root / f"{REDO}.tmp")  # a group that never committed
        except FileNotFoundError:
            pass
        return
    commits = decode_group(data)
    if commits is None:  # fsync'd before its rename: damaged afterwards
        raise StoreCorrupt(f"{REDO}: the record of a committed group fails its checksum",
                           store=store.description)
    ours = []  # the parts no later commit has overwritten: their marks are the group's
    for c in commits:
        kdir = store._key_dir(c.key, create=True)
        dir_fd = os.open(kdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            with store._state:
                old = store._tails.pop(c.key, None)
            if old is not None:
                old.close()
            tail = scan_key(store.description, c.key, kdir, for_write=True).tail
            if tail.seq == c.expected_seq:
                new = apply(store, c, kdir, tail, sync=True)
                new.close()
                update_manifest(store, kdir, new)
                ours.append(c)
            elif tail.seq == c.seq:  # applied; its mark may not be (every commit that
                ours.append(c)      # changes a mark also moves the seq on)
            elif not c.seq < tail.seq:
                raise StoreCorrupt(f"{REDO}: a committed group moves the key from seq "
                                   f"{c.expected_seq} to {c.seq}, but it is at {tail.seq}",
                                   store=store.description, key=c.key, seq=tail.seq)
        finally:
            os.close(dir_fd)
    set_marks(store, ours)
    os.unlink(path)
    store._sync_dir(store._root)
