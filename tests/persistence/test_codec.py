"""The codec: typed round trips, the checked envelope, schema evolution."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from typing import Any, Generic, NamedTuple, TypeVar

import msgpack
import pydantic
import pytest
from typing_extensions import TypedDict

from fasm import Normal, StateMachine, Tracked, TrackedActionCompleted
from fasm._remembered import Remembered
from fasm.errors import IncompatibleRecord, MigrationFailed, StoreCorrupt
from fasm.persistence import Codec
from fasm.persistence._codec import FORMAT_VERSION, Unencodable

T = TypeVar("T")


class Color(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Item:
    name: str
    price: Decimal
    at: dt.datetime
    color: Color = Color.RED


class Model(pydantic.BaseModel):
    n: int
    tags: list[str] = []


@dataclass
class State:
    items: dict[int, Item] = field(default_factory=dict)
    model: Model | None = None
    seen: set[str] = field(default_factory=set)
    pair: tuple[int, str] = (0, "")


@dataclass(frozen=True)
class Add:
    item: Item


@dataclass(frozen=True)
class Remove:
    id: int


@dataclass(frozen=True)
class Ok:
    id: int


@dataclass(frozen=True)
class Err:
    id: int  # same fields as Ok: must still decode as the right class


class Shop(StateMachine[State, Add | Remove, int, str, Ok | Err]):
    machine_name = "tests.shop"

    async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

    async def restore(self, state: Any, actions: Any) -> None: ...


def sample() -> State:
    t = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
    return State(items={1: Item("tea", Decimal("2.50"), t, Color.BLUE)}, model=Model(n=3),
                 seen={"ß", "🔑"}, pair=(7, "x"))


def test_state_round_trips_with_rich_types() -> None:
    codec = Codec(Shop)
    data = codec.encode_checkpoint(5, sample(), {"req-1": Remembered(4, 17.5)})
    cp = codec.decode_checkpoint(data, 5)
    assert cp.state == sample()
    assert cp.idempotency == {"req-1": Remembered(4, 17.5)}
    assert cp.seq == 5


def test_inputs_and_lookalike_results_keep_their_class() -> None:
    codec = Codec(Shop)
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for seq, value in enumerate([Normal(Add(Item("a", Decimal(1), t))), Normal(Remove(3)),
                                 TrackedActionCompleted(9, Ok(9)),
                                 TrackedActionCompleted(9, Err(9))], start=1):
        entry = codec.decode_entry(codec.encode_entry(seq, value, f"k{seq}"), seq)
        assert entry.input == value
        assert type(getattr(entry.input, "result", None)) is type(getattr(value, "result", None))
        assert entry.idempotency_key == f"k{seq}"


def test_envelope_is_never_pickle_and_names_the_machine() -> None:
    raw = Codec(Shop).encode_entry(1, Normal(Remove(1)), None)
    fmt, name, schema, seq, kind, _ = msgpack.unpackb(raw[:-4])
    assert (fmt, name, schema, seq, kind) == (FORMAT_VERSION, "tests.shop", 1, 1, 1)
    assert b"\x80\x04" not in raw  # no pickle protocol header anywhere


@pytest.mark.parametrize("cut", [0, 1, 4, 10, -1])
def test_truncated_record_is_corrupt(cut: int) -> None:
    data = Codec(Shop).encode_checkpoint(1, sample(), {})
    with pytest.raises(StoreCorrupt):
        Codec(Shop).decode_checkpoint(data[:cut], 1)


def test_every_flipped_byte_is_detected() -> None:
    codec = Codec(Shop)
    data = codec.encode_entry(3, Normal(Remove(3)), "key")
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x40
        with pytest.raises(StoreCorrupt):
            codec.decode_entry(bytes(flipped), 3)


def test_record_of_another_machine_is_refused() -> None:
    class Other(Shop):
        machine_name = "tests.other"

    data = Codec(Other).encode_checkpoint(1, sample(), {})
    with pytest.raises(StoreCorrupt, match=r"belongs to machine 'tests\.other'"):
        Codec(Shop).decode_checkpoint(data, 1)


def test_wrong_seq_or_kind_is_refused() -> None:
    codec = Codec(Shop)
    entry = codec.encode_entry(3, Normal(Remove(3)), None)
    with pytest.raises(StoreCorrupt, match="seq"):
        codec.decode_entry(entry, 4)
    with pytest.raises(StoreCorrupt, match="kind"):
        codec.decode_checkpoint(entry, 3)


def _reseal(data: bytes, **changes: Any) -> bytes:
    import zlib

    fields = msgpack.unpackb(data[:-4])
    for index, value in changes.items():
        fields[int(index[1:])] = value
    raw = msgpack.packb(fields, use_bin_type=True)
    return raw + zlib.crc32(raw).to_bytes(4, "big")


def test_newer_format_or_schema_is_refused_never_half_read() -> None:
    codec = Codec(Shop)
    data = codec.encode_checkpoint(1, sample(), {})
    with pytest.raises(IncompatibleRecord, match=f"format {FORMAT_VERSION + 1} is newer"):
        codec.decode_checkpoint(_reseal(data, f0=FORMAT_VERSION + 1), 1)
    with pytest.raises(IncompatibleRecord, match="schema version 2 is newer"):
        codec.decode_checkpoint(_reseal(data, f2=2), 1)


def test_state_of_an_older_schema_is_migrated() -> None:
    @dataclass
    class V1:
        balance: int

    @dataclass
    class V3:
        cents: int
        currency: str

    class AccountV1(StateMachine[V1, int]):
        machine_name = "tests.account"

        async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

        async def restore(self, state: Any, actions: Any) -> None: ...

    class AccountV3(StateMachine[V3, int]):
        machine_name = "tests.account"
        schema_version = 3
        migrations = {  # noqa: RUF012
            1: lambda d: {"cents": d["balance"] * 100},
            2: lambda d: {**d, "currency": "EUR"},
        }

        async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

        async def restore(self, state: Any, actions: Any) -> None: ...

    old = Codec(AccountV1).encode_checkpoint(4, V1(balance=12), {})
    assert Codec(AccountV3).decode_checkpoint(old, 4).state == V3(1200, "EUR")

    class AccountV2Gap(AccountV3):
        migrations = {2: lambda d: d}  # noqa: RUF012

    with pytest.raises(IncompatibleRecord, match="no migration from it to 2"):
        Codec(AccountV2Gap).decode_checkpoint(old, 4)


def test_state_that_does_not_validate_is_corrupt_not_half_loaded() -> None:
    @dataclass
    class Narrow:
        n: int

    class Wide(StateMachine[dict[str, str], int]):
        machine_name = "tests.narrow"

        async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

        async def restore(self, state: Any, actions: Any) -> None: ...

    class NarrowM(StateMachine[Narrow, int]):
        machine_name = "tests.narrow"

        async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

        async def restore(self, state: Any, actions: Any) -> None: ...

    data = Codec(Wide).encode_checkpoint(1, {"x": "y"}, {})
    with pytest.raises(StoreCorrupt, match="does not decode as the declared state"):
        Codec(NarrowM).decode_checkpoint(data, 1)


# -- records made from bytes packed at submit, where a value cannot be written ----------------


@pytest.mark.parametrize("seq", [0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32])
def test_an_entry_from_prepacked_bytes_is_byte_for_byte_the_packed_envelope(seq: int) -> None:
    """The runtime packs an input's body once at submit and the journal reuses it: the record
    must be exactly what packing the whole envelope gives, so format 1 is unchanged."""
    codec = Codec(Shop)
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for value, key in ((Normal(Add(Item("a", Decimal(1), t))), "k"), (Normal(Remove(3)), None),
                       (TrackedActionCompleted(9, Err(9)), "ß")):
        payload: Any = (
            [0, codec._typed("input").dump(value.value), key] if isinstance(value, Normal)
            else [1, [9, ["Err", {"id": 9}]], key])
        if key is not None:
            payload.append(None)  # format 3: a key is dated (here: not)
        whole = msgpack.packb([FORMAT_VERSION, "tests.shop", 1, seq, 1, payload],
                              use_bin_type=True)
        assert codec.encode_entry(seq, value, key)[:-4] == whole
        if isinstance(value, Normal):
            packed = Normal(value.value)
            object.__setattr__(packed, "_packed", codec.pack("input", value.value))
            assert codec.encode_entry(seq, packed, key)[:-4] == whole
        assert codec.decode_entry(codec.encode_entry(seq, value, key), seq).input == value


@dataclass
class Pending:
    user: str


@dataclass
class Book:
    pending: list[Pending]
    extra: Any = None


def test_unencodable_names_the_field_that_does_not_encode() -> None:
    class Books(StateMachine[Book, int]):
        machine_name = "tests.books"

        async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

        async def restore(self, state: Any, actions: Any) -> None: ...

    codec = Codec(Books)
    book = Book([Pending("a")] * 3 + [Pending("\ud800")])
    with pytest.raises(Unencodable) as info:
        codec.encode_checkpoint(1, book, {})
    assert (info.value.what, info.value.path) == ("state", "pending[3].user")
    with pytest.raises(Unencodable) as info:
        codec.encode_checkpoint(1, Book([], extra={"n": [1, 2**64]}), {})
    assert info.value.path == "extra.n[1]"
    with pytest.raises(Unencodable) as info:
        codec.encode_checkpoint(1, Book([], extra=object()), {})
    assert info.value.path == "extra"


class Tagged(StateMachine[dict[str, Ok | Err], Ok | Err]):
    machine_name = "tests.tagged"

    async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

    async def restore(self, state: Any, actions: Any) -> None: ...


@dataclass(frozen=True)
class OkWide:
    id: int
    gone: str = "x"


class TaggedWide(StateMachine[dict[str, OkWide | Err], OkWide | Err]):
    machine_name = "tests.tagged"

    async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

    async def restore(self, state: Any, actions: Any) -> None: ...


@dataclass
class V1:
    accounts: dict[str, dict[str, Any]]
    rows: list[Model]


class Row(pydantic.BaseModel):
    n: int


@dataclass
class V2:
    accounts: dict[str, dict[str, Any]]
    rows: list[Row]


def test_fields_the_type_no_longer_has_are_refused_at_every_depth() -> None:
    wide = Codec(TaggedWide)
    OkWide.__qualname__ = "Ok"  # the same class name, as after removing a field in place
    try:
        entry = wide.encode_entry(1, Normal(OkWide(1)), None)
    finally:
        OkWide.__qualname__ = "OkWide"
    narrow = Codec(Tagged)
    with pytest.raises(IncompatibleRecord, match=r"stored input has field\(s\) gone"):
        narrow.decode_entry(entry, 1)

    class Declared(Tagged):
        dropped_fields = {"input": ("gone",)}  # noqa: RUF012

    assert Codec(Declared).decode_entry(entry, 1).input == Normal(Ok(1))

    class M1(StateMachine[V1, int]):
        machine_name = "tests.depth"

        async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

        async def restore(self, state: Any, actions: Any) -> None: ...

    class M2(StateMachine[V2, int]):
        machine_name = "tests.depth"

        async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

        async def restore(self, state: Any, actions: Any) -> None: ...

    data = Codec(M1).encode_checkpoint(3, V1({"a": {"x": 1}}, [Model(n=1), Model(n=2)]), {})
    with pytest.raises(IncompatibleRecord, match=r"rows\[0\]\.tags, rows\[1\]\.tags") as info:
        Codec(M2).decode_checkpoint(data, 3)
    assert "migration" in str(info.value) and "dropped_fields" in str(info.value)
    assert "accounts" not in str(info.value)  # a dict of Any keeps what it holds


def test_a_migration_that_raises_is_migration_failed() -> None:
    @dataclass
    class V:
        n: int

    class M1(StateMachine[V, int]):
        machine_name = "tests.mig"

        async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

        async def restore(self, state: Any, actions: Any) -> None: ...

    class M2(M1):
        schema_version = 2
        migrations = {1: lambda d: d["missing"]}  # noqa: RUF012

    data = Codec(M1).encode_checkpoint(4, V(1), {})
    with pytest.raises(MigrationFailed, match="from schema version 1 to 2") as info:
        Codec(M2).decode_checkpoint(data, 4)
    assert (info.value.seq, info.value.from_version) == (4, 1)
    assert isinstance(info.value.__cause__, KeyError)


# -- containers in Any fields keep their type (format 2); format 1 is still read --------------


@dataclass
class Loose:
    anything: Any
    bag: dict[str, Any] = field(default_factory=dict)
    rows: list[Any] = field(default_factory=list)
    bare: tuple = ()  # type: ignore[type-arg]
    typed: set[str] = field(default_factory=set)
    maybe: Item | None = None


class LooseM(StateMachine[Loose, Loose | Remove]):
    machine_name = "tests.loose"

    async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

    async def restore(self, state: Any, actions: Any) -> None: ...


def loose() -> Loose:
    return Loose(
        anything=(1, "a", (2, 3), [4, (5,)], {"k": {6, 7}}, frozenset({8})),
        bag={"s": {"x"}, "t": (1, 2), "f": frozenset({(1, 2)}), "d": {"in": (3,)}},
        rows=[(1,), {2}, [3, (4,)]],
        bare=(1, (2,)),
        typed={"y"},
    )


def test_tuples_and_sets_in_any_fields_round_trip_as_themselves() -> None:
    codec = Codec(LooseM)
    cp = codec.decode_checkpoint(codec.encode_checkpoint(2, loose(), {}), 2)
    assert cp.state == loose()
    assert type(cp.state.anything) is tuple and type(cp.state.anything[5]) is frozenset
    assert type(cp.state.bag["s"]) is set and type(cp.state.rows[0]) is tuple
    entry = codec.decode_entry(codec.encode_entry(3, Normal(loose()), None), 3)
    assert entry.input == Normal(loose())
    assert type(entry.input.value.bag["t"]) is tuple  # type: ignore[union-attr]


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_format_1_or_2_record_is_still_read(fmt: int) -> None:
    """Before format 3 a checkpoint mapped each key to its seq, and an entry's body had three
    elements: such keys load undated, with their outcome unknown."""
    codec = Codec(Shop)
    data = codec.encode_checkpoint(1, sample(), {"k": 1})
    assert msgpack.unpackb(data[:-4])[0] == FORMAT_VERSION == 3
    fields = msgpack.unpackb(data[:-4])
    old = _reseal(data, f0=fmt, f5={"s": fields[5]["s"], "k": {"k": 1}})
    cp = codec.decode_checkpoint(old, 1)
    assert cp.state == sample() and cp.idempotency == {"k": Remembered(1)}
    assert cp.idempotency["k"].at is None and codec.outcome(cp.idempotency["k"]) is None
    entry = codec.encode_entry(2, Normal(Remove(3)), "k", 9.0)
    body = msgpack.unpackb(entry[:-4])[5]
    assert body[3] == 9.0
    decoded = codec.decode_entry(_reseal(entry, f0=fmt, f5=body[:3]), 2)
    assert decoded.input == Normal(Remove(3)) and decoded.idempotency_key == "k"
    assert decoded.at is None
    assert codec.decode_entry(entry, 2).at == 9.0


def test_a_keys_outcome_round_trips_through_a_checkpoint() -> None:
    """The actions of a keyed transition are kept encoded in the checkpoint and decoded only
    when a duplicate asks for them."""
    codec = Codec(Shop)
    actions = (Tracked(4, "charge a"), Tracked(5, "charge b"))
    data = codec.encode_checkpoint(1, sample(), {"k": Remembered(1, 2.0, actions)})
    stored = codec.decode_checkpoint(data, 1).idempotency["k"]
    assert stored.actions is None and stored.packed is not None
    assert codec.outcome(stored) == actions
    with pytest.raises(StoreCorrupt, match="outcome"):
        codec.unpack_outcome(b"\x91\x92\x00\x01")


def test_a_failed_pack_leaves_the_codec_writing_correct_bytes() -> None:
    """The codec keeps one msgpack Packer per thread; a value that fails half-way must not
    leave bytes behind in it for the next record."""
    codec = Codec(Shop)
    for bad in (Remove(2**64),):
        with pytest.raises(Unencodable):
            codec.pack("input", bad)
    assert codec.pack("input", Remove(1)) == msgpack.packb(["Remove", {"id": 1}],
                                                            use_bin_type=True)


class AnyTD(TypedDict):
    a: Any


class AnyNT(NamedTuple):
    x: Any
    y: int


class AnyModel(pydantic.BaseModel):
    z: Any = None
    w: list[Any] = []


@dataclass
class AnyNode:
    v: Any
    kids: list[AnyNode] = field(default_factory=list)


@dataclass
class AnyBox(Generic[T]):
    item: T


@dataclass
class Shapes:
    o: Any | None = None
    la: list[Any] = field(default_factory=list)
    di: dict[int, Any] = field(default_factory=dict)
    ta: tuple[Any, ...] = ()
    un: int | list[Any] = 0
    td: AnyTD | None = None
    nt: AnyNT | None = None
    pm: AnyModel = field(default_factory=AnyModel)
    node: AnyNode | None = None
    box: AnyBox[Any] | None = None
    seq: Sequence[Any] = ()
    mp: Mapping[str, Any] = field(default_factory=dict)


class ShapesM(StateMachine[Shapes, int]):
    machine_name = "tests.shapes"

    async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

    async def restore(self, state: Any, actions: Any) -> None: ...


def test_any_positions_are_found_in_every_shape() -> None:
    state = Shapes(o=(1,), la=[None, (2,), {3}], di={1: (4,)}, ta=((5,), 6), un=[(7,)],
                   td={"a": (8,)}, nt=AnyNT((9,), 1), pm=AnyModel(z=(10,), w=[{11}]),
                   node=AnyNode((12,), [AnyNode({13})]), box=AnyBox((14,)), seq=[(15,)],
                   mp={"k": frozenset({16})})
    codec = Codec(ShapesM)
    got = codec.decode_checkpoint(codec.encode_checkpoint(1, state, {}), 1).state
    for name in ("o", "la", "di", "ta", "un", "td", "nt", "pm", "node", "box", "seq", "mp"):
        assert repr(getattr(got, name)) == repr(getattr(state, name)), name
