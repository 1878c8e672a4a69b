"""FileStore: a directory of files, one subdirectory per key.

Layout::

    <directory>/
        FASM-STORE               marker naming the format ("fasm file store 2")
        FASM-STORE-ID            the store's identity (a UUID), made once when first opened
        k-<hex of utf-8 key>/    per key (h-<sha256 hex> for keys too long for a file name)
            key                  the key itself (UTF-8), in h- directories only, for listing
            lock                 flock'd by the holder of the key, or by a commit in progress
            manifest             what must exist: written when the key's first commit or a
                                 new segment's first commit is durable, never per commit
            ckpt-<seq:020d>      a checkpoint: header + payload; written once, never modified
            jrnl-<seq:020d>      a journal segment whose first entry is <seq>; frames appended
            base-<seq:020d>      the history base (Store.history_base): a checkpoint's format

Theory of operation (the rules live here and nowhere else):

* A checkpoint is written to ``ckpt-<seq>.tmp``, fsync'd, renamed over its final name and the
  directory fsync'd: it is either absent or whole. Only once it is durable are the older
  checkpoints and every journal segment deleted (they hold entries up to ``seq`` only). A crash
  between the rename and the deletions leaves files that ``load`` ignores.
* A journal commit appends one frame per entry to the newest segment (or starts
  ``jrnl-<expected_seq + 1>`` after a checkpoint), then fsyncs once. Each frame carries its
  length, its seq, the seq of the commit's *last* entry, a CRC-32 of the payload and a CRC-32 of
  the header. A commit is visible only when its last frame is intact, so a crash mid-append shows
  none of it.
* On load, a segment that ends inside a frame (or whose unreadable bytes are all zero, as a
  crash can leave them) has a torn tail: the unfinished commit is ignored, and the next writer
  truncates it before appending. A *complete* frame that fails a check, a frame out of order, or
  a gap between the checkpoint and the journal raises :class:`StoreCorrupt`.
* The manifest says that the key has committed and names the newest segment a writer started
  (``S``) with the seq its first commit ended at (``L``). It is replaced (tmp, fsync, rename)
  only *after* what it names is durable, so a crash never leaves it naming something absent.
  On load, a key whose manifest exists but which has neither a checkpoint nor a segment, or
  whose checkpoint is older than ``S`` while ``jrnl-S`` is missing or ends before ``L``, lost
  files behind the store's back: :class:`StoreCorrupt`. Deleting the newest commits *inside*
  the newest segment, or a checkpoint while an older one remains, is not detectable at this
  cost (it would take a write per commit). Format 1 stores had no manifest; ``open`` upgrades
  the marker in place and the first commit on a key writes its manifest.
* Writers hold ``lock`` (``fcntl.flock``) from ``acquire`` to ``release`` (or for one commit);
  the kernel drops it when the process dies. Every commit also takes an ``flock`` on the key's
  directory for its duration and checks, under it, that the lock file it holds is still linked
  (``fstat``: a deleted or replaced file has no links left): a lock file deleted behind a
  holder's back lets a second writer lock a new one, and the first one's next commit raises
  :class:`StoreConflict` and writes nothing. The directory lock makes that check and the write
  one step, so the second writer's first commit (which reads the files afresh) sees all that
  the first one wrote. Loads take no file lock: a load racing another process's checkpoint
  retries.

Group commits (``commit_many``, and a ``commit`` that sets or clears the in-flight mark) are made
atomic across keys by a redo record. Under ``FASM-STORE-GROUP`` (an flock) and every key's
directory lock, with every key fenced, the whole group is written to ``FASM-STORE-REDO.tmp``
with a checksummed header, fsync'd and renamed to ``FASM-STORE-REDO`` (root fsync'd): that is
the commit point. Then each key's part is applied as a plain commit (journal appends synced
together at the end) and the in-flight index updated, and the record is deleted. A crash before
the rename leaves no record (or a torn ``.tmp``, ignored and deleted): nothing of the group is
visible, as no key was touched. A crash after it leaves the record, which the next ``open``,
``acquire``, ``acquire_all`` or commit (in any process, under the
group lock) replays: a key still at its ``expected_seq`` (a torn append is cut off first) gets
its part, a key at ``seq`` already has it. The in-flight index is the directory
``FASM-STORE-IN-FLIGHT``: one file per marked key, named like its key directory and holding
the key, so ``keys_in_flight`` lists the marked keys and never the others.

Every file operation runs on the store's own worker thread, one hand-off per store call, so the
event loop never waits on the disk and the store works on asyncio and trio alike (or, with
``inline=True``, on the event loop's thread). A held key's newest segment stays open between
appends, and appends are made durable with ``fdatasync`` (the data and the file's size, not its
timestamps) where the platform has it.

This module owns the rules and the public surface; the parts live beside it: the per-key files'
format, reading and writing in :mod:`._file_format`, the locks in :mod:`._file_locks`, group
commits and their replay in :mod:`._file_group` (the redo record's bytes in :mod:`._file_redo`).
"""

from __future__ import annotations

import fcntl
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import StoreConflict, StoreCorrupt, StoreUnavailable
from ._file_format import (
    KEY_NAME,
    MAX_FRAME,
    FilesMissing,
    Tail,
    append,
    fsync_dir,
    has_committed,
    key_file_name,
    parse_segment,
    read_checkpoint,
    scan_key,
    update_manifest,
    write_base,
    write_checkpoint,
)
from ._file_group import IN_FLIGHT, REDO, group_sync, replay, write_redo
from ._file_locks import ALL_LOCK, Hold, check_hold, take, take_shared, try_flock, unflock
from ._store import (
    KeyCommit,
    StoredRecords,
    check_commit_args,
    check_keys_args,
    check_many_args,
    contiguous,
    page_of,
)
from ._worker import Worker

__all__ = ("FileStore",)

_MARKER_NAME = "FASM-STORE"
# 2: per-key manifest, commits lock the key's directory; 3: group commits (redo record) and the
# in-flight index
_MARKER_TEXT = "fasm file store 3\n"
_UPGRADABLE = ("fasm file store 1\n", "fasm file store 2\n")  # valid as they are under 3
_IDENTITY_NAME = "FASM-STORE-ID"  # starts with the marker's name: not "other files" at open
_STRIPES = 64
_LOAD_ATTEMPTS = 5
_T = TypeVar("_T")


class FileStore:
    """A :class:`~fasm.persistence.Store` in a directory of plain files.

    Args:
        directory: where the store lives; created when missing. A non-empty directory that is not
            a fasm file store is refused (:class:`StoreCorrupt`) rather than written into.
        fsync: fsync files and directories so a commit that returned survives power loss. With
            ``fsync=False`` a commit survives a crash of the process but not of the machine.
        inline: run every call on the event loop's thread instead of the store's worker thread:
            no hand-off to the thread and back (on a virtual machine nearly as long as a fast
            disk's fsync), but every other task of the loop waits for each commit's fsync. For a
            process that does little else, on a fast local disk.

    What a user should know:

    * Checkpoints are new files renamed into place; journal entries are appended in checksummed
      frames, one fsync per ``commit`` call (group commit is one call with many entries). A
      checkpoint deletes the journal it covers once it is durable.
    * A torn tail (a crash inside an append, so the commit never returned) is ignored on load and
      cut off by the next writer. A complete record that fails its checksum, or a missing record
      before the tail, raises :class:`StoreCorrupt`; the store never falls back to older data.
      Damage that makes the *last* commit of a segment look unfinished (the file cut short
      inside it) cannot be told from a torn write and is treated as one.
    * Files deleted behind the store's back are refused (:class:`StoreCorrupt`) where the key's
      manifest says they must exist: a key's only checkpoint, its journal segment, a segment cut
      short before its first acknowledged commit. A key directory deleted whole looks like a key
      never used. docs/persistence.md has the full table.
    * ``acquire`` takes an ``flock`` on the key's lock file: exclusive between store objects and
      processes, released by the kernel if the process dies. A ``commit`` takes the same lock for
      its duration when the key is not acquired, so a commit on a key another store object holds
      raises :class:`StoreConflict`. If the lock file is deleted while held, the holder's next
      commit raises :class:`StoreConflict` (another writer may have locked a new one) and writes
      nothing.
    * Disk full or any other write error raises :class:`StoreUnavailable` after the partial write
      is cut off again, so nothing of that commit is visible. If even that cleanup fails (a
      failing disk), the message says so: the commit may then become visible later, as after a
      crash during the commit.
    * Keys map to directory names by hex (``h-<sha256>`` beyond 100 UTF-8 bytes); lock files and
      key directories are never deleted.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True,
                 inline: bool = False) -> None:
        self._root = Path(directory)
        self._fsync = fsync
        self.inline = inline
        """Whether calls run on the event loop's thread (see the ``inline`` argument)."""
        self._worker = Worker(f"fasm-{self.description}")
        self._open = False
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._state = threading.Lock()  # guards _held and _tails
        self._held: dict[str, Hold] = {}  # key -> its flock'd lock file and directory
        self._tails: dict[str, Tail] = {}  # only for held keys: nobody else writes them
        self._durable_dirs: set[str] = set()  # keys whose directory entry we fsync'd
        self._identity: str | None = None
        self._shared: int | None = None  # shared flock on FASM-STORE-ALL while keys are held
        self._all: int | None = None  # exclusive flock on it, taken by acquire_all
        self._group = threading.Lock()  # one group commit (or replay) at a time in this object

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self.inline:
            return fn(*args)
        return await self._worker.run(fn, *args)

    @property
    def description(self) -> str:
        """``file:<directory>``."""
        return f"file:{self._root}"

    @property
    def identity(self) -> str:
        """The UUID in ``FASM-STORE-ID``, made by the first ``open`` of the directory (also of
        one written by an older fasm that had none).

        Raises:
            StoreUnavailable: the store is not open.
        """
        if self._identity is None or not self._open:
            raise StoreUnavailable("store is not open", store=self.description)
        return self._identity

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directory and its marker, or check an existing one.

        Raises:
            StoreUnavailable: the directory cannot be created or read.
            StoreCorrupt: the directory holds something that is not a fasm file store.
        """
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            marker = self._root / _MARKER_NAME
            try:
                text = marker.read_text(encoding="utf-8")
            except FileNotFoundError:
                others = [p for p in os.listdir(self._root) if not p.startswith(_MARKER_NAME)]
                if others:
                    raise StoreCorrupt(
                        "directory is not empty and has no FASM-STORE marker: not a fasm file "
                        "store", store=self.description) from None
                self._write_marker(marker)
            else:
                if text in _UPGRADABLE:
                    # Format 1's files are valid format 2 files; its keys get a manifest at
                    # their next commit. Older fasm refuses the upgraded store.
                    self._write_marker(marker)
                elif text != _MARKER_TEXT:
                    raise StoreCorrupt(f"unknown store format {text.strip()!r}",
                                       store=self.description)
            self._identity = self._read_identity()
            (self._root / IN_FLIGHT).mkdir(exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"cannot open the store directory: {e}",
                                   store=self.description) from e
        self._open = True
        try:
            self._replay()  # a group commit that a crash interrupted after its commit point
        except BaseException:
            self._open = False
            raise

    def _read_identity(self) -> str:
        """The identity in its file, made first when there is none: written to a temporary
        file, fsync'd and linked to its name, which fails when another process linked its own
        first (then that one is read), so every opener agrees."""
        path = self._root / _IDENTITY_NAME
        for _ in range(2):
            try:
                text = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                tmp = self._root / f"{_IDENTITY_NAME}.{uuid.uuid4().hex}.tmp"
                tmp.write_text(f"{uuid.uuid4()}\n", encoding="utf-8")
                self._sync_file(tmp)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink()
                self._sync_dir(self._root)
                continue
            if not text or len(text) > 200 or not text.isprintable():
                raise StoreCorrupt(f"{_IDENTITY_NAME} does not hold a store identity",
                                   store=self.description)
            return text
        raise StoreCorrupt(f"{_IDENTITY_NAME} vanished while it was being made",
                           store=self.description)

    def _write_marker(self, marker: Path) -> None:
        tmp = self._root / f"{_MARKER_NAME}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(_MARKER_TEXT, encoding="utf-8")
        self._sync_file(tmp)
        os.replace(tmp, marker)
        self._sync_dir(self._root)

    async def close(self) -> None:
        """Release every held key. Safe to call twice."""
        try:
            await self._run(self._close_sync)
        finally:
            self._worker.stop()

    def _close_sync(self) -> None:
        self._open = False
        with self._state:
            held, self._held = self._held, {}
            tails, self._tails = self._tails, {}
            locks = [self._shared, self._all]
            self._shared = self._all = None
        for tail in tails.values():
            tail.close()
        for hold in held.values():
            hold.close()  # closing the descriptor (or the process ending) frees the lock anyway
        for fd in locks:
            if fd is not None:
                try:
                    unflock(fd)
                except OSError:
                    pass

    def _check_open(self, key: str | None) -> None:
        if not self._open:
            raise StoreUnavailable("store is not open", store=self.description, key=key)

    # -- helpers ----------------------------------------------------------------------------

    def _mutex(self, key: str) -> threading.Lock:
        """Serializes this object's operations on one key (striped to bound memory)."""
        return self._stripes[hash(key) % _STRIPES]

    def _sync_file(self, path: Path) -> None:
        if self._fsync:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _sync_dir(self, path: Path) -> None:
        if self._fsync:
            fsync_dir(path)

    def _key_dir(self, key: str, *, create: bool) -> Path:
        path = self._root / key_file_name(key)
        if create and key not in self._durable_dirs:
            path.mkdir(exist_ok=True)
            if path.name.startswith("h-") and not (path / KEY_NAME).exists():
                self._write_key_name(path, key)
            # Also when it existed: a process that died right after mkdir may have left an entry
            # that is not durable yet, and our commits would go with it on power loss.
            self._sync_dir(self._root)
            self._durable_dirs.add(key)
        return path

    def _write_key_name(self, kdir: Path, key: str) -> None:
        """Record the key an ``h-`` directory is for (written whole: tmp, fsync, rename), so
        that :meth:`keys` can name it. Older fasm wrote none; such keys are not listed until
        their next commit writes it."""
        tmp = kdir / f"{KEY_NAME}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(key.encode("utf-8"))
        self._sync_file(tmp)
        os.replace(tmp, kdir / KEY_NAME)
        self._sync_dir(kdir)

    def _write_at(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``. Kept as a method so that tests can inject write
        faults (a disk that fills up midway)."""
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    async def keys(self, after: str | None = None, limit: int = 1000) -> list[str]:
        """Committed keys: every key directory with a checkpoint, a non-empty journal segment
        or a manifest (a directory made by ``acquire`` alone is not listed). Each call lists the
        whole root directory, O(keys) per page. An ``h-`` directory written by an older fasm,
        which did not record its key, is not listed until its next commit.

        Raises:
            StoreUnavailable: the directory cannot be read.
        """
        check_keys_args(limit)
        return await self._run(self._keys_sync, after, limit)

    def _keys_sync(self, after: str | None, limit: int) -> list[str]:
        self._check_open(None)
        try:
            found: list[str] = []
            for name in os.listdir(self._root):
                prefix, _, rest = name.partition("-")
                kdir = self._root / name
                if prefix == "k":
                    try:
                        key = bytes.fromhex(rest).decode("utf-8")
                    except ValueError:
                        continue
                elif prefix == "h":
                    try:
                        key = (kdir / KEY_NAME).read_bytes().decode("utf-8")
                    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
                        continue
                else:
                    continue
                if (after is None or key > after) and has_committed(kdir):
                    found.append(key)
        except OSError as e:
            raise StoreUnavailable(f"cannot list keys: {e}", store=self.description) from e
        return page_of(found, None, limit)

    async def load(self, key: str) -> StoredRecords | None:
        """Everything stored for ``key``, or None for a key never committed.

        Raises:
            StoreCorrupt: a complete record fails its checksum, or records are missing (a gap,
                or files the key's manifest says exist).
            StoreUnavailable: the files cannot be read.
        """
        return await self._run(self._load_sync, key)

    async def load_many(self, keys: Sequence[str]) -> dict[str, StoredRecords | None]:
        """:meth:`load` of each key, in one call to the store's thread (raises as it does)."""
        return await self._run(self._load_many_sync, list(keys))

    def _load_many_sync(self, keys: list[str]) -> dict[str, StoredRecords | None]:
        return {key: self._load_sync(key) for key in keys}

    def _load_sync(self, key: str) -> StoredRecords | None:
        self._check_open(key)
        missing: FilesMissing | None = None
        for _ in range(_LOAD_ATTEMPTS):
            try:
                with self._mutex(key):
                    scan = scan_key(self.description, key, self._key_dir(key, create=False),
                                    for_write=False)
                    checkpoint = None
                    if scan.checkpoint is not None:
                        checkpoint = read_checkpoint(self.description, key, scan.checkpoint,
                                                     scan.checkpoint_seq)
            except FileNotFoundError:
                continue  # another process replaced files under us (a checkpoint); read again
            except FilesMissing as e:
                missing = e  # or a listing that raced a checkpoint: read again to be sure
                continue
            except OSError as e:
                raise StoreUnavailable(f"cannot read: {e}", store=self.description,
                                       key=key) from e
            if checkpoint is None and not scan.entries:
                return None
            marked = os.path.exists(self._root / IN_FLIGHT / key_file_name(key))
            return StoredRecords(scan.tail.seq, checkpoint, scan.checkpoint_seq,
                                 tuple(scan.entries), marked)
        if missing is not None:
            raise StoreCorrupt(missing.message, store=self.description, key=key,
                               seq=missing.seq)
        raise StoreUnavailable(f"files kept changing during {_LOAD_ATTEMPTS} attempts to load",
                               store=self.description, key=key)

    async def history(self, key: str) -> tuple[tuple[int, bytes], ...]:
        """Every entry in the key's segments (those a checkpoint kept included), checked."""
        return await self._run(self._history_sync, key)

    def _history_sync(self, key: str) -> tuple[tuple[int, bytes], ...]:
        self._check_open(key)
        for _ in range(_LOAD_ATTEMPTS):
            try:
                with self._mutex(key):
                    kdir = self._key_dir(key, create=False)
                    scan = scan_key(self.description, key, kdir, for_write=False)
                    kept: list[tuple[int, bytes]] = []
                    if not kdir.is_dir():
                        return ()
                    names = os.listdir(kdir)
                    starts = sorted(int(n[5:]) for n in names
                                    if n.startswith("jrnl-") and n[5:].isdigit())
                    base = max((int(n[5:]) for n in names
                                if n.startswith("base-") and n[5:].isdigit()), default=0)
                    for start in starts:
                        if start > scan.checkpoint_seq:
                            break
                        path = kdir / f"jrnl-{start:020d}"
                        kept += parse_segment(self.description, key, path, start,
                                              path.read_bytes())[0]
            except FileNotFoundError:
                continue  # a checkpoint replaced files under us; read again
            except OSError as e:
                raise StoreUnavailable(f"cannot read: {e}", store=self.description,
                                       key=key) from e
            kept = [e for e in kept if base < e[0] <= scan.checkpoint_seq]
            # Segments a crash left behind a checkpoint written without keep_journal are older
            # than the kept run: only the run that reaches the checkpoint counts.
            for i in range(len(kept) - 1, 0, -1):
                if kept[i][0] != kept[i - 1][0] + 1:
                    kept = kept[i:]
                    break
            if kept and kept[-1][0] != scan.checkpoint_seq:
                kept = []
            return contiguous([*kept, *scan.entries], key, self.description, scan.tail.seq)
        raise StoreUnavailable(f"files kept changing during {_LOAD_ATTEMPTS} attempts to read",
                               store=self.description, key=key)

    async def history_base(self, key: str) -> tuple[int, bytes] | None:
        """The newest ``base-<seq>`` file of ``key``, checked."""
        return await self._run(self._history_base_sync, key)

    def _history_base_sync(self, key: str) -> tuple[int, bytes] | None:
        self._check_open(key)
        for _ in range(_LOAD_ATTEMPTS):
            try:
                kdir = self._key_dir(key, create=False)
                if not kdir.is_dir():
                    return None
                seqs = [int(n[5:]) for n in os.listdir(kdir)
                        if n.startswith("base-") and n[5:].isdigit()]
                if not seqs:
                    return None
                b = max(seqs)
                return b, read_checkpoint(self.description, key, kdir / f"base-{b:020d}", b)
            except FileNotFoundError:
                continue  # a newer base replaced it under us; read again
            except OSError as e:
                raise StoreUnavailable(f"cannot read: {e}", store=self.description,
                                       key=key) from e
        raise StoreUnavailable(f"files kept changing during {_LOAD_ATTEMPTS} attempts to read",
                               store=self.description, key=key)

    # -- locking ----------------------------------------------------------------------------

    async def acquire(self, key: str) -> None:
        """Take the key's lock file for this store object (a no-op if it holds it already).

        Raises:
            StoreConflict: another store object or process holds the key.
            StoreUnavailable: the store is closed or the lock file cannot be created.
        """
        await self._run(self._acquire_sync, key)

    def _acquire_sync(self, key: str) -> None:
        self._check_open(key)
        with self._mutex(key):
            if key in self._held:
                return
            try:
                hold = take(self._key_dir(key, create=True))
            except OSError as e:
                raise StoreUnavailable(f"cannot take the key's lock file: {e}",
                                       store=self.description, key=key) from e
            if hold is None:
                raise StoreConflict("key is held by another store object or process",
                                    store=self.description, key=key)
            try:
                if self._all is None and self._shared is None:
                    self._shared = take_shared(self._root, self.description, key)
            except BaseException:
                hold.close()
                raise
            with self._state:
                self._held[key] = hold
        if os.path.exists(self._root / REDO):
            self._replay()  # a crashed group commit may hold a part of this key

    async def acquire_all(self) -> None:
        """Take exclusive use of every key: an exclusive ``flock`` on ``FASM-STORE-ALL``, which
        every other object holding a key (or committing one it did not acquire) takes shared.

        Raises:
            StoreConflict: another store object or process holds the store or one of its keys.
            StoreUnavailable: the store is closed or the lock file cannot be created.
        """
        await self._run(self._acquire_all_sync)

    def _acquire_all_sync(self) -> None:
        self._check_open("")
        with self._state:
            if self._all is not None:
                return
            shared, self._shared = self._shared, None
        if shared is not None:  # our own shared lock would refuse our exclusive one
            unflock(shared)
        try:
            fd = try_flock(self._root / ALL_LOCK)
        except OSError as e:
            raise StoreUnavailable(f"cannot take the store's lock file: {e}",
                                   store=self.description) from e
        if fd is None:
            if self._held:
                self._shared = try_flock(self._root / ALL_LOCK, shared=True)
            raise StoreConflict("another store object or process holds the store or one of "
                                "its keys", store=self.description)
        self._all = fd
        self._replay()

    async def release_all(self) -> None:
        """Give up what :meth:`acquire_all` took (nothing if it is not held)."""
        await self._run(self._release_all_sync)

    def _release_all_sync(self) -> None:
        with self._state:
            fd, self._all = self._all, None
        if fd is None:
            return
        try:
            unflock(fd)
        except OSError:
            pass
        if self._held and self._open:  # keys acquired one by one stay held
            self._shared = try_flock(self._root / ALL_LOCK, shared=True)

    async def keys_in_flight(self) -> list[str]:
        """Every key whose in-flight mark is set, sorted: the files of ``FASM-STORE-IN-FLIGHT``.

        Raises:
            StoreUnavailable: the directory cannot be read.
        """
        return await self._run(self._keys_in_flight_sync)

    def _keys_in_flight_sync(self) -> list[str]:
        self._check_open("")
        index = self._root / IN_FLIGHT
        keys = []
        try:
            for name in os.listdir(index):
                if not name.endswith(".tmp"):
                    keys.append((index / name).read_bytes().decode("utf-8"))
        except FileNotFoundError:
            pass  # a mark deleted while we listed
        except (OSError, UnicodeDecodeError) as e:
            raise StoreUnavailable(f"cannot read the in-flight index: {e}",
                                   store=self.description) from e
        return sorted(keys)

    async def release(self, key: str) -> None:
        """Give up ``key``; releasing a key that is not held does nothing."""
        await self._run(self._release_sync, key)

    def _release_sync(self, key: str) -> None:
        with self._mutex(key), self._state:
            hold = self._held.pop(key, None)
            tail = self._tails.pop(key, None)
            shared = None
            if not self._held:
                shared, self._shared = self._shared, None
        if tail is not None:
            tail.close()
        if hold is not None:
            hold.close()
        if shared is not None:
            try:
                unflock(shared)
            except OSError:
                pass

    # -- writing ----------------------------------------------------------------------------

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
        """Durably and atomically move ``key`` from ``expected_seq`` to ``seq``. With
        ``keep_journal`` the entries are appended first, then the checkpoint is written and the
        segments it covers stay (a crash between the two leaves the same seq as a journal).
        A ``history_base`` is written after the checkpoint, then the older bases and segments
        it covers are deleted: a crash (or a failed write) there leaves the older base and a
        longer history, which replays as well, so only the trimming is lost. (A group commit
        finished from its redo record, which does not carry the base, does not trim.)
        With ``in_flight`` given it runs as a group commit of one key: the mark changes with it.

        Raises:
            StoreConflict: the stored seq is not ``expected_seq``, another store object holds
                the key (or the whole store), or the lock file this object held was deleted or
                replaced; nothing written.
            StoreUnavailable: the write failed (disk full, I/O error); nothing committed.
            StoreCorrupt: the key's files are damaged; nothing written on top of them.
            ValueError: the arguments break the commit rules.
        """
        check_commit_args(expected_seq, seq, entries, checkpoint, keep_journal, history_base)
        if any(len(e) > MAX_FRAME for e in entries):
            raise ValueError("a journal entry is larger than 4 GiB")
        if in_flight is not None:
            part = KeyCommit(key, expected_seq, seq, entries, checkpoint, in_flight,
                             keep_journal, history_base)
            await self._run(group_sync, self, [part], False)
            return
        await self._run(self._commit_sync, key, expected_seq, seq, entries, checkpoint,
                        keep_journal, history_base)

    async def commit_many(self, commits: Sequence[KeyCommit]) -> None:
        """Commit several keys atomically through a redo record (see the module's notes).

        Raises:
            StoreConflict: a key's stored seq is not its ``expected_seq``, or a key is not held
                by this object; nothing written.
            StoreUnavailable: the write failed before the commit point (nothing committed), or
                after it (the message says so: the group is applied by the next open, acquire
                or group commit, as after a crash).
            StoreCorrupt: a key's files are damaged; nothing written.
            ValueError: a key appears twice, or a part breaks the commit rules.
        """
        check_many_args(commits)
        if not commits:
            return
        if any(len(e) > MAX_FRAME for c in commits for e in c.entries):
            raise ValueError("a journal entry is larger than 4 GiB")
        await self._run(group_sync, self, commits, True)

    def _commit_sync(self, key: str, expected_seq: int, seq: int, entries: Sequence[bytes],
                     checkpoint: bytes | None, keep_journal: bool = False,
                     history_base: tuple[int, bytes] | None = None) -> None:
        self._check_open(key)
        if os.path.exists(self._root / REDO):  # a group a crash (or a failing disk) left
            self._replay()
        with self._mutex(key):
            hold = self._held.get(key)
            held = hold is not None
            temporary: Hold | None = None
            shared: int | None = None
            locked: int | None = None  # the directory descriptor we flock'd
            old: Tail | None = None
            new: Tail | None = None
            try:
                kdir = self._key_dir(key, create=True)
                if hold is None:
                    if self._all is None and self._shared is None:
                        shared = take_shared(self._root, self.description, key)
                    hold = temporary = take(kdir)
                    if hold is None:
                        raise StoreConflict("key is held by another store object or process",
                                            store=self.description, key=key, seq=seq)
                # One commit at a time per key directory, across store objects and processes,
                # so that checking the lock file below and writing are one step.
                fcntl.flock(hold.dir_fd, fcntl.LOCK_EX)
                locked = hold.dir_fd
                check_hold(self.description, key, hold, seq)
                with self._state:
                    old = self._tails.pop(key, None)  # dropped on any failure below
                tail = (old if old is not None
                        else scan_key(self.description, key, kdir, for_write=True).tail)
                if tail.seq != expected_seq:
                    raise StoreConflict(f"stale writer: stored seq is {tail.seq}, writer expected "
                                        f"{expected_seq}", store=self.description, key=key,
                                        seq=seq)
                if checkpoint is not None and keep_journal:
                    appended = append(self, key, tail, kdir, expected_seq, entries)
                    if old is not None and old.fd == appended.fd:
                        old.fd = None  # closed once, below, never twice
                    appended.close()
                    new = write_checkpoint(self, key, kdir, seq, checkpoint, keep_journal=True)
                    if history_base is not None:
                        write_base(self, kdir, *history_base)
                elif checkpoint is not None:
                    new = write_checkpoint(self, key, kdir, seq, checkpoint)
                else:
                    new = append(self, key, tail, kdir, expected_seq, entries)
                if new.manifest is None:
                    new.manifest = tail.manifest
                update_manifest(self, kdir, new)
                if held:
                    with self._state:
                        self._tails[key] = new
            except FilesMissing as e:  # under the directory lock: no listing race, so final
                raise StoreCorrupt(e.message, store=self.description, key=key,
                                   seq=e.seq) from None
            except OSError as e:
                raise StoreUnavailable(f"commit failed, nothing committed: {e}",
                                       store=self.description, key=key, seq=seq) from e
            finally:
                if old is not None and (new is None or old.fd != new.fd):
                    old.close()  # its segment is gone (a checkpoint) or the commit failed
                if new is not None and not held:
                    new.close()
                if locked is not None:
                    try:
                        fcntl.flock(locked, fcntl.LOCK_UN)
                    except OSError:
                        pass  # closing the descriptor (below, or at release) unlocks it too
                if temporary is not None:
                    temporary.close()
                if shared is not None:
                    unflock(shared)

    # -- group commits (:mod:`._file_group`) ------------------------------------------------

    def _write_redo(self, commits: Sequence[KeyCommit]) -> None:
        """Write the group's redo record: the commit point (a method so that tests can make a
        group's record without applying it)."""
        write_redo(self, commits)

    def _replay(self) -> None:
        replay(self)
