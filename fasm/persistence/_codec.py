"""The codec: typed values to bytes and back, inside a checked, versioned envelope. Never pickle.

Values become plain data through pydantic (a ``TypeAdapter`` over each declared type, JSON mode so
that msgpack can carry the result), then bytes through msgpack. Where a declared type is a union of
several classes, the value is tagged with its class name, so two alternatives with the same fields
never decode as each other.

Envelope (msgpack array, then a 4-byte CRC-32 of everything before it)::

    [FORMAT_VERSION, machine_name, schema_version, seq, kind, body]

Decoding checks, in order: length and checksum (torn or flipped -> StoreCorrupt), format version
(newer -> IncompatibleRecord), machine name (another machine -> StoreCorrupt), kind and sequence
number, schema version (newer -> IncompatibleRecord; older -> the machine's migrations).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import pydantic

from .._inputs import Input, Normal, TrackedActionCompleted
from .._machine import MachineTypes, StateMachine, type_members
from ..errors import DefinitionError, IncompatibleRecord, StoreCorrupt

__all__ = ("FORMAT_VERSION", "Checkpoint", "Codec", "JournalEntry", "Unencodable")

FORMAT_VERSION: Final = 1
KIND_CHECKPOINT: Final = 0
KIND_ENTRY: Final = 1
_CRC = 4


class Unencodable(ValueError):
    """A value cannot be written as a record (the codec's own error; callers translate it).

    Attributes:
        what: which declared part it is (``"state"``, ``"input"``, ``"tracked_result"``,
            ``"idempotency key"`` ...).
        path: where inside the value, as a Python-like path (``"pending[3].user"``), or ``""``
            for the value as a whole.
        reason: why it cannot be encoded.
    """

    def __init__(self, what: str, path: str, reason: str) -> None:
        where = f" at {path}" if path else ""
        super().__init__(f"{what}{where} cannot be encoded: {reason}")
        self.what = what
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A decoded checkpoint: the state and the runtime's own bookkeeping as of ``seq``."""

    seq: int
    state: Any
    idempotency: dict[str, int]


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A decoded journal entry: the committed input at ``seq`` and its idempotency key."""

    seq: int
    input: Input[Any, Any, Any]
    idempotency_key: str | None


class _Typed:
    """Plain data for one declared type, tagging union alternatives by class name."""

    def __init__(self, tp: Any, what: str) -> None:
        self.what = what
        members = type_members(tp)
        self._tagged = len(members) > 1 and all(isinstance(m, type) for m in members)
        self._whole = pydantic.TypeAdapter(tp) if members else None
        self._by_name: dict[str, pydantic.TypeAdapter[Any]] = {}
        self._by_type: dict[type, tuple[str, pydantic.TypeAdapter[Any]]] = {}
        if self._tagged:
            for m in members:
                name = m.__qualname__
                if name in self._by_name:
                    raise DefinitionError(f"{what}: two alternatives are named {name!r}")
                adapter = pydantic.TypeAdapter(m)
                self._by_name[name] = adapter
                self._by_type[m] = (name, adapter)

    def dump(self, value: Any) -> Any:
        if self._tagged:
            found = self._by_type.get(type(value))
            if found is None:
                for tp, pair in self._by_type.items():
                    if isinstance(value, tp):
                        found = pair
                        break
                else:
                    raise TypeError(f"{self.what}: {type(value).__qualname__} is not declared")
            return [found[0], self._dump(found[1], value)]
        if self._whole is None:
            raise TypeError(f"{self.what}: the machine declares none")
        return self._dump(self._whole, value)

    def _dump(self, adapter: pydantic.TypeAdapter[Any], value: Any) -> Any:
        try:
            return adapter.dump_python(value, mode="json")
        except ValueError as e:  # pydantic_core.PydanticSerializationError is a ValueError
            raise Unencodable(self.what, "", str(e)) from e

    def load(self, data: Any) -> Any:
        if self._tagged:
            if not (isinstance(data, list) and len(data) == 2 and data[0] in self._by_name):
                raise ValueError(f"{self.what}: not a tagged alternative")
            return self._by_name[data[0]].validate_python(data[1])
        if self._whole is None:
            raise ValueError(f"{self.what}: the machine declares none")
        return self._whole.validate_python(data)


class Codec:
    """Encodes a machine's checkpoints and journal entries.

    Built from the machine class: its declared types, ``machine_name``, ``schema_version`` and
    ``migrations``. Adapters are made lazily, so a machine whose state is not serializable (a
    database transaction) can still use the codec for its inputs.
    """

    def __init__(self, machine: type[StateMachine[Any, Any, Any, Any, Any, Any]]) -> None:
        self.types: MachineTypes = machine.machine_types()
        self.machine_name: str = machine.machine_name
        self.schema_version: int = machine.schema_version
        self.migrations: Mapping[int, Callable[[Any], Any]] = machine.migrations
        self._cache: dict[str, _Typed] = {}

    def _typed(self, what: str) -> _Typed:
        t = self._cache.get(what)
        if t is None:
            t = self._cache[what] = _Typed(getattr(self.types, what), what)
        return t

    # -- envelope ---------------------------------------------------------------------------

    def _seal(self, seq: int, kind: int, body: Any) -> bytes:
        try:
            raw = msgpack.packb(
                [FORMAT_VERSION, self.machine_name, self.schema_version, seq, kind, body],
                use_bin_type=True,
            )
        except (TypeError, ValueError, OverflowError) as e:
            what = "state" if kind == KIND_CHECKPOINT else "journal entry"
            raise Unencodable(what, "", f"{type(e).__name__}: {e}") from e
        return raw + zlib.crc32(raw).to_bytes(_CRC, "big")

    def _open(self, data: bytes, kind: int, seq: int | None) -> tuple[int, int, Any]:
        if len(data) <= _CRC:
            raise StoreCorrupt(f"record truncated to {len(data)} bytes", seq=seq)
        raw, crc = data[:-_CRC], int.from_bytes(data[-_CRC:], "big")
        if zlib.crc32(raw) != crc:
            raise StoreCorrupt("record checksum mismatch (torn or corrupted write)", seq=seq)
        try:
            fmt, name, schema, rec_seq, rec_kind, body = msgpack.unpackb(
                raw, raw=False, strict_map_key=False
            )
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise StoreCorrupt(f"record envelope unreadable: {e}", seq=seq) from e
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise IncompatibleRecord(
                f"record format {fmt!r} is newer than this fasm reads ({FORMAT_VERSION})", seq=seq
            )
        if name != self.machine_name:
            raise StoreCorrupt(
                f"record belongs to machine {name!r}, not {self.machine_name!r}", seq=seq
            )
        if rec_kind != kind:
            raise StoreCorrupt(f"record kind {rec_kind!r} where {kind} was expected", seq=seq)
        if seq is not None and rec_seq != seq:
            raise StoreCorrupt(f"record says seq {rec_seq!r}", seq=seq)
        if not isinstance(schema, int) or schema > self.schema_version:
            raise IncompatibleRecord(
                f"record schema version {schema!r} is newer than the code's "
                f"({self.schema_version}); deploy the newer code or a migration",
                seq=seq,
            )
        return rec_seq, schema, body

    # -- checkpoints ------------------------------------------------------------------------

    def encode_checkpoint(self, seq: int, state: Any, idempotency: Mapping[str, int]) -> bytes:
        """The whole state and the runtime's bookkeeping as of ``seq``."""
        return self._seal(
            seq, KIND_CHECKPOINT, {"s": self._typed("state").dump(state), "k": dict(idempotency)}
        )

    def decode_checkpoint(self, data: bytes, seq: int | None = None) -> Checkpoint:
        """Decode and check a checkpoint, migrating state written by an older schema.

        Raises:
            StoreCorrupt: the record fails a check or its state does not validate.
            IncompatibleRecord: written by a newer format or schema version.
        """
        rec_seq, schema, body = self._open(data, KIND_CHECKPOINT, seq)
        try:
            plain = body["s"]
            for version in range(schema, self.schema_version):
                step = self.migrations.get(version)
                if step is None:
                    raise IncompatibleRecord(
                        f"state is schema version {version} and the machine has no migration "
                        f"from it to {version + 1}",
                        seq=rec_seq,
                    )
                plain = step(plain)
            state = self._typed("state").load(plain)
            keys = {str(k): int(v) for k, v in body["k"].items()}
        except IncompatibleRecord:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreCorrupt(f"checkpoint does not decode as the declared state: {e}",
                               seq=rec_seq) from e
        return Checkpoint(rec_seq, state, keys)

    # -- journal entries --------------------------------------------------------------------

    def encode_entry(self, seq: int, input: Input[Any, Any, Any], key: str | None) -> bytes:
        """One committed input, as a journal entry."""
        if isinstance(input, Normal):
            body: Any = [0, self._typed("input").dump(input.value), key]
        else:
            body = [
                1,
                [self._typed("tracked_id").dump(input.id),
                 self._typed("tracked_result").dump(input.result)],
                key,
            ]
        return self._seal(seq, KIND_ENTRY, body)

    def decode_entry(self, data: bytes, seq: int | None = None) -> JournalEntry:
        """Decode and check a journal entry.

        Raises:
            StoreCorrupt: the record fails a check or does not validate as the declared types.
            IncompatibleRecord: written by a newer format or schema version.
        """
        rec_seq, schema, body = self._open(data, KIND_ENTRY, seq)
        try:
            tag, payload, key = body
            value: Input[Any, Any, Any]
            if tag == 0:
                value = Normal(self._typed("input").load(payload))
            elif tag == 1:
                value = TrackedActionCompleted(
                    self._typed("tracked_id").load(payload[0]),
                    self._typed("tracked_result").load(payload[1]),
                )
            else:
                raise ValueError(f"unknown input tag {tag!r}")
        except (TypeError, ValueError) as e:
            hint = (f" (written under schema {schema}; inputs are not migrated, so a journal "
                    "tail from older code must still validate)") if schema < self.schema_version \
                else ""
            raise StoreCorrupt(f"journal entry does not decode as the declared input: {e}{hint}",
                               seq=rec_seq) from e
        return JournalEntry(rec_seq, value, key if isinstance(key, str) else None)
