"""The file store's per-key files: their format, how they are read and checked, and how they
are written (journal frames, checkpoints, the manifest, history bases).

:mod:`._file` owns when each is written and under which locks (see its notes); this module
owns the bytes. Reading takes the store's description (for errors) and nothing else; writing
goes through a :class:`Disk` (the store), whose ``_write_at`` and ``_sync_dir`` are the one
way bytes and directory entries reach the disk, so that tests can inject faults there.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol

from ..errors import StoreCorrupt, StoreUnavailable

__all__ = (
    "CKPT_HEADER", "FRAME_HEADER", "MAX_FRAME", "KEY_NAME", "MANIFEST", "Disk", "FilesMissing",
    "Scan", "Tail", "append", "check_manifest", "datasync", "fsync_dir", "has_committed",
    "key_file_name", "parse_segment", "read_checkpoint", "read_manifest", "scan_key",
    "update_manifest", "write_base", "write_checkpoint", "write_manifest",
)

MANIFEST = "manifest"
KEY_NAME = "key"  # in an h- directory: the key it is for (its name is a hash)
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
MAX_FRAME = 2**32 - 1
_LONGEST_HEX_NAME = 200  # file names are limited to 255 bytes
# fdatasync makes the appended bytes and the new size durable, which is all a reader needs;
# fsync would also write the inode's timestamps. macOS has no fdatasync.
datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def key_file_name(key: str) -> str:
    """A file name for ``key``: any unicode, '/' and '' included, case-sensitive-safe (hex).

    Raises:
        UnicodeEncodeError: the key holds lone surrogates (not valid UTF-8).
    """
    raw = key.encode("utf-8")
    if 2 * len(raw) <= _LONGEST_HEX_NAME:
        return "k-" + raw.hex()
    return "h-" + hashlib.sha256(raw).hexdigest()


def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _sealed(head: bytes) -> bytes:
    return head + _crc(head).to_bytes(_CRC, "big")


def _frame(seq: int, last_seq: int, payload: bytes) -> bytes:
    head = _FRAME.pack(_FRAME_MAGIC, _VERSION, len(payload), seq, last_seq, _crc(payload))
    return _sealed(head) + payload


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Tail:
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


class FilesMissing(StoreCorrupt):
    """Files the manifest names are missing. A load (which takes no lock) reads again before
    raising it, as a directory listing racing another process's checkpoint can miss a file."""


@dataclass(slots=True)
class Scan:
    tail: Tail
    checkpoint_seq: int = 0
    checkpoint: Path | None = None
    entries: list[tuple[int, bytes]] = field(default_factory=list)


class Disk(Protocol):
    """What the writers use of their store: its description (for errors), whether it fsyncs,
    and its two hooks for bytes and directory entries."""

    _fsync: bool

    @property
    def description(self) -> str: ...

    def _write_at(self, fd: int, data: bytes | memoryview, offset: int) -> None: ...

    def _sync_dir(self, path: Path) -> None: ...


def _corrupt(store: str, message: str, key: str, seq: int | None = None) -> StoreCorrupt:
    return StoreCorrupt(message, store=store, key=key, seq=seq)


# -- reading ---------------------------------------------------------------------------------


def parse_segment(
    store: str, key: str, path: Path, start: int, data: bytes
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
            raise _corrupt(store, f"{path.name}: frame header at offset {pos} fails its "
                           "checksum", key)
        magic, version, length, seq, last_seq, payload_crc = _FRAME.unpack(head)
        if magic != _FRAME_MAGIC or version != _VERSION:
            raise _corrupt(store, f"{path.name}: unknown frame format at offset {pos}", key, seq)
        end = pos + FRAME_HEADER + length
        if end > size:
            break  # torn inside a payload
        payload = data[pos + FRAME_HEADER:end]
        if _crc(payload) != payload_crc:
            raise _corrupt(store, f"{path.name}: entry at offset {pos} fails its checksum",
                           key, seq)
        want = pending[-1][0] + 1 if pending else (
            committed[-1][0] + 1 if committed else start)
        if seq != want or last_seq < seq or (pending and last_seq != pending_last):
            raise _corrupt(store, f"{path.name}: entry out of order at offset {pos} (expected "
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


def scan_key(store: str, key: str, kdir: Path, *, for_write: bool) -> Scan:
    """Find the checkpoint and the committed journal of a key (raises on corruption)."""
    try:
        names = os.listdir(kdir)
    except FileNotFoundError:
        return Scan(Tail(0, None))
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
    scan = Scan(Tail(0, None))
    manifest = scan.tail.manifest = (
        read_manifest(store, key, kdir) if MANIFEST in names else None)
    if ckpts:
        scan.checkpoint_seq = max(ckpts)
        scan.checkpoint = kdir / f"ckpt-{scan.checkpoint_seq:020d}"
    ends: dict[int, int] = {}  # segment start -> the last seq committed in it
    for start in sorted(segments):
        if ckpts and start <= scan.checkpoint_seq:
            continue  # covered by the checkpoint: history (keep_journal) or a leftover
        path = kdir / f"jrnl-{start:020d}"
        entries, valid_end, first_end = parse_segment(store, key, path, start,
                                                      path.read_bytes())
        ends[start] = entries[-1][0] if entries else 0
        if start > scan.checkpoint_seq:
            scan.tail.segment, scan.tail.segment_end = path, valid_end
            scan.tail.first_end = first_end
        scan.entries.extend(e for e in entries if e[0] > scan.checkpoint_seq)
    if manifest is not None:
        check_manifest(store, key, manifest, scan.checkpoint, scan.checkpoint_seq, ends)
    want = scan.checkpoint_seq + 1
    for seq, _ in scan.entries:
        if seq != want:
            raise _corrupt(store, f"journal has seq {seq} where {want} was expected (missing "
                           "or repeated entries)", key, seq)
        want += 1
    scan.tail.seq = want - 1
    return scan


def read_manifest(store: str, key: str, kdir: Path) -> tuple[int, int]:
    data = (kdir / MANIFEST).read_bytes()
    size = _MANIFEST_HEAD.size
    if len(data) != size + _CRC or _crc(data[:size]) != int.from_bytes(data[size:], "big"):
        raise _corrupt(store, f"{MANIFEST}: truncated or fails its checksum "
                       f"({len(data)} bytes)", key)
    magic, version, start, first_end = _MANIFEST_HEAD.unpack(data[:size])
    if magic != _MANIFEST_MAGIC or version != _VERSION:
        raise _corrupt(store, f"{MANIFEST}: unknown manifest format", key)
    return start, first_end


def check_manifest(store: str, key: str, manifest: tuple[int, int], checkpoint: Path | None,
                   checkpoint_seq: int, ends: dict[int, int]) -> None:
    """Raise StoreCorrupt when files the manifest says exist are gone."""
    start, first_end = manifest
    if checkpoint is None and not ends:
        raise FilesMissing("the key has committed (its manifest says so) but its "
                           "checkpoint and journal files are missing: deleted behind the "
                           "store's back", store=store, key=key)
    if start > checkpoint_seq:  # no checkpoint covers the segment: it must be there
        if start not in ends:
            raise FilesMissing(
                f"jrnl-{start:020d} is missing: it held acknowledged commits from seq "
                f"{start} and no checkpoint covers them (the newest checkpoint is at seq "
                f"{checkpoint_seq}); deleted behind the store's back",
                store=store, key=key, seq=start)
        if ends[start] < first_end:
            raise FilesMissing(
                f"jrnl-{start:020d} ends at seq {ends[start] or start - 1} but a commit up "
                f"to seq {first_end} in it was acknowledged: the file was cut short",
                store=store, key=key, seq=first_end)


def read_checkpoint(store: str, key: str, path: Path, seq: int) -> bytes:
    with open(path, "rb") as f:
        header = f.read(CKPT_HEADER)
        payload = f.read()
    if len(header) < CKPT_HEADER or _crc(header[:_CKPT.size]) != int.from_bytes(
            header[_CKPT.size:], "big"):
        raise _corrupt(store, f"{path.name}: checkpoint header fails its checksum", key, seq)
    magic, version, rec_seq, length, crc = _CKPT.unpack(header[:_CKPT.size])
    if magic != _CKPT_MAGIC or version != _VERSION or rec_seq != seq:
        raise _corrupt(store, f"{path.name}: not a checkpoint of seq {seq}", key, seq)
    if len(payload) != length or _crc(payload) != crc:
        raise _corrupt(store, f"{path.name}: checkpoint is truncated or fails its checksum "
                       f"({len(payload)} of {length} bytes)", key, seq)
    return payload


def has_committed(kdir: Path) -> bool:
    """Whether a key directory holds a commit (what ``keys`` lists)."""
    try:
        names = os.listdir(kdir)
    except (FileNotFoundError, NotADirectoryError):
        return False
    for name in names:
        prefix, _, number = name.partition("-")
        if name == MANIFEST or (prefix == "ckpt" and number.isdigit()):
            return True
        if prefix == "jrnl" and number.isdigit() and (kdir / name).stat().st_size > 0:
            return True
    return False


# -- writing ---------------------------------------------------------------------------------


def update_manifest(disk: Disk, kdir: Path, tail: Tail) -> None:
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
        write_manifest(disk, kdir, want)
    except OSError:
        try:
            os.unlink(kdir / f"{MANIFEST}.tmp")
        except OSError:
            pass  # a leftover .tmp is ignored by load and removed by the next writer
        return
    tail.manifest = want
    tail.named = tail.segment is not None


def append(disk: Disk, key: str, tail: Tail, kdir: Path, expected_seq: int,
           entries: Sequence[bytes], *, sync: bool = True) -> Tail:
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
        disk._write_at(fd, data, offset)
        if disk._fsync and sync:  # else the caller syncs it
            datasync(fd)
        if offset == 0:  # a new segment (or one a failed writer left empty)
            disk._sync_dir(kdir)
    except OSError as e:
        try:
            _raise_after_rollback(disk, e, fd, offset, key, last)
        finally:
            os.close(fd)
            tail.fd = None
    return Tail(last, path, offset + len(data), fd,
                first_end=last if offset == 0 else tail.first_end, manifest=tail.manifest,
                named=tail.named and tail.segment is not None)


def _raise_after_rollback(disk: Disk, error: OSError, fd: int, offset: int, key: str,
                          seq: int) -> NoReturn:
    """Cut the frames of a failed append off again, then raise StoreUnavailable."""
    what = "disk full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "write failed"
    try:
        os.ftruncate(fd, offset)
        if disk._fsync:
            os.fsync(fd)
    except OSError:
        raise StoreUnavailable(
            f"{what} ({error}) and cutting off the partial write failed too: the commit may "
            "become visible on a later load, as after a crash", store=disk.description,
            key=key, seq=seq) from error
    raise StoreUnavailable(f"{what}, nothing committed: {error}", store=disk.description,
                           key=key, seq=seq) from error


def write_base(disk: Disk, kdir: Path, seq: int, data: bytes) -> None:
    """After a commit's checkpoint is durable: write ``base-<seq>`` (tmp, fsync, rename),
    then delete the older bases and the kept segments whose entries are all up to ``seq``.
    The commit happened already, so a failure (or a crash) here only leaves the older base
    and a longer history, which still replays: nothing is raised."""
    tmp = kdir / f"base-{seq:020d}.tmp"
    header = _sealed(_CKPT.pack(_CKPT_MAGIC, _VERSION, seq, len(data), _crc(data)))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            disk._write_at(fd, header, 0)
            disk._write_at(fd, bytes(data), len(header))
            if disk._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, kdir / f"base-{seq:020d}")
        disk._sync_dir(kdir)
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


def write_checkpoint(disk: Disk, key: str, kdir: Path, seq: int, checkpoint: bytes, *,
                     keep_journal: bool = False) -> Tail:
    final = kdir / f"ckpt-{seq:020d}"
    tmp = kdir / f"ckpt-{seq:020d}.tmp"
    header = _sealed(_CKPT.pack(_CKPT_MAGIC, _VERSION, seq, len(checkpoint),
                                _crc(checkpoint)))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            disk._write_at(fd, header, 0)
            disk._write_at(fd, checkpoint, len(header))
            if disk._fsync:
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
                               store=disk.description, key=key, seq=seq) from e
    try:
        disk._sync_dir(kdir)
    except OSError as e:
        # The rename may or may not be durable: undo it so that this process does not
        # load a commit it reported as failed.
        try:
            os.unlink(final)
            disk._sync_dir(kdir)
        except OSError:
            raise StoreUnavailable(
                f"cannot make the checkpoint durable ({e}) nor undo it: it may become "
                "visible on a later load, as after a crash", store=disk.description,
                key=key, seq=seq) from e
        raise StoreUnavailable(f"cannot make the checkpoint durable, nothing committed: {e}",
                               store=disk.description, key=key, seq=seq) from e
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
    return Tail(seq, None)


def write_manifest(disk: Disk, kdir: Path, manifest: tuple[int, int]) -> None:
    """Replace the key's manifest (only ever after what it names is durable)."""
    data = _sealed(_MANIFEST_HEAD.pack(_MANIFEST_MAGIC, _VERSION, *manifest))
    tmp = kdir / f"{MANIFEST}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        disk._write_at(fd, data, 0)
        if disk._fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, kdir / MANIFEST)
    disk._sync_dir(kdir)
