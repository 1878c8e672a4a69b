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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from ..errors import StoreConflict, StoreCorrupt, StoreUnavailable
from ._file_redo import decode_group as _decode_group
from ._file_redo import encode_group as _encode_group
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
from ._worker import Worker

__all__ = ("FileStore",)

_MARKER_NAME = "FASM-STORE"
# 2: per-key manifest, commits lock the key's directory; 3: group commits (redo record) and the
# in-flight index
_MARKER_TEXT = "fasm file store 3\n"
_UPGRADABLE = ("fasm file store 1\n", "fasm file store 2\n")  # valid as they are under 3
_ALL_LOCK = "FASM-STORE-ALL"  # flock'd exclusive by acquire_all, shared by holders of keys
_GROUP_LOCK = "FASM-STORE-GROUP"  # flock'd by a group commit and by the replay of its record
_REDO = "FASM-STORE-REDO"  # the record of the group commit being applied
_IN_FLIGHT = "FASM-STORE-IN-FLIGHT"  # the in-flight index: one file per marked key
_IDENTITY_NAME = "FASM-STORE-ID"  # starts with the marker's name: not "other files" at open
_MANIFEST = "manifest"
_KEY_NAME = "key"  # in an h- directory: the key it is for (its name is a hash)
_MANIFEST_MAGIC = b"FMAN"
_CKPT_MAGIC = b"FCKP"
_FRAME_MAGIC = b"FJ"
_VERSION = 1
# header without its own CRC, then a CRC-32 of those bytes
_CKPT = struct.Struct(">4sHQQI")  # magic, version, seq, payload length, payload crc
_FRAME = struct.Struct(">2sHIQQI")  # magic, version, payload length, seq, last seq of commit, crc
# magic, version, the newest segment's first seq, the seq its first commit ended at
_MANIFEST_HEAD = struct.Struct(">4sHQQ")
_CRC = 4
CKPT_HEADER = _CKPT.size + _CRC
FRAME_HEADER = _FRAME.size + _CRC
_MAX_FRAME = 2**32 - 1
_LONGEST_HEX_NAME = 200  # file names are limited to 255 bytes
_STRIPES = 64
_LOAD_ATTEMPTS = 5
_T = TypeVar("_T")
# fdatasync makes the appended bytes and the new size durable, which is all a reader needs;
# fsync would also write the inode's timestamps. macOS has no fdatasync.
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def key_file_name(key: str) -> str:
    """A file name for ``key``: any unicode, '/' and '' included, case-sensitive-safe (hex).

    Raises:
        UnicodeEncodeError: the key holds lone surrogates (not valid UTF-8).
    """
    raw = key.encode("utf-8")
    if 2 * len(raw) <= _LONGEST_HEX_NAME:
        return "k-" + raw.hex()
    return "h-" + hashlib.sha256(raw).hexdigest()


def try_flock(path: Path, *, shared: bool = False) -> int | None:
    """Open ``path`` (creating it) and take an exclusive (or ``shared``), non-blocking ``flock``
    on it.

    Returns the file descriptor holding the lock, or None when another open file (in this process
    or another) holds it. The kernel releases the lock when the descriptor is closed, including
    when the process dies.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def unflock(fd: int) -> None:
    """Release a lock taken by :func:`try_flock` and close its descriptor."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _sealed(head: bytes) -> bytes:
    return head + _crc(head).to_bytes(_CRC, "big")


def _frame(seq: int, last_seq: int, payload: bytes) -> bytes:
    head = _FRAME.pack(_FRAME_MAGIC, _VERSION, len(payload), seq, last_seq, _crc(payload))
    return _sealed(head) + payload


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Tail:
    """Where the next journal commit of a key goes, as a writer found it."""

    seq: int
    segment: Path | None  # None: the next append starts a new segment
    segment_end: int = 0
    fd: int | None = None  # ``segment`` open for writing, kept between appends to a held key
    first_end: int = 0  # the seq the first commit in ``segment`` ended at (0: none yet)
    manifest: tuple[int, int] | None = None  # what the key's manifest says, None: no manifest
    named: bool = False  # the manifest names ``segment`` (checked once per segment)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # nothing of ours is unwritten: every append was synced before it returned


class _FilesMissing(StoreCorrupt):
    """Files the manifest names are missing. A load (which takes no lock) reads again before
    raising it, as a directory listing racing another process's checkpoint can miss a file."""


@dataclass(slots=True)
class _Hold:
    """A key this store object holds: its flock'd lock file and its directory, kept open."""

    lock_fd: int
    dir_fd: int

    def close(self) -> None:
        try:
            os.close(self.dir_fd)
        except OSError:
            pass
        try:
            unflock(self.lock_fd)
        except OSError:
            pass  # the descriptor is closed either way, and with it the lock


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


@dataclass(slots=True)
class _Part:
    """One key's part of a group commit while it is made."""

    commit: KeyCommit
    kdir: Path
    hold: _Hold | None
    temporary: _Hold | None
    locked: bool = False
    old: _Tail | None = None
    tail: _Tail | None = None
    new: _Tail | None = None

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


@dataclass(slots=True)
class _Scan:
    tail: _Tail
    checkpoint_seq: int = 0
    checkpoint: Path | None = None
    entries: list[tuple[int, bytes]] = field(default_factory=list)


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
        self._held: dict[str, _Hold] = {}  # key -> its flock'd lock file and directory
        self._tails: dict[str, _Tail] = {}  # only for held keys: nobody else writes them
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
            (self._root / _IN_FLIGHT).mkdir(exist_ok=True)
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
            _fsync_dir(path)

    def _key_dir(self, key: str, *, create: bool) -> Path:
        path = self._root / key_file_name(key)
        if create and key not in self._durable_dirs:
            path.mkdir(exist_ok=True)
            if path.name.startswith("h-") and not (path / _KEY_NAME).exists():
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
        tmp = kdir / f"{_KEY_NAME}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(key.encode("utf-8"))
        self._sync_file(tmp)
        os.replace(tmp, kdir / _KEY_NAME)
        self._sync_dir(kdir)

    def _write_at(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``. Kept as a method so that tests can inject write
        faults (a disk that fills up midway)."""
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def _corrupt(self, message: str, key: str, seq: int | None = None) -> StoreCorrupt:
        return StoreCorrupt(message, store=self.description, key=key, seq=seq)

    # -- reading ----------------------------------------------------------------------------

    def _parse_segment(
        self, key: str, path: Path, start: int, data: bytes
    ) -> tuple[list[tuple[int, bytes]], int, int]:
        """The committed entries of one segment, the offset where they end and the seq its
        first commit ended at (0: none)."""
        committed: list[tuple[int, bytes]] = []
        first_end = 0
        pending: list[tuple[int, bytes]] = []
        pending_last = 0
        valid_end = pos = 0
        size = len(data)
        while pos < size:
            if size - pos < FRAME_HEADER:
                break  # torn inside a header
            head = data[pos:pos + _FRAME.size]
            crc = int.from_bytes(data[pos + _FRAME.size:pos + FRAME_HEADER], "big")
            if _crc(head) != crc:
                if not data[pos:].strip(b"\0"):
                    break  # blocks a crash left unwritten
                raise self._corrupt(f"{path.name}: frame header at offset {pos} fails its "
                                    "checksum", key)
            magic, version, length, seq, last_seq, payload_crc = _FRAME.unpack(head)
            if magic != _FRAME_MAGIC or version != _VERSION:
                raise self._corrupt(f"{path.name}: unknown frame format at offset {pos}", key, seq)
            end = pos + FRAME_HEADER + length
            if end > size:
                break  # torn inside a payload
            payload = data[pos + FRAME_HEADER:end]
            if _crc(payload) != payload_crc:
                raise self._corrupt(f"{path.name}: entry at offset {pos} fails its checksum",
                                    key, seq)
            want = pending[-1][0] + 1 if pending else (
                committed[-1][0] + 1 if committed else start)
            if seq != want or last_seq < seq or (pending and last_seq != pending_last):
                raise self._corrupt(f"{path.name}: entry out of order at offset {pos} (expected "
                                    f"seq {want}, commit ending at {last_seq})", key, seq)
            pending.append((seq, payload))
            pending_last = last_seq
            pos = end
            if seq == last_seq:
                committed.extend(pending)
                pending = []
                valid_end = pos
                first_end = first_end or seq
        return committed, valid_end, first_end

    def _scan(self, key: str, kdir: Path, *, for_write: bool) -> _Scan:
        """Find the checkpoint and the committed journal of a key (raises on corruption)."""
        try:
            names = os.listdir(kdir)
        except FileNotFoundError:
            return _Scan(_Tail(0, None))
        ckpts: list[int] = []
        segments: list[int] = []
        for name in names:
            prefix, _, number = name.partition("-")
            if name.endswith(".tmp"):
                if for_write:  # an unfinished checkpoint from a crash; we hold the lock
                    os.unlink(kdir / name)
            elif number.isdigit() and prefix == "ckpt":
                ckpts.append(int(number))
            elif number.isdigit() and prefix == "jrnl":
                segments.append(int(number))
        scan = _Scan(_Tail(0, None))
        manifest = scan.tail.manifest = (
            self._read_manifest(key, kdir) if _MANIFEST in names else None)
        if ckpts:
            scan.checkpoint_seq = max(ckpts)
            scan.checkpoint = kdir / f"ckpt-{scan.checkpoint_seq:020d}"
        ends: dict[int, int] = {}  # segment start -> the last seq committed in it
        for start in sorted(segments):
            if ckpts and start <= scan.checkpoint_seq:
                continue  # covered by the checkpoint: history (keep_journal) or a leftover
            path = kdir / f"jrnl-{start:020d}"
            entries, valid_end, first_end = self._parse_segment(key, path, start,
                                                                path.read_bytes())
            ends[start] = entries[-1][0] if entries else 0
            if start > scan.checkpoint_seq:
                scan.tail.segment, scan.tail.segment_end = path, valid_end
                scan.tail.first_end = first_end
            scan.entries.extend(e for e in entries if e[0] > scan.checkpoint_seq)
        if manifest is not None:
            self._check_manifest(key, manifest, scan.checkpoint, scan.checkpoint_seq, ends)
        want = scan.checkpoint_seq + 1
        for seq, _ in scan.entries:
            if seq != want:
                raise self._corrupt(f"journal has seq {seq} where {want} was expected (missing "
                                    "or repeated entries)", key, seq)
            want += 1
        scan.tail.seq = want - 1
        return scan

    def _read_manifest(self, key: str, kdir: Path) -> tuple[int, int]:
        data = (kdir / _MANIFEST).read_bytes()
        size = _MANIFEST_HEAD.size
        if len(data) != size + _CRC or _crc(data[:size]) != int.from_bytes(data[size:], "big"):
            raise self._corrupt(f"{_MANIFEST}: truncated or fails its checksum "
                                f"({len(data)} bytes)", key)
        magic, version, start, first_end = _MANIFEST_HEAD.unpack(data[:size])
        if magic != _MANIFEST_MAGIC or version != _VERSION:
            raise self._corrupt(f"{_MANIFEST}: unknown manifest format", key)
        return start, first_end

    def _check_manifest(self, key: str, manifest: tuple[int, int], checkpoint: Path | None,
                        checkpoint_seq: int, ends: dict[int, int]) -> None:
        """Raise StoreCorrupt when files the manifest says exist are gone."""
        start, first_end = manifest
        if checkpoint is None and not ends:
            raise _FilesMissing("the key has committed (its manifest says so) but its "
                                "checkpoint and journal files are missing: deleted behind the "
                                "store's back", store=self.description,
                                key=key)
        if start > checkpoint_seq:  # no checkpoint covers the segment: it must be there
            if start not in ends:
                raise _FilesMissing(
                    f"jrnl-{start:020d} is missing: it held acknowledged commits from seq "
                    f"{start} and no checkpoint covers them (the newest checkpoint is at seq "
                    f"{checkpoint_seq}); deleted behind the store's back",
                    store=self.description, key=key, seq=start)
            if ends[start] < first_end:
                raise _FilesMissing(
                    f"jrnl-{start:020d} ends at seq {ends[start] or start - 1} but a commit up "
                    f"to seq {first_end} in it was acknowledged: the file was cut short",
                    store=self.description, key=key, seq=first_end)

    def _write_manifest(self, kdir: Path, manifest: tuple[int, int]) -> None:
        """Replace the key's manifest (only ever after what it names is durable)."""
        data = _sealed(_MANIFEST_HEAD.pack(_MANIFEST_MAGIC, _VERSION, *manifest))
        tmp = kdir / f"{_MANIFEST}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            self._write_at(fd, data, 0)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, kdir / _MANIFEST)
        self._sync_dir(kdir)

    def _read_checkpoint(self, key: str, path: Path, seq: int) -> bytes:
        with open(path, "rb") as f:
            header = f.read(CKPT_HEADER)
            payload = f.read()
        if len(header) < CKPT_HEADER or _crc(header[:_CKPT.size]) != int.from_bytes(
                header[_CKPT.size:], "big"):
            raise self._corrupt(f"{path.name}: checkpoint header fails its checksum", key, seq)
        magic, version, rec_seq, length, crc = _CKPT.unpack(header[:_CKPT.size])
        if magic != _CKPT_MAGIC or version != _VERSION or rec_seq != seq:
            raise self._corrupt(f"{path.name}: not a checkpoint of seq {seq}", key, seq)
        if len(payload) != length or _crc(payload) != crc:
            raise self._corrupt(f"{path.name}: checkpoint is truncated or fails its checksum "
                                f"({len(payload)} of {length} bytes)", key, seq)
        return payload

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
                        key = (kdir / _KEY_NAME).read_bytes().decode("utf-8")
                    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
                        continue
                else:
                    continue
                if (after is None or key > after) and self._committed(kdir):
                    found.append(key)
        except OSError as e:
            raise StoreUnavailable(f"cannot list keys: {e}", store=self.description) from e
        return page_of(found, None, limit)

    @staticmethod
    def _committed(kdir: Path) -> bool:
        try:
            names = os.listdir(kdir)
        except (FileNotFoundError, NotADirectoryError):
            return False
        for name in names:
            prefix, _, number = name.partition("-")
            if name == _MANIFEST or (prefix == "ckpt" and number.isdigit()):
                return True
            if prefix == "jrnl" and number.isdigit() and (kdir / name).stat().st_size > 0:
                return True
        return False

    async def load(self, key: str) -> StoredRecords | None:
        """Everything stored for ``key``, or None for a key never committed.

        Raises:
            StoreCorrupt: a complete record fails its checksum, or records are missing (a gap,
                or files the key's manifest says exist).
            StoreUnavailable: the files cannot be read.
        """
        return await self._run(self._load_sync, key)

    def _load_sync(self, key: str) -> StoredRecords | None:
        self._check_open(key)
        missing: _FilesMissing | None = None
        for _ in range(_LOAD_ATTEMPTS):
            try:
                with self._mutex(key):
                    scan = self._scan(key, self._key_dir(key, create=False), for_write=False)
                    checkpoint = None
                    if scan.checkpoint is not None:
                        checkpoint = self._read_checkpoint(key, scan.checkpoint,
                                                           scan.checkpoint_seq)
            except FileNotFoundError:
                continue  # another process replaced files under us (a checkpoint); read again
            except _FilesMissing as e:
                missing = e  # or a listing that raced a checkpoint: read again to be sure
                continue
            except OSError as e:
                raise StoreUnavailable(f"cannot read: {e}", store=self.description,
                                       key=key) from e
            if checkpoint is None and not scan.entries:
                return None
            marked = os.path.exists(self._root / _IN_FLIGHT / key_file_name(key))
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
                    scan = self._scan(key, kdir, for_write=False)
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
                        kept += self._parse_segment(key, path, start, path.read_bytes())[0]
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
                return b, self._read_checkpoint(key, kdir / f"base-{b:020d}", b)
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
                hold = self._take(self._key_dir(key, create=True))
            except OSError as e:
                raise StoreUnavailable(f"cannot take the key's lock file: {e}",
                                       store=self.description, key=key) from e
            if hold is None:
                raise StoreConflict("key is held by another store object or process",
                                    store=self.description, key=key)
            try:
                if self._all is None and self._shared is None:
                    self._shared = self._take_shared(key)
            except BaseException:
                hold.close()
                raise
            with self._state:
                self._held[key] = hold
        if os.path.exists(self._root / _REDO):
            self._replay()  # a crashed group commit may hold a part of this key

    def _take_shared(self, key: str | None) -> int:
        """A shared flock on the all-lock: refused while another object holds acquire_all."""
        try:
            fd = try_flock(self._root / _ALL_LOCK, shared=True)
        except OSError as e:
            raise StoreUnavailable(f"cannot take the store's lock file: {e}",
                                   store=self.description, key=key) from e
        if fd is None:
            raise StoreConflict("the whole store is held by another store object or process "
                                "(acquire_all)", store=self.description, key=key)
        return fd

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
            fd = try_flock(self._root / _ALL_LOCK)
        except OSError as e:
            raise StoreUnavailable(f"cannot take the store's lock file: {e}",
                                   store=self.description) from e
        if fd is None:
            if self._held:
                self._shared = try_flock(self._root / _ALL_LOCK, shared=True)
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
            self._shared = try_flock(self._root / _ALL_LOCK, shared=True)

    async def keys_in_flight(self) -> list[str]:
        """Every key whose in-flight mark is set, sorted: the files of ``FASM-STORE-IN-FLIGHT``.

        Raises:
            StoreUnavailable: the directory cannot be read.
        """
        return await self._run(self._keys_in_flight_sync)

    def _keys_in_flight_sync(self) -> list[str]:
        self._check_open("")
        index = self._root / _IN_FLIGHT
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

    @staticmethod
    def _take(kdir: Path) -> _Hold | None:
        """Lock the key's lock file, or None when another open file holds it."""
        path = kdir / "lock"
        for _ in range(_LOAD_ATTEMPTS):
            fd = try_flock(path)
            if fd is None:
                return None
            try:
                lock_id = _file_id(os.fstat(fd))
                if _file_id(os.stat(path)) == lock_id:  # not deleted while we locked it
                    dir_fd = os.open(kdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    return _Hold(fd, dir_fd)
            except FileNotFoundError:
                pass
            except BaseException:
                unflock(fd)
                raise
            unflock(fd)
        raise OSError(errno.EAGAIN, "the lock file keeps being replaced", str(path))

    def _check_hold(self, key: str, hold: _Hold, seq: int) -> None:
        """Under the directory lock: raise StoreConflict unless our lock file is still linked.

        Deleting ``lock``, renaming another file over it or deleting the key's directory all
        unlink the file we hold, and a second writer can then lock a new one; one ``fstat`` of
        our descriptor tells (its link count drops to 0), cheaper than looking the name up."""
        if os.fstat(hold.lock_fd).st_nlink == 0:
            raise StoreConflict(
                "the key's lock file was deleted or replaced while this store object held it, "
                "so another writer may have taken the key; nothing written (acquire the key "
                "again once no other writer runs)", store=self.description, key=key, seq=seq)

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
        if any(len(e) > _MAX_FRAME for e in entries):
            raise ValueError("a journal entry is larger than 4 GiB")
        if in_flight is not None:
            part = KeyCommit(key, expected_seq, seq, entries, checkpoint, in_flight,
                             keep_journal, history_base)
            await self._run(self._group_sync, [part], False)
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
        if any(len(e) > _MAX_FRAME for c in commits for e in c.entries):
            raise ValueError("a journal entry is larger than 4 GiB")
        await self._run(self._group_sync, commits, True)

    def _commit_sync(self, key: str, expected_seq: int, seq: int, entries: Sequence[bytes],
                     checkpoint: bytes | None, keep_journal: bool = False,
                     history_base: tuple[int, bytes] | None = None) -> None:
        self._check_open(key)
        if os.path.exists(self._root / _REDO):  # a group a crash (or a failing disk) left
            self._replay()
        with self._mutex(key):
            hold = self._held.get(key)
            held = hold is not None
            temporary: _Hold | None = None
            shared: int | None = None
            locked: int | None = None  # the directory descriptor we flock'd
            old: _Tail | None = None
            new: _Tail | None = None
            try:
                kdir = self._key_dir(key, create=True)
                if hold is None:
                    if self._all is None and self._shared is None:
                        shared = self._take_shared(key)
                    hold = temporary = self._take(kdir)
                    if hold is None:
                        raise StoreConflict("key is held by another store object or process",
                                            store=self.description, key=key, seq=seq)
                # One commit at a time per key directory, across store objects and processes,
                # so that checking the lock file below and writing are one step.
                fcntl.flock(hold.dir_fd, fcntl.LOCK_EX)
                locked = hold.dir_fd
                self._check_hold(key, hold, seq)
                with self._state:
                    old = self._tails.pop(key, None)  # dropped on any failure below
                tail = old if old is not None else self._scan(key, kdir, for_write=True).tail
                if tail.seq != expected_seq:
                    raise StoreConflict(f"stale writer: stored seq is {tail.seq}, writer expected "
                                        f"{expected_seq}", store=self.description, key=key,
                                        seq=seq)
                if checkpoint is not None and keep_journal:
                    appended = self._append(key, tail, kdir, expected_seq, entries)
                    if old is not None and old.fd == appended.fd:
                        old.fd = None  # closed once, below, never twice
                    appended.close()
                    new = self._write_checkpoint(key, kdir, seq, checkpoint, keep_journal=True)
                    if history_base is not None:
                        self._write_base(kdir, *history_base)
                elif checkpoint is not None:
                    new = self._write_checkpoint(key, kdir, seq, checkpoint)
                else:
                    new = self._append(key, tail, kdir, expected_seq, entries)
                if new.manifest is None:
                    new.manifest = tail.manifest
                self._update_manifest(kdir, new)
                if held:
                    with self._state:
                        self._tails[key] = new
            except _FilesMissing as e:  # under the directory lock: no listing race, so final
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

    # -- group commits ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _group_locked(self) -> Iterator[None]:
        """One group commit or replay at a time, across store objects and processes."""
        with self._group:
            fd = os.open(self._root / _GROUP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _group_sync(self, commits: Sequence[KeyCommit], require_held: bool) -> None:
        self._check_open(commits[0].key)
        if require_held:
            for c in commits:
                if self._all is None and c.key not in self._held:
                    raise not_held(self.description, c.key, c.seq)
        try:
            with self._group_locked():
                self._replay_locked()
                stripes = sorted({hash(c.key) % _STRIPES for c in commits})
                for i in stripes:
                    self._stripes[i].acquire()
                try:
                    self._group_commit(commits)
                finally:
                    for i in reversed(stripes):
                        self._stripes[i].release()
        except _FilesMissing as e:
            raise StoreCorrupt(e.message, store=self.description, key=e.key, seq=e.seq) from None
        except OSError as e:
            raise StoreUnavailable(f"commit failed, nothing committed: {e}",
                                   store=self.description) from e

    def _group_commit(self, commits: Sequence[KeyCommit]) -> None:
        """Under the group lock and the keys' mutexes: fence, record, apply, forget."""
        parts: list[_Part] = []
        shared: int | None = None
        try:
            if self._all is None and self._shared is None:
                shared = self._take_shared(commits[0].key)
            for c in commits:
                kdir = self._key_dir(c.key, create=True)
                hold = self._held.get(c.key)
                part = _Part(c, kdir, hold, None)
                if hold is None:
                    part.hold = part.temporary = self._take(kdir)
                    if part.hold is None:
                        raise StoreConflict("key is held by another store object or process",
                                            store=self.description, key=c.key, seq=c.seq)
                parts.append(part)
                held = part.hold
                assert held is not None
                fcntl.flock(held.dir_fd, fcntl.LOCK_EX)
                part.locked = True
                self._check_hold(c.key, held, c.seq)
                with self._state:
                    part.old = self._tails.pop(c.key, None)
                part.tail = (part.old if part.old is not None
                             else self._scan(c.key, kdir, for_write=True).tail)
                if part.tail.seq != c.expected_seq:
                    raise StoreConflict(f"stale writer: stored seq is {part.tail.seq}, writer "
                                        f"expected {c.expected_seq}", store=self.description,
                                        key=c.key, seq=c.seq)
            self._write_redo(commits)  # the commit point
            try:
                for part in parts:
                    assert part.tail is not None
                    part.new = self._apply(part.commit, part.kdir, part.tail, sync=False)
                for part in parts:
                    if part.new is not None and part.new.fd is not None and self._fsync:
                        _datasync(part.new.fd)
                self._set_marks(commits)
            except (OSError, StoreUnavailable) as e:
                for part in parts:
                    part.new = None  # rescan at the next commit
                raise StoreUnavailable(
                    f"the group commit is recorded but applying it failed ({e}): it will be "
                    "applied by the next open, acquire or group commit, as after a crash",
                    store=self.description) from e
            try:
                os.unlink(self._root / _REDO)  # applied and durable: the record is not needed
            except OSError:
                pass  # replaying it changes nothing: every part is at its seq already
            for part in parts:
                assert part.new is not None
                self._update_manifest(part.kdir, part.new)
                if part.temporary is None:
                    with self._state:
                        self._tails[part.commit.key] = part.new
        finally:
            for part in parts:
                part.finish()
            if shared is not None:
                unflock(shared)

    def _apply(self, c: KeyCommit, kdir: Path, tail: _Tail, *, sync: bool) -> _Tail:
        if c.checkpoint is not None and c.keep_journal:
            # Synced here, not with the group's appends: the checkpoint after it closes it.
            appended = self._append(c.key, tail, kdir, c.expected_seq, c.entries)
            if tail.fd == appended.fd:
                tail.fd = None  # closed once, below, never twice
            appended.close()
            new = self._write_checkpoint(c.key, kdir, c.seq, c.checkpoint, keep_journal=True)
            if c.history_base is not None:
                self._write_base(kdir, *c.history_base)
        elif c.checkpoint is not None:
            new = self._write_checkpoint(c.key, kdir, c.seq, c.checkpoint)
        else:
            new = self._append(c.key, tail, kdir, c.expected_seq, c.entries, sync=sync)
        if new.manifest is None:
            new.manifest = tail.manifest
        return new

    def _write_redo(self, commits: Sequence[KeyCommit]) -> None:
        head, payload = _encode_group(commits)
        tmp = self._root / f"{_REDO}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            self._write_at(fd, head, 0)
            self._write_at(fd, payload, len(head))
            if self._fsync:
                os.fsync(fd)
        except OSError:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self._root / _REDO)
        self._sync_dir(self._root)

    def _set_marks(self, commits: Sequence[KeyCommit]) -> None:
        """Make the in-flight index say what the group's parts say (idempotent)."""
        index = self._root / _IN_FLIGHT
        changed = False
        for c in commits:
            path = index / key_file_name(c.key)
            if c.in_flight is True and not path.exists():
                tmp = index / f"{path.name}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    self._write_at(fd, c.key.encode("utf-8"), 0)
                    if self._fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                changed = True
            elif c.in_flight is False and path.exists():
                path.unlink()
                changed = True
        if changed:
            self._sync_dir(index)

    def _replay(self) -> None:
        with self._group_locked():
            self._replay_locked()

    def _replay_locked(self) -> None:
        """Under the group lock: apply the group commit a crash interrupted after its commit
        point, if any, and delete its record (idempotent: a crash here is replayed again)."""
        path = self._root / _REDO
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            try:
                os.unlink(self._root / f"{_REDO}.tmp")  # a group that never committed
            except FileNotFoundError:
                pass
            return
        commits = _decode_group(data)
        if commits is None:  # fsync'd before its rename: damaged afterwards
            raise StoreCorrupt(f"{_REDO}: the record of a committed group fails its checksum",
                               store=self.description)
        ours = []  # the parts no later commit has overwritten: their marks are the group's
        for c in commits:
            kdir = self._key_dir(c.key, create=True)
            dir_fd = os.open(kdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX)
                with self._state:
                    old = self._tails.pop(c.key, None)
                if old is not None:
                    old.close()
                tail = self._scan(c.key, kdir, for_write=True).tail
                if tail.seq == c.expected_seq:
                    new = self._apply(c, kdir, tail, sync=True)
                    new.close()
                    self._update_manifest(kdir, new)
                    ours.append(c)
                elif tail.seq == c.seq:  # applied; its mark may not be (every commit that
                    ours.append(c)      # changes a mark also moves the seq on)
                elif not c.seq < tail.seq:
                    raise StoreCorrupt(f"{_REDO}: a committed group moves the key from seq "
                                       f"{c.expected_seq} to {c.seq}, but it is at {tail.seq}",
                                       store=self.description, key=c.key, seq=tail.seq)
            finally:
                os.close(dir_fd)
        self._set_marks(ours)
        os.unlink(path)
        self._sync_dir(self._root)

    def _update_manifest(self, kdir: Path, tail: _Tail) -> None:
        """After a durable commit: make the manifest name the segment ``tail`` appends to (or,
        after a checkpoint, say that the key has committed) if it does not yet. A failure here
        only postpones it to the next commit: the commit itself is durable."""
        if tail.named:
            return
        if tail.segment is not None:
            want = (int(tail.segment.name.partition("-")[2]), tail.first_end)
            if tail.manifest is not None and tail.manifest[0] == want[0]:
                tail.named = True
                return
        elif tail.manifest is not None:
            return
        else:
            want = (0, 0)
        try:
            self._write_manifest(kdir, want)
        except OSError:
            try:
                os.unlink(kdir / f"{_MANIFEST}.tmp")
            except OSError:
                pass  # a leftover .tmp is ignored by load and removed by the next writer
            return
        tail.manifest = want
        tail.named = tail.segment is not None

    def _append(self, key: str, tail: _Tail, kdir: Path, expected_seq: int,
                entries: Sequence[bytes], *, sync: bool = True) -> _Tail:
        last = expected_seq + len(entries)
        data = b"".join(_frame(s, last, bytes(e))
                        for s, e in zip(range(expected_seq + 1, last + 1), entries, strict=True))
        path, offset, fd = tail.segment, tail.segment_end, tail.fd
        if path is None:
            path, offset = kdir / f"jrnl-{expected_seq + 1:020d}", 0
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if os.fstat(fd).st_size != offset:
                    os.ftruncate(fd, offset)  # cut a torn tail a crash left behind
            except OSError:
                os.close(fd)
                raise
        # else: our own descriptor, which ends where our last append did
        try:
            self._write_at(fd, data, offset)
            if self._fsync and sync:  # else the caller syncs it
                _datasync(fd)
            if offset == 0:  # a new segment (or one a failed writer left empty)
                self._sync_dir(kdir)
        except OSError as e:
            try:
                self._raise_after_rollback(e, fd, offset, key, last)
            finally:
                os.close(fd)
                tail.fd = None
        return _Tail(last, path, offset + len(data), fd,
                     first_end=last if offset == 0 else tail.first_end, manifest=tail.manifest,
                     named=tail.named and tail.segment is not None)

    def _raise_after_rollback(self, error: OSError, fd: int, offset: int, key: str,
                              seq: int) -> NoReturn:
        """Cut the frames of a failed append off again, then raise StoreUnavailable."""
        what = "disk full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "write failed"
        try:
            os.ftruncate(fd, offset)
            if self._fsync:
                os.fsync(fd)
        except OSError:
            raise StoreUnavailable(
                f"{what} ({error}) and cutting off the partial write failed too: the commit may "
                "become visible on a later load, as after a crash", store=self.description,
                key=key, seq=seq) from error
        raise StoreUnavailable(f"{what}, nothing committed: {error}", store=self.description,
                               key=key, seq=seq) from error

    def _write_base(self, kdir: Path, seq: int, data: bytes) -> None:
        """After a commit's checkpoint is durable: write ``base-<seq>`` (tmp, fsync, rename),
        then delete the older bases and the kept segments whose entries are all up to ``seq``.
        The commit happened already, so a failure (or a crash) here only leaves the older base
        and a longer history, which still replays: nothing is raised."""
        tmp = kdir / f"base-{seq:020d}.tmp"
        header = _sealed(_CKPT.pack(_CKPT_MAGIC, _VERSION, seq, len(data), _crc(data)))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                self._write_at(fd, header, 0)
                self._write_at(fd, bytes(data), len(header))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, kdir / f"base-{seq:020d}")
            self._sync_dir(kdir)
            names = os.listdir(kdir)
            starts = sorted(int(n[5:]) for n in names if n.startswith("jrnl-") and n[5:].isdigit())
            for n in names:
                if n.startswith("base-") and n[5:].isdigit() and int(n[5:]) < seq:
                    os.unlink(kdir / n)
            for start, after in itertools.pairwise(starts):
                if after <= seq + 1:  # the next segment starts by seq + 1: all of it is <= seq
                    os.unlink(kdir / f"jrnl-{start:020d}")
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # a leftover .tmp is removed by the next writer

    def _write_checkpoint(self, key: str, kdir: Path, seq: int, checkpoint: bytes, *,
                          keep_journal: bool = False) -> _Tail:
        final = kdir / f"ckpt-{seq:020d}"
        tmp = kdir / f"ckpt-{seq:020d}.tmp"
        header = _sealed(_CKPT.pack(_CKPT_MAGIC, _VERSION, seq, len(checkpoint),
                                    _crc(checkpoint)))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                self._write_at(fd, header, 0)
                self._write_at(fd, checkpoint, len(header))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # a leftover .tmp is ignored by load and removed by the next writer
            what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "write failed"
            raise StoreUnavailable(f"{what} writing a checkpoint, nothing committed: {e}",
                                   store=self.description, key=key, seq=seq) from e
        try:
            self._sync_dir(kdir)
        except OSError as e:
            # The rename may or may not be durable: undo it so that this process does not
            # load a commit it reported as failed.
            try:
                os.unlink(final)
                self._sync_dir(kdir)
            except OSError:
                raise StoreUnavailable(
                    f"cannot make the checkpoint durable ({e}) nor undo it: it may become "
                    "visible on a later load, as after a crash", store=self.description,
                    key=key, seq=seq) from e
            raise StoreUnavailable(f"cannot make the checkpoint durable, nothing committed: {e}",
                                   store=self.description, key=key, seq=seq) from e
        # Committed: what it covers can go. Failures here only leave files that load ignores,
        # so they must not turn a commit that happened into an error.
        try:
            for name in os.listdir(kdir):
                prefix, _, number = name.partition("-")
                if number.isdigit() and ((prefix in ("jrnl", "base") and not keep_journal)
                                         or (prefix == "ckpt" and int(number) < seq)):
                    os.unlink(kdir / name)
        except OSError:
            pass
        return _Tail(seq, None)
