"""The codec: typed values to bytes and back, inside a checked, versioned envelope. Never pickle.

Values become plain data through pydantic (a ``TypeAdapter`` over each declared type, JSON mode so
that msgpack can carry the result), then bytes through msgpack. Where a declared type is a union of
several classes, the value is tagged with its class name, so two alternatives with the same fields
never decode as each other.

Envelope (msgpack array, then a 4-byte CRC-32 of everything before it)::

    [FORMAT_VERSION, machine_name, schema_version, seq, kind, body]

Decoding checks, in order: length and checksum (torn or flipped -> StoreCorrupt), format version
(newer -> IncompatibleRecord), machine name (another machine -> StoreCorrupt), kind and sequence
number, schema version (newer -> IncompatibleRecord; older -> the machine's migrations; a step
that raises -> MigrationFailed), then the value, and last whether loading it drops fields the
stored data has and the declared type no longer does (-> IncompatibleRecord, unless the machine's
``dropped_fields`` names them).

Format 2 differs from format 1 only where a declared type contains ``Any``: tuples, sets and
frozensets there are msgpack extension types, so they decode as themselves (``_AnyWalk``).
Format 3 dates idempotency keys and keeps their outcome: a journal entry with a key carries the
time it was committed as a fourth element, and a checkpoint maps each key to
``[seq, at, outcome]`` (the actions its transition emitted, encoded, see
:meth:`Codec.pack_outcome`) where formats 1 and 2 held the seq alone. Every older format is
still read: its keys are undated and their outcomes unknown.

Nothing is acknowledged that cannot be read back: the runtime calls :meth:`Codec.pack` on every
submitted input (and executor result) before queueing it, so a value that cannot be written is
refused alone, and the journal entry reuses those bytes (:meth:`Codec.encode_entry` assembles the
envelope around them; msgpack is concatenative, so the bytes are exactly those of one pack).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import struct
import threading
import types
import typing
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import pydantic
import pydantic_core
import typing_extensions

from .._actions import Tracked, Untracked
from .._inputs import Input, Normal, TrackedActionCompleted
from .._machine import MachineTypes, StateMachine, type_members
from .._remembered import AnyAction, Remembered
from ..errors import DefinitionError, IncompatibleRecord, MigrationFailed, StoreCorrupt

__all__ = ("FORMAT_VERSION", "Checkpoint", "Codec", "JournalEntry", "Unencodable")

FORMAT_VERSION: Final = 3
"""3: dated idempotency keys with their outcome; 2: containers at ``Any`` positions are extension
types (see ``_AnyWalk``). 1 and 2 are still read."""
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
    idempotency: dict[str, Remembered]


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A decoded journal entry: the committed input at ``seq``, its idempotency key and when
    that key was committed (None without a key, or written before format 3)."""

    seq: int
    input: Input[Any, Any, Any]
    idempotency_key: str | None
    at: float | None = None


class _Typed:
    """Plain data for one declared type, tagging union alternatives by class name."""

    def __init__(self, tp: Any, what: str) -> None:
        self.what = what
        self.tp = tp
        members = type_members(tp)
        self._tagged = self.tagged = len(members) > 1 and all(isinstance(m, type) for m in members)
        # pydantic does not revalidate model instances, so a model built with model_construct or
        # mutated after validation is caught by its serializer's type check ("error" costs about
        # 1 us a value, so it is only asked for where the declared type can hold a model).
        self.models = _mentions_model(tp, set())
        # The state is never validated on its way in (the stf builds it), so its serializer's
        # type check is what stands between a mistyped field (``state.balance = "x"``) and a
        # checkpoint that would not load: always "error" there (it costs no more than the
        # warning it replaces: 7.7 against 10.7 ms for 10,000 dataclass entries, best of 5).
        self._check: Any = "error" if self.models or what == "state" else True
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

    def dump(self, value: Any, *, check: bool = False) -> Any:
        """Plain data for ``value``. With ``check``, a value that does not match the declared
        type field for field (a model built with ``model_construct`` or mutated after it was
        validated) is refused rather than written with a warning, as it could not be read back.

        Raises:
            Unencodable: pydantic cannot serialize it (or, with ``check``, it does not match).
            TypeError: it is none of the declared alternatives.
        """
        warnings: Any = self._check if check else True
        if self._tagged:
            found = self._by_type.get(type(value))
            if found is None:
                for tp, pair in self._by_type.items():
                    if isinstance(value, tp):
                        found = pair
                        break
                else:
                    raise TypeError(f"{self.what}: {type(value).__qualname__} is not declared")
            return [found[0], self._dump(found[1], value, warnings)]
        if self._whole is None:
            raise TypeError(f"{self.what}: the machine declares none")
        return self._dump(self._whole, value, warnings)

    def _dump(self, adapter: pydantic.TypeAdapter[Any], value: Any, warnings: Any) -> Any:
        try:
            return adapter.dump_python(value, mode="json", warnings=warnings)
        except ValueError as e:  # pydantic_core.PydanticSerializationError is a ValueError
            where = _locate(value, str(e))
            if warnings == "error":  # a type mismatch: where reading it back would fail says more
                try:
                    adapter.validate_python(adapter.dump_python(value, mode="json",
                                                                warnings=False))
                except pydantic.ValidationError as invalid:
                    where = _loc_path(invalid.errors()[0]["loc"]) or where
                except Exception:
                    pass  # the serializer's message is the one that matters
            raise Unencodable(self.what, where, _short(str(e))) from e

    def inner(self, plain: Any) -> Any:
        """The value's own plain data, without the union tag (for paths in messages)."""
        return plain[1] if self._tagged else plain

    def tag_any(self, walk: _AnyWalk, value: Any, plain: Any) -> Any:
        """``plain`` with containers at ``Any`` positions as extension types (format 2)."""
        if not walk.has_any(self.tp):
            return plain
        try:
            if self._tagged:
                plain[1] = walk.tag(type(value), value, plain[1])
                return plain
            return walk.tag(self.tp, value, plain)
        except Exception:
            # A shape the walk does not know: write what pydantic made of it (format 1's
            # behaviour: such containers come back as lists), never fail the write for it.
            return plain

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
        self.dropped_fields: Mapping[str, Collection[str]] = machine.dropped_fields
        self._cache: dict[str, _Typed] = {}
        self._local = threading.local()  # a Packer per thread: packb makes one per call (1 us)
        self._walk = _AnyWalk()
        self._head = b"\x96" + b"".join(  # a 6-element array, then its constant elements
            msgpack.packb(x, use_bin_type=True)
            for x in (FORMAT_VERSION, self.machine_name, self.schema_version))

    def _typed(self, what: str) -> _Typed:
        t = self._cache.get(what)
        if t is None:
            t = self._cache[what] = _Typed(getattr(self.types, what), what)
        return t

    def pack(self, what: str, value: Any) -> bytes:
        """The record bytes of one declared value (``"input"``, ``"tracked_result"`` ...), checked
        field for field against its declared type. The runtime calls it before it acknowledges
        anything, so a value that could not be written (or read back) is refused alone, and
        :meth:`encode_entry` reuses the bytes.

        Raises:
            Unencodable: the value cannot be written as a record (``path`` says where).
            TypeError: it is none of the declared alternatives.
        """
        plain = self._plain(what, value)
        try:
            return self._packer().pack(plain)
        except (TypeError, ValueError, OverflowError) as e:
            raise Unencodable(what, _locate(self._typed(what).inner(plain), ""),
                              f"{type(e).__name__}: {e}") from e

    def _plain(self, what: str, value: Any) -> Any:
        """The checked plain data of one declared value (see :meth:`pack`)."""
        typed = self._typed(what)
        plain = typed.dump(value, check=True)
        if typed.models:
            # A model instance is not revalidated by pydantic, and its serializer does not
            # notice a required field left out by model_construct: read the data back, as a
            # restart would (about 1 us, only where the declared type can hold a model).
            try:
                typed.load(plain)
            except pydantic.ValidationError as e:
                first = e.errors()[0]
                raise Unencodable(what, _loc_path(first["loc"]),
                                  f"it would not load back: {first['msg']}") from e
        return typed.tag_any(self._walk, value, plain)

    # -- outcomes of idempotency keys ------------------------------------------------------

    def pack_outcome(self, actions: tuple[AnyAction, ...]) -> bytes:
        """The actions a keyed transition emitted, encoded, so that a duplicate submit after a
        restart is answered with them (format 3).

        Raises:
            Unencodable: an action is not of its declared type or cannot be written.
        """
        items: list[Any] = []
        for action in actions:
            if isinstance(action, Tracked):
                items.append([0, self._plain("tracked_id", action.id),
                              self._plain("tracked_action", action.action)])
            else:
                items.append([1, self._plain("untracked", action.action)])
        try:
            return self._packer().pack(items)
        except (TypeError, ValueError, OverflowError) as e:
            raise Unencodable("outcome", "", f"{type(e).__name__}: {e}") from e

    def unpack_outcome(self, data: bytes) -> tuple[AnyAction, ...]:
        """The actions :meth:`pack_outcome` encoded.

        Raises:
            StoreCorrupt: they do not decode as the declared action types.
        """
        try:
            items = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook)
            out: list[AnyAction] = []
            for item in items:
                if item[0] == 0:
                    out.append(Tracked(self._typed("tracked_id").load(item[1]),
                                       self._typed("tracked_action").load(item[2])))
                else:
                    out.append(Untracked(self._typed("untracked").load(item[1])))
        except (TypeError, ValueError, IndexError, msgpack.UnpackException) as e:
            raise StoreCorrupt(f"the outcome of an idempotency key does not decode as the "
                               f"declared actions: {e}") from e
        return tuple(out)

    def outcome(self, remembered: Remembered) -> tuple[AnyAction, ...] | None:
        """The actions of a remembered key: held, or decoded (and kept) from the store's bytes;
        None when they are not known (written by an older fasm, or they could not be encoded).

        Raises:
            StoreCorrupt: the stored bytes do not decode.
        """
        if remembered.actions is None and remembered.packed is not None:
            remembered.actions = self.unpack_outcome(remembered.packed)
        return remembered.actions

    def _packed_outcome(self, remembered: Remembered) -> bytes | None:
        """The stored form of a key's outcome, encoded once and kept; None when unknown or not
        encodable (a duplicate is then answered without actions, as before format 3)."""
        if remembered.packed is None and remembered.actions is not None:
            try:
                remembered.packed = self.pack_outcome(remembered.actions)
            except (Unencodable, TypeError):
                return None
        return remembered.packed

    def _packer(self) -> msgpack.Packer:
        packer: msgpack.Packer | None = getattr(self._local, "packer", None)
        if packer is None:
            packer = self._local.packer = msgpack.Packer(use_bin_type=True)
        return packer

    # -- envelope ---------------------------------------------------------------------------

    def _seal(self, seq: int, kind: int, body: Any) -> bytes:
        try:
            packed = msgpack.packb(body, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            what = "state" if kind == KIND_CHECKPOINT else "journal entry"
            raise Unencodable(what, _locate(body, ""), f"{type(e).__name__}: {e}") from e
        return self._seal_packed(seq, kind, packed)

    def _seal_packed(self, seq: int, kind: int, body: bytes) -> bytes:
        """The envelope around an already packed body: msgpack is concatenative, so these bytes
        are exactly those of packing the whole array at once."""
        raw = b"".join((self._head, _uint(seq), _KINDS[kind], body))
        return raw + zlib.crc32(raw).to_bytes(_CRC, "big")

    def _open(self, data: bytes, kind: int, seq: int | None) -> tuple[int, int, Any]:
        if len(data) <= _CRC:
            raise StoreCorrupt(f"record truncated to {len(data)} bytes", seq=seq)
        raw, crc = data[:-_CRC], int.from_bytes(data[-_CRC:], "big")
        if zlib.crc32(raw) != crc:
            raise StoreCorrupt("record checksum mismatch (torn or corrupted write)", seq=seq)
        try:
            fmt, name, schema, rec_seq, rec_kind, body = msgpack.unpackb(
                raw, raw=False, strict_map_key=False, ext_hook=_ext_hook
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

    def encode_checkpoint(self, seq: int, state: Any,
                          idempotency: Mapping[str, Remembered | int]) -> bytes:
        """The whole state and the runtime's bookkeeping as of ``seq``.

        Raises:
            Unencodable: the state (or a key) cannot be written; ``path`` says where in the
                state (``"pending[3].user"``), found only after the failure.
        """
        typed = self._typed("state")
        plain = typed.tag_any(self._walk, state, typed.dump(state, check=True))
        keys = {k: ([r, None, None] if isinstance(r, int)
                    else [r.seq, r.at, self._packed_outcome(r)]) for k, r in idempotency.items()}
        try:
            packed = msgpack.packb({"s": plain, "k": keys}, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            reason = f"{type(e).__name__}: {e}"
            bad_key = _first_bad(keys, "", 0)
            if bad_key is not None and _first_bad(plain, "", 0) is None:
                raise Unencodable("idempotency key", bad_key, reason) from e
            raise Unencodable("state", _locate(typed.inner(plain), ""), reason) from e
        return self._seal_packed(seq, KIND_CHECKPOINT, packed)

    def decode_checkpoint(self, data: bytes, seq: int | None = None) -> Checkpoint:
        """Decode and check a checkpoint, migrating state written by an older schema.

        Raises:
            StoreCorrupt: the record fails a check or its state does not validate.
            IncompatibleRecord: written by a newer format or schema version, or its state has
                fields the declared state type does not (see :meth:`_refuse_dropped`).
            MigrationFailed: a migration step raised (the ``__cause__``).
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
                try:
                    plain = step(plain)
                except Exception as e:
                    raise MigrationFailed(
                        f"migration from schema version {version} to {version + 1} raised "
                        f"{type(e).__name__}: {e}", seq=rec_seq, from_version=version) from e
            state = self._typed("state").load(plain)
            self._refuse_dropped("state", plain, state, rec_seq)
            keys = {str(k): _remembered(v) for k, v in body["k"].items()}
        except IncompatibleRecord:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreCorrupt(f"checkpoint does not decode as the declared state: {e}",
                               seq=rec_seq) from e
        return Checkpoint(rec_seq, state, keys)

    # -- journal entries --------------------------------------------------------------------

    def encode_entry(self, seq: int, input: Input[Any, Any, Any], key: str | None,
                     at: float | None = None) -> bytes:
        """One committed input, as a journal entry (reusing the bytes :meth:`pack` made at
        submit, when the input carries them); a key is written with ``at``, when it was
        committed.

        Raises:
            Unencodable: the input or key cannot be written as a record.
        """
        try:
            if key is None:
                head, tail = b"\x93", b"\xc0"
            else:
                head, tail = b"\x94", self._packer().pack(key) + self._packer().pack(at)
        except (ValueError, TypeError) as e:
            raise Unencodable("idempotency key", "", f"{type(e).__name__}: {e}") from e
        if isinstance(input, Normal):
            value = input._packed
            if value is None:
                value = self.pack("input", input.value)
            raw = b"".join((self._head, _uint(seq), b"\x01", head, b"\x00", value, tail))
            return raw + zlib.crc32(raw).to_bytes(_CRC, "big")  # kind 1, tag 0
        ident = self.pack("tracked_id", input.id)
        result = self.pack("tracked_result", input.result)
        return self._seal_packed(seq, KIND_ENTRY,
                                 b"".join((head, b"\x01\x92", ident, result, tail)))

    def decode_entry(self, data: bytes, seq: int | None = None) -> JournalEntry:
        """Decode and check a journal entry.

        Raises:
            StoreCorrupt: the record fails a check or does not validate as the declared types.
            IncompatibleRecord: written by a newer format or schema version, or it has fields
                the declared types do not.
        """
        rec_seq, schema, body = self._open(data, KIND_ENTRY, seq)
        try:
            tag, payload, key, *dated = body
            at = dated[0] if dated else None
            if at is not None and not isinstance(at, (int, float)):
                raise ValueError(f"the key's date is {at!r}")
            value: Input[Any, Any, Any]
            if tag == 0:
                loaded = self._typed("input").load(payload)
                self._refuse_dropped("input", payload, loaded, rec_seq)
                value = Normal(loaded)
            elif tag == 1:
                ident = self._typed("tracked_id").load(payload[0])
                result = self._typed("tracked_result").load(payload[1])
                self._refuse_dropped("tracked_id", payload[0], ident, rec_seq)
                self._refuse_dropped("tracked_result", payload[1], result, rec_seq)
                value = TrackedActionCompleted(ident, result)
            else:
                raise ValueError(f"unknown input tag {tag!r}")
        except IncompatibleRecord:
            raise
        except (TypeError, ValueError) as e:
            hint = (f" (written under schema {schema}; inputs are not migrated, so a journal "
                    "tail from older code must still validate)") if schema < self.schema_version \
                else ""
            raise StoreCorrupt(f"journal entry does not decode as the declared input: {e}{hint}",
                               seq=rec_seq) from e
        key = key if isinstance(key, str) else None
        return JournalEntry(rec_seq, value, key, None if key is None or at is None else float(at))

    # -- schema evolution -------------------------------------------------------------------

    def _refuse_dropped(self, what: str, plain: Any, loaded: Any, seq: int) -> None:
        """Refuse a record whose plain data has fields the declared type no longer has: pydantic
        ignores unknown keys, so loading it would lose them at the next write, in silence.

        The loaded value is dumped again and compared key by key with what was stored, so every
        shape (dataclasses, models, nested in lists and dicts, union alternatives) is covered;
        the cost is paid at load only. Fields named in the machine's ``dropped_fields[what]``
        may go.

        Raises:
            IncompatibleRecord: naming the fields (as paths) that would be lost.
        """
        typed = self._typed(what)
        now = typed.dump(loaded)
        if typed.tagged and isinstance(plain, list) and len(plain) == 2:
            plain, now = plain[1], now[1]  # compare inside the alternative, not its tag
        if plain == now or not _lacks(plain, now):  # C-speed equality first: the usual case
            return
        missing = list(_missing(plain, now, ""))
        allowed = self.dropped_fields.get(what, ())
        missing = [p for p in missing if _last_name(p) not in allowed]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more"
                                               if len(missing) > 5 else "")
            raise IncompatibleRecord(
                f"the stored {what} has field(s) {shown} that the declared type does not have: "
                f"loading it would drop them. Write a migration (bump schema_version) that "
                f"moves or removes them, or declare the loss with "
                f"dropped_fields = {{{what!r}: (...)}} on the machine",
                seq=seq,
            )


_KINDS: Final = {KIND_CHECKPOINT: b"\x00", KIND_ENTRY: b"\x01"}  # positive fixints


def _uint(n: int) -> bytes:
    """msgpack's encoding of a non-negative int, as packb writes it (smallest form)."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return b"\xcc" + bytes((n,))
    if n < 0x10000:
        return b"\xcd" + struct.pack(">H", n)
    if n < 0x100000000:
        return b"\xce" + struct.pack(">I", n)
    return b"\xcf" + struct.pack(">Q", n)


def _mentions_model(tp: Any, seen: set[int]) -> bool:
    """Whether a value of declared type ``tp`` can hold a pydantic model instance (``Any`` and
    unresolvable annotations count as yes)."""
    if tp is Any or isinstance(tp, (str, typing.ForwardRef, typing.TypeVar)):
        return True
    if id(tp) in seen:
        return False
    seen.add(id(tp))
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return False
    if origin is typing.Annotated:
        return _mentions_model(typing.get_args(tp)[0], seen)
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp)
                                 or typing_extensions.is_typeddict(tp)):
        try:
            hints = typing.get_type_hints(tp)
        except Exception:  # an annotation that does not resolve: be safe
            return True
        return any(_mentions_model(h, seen) for h in hints.values())
    return any(_mentions_model(a, seen) for a in typing.get_args(tp) if a is not Ellipsis)


def _lacks(stored: Any, now: Any) -> bool:
    """Whether ``now`` lacks a dict key ``stored`` has, at any depth (no paths: the fast test)."""
    if isinstance(stored, dict):
        if not isinstance(now, dict):
            return False
        if not now.keys() >= stored.keys():
            return True
        return any(isinstance(v, (dict, list)) and _lacks(v, now[k]) for k, v in stored.items())
    if isinstance(stored, list) and isinstance(now, list) and len(stored) == len(now):
        return any(isinstance(a, (dict, list)) and _lacks(a, b)
                   for a, b in zip(stored, now, strict=True))
    return False


def _missing(stored: Any, now: Any, path: str) -> Iterator[str]:
    """Paths of dict keys in ``stored`` that ``now`` (the same data loaded and dumped again)
    lacks, at any depth."""
    if isinstance(stored, dict) and isinstance(now, dict):
        for k, v in stored.items():
            sub = _join(path, k)
            if k not in now:
                yield sub
            else:
                yield from _missing(v, now[k], sub)
    elif isinstance(stored, list) and isinstance(now, list) and len(stored) == len(now):
        for i, (a, b) in enumerate(zip(stored, now, strict=True)):
            yield from _missing(a, b, f"{path}[{i}]")


def _join(path: str, key: Any) -> str:
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _loc_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a path (``("pending", 3, "user")`` -> ``pending[3].user``)."""
    path = ""
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
    return path


def _last_name(path: str) -> str:
    return path.rsplit(".", 1)[-1].split("[", 1)[0]


# -- where a value fails to encode (paid on failure only) ------------------------------------

_FIELD_NAME = re.compile(r"field_name='([^']+)'")


def _locate(value: Any, message: str) -> str:
    """The path of the first part of ``value`` that cannot be written, or of the field the
    pydantic ``message`` names, or ``""``."""
    found = _first_bad(value, "", 0)
    if found is not None:
        return found
    m = _FIELD_NAME.search(message)
    return m.group(1) if m else ""


def _first_bad(value: Any, path: str, depth: int) -> str | None:
    if depth > 100:
        return None
    if isinstance(value, str):
        return None if _encodes(value) else path
    if isinstance(value, bool) or value is None or isinstance(value, (float, bytes,
                                                                        msgpack.ExtType)):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**64 else path
    items: Any
    if isinstance(value, dict):
        for k, v in value.items():
            sub = _join(path, k)
            if isinstance(k, str) and not _encodes(k):
                return sub
            found = _first_bad(v, sub, depth + 1)
            if found is not None:
                return found
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value))
    elif isinstance(value, pydantic.BaseModel):
        items = iter(value.__dict__.items())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = ((i, v) for i, v in enumerate(value))
    else:
        try:
            pydantic_core.to_jsonable_python(value)
        except (TypeError, ValueError):
            return path
        return None
    for k, v in items:
        found = _first_bad(v, f"{path}[{k}]" if isinstance(k, int) else _join(path, k), depth + 1)
        if found is not None:
            return found
    return None


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _remembered(stored: Any) -> Remembered:
    """A checkpoint's record of one key: a bare seq (formats 1 and 2) or ``[seq, at, outcome]``.

    Raises:
        ValueError: it is neither.
    """
    if isinstance(stored, int) and not isinstance(stored, bool):
        return Remembered(stored)
    seq, at, outcome = stored
    if not isinstance(seq, int) or (at is not None and not isinstance(at, (int, float))) or \
            (outcome is not None and not isinstance(outcome, bytes)):
        raise ValueError(f"an idempotency key's record is {stored!r}")
    return Remembered(seq, None if at is None else float(at), None, outcome)


def _short(message: str) -> str:
    """pydantic's serializer message, first lines only."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return " ".join(lines[:2])


# -- values in Any fields keep their container type (format 2) -------------------------------
#
# pydantic's JSON mode turns a tuple, set or frozenset it meets where the declared type is
# ``Any`` into a list, so such a value would come back as a list after a restart. The codec walks
# the declared type next to the value and its plain data, and at every ``Any`` replaces such
# containers by msgpack extension types (tuple 1, set 2, frozenset 3), which decode as
# themselves. Only declared types that contain ``Any`` (or an unparametrized container or a bare
# TypeVar, which pydantic treats as ``Any``) are walked, and a walk only visits the branches
# that contain it; everything else is written exactly as format 1 wrote it.

_EXT_TUPLE: Final = 1
_EXT_SET: Final = 2
_EXT_FROZENSET: Final = 3
_BARE = (list, dict, set, frozenset, tuple, collections.abc.Sequence, collections.abc.Mapping,
         collections.abc.Set, collections.abc.MutableSequence, collections.abc.MutableMapping)


def _ext_hook(code: int, data: bytes) -> Any:
    if code in (_EXT_TUPLE, _EXT_SET, _EXT_FROZENSET):
        items = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook)
        if code == _EXT_TUPLE:
            return tuple(items)
        return set(items) if code == _EXT_SET else frozenset(items)
    return msgpack.ExtType(code, data)


class _AnyWalk:
    """Finds the ``Any`` positions of one declared type (computed once per type)."""

    def __init__(self) -> None:
        self._has_any: dict[int, bool] = {}
        self._hints: dict[type, dict[str, Any] | None] = {}

    def has_any(self, tp: Any) -> bool:
        key = id(tp)
        found = self._has_any.get(key)
        if found is None:
            self._has_any[key] = False  # a recursive type: assume no while looking
            found = self._has_any[key] = self._scan(tp)
        return found

    def _scan(self, tp: Any) -> bool:
        if _is_any(tp):
            return True
        origin = typing.get_origin(tp)
        if origin is typing.Literal:
            return False
        if origin is typing.Annotated:
            return self.has_any(typing.get_args(tp)[0])
        if isinstance(tp, type) and not typing.get_args(tp):
            if tp in _BARE:
                return True
            fields = self.fields(tp)
            return fields is not None and any(self.has_any(h) for h in fields.values())
        if isinstance(origin, type) and self.fields(origin) is not None:
            return True  # a generic dataclass or model: its TypeVar fields are walked as Any
        return any(self.has_any(a) for a in typing.get_args(tp) if a is not Ellipsis)

    def fields(self, tp: type) -> dict[str, Any] | None:
        """Field name -> declared type, for a dataclass, model or TypedDict; else None."""
        if tp in self._hints:
            return self._hints[tp]
        hints: dict[str, Any] | None = None
        if issubclass(tp, pydantic.BaseModel):
            hints = {n: f.annotation for n, f in tp.model_fields.items()}
        elif dataclasses.is_dataclass(tp) or typing_extensions.is_typeddict(tp) or (
                issubclass(tp, tuple) and hasattr(tp, "_fields")):
            try:
                hints = typing.get_type_hints(tp)
            except Exception:  # unresolvable annotations: pydantic would have failed first
                hints = {}
            if dataclasses.is_dataclass(tp):
                names = {f.name for f in dataclasses.fields(tp)}
                hints = {n: h for n, h in hints.items() if n in names}
        self._hints[tp] = hints
        return hints

    def tag(self, tp: Any, value: Any, plain: Any) -> Any:
        """``plain`` with the containers at ``Any`` positions of ``value`` made extension types
        (``plain`` is fresh from the dump; it is changed in place where that is possible)."""
        if not self.has_any(tp):
            return plain
        if _is_any(tp):
            return _tag_any(value, plain)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            return self.tag(args[0], value, plain)
        if origin in (typing.Union, types.UnionType):
            member = _member(args, value)
            return plain if member is None else self.tag(member, value, plain)
        if isinstance(tp, type) and not args:
            if tp in _BARE:
                return _tag_any(value, plain)
            return self._tag_fields(tp, value, plain)
        cls = origin if isinstance(origin, type) else None
        if cls is None:
            return plain
        if self.fields(cls) is not None:
            return self._tag_fields(cls, value, plain)
        if issubclass(cls, collections.abc.Mapping) and isinstance(plain, dict) and \
                isinstance(value, collections.abc.Mapping) and len(args) == 2:
            for pk, sub in zip(list(plain), value.values(), strict=False):
                plain[pk] = self.tag(args[1], sub, plain[pk])
            return plain
        if isinstance(plain, list) and isinstance(value, (list, tuple, set, frozenset)):
            if issubclass(cls, tuple) and not (len(args) == 2 and args[1] is Ellipsis):
                hints = list(args)
            else:
                hints = [args[0]] * len(plain) if args else []
            for i, (hint, sub) in enumerate(zip(hints, value, strict=False)):
                plain[i] = self.tag(hint, sub, plain[i])
        return plain


    def _tag_fields(self, tp: type, value: Any, plain: Any) -> Any:
        fields = self.fields(tp)
        if not fields:
            return plain
        if isinstance(plain, dict):
            for name, hint in fields.items():
                if name in plain and self.has_any(hint):
                    sub = value.get(name) if isinstance(value, dict) else getattr(
                        value, name, None)
                    plain[name] = self.tag(hint, sub, plain[name])
        elif isinstance(plain, list) and isinstance(value, tuple):  # a NamedTuple
            for i, (hint, sub) in enumerate(zip(fields.values(), value, strict=False)):
                if i < len(plain) and self.has_any(hint):
                    plain[i] = self.tag(hint, sub, plain[i])
        return plain


def _is_any(tp: Any) -> bool:
    return tp is Any or tp is object or isinstance(tp, typing.TypeVar)


def _member(args: tuple[Any, ...], value: Any) -> Any:
    """The union member ``value`` is an instance of (the first that fits), or None."""
    for a in args:
        if _is_any(a):
            return a
        base = typing.get_origin(a) or a
        if typing.get_origin(a) is typing.Annotated:
            base = typing.get_origin(typing.get_args(a)[0]) or typing.get_args(a)[0]
        if typing_extensions.is_typeddict(base):
            if isinstance(value, dict):
                return a
        elif isinstance(base, type) and isinstance(value, base):
            return a
    return None


def _tag_any(value: Any, plain: Any) -> Any:
    """What pydantic's inference made of ``value``, with its tuples, sets and frozensets (at any
    depth) as extension types."""
    if isinstance(value, (tuple, set, frozenset)) and isinstance(plain, list):
        items = [_tag_any(v, p) for v, p in zip(value, plain, strict=False)]
        if isinstance(value, tuple):
            return msgpack.ExtType(_EXT_TUPLE, _pack_ext(items))
        if not all(_hashable(i) for i in items):
            return items  # a set of dataclasses in an Any field: its plain items are dicts
        return msgpack.ExtType(_EXT_SET if isinstance(value, set) else _EXT_FROZENSET,
                               _pack_ext(items))
    if isinstance(plain, list) and isinstance(value, list):
        for i, (v, p) in enumerate(zip(value, plain, strict=False)):
            plain[i] = _tag_any(v, p)
    elif isinstance(plain, dict):
        if isinstance(value, dict):
            for pk, v in zip(list(plain), value.values(), strict=False):
                plain[pk] = _tag_any(v, plain[pk])
        elif dataclasses.is_dataclass(value) or isinstance(value, pydantic.BaseModel):
            for pk in plain:
                if isinstance(pk, str) and hasattr(value, pk):
                    plain[pk] = _tag_any(getattr(value, pk), plain[pk])
    return plain


def _hashable(x: Any) -> bool:
    return not isinstance(x, (dict, list))


def _pack_ext(items: list[Any]) -> bytes:
    return msgpack.packb(items, use_bin_type=True)
