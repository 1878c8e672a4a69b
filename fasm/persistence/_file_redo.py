"""The file store's redo record: one group commit (``commit_many``) written whole before any key
is touched, so that a crash in the middle of applying it can be finished at the next open.

Layout: a header (magic ``FRDO``, version, payload length, payload CRC-32) sealed by a CRC-32 of
its own, then the payload: the number of parts, and per part the key (UTF-8, length-prefixed),
``expected_seq``, ``seq``, the in-flight flag (-1 for None), the checkpoint (flag: 0 none, 1
given, 2 given with ``keep_journal``; length; bytes) and the journal entries (count, then each
length-prefixed). :mod:`._file_group` owns when it is written, applied and deleted.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from ._store import KeyCommit

__all__ = ("decode_group", "encode_group")

_REDO_MAGIC = b"FRDO"
_REDO_HEAD = struct.Struct(">4sHQI")  # magic, version, payload length, payload crc
_VERSION = 1
_CRC = 4


def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


_U32 = struct.Struct(">I")
_PART = struct.Struct(">QQbBQI")  # expected seq, seq, in_flight (-1: None), has ckpt, len, n


def encode_group(commits: Sequence[KeyCommit]) -> tuple[bytes, bytes]:
    """The record of a group: its sealed header and its payload."""
    out = [_U32.pack(len(commits))]
    for c in commits:
        key = c.key.encode("utf-8")
        flag = -1 if c.in_flight is None else int(c.in_flight)
        ckpt = b"" if c.checkpoint is None else bytes(c.checkpoint)
        out += [_U32.pack(len(key)), key,
                _PART.pack(c.expected_seq, c.seq, flag,
                           0 if c.checkpoint is None else 2 if c.keep_journal else 1, len(ckpt),
                           len(c.entries)), ckpt]
        for e in c.entries:
            out += [_U32.pack(len(e)), bytes(e)]
    payload = b"".join(out)
    head = _REDO_HEAD.pack(_REDO_MAGIC, _VERSION, len(payload), _crc(payload))
    return head + _crc(head).to_bytes(_CRC, "big"), payload


def decode_group(data: bytes) -> list[KeyCommit] | None:
    """The parts of a redo record, or None when it is torn or fails its checksums."""
    size = _REDO_HEAD.size
    if len(data) < size + _CRC or _crc(data[:size]) != int.from_bytes(data[size:size + _CRC],
                                                                      "big"):
        return None
    magic, version, length, crc = _REDO_HEAD.unpack(data[:size])
    payload = data[size + _CRC:]
    if magic != _REDO_MAGIC or version != _VERSION or len(payload) != length or _crc(
            payload) != crc:
        return None
    view = memoryview(payload)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return bytes(view[pos - n:pos])

    (count,) = _U32.unpack(take(4))
    commits = []
    for _ in range(count):
        (klen,) = _U32.unpack(take(4))
        key = take(klen).decode("utf-8")
        expected, seq, flag, has_ckpt, clen, n = _PART.unpack(take(_PART.size))
        ckpt = take(clen) if has_ckpt else None
        entries = tuple(take(_U32.unpack(take(4))[0]) for _ in range(n))
        commits.append(KeyCommit(key, expected, seq, entries, ckpt,
                                 None if flag < 0 else bool(flag), has_ckpt == 2))
    return commits
