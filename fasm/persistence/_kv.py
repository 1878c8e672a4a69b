"""The ordered key-value layer over a database table, in the shape of the Rust crate's
``fasm-storage`` ``KvStore``: get, set, delete, exists and range scans in key order, within a
named keyspace (the Rust crate's directory), inside the state's transaction.

Keys are strings, stored as their UTF-8 bytes and ordered by those bytes (which is code point
order), whatever the database's collation. Values are typed per keyspace and stored as msgpack of
their pydantic plain data (the codec's typing: models, dataclasses, builtins, tagged unions);
a ``bytes`` keyspace stores the bytes as they are.

Within a transaction, reads are cached and writes buffered (read-your-writes): a second ``get`` of
a key costs no round trip, and writes reach the database together, with the next statement that
needs an answer or when the input is accepted. SQL run through the same transaction drops the
cache, so raw statements and the key-value layer can be mixed safely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import msgpack

from ..errors import StoreCorrupt
from ._codec import _Typed

if TYPE_CHECKING:
    from ._txn import Transaction

__all__ = ("KV", "Keyspace")

T = TypeVar("T")
D = TypeVar("D")


class Keyspace(Generic[T]):
    """A named part of the key-value layer whose values are all of one type.

    Declare each once, next to the machine: ``BOOKINGS = Keyspace("bookings", Booking)``. Two
    keyspaces with the same name are the same data.

    Args:
        name: the keyspace's name in the table (any string).
        value_type: what its values are: a pydantic model, a dataclass, a builtin, a union of
            classes, or ``bytes`` for raw bytes.
    """

    __slots__ = ("_typed", "name", "value_type")

    def __init__(self, name: str, value_type: type[T]) -> None:
        self.name = name
        self.value_type = value_type
        self._typed: _Typed | None = None

    def __repr__(self) -> str:
        shown = getattr(self.value_type, "__qualname__", self.value_type)
        return f"Keyspace({self.name!r}, {shown})"

    def encode(self, value: T) -> bytes:
        """The stored bytes of ``value``.

        Raises:
            TypeError: ``value`` is not of the keyspace's type.
        """
        if self.value_type is bytes:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"{self!r} holds bytes, not {type(value).__qualname__}")
            return bytes(value)
        try:
            plain = self._adapter().dump(value)
        except Exception as e:
            raise TypeError(f"{self!r} cannot store {value!r}: {e}") from e
        return msgpack.packb(plain, use_bin_type=True)

    def decode(self, data: bytes, key: str = "?") -> T:
        """The value stored as ``data``.

        Raises:
            StoreCorrupt: the bytes are not a value of the keyspace's type (written for another
                type, or by code whose type has since changed incompatibly).
        """
        if self.value_type is bytes:
            return data  # type: ignore[return-value]
        try:
            value: T = self._adapter().load(msgpack.unpackb(data, raw=False, strict_map_key=False))
        except Exception as e:
            raise StoreCorrupt(f"value of key {key!r} in {self!r} does not decode: {e}") from e
        return value

    def _adapter(self) -> _Typed:
        if self._typed is None:
            self._typed = _Typed(self.value_type, f"keyspace {self.name!r}")
        return self._typed


def _key(key: str) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"keys are str, not {type(key).__qualname__}")
    return key.encode("utf-8")


def successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix`` (None when
    there is none: the prefix is empty or all 0xFF)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def bounds(prefix: str, start: str | None, end: str | None) -> tuple[bytes | None, bytes | None]:
    """Byte bounds ``[lo, hi)`` of the keys that start with ``prefix`` and lie in
    ``[start, end)``."""
    p = _key(prefix)
    lo: bytes | None = p or None
    hi = successor(p)
    if start is not None:
        s = _key(start)
        lo = s if lo is None or s > lo else lo
    if end is not None:
        e = _key(end)
        hi = e if hi is None or e < hi else hi
    return lo, hi


class KV:
    """The key-value layer of one :class:`~fasm.persistence.Transaction` (``state.kv``).

    Every method raises what the transaction's statements raise (a lost transaction, a closed
    one); writes are refused in the read-only transaction ``restore`` gets.
    """

    __slots__ = ("_tx",)

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    @overload
    async def get(self, space: Keyspace[T], key: str) -> T | None: ...

    @overload
    async def get(self, space: Keyspace[T], key: str, default: D) -> T | D: ...

    async def get(self, space: Keyspace[T], key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it is absent.

        Raises:
            StoreCorrupt: the stored bytes do not decode as the keyspace's type.
        """
        data = await self._tx._call(self._tx._session.kv_get, space.name, _key(key))
        return default if data is None else space.decode(data, key)

    async def exists(self, space: Keyspace[Any], key: str) -> bool:
        """Whether ``key`` is present (without reading its value)."""
        found: bool = await self._tx._call(self._tx._session.kv_exists, space.name, _key(key))
        return found

    async def set(self, space: Keyspace[T], key: str, value: T) -> None:
        """Store ``value`` under ``key``, replacing what was there.

        Raises:
            TypeError: ``value`` is not of the keyspace's type.
        """
        data = space.encode(value)
        await self._tx._call(self._tx._session.kv_set, space.name, _key(key), data)

    async def delete(self, space: Keyspace[Any], key: str) -> None:
        """Remove ``key``; removing an absent key does nothing."""
        await self._tx._call(self._tx._session.kv_set, space.name, _key(key), None)

    async def range(
        self,
        space: Keyspace[T],
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> list[tuple[str, T]]:
        """The pairs whose key starts with ``prefix`` and lies in ``[start, end)``, in key order
        (descending with ``reverse``), at most ``limit`` of them. Writes made earlier in the
        transaction are included; to page, pass the last key seen plus ``"\\0"`` as ``start``
        (or as ``end`` with ``reverse``).

        Raises:
            ValueError: ``limit`` is negative.
            StoreCorrupt: a stored value does not decode as the keyspace's type.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        lo, hi = bounds(prefix, start, end)
        if (lo is not None and hi is not None and lo >= hi) or limit == 0:
            return []
        rows = await self._tx._call(self._tx._session.kv_range, space.name, lo, hi, reverse,
                                    limit)
        out: list[tuple[str, T]] = []
        for k, v in rows:
            key = k.decode("utf-8")
            out.append((key, space.decode(v, key)))
        return out

    async def delete_range(self, space: Keyspace[Any], *, prefix: str = "",
                           start: str | None = None, end: str | None = None) -> int:
        """Remove every key :meth:`range` would return with the same bounds; returns how many
        were removed."""
        lo, hi = bounds(prefix, start, end)
        if lo is not None and hi is not None and lo >= hi:
            return 0
        count: int = await self._tx._call(self._tx._session.kv_delete_range, space.name, lo, hi)
        return count
