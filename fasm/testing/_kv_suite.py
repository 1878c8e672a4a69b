"""The key-value conformance suite: the answers every :class:`~fasm.persistence.Database`'s
key-value layer (``transaction.kv``) must give, whatever the database underneath.

One implementation, two ways in, as for stores:

* :func:`check_kv` runs every check against a database factory and raises ``AssertionError``
  naming the check that failed;
* :class:`KVConformance` is a pytest base class with one test per check; a subclass provides
  ``make_database``.

The factory returns a new, not yet opened database object on the *same location* every time it is
called (same file, same DSN and schema): the durability check reopens it. Every check writes into
keyspaces whose names are unique to the run, so a database that already holds data is fine.

What is checked, after the Rust crate's ``kv_store_tests!``: round trips and overwrites, absent
keys, keyspace isolation, key order (code point order, prefix-shadowing keys, the empty key,
non-ASCII), every combination of bounds, prefixes, reverse scans and limits, paging over 1,500 keys,
read-your-writes inside a transaction (a scan sees buffered writes exactly once, deletes hide keys,
a range delete followed by re-inserts), rollback, typed values (dataclasses, pydantic models,
containers, tagged unions, raw bytes, a 1 MiB value), values that no longer decode, mixing SQL with
the key-value layer, and durability across reopening.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import pydantic

from ..errors import StoreCorrupt
from ..persistence._kv import Keyspace
from ..persistence._txn import Database, Transaction
from ._suite_runner import Skip, anyio_marks, run_all, run_as_test

__all__ = ("KV_CHECKS", "KVConformance", "check_kv")


@dataclass(frozen=True)
class _Point:
    x: int
    y: int


@dataclass(frozen=True)
class _Celsius:
    degrees: float


@dataclass(frozen=True)
class _Fahrenheit:
    degrees: float


class _Model(pydantic.BaseModel):
    name: str
    tags: list[str] = []
    nested: dict[str, _Point] = {}


class _Rollback(Exception):
    """Raised inside a transaction to roll it back."""


@dataclass
class _Suite:
    make_database: Callable[[], Awaitable[Database]]
    durable: bool
    run: str = field(default_factory=lambda: f"{random.getrandbits(48):012x}")

    def space(self, name: str, tp: Any = str) -> Keyspace[Any]:
        return Keyspace(f"fasm-kv-suite-{self.run}/{name}", tp)

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Database]:
        db = await self.make_database()
        await db.open()
        try:
            yield db
        finally:
            with anyio.CancelScope(shield=True):
                await db.close()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _equal(got: Any, want: Any, what: str) -> None:
    _check(got == want, f"{what}: got {got!r}, expected {want!r}")


async def _keys(tx: Transaction, space: Keyspace[Any], **bounds: Any) -> list[str]:
    return [k for k, _ in await tx.kv.range(space, **bounds)]


# -- the checks ------------------------------------------------------------------------------


async def check_round_trip(suite: _Suite) -> None:
    """get / set / delete / exists, overwrite, absent keys, and commits seen by later
    transactions."""
    s = suite.space("round-trip")
    async with suite.opened() as db:
        async with db.transaction() as tx:
            _equal(await tx.kv.get(s, "one"), None, "get of a key never set")
            _equal(await tx.kv.get(s, "one", "fallback"), "fallback", "get with a default")
            _check(not await tx.kv.exists(s, "one"), "exists of a key never set")
            for key in ("", "one", "two"):
                await tx.kv.set(s, key, f"value of {key!r}")
            for key in ("", "one", "two"):
                _equal(await tx.kv.get(s, key), f"value of {key!r}", f"get {key!r} after set")
                _check(await tx.kv.exists(s, key), f"exists {key!r} after set")
        async with db.transaction() as tx:
            _equal(await tx.kv.get(s, "one"), "value of 'one'", "get in a later transaction")
            await tx.kv.set(s, "one", "replaced")
            await tx.kv.delete(s, "two")
            await tx.kv.delete(s, "never-was")  # a no-op, not an error
        async with db.transaction(readonly=True) as tx:
            _equal(await tx.kv.get(s, "one"), "replaced", "get after an overwrite")
            _equal(await tx.kv.get(s, "two"), None, "get after a delete")
            _check(not await tx.kv.exists(s, "two"), "exists after a delete")
            _check(not await tx.kv.exists(s, "never-was"), "exists of a deleted absent key")
            _equal(await _keys(tx, s), ["", "one"], "keys after overwrite and delete")


async def check_keyspaces_are_isolated(suite: _Suite) -> None:
    """The same key in different keyspaces: separate values, and a scan never crosses over."""
    a, b, ab = suite.space("iso-a"), suite.space("iso-b"), suite.space("iso-a/b")
    async with suite.opened() as db:
        async with db.transaction() as tx:
            await tx.kv.set(a, "k", "from a")
            await tx.kv.set(b, "k", "from b")
            await tx.kv.set(ab, "k", "from a/b")
            await tx.kv.set(a, "only-a", "x")
        async with db.transaction(readonly=True) as tx:
            _equal(await tx.kv.range(a), [("k", "from a"), ("only-a", "x")], "scan of a")
            _equal(await tx.kv.range(b), [("k", "from b")], "scan of b")
            _equal(await tx.kv.range(ab), [("k", "from a/b")], "scan of a/b")
            _equal(await tx.kv.range(suite.space("iso-none")), [], "scan of an unused keyspace")


_ORDER = ["", "\x00", "\x01", "A", "Z", "a", "a\x00", "a\x01", "ab", "b", "~", "\x7f", "é",
          "ÿ", "Ā", "日本", "\uffff", "\U0001f600", "\U0010ffff"]


async def check_key_order(suite: _Suite) -> None:
    """Keys come back in code point order (their UTF-8 byte order), whatever the collation:
    the empty key first, a key before the keys it prefixes, upper case before lower case."""
    s = suite.space("order")
    shuffled = list(_ORDER)
    random.Random(3).shuffle(shuffled)
    async with suite.opened() as db:
        async with db.transaction() as tx:
            for key in shuffled:
                await tx.kv.set(s, key, key)
        async with db.transaction(readonly=True) as tx:
            _equal(await _keys(tx, s), sorted(_ORDER), "forward scan order")
            _equal(await _keys(tx, s, reverse=True), sorted(_ORDER, reverse=True),
                   "reverse scan order")
            pairs = await tx.kv.range(s)
            _check(all(k == v for k, v in pairs), "values must follow their keys")


async def check_bounds(suite: _Suite) -> None:
    """start (included), end (excluded), prefix, reverse and limit, alone and combined."""
    s = suite.space("bounds")
    keys = ["a", "b", "ba", "bb", "bz", "b\U0010ffff", "c", "d"]
    async with suite.opened() as db:
        async with db.transaction() as tx:
            for key in keys:
                await tx.kv.set(s, key, key)
        async with db.transaction(readonly=True) as tx:
            cases: list[tuple[dict[str, Any], list[str]]] = [
                ({}, keys),
                ({"start": "b"}, ["b", "ba", "bb", "bz", "b\U0010ffff", "c", "d"]),
                ({"end": "c"}, ["a", "b", "ba", "bb", "bz", "b\U0010ffff"]),
                ({"start": "ba", "end": "bz"}, ["ba", "bb"]),
                ({"start": "bb", "end": "bb"}, []),
                ({"start": "c", "end": "b"}, []),
                ({"prefix": "b"}, ["b", "ba", "bb", "bz", "b\U0010ffff"]),
                ({"prefix": "bb"}, ["bb"]),
                ({"prefix": "bq"}, []),
                ({"prefix": "b\U0010ffff"}, ["b\U0010ffff"]),
                ({"prefix": "b", "start": "bb"}, ["bb", "bz", "b\U0010ffff"]),
                ({"prefix": "b", "end": "bb"}, ["b", "ba"]),
                ({"prefix": "b", "start": "a", "end": "z"}, ["b", "ba", "bb", "bz",
                                                             "b\U0010ffff"]),
                ({"prefix": "b", "limit": 2}, ["b", "ba"]),
                ({"prefix": "b", "reverse": True}, ["b\U0010ffff", "bz", "bb", "ba", "b"]),
                ({"prefix": "b", "reverse": True, "limit": 2}, ["b\U0010ffff", "bz"]),
                ({"start": "b", "end": "c", "reverse": True, "limit": 3},
                 ["b\U0010ffff", "bz", "bb"]),
                ({"limit": 0}, []),
            ]
            for bounds, want in cases:
                _equal(await _keys(tx, s, **bounds), want, f"range({bounds})")
            for bounds, want in cases:
                if "limit" in bounds or "reverse" in bounds:
                    continue
                _equal(await _keys(tx, s, reverse=True, **bounds), want[::-1],
                       f"range({bounds}, reverse=True)")
            try:
                await tx.kv.range(s, limit=-1)
            except ValueError:
                pass
            else:
                raise AssertionError("range(limit=-1) must raise ValueError")


async def check_paging(suite: _Suite) -> None:
    """1,500 keys paged 100 at a time, forward and backward, through start/end continuations."""
    s = suite.space("paging", int)
    keys = [f"item/{i:05d}" for i in range(1500)]
    async with suite.opened() as db:
        async with db.transaction() as tx:
            for i, key in enumerate(keys):
                await tx.kv.set(s, key, i)
        async with db.transaction(readonly=True) as tx:
            seen: list[str] = []
            start: str | None = None
            while True:
                page = await tx.kv.range(s, prefix="item/", start=start, limit=100)
                if not page:
                    break
                seen += [k for k, _ in page]
                start = page[-1][0] + "\0"
            _equal(seen, keys, "forward paging")
            back: list[str] = []
            end: str | None = None
            while True:
                page = await tx.kv.range(s, prefix="item/", end=end, limit=100, reverse=True)
                if not page:
                    break
                back += [k for k, _ in page]
                end = page[-1][0]
            _equal(back, keys[::-1], "backward paging")
            _equal(sum(v for _, v in await tx.kv.range(s)), sum(range(1500)), "values")


async def check_read_your_writes(suite: _Suite) -> None:
    """Inside one transaction, reads and scans see the transaction's own writes exactly once."""
    s = suite.space("ryw")
    async with suite.opened() as db:
        async with db.transaction() as tx:
            for key in ("a", "b", "c"):
                await tx.kv.set(s, key, "old")
        async with db.transaction() as tx:
            await tx.kv.set(s, "b", "new")
            await tx.kv.set(s, "d", "added")
            await tx.kv.delete(s, "c")
            _equal(await tx.kv.get(s, "b"), "new", "get of an overwrite")
            _equal(await tx.kv.range(s), [("a", "old"), ("b", "new"), ("d", "added")],
                   "scan after an overwrite, an insert and a delete")
            await tx.kv.set(s, "b", "newer")  # a write after a scan
            _equal(await tx.kv.range(s, start="b", end="c"), [("b", "newer")],
                   "scan after writing a scanned key again")
            _equal(await tx.kv.delete_range(s, start="a", end="c"), 2, "delete_range count")
            _equal(await tx.kv.get(s, "a"), None, "get after delete_range")
            await tx.kv.set(s, "a", "back")
            _equal(await tx.kv.range(s), [("a", "back"), ("d", "added")],
                   "re-insert into a just-deleted range")
            _equal(await tx.fetchval("SELECT 40 + 2"), 42, "SQL in between")
            _equal(await tx.kv.get(s, "a"), "back", "get after SQL ran in between")
            _check(await tx.kv.exists(s, "d") and not await tx.kv.exists(s, "c"),
                   "exists sees buffered writes")
        async with db.transaction(readonly=True) as tx:
            _equal(await tx.kv.range(s), [("a", "back"), ("d", "added")], "after the commit")


async def check_rollback(suite: _Suite) -> None:
    """A transaction that raises leaves nothing behind, buffered or sent."""
    s = suite.space("rollback")
    async with suite.opened() as db:
        async with db.transaction() as tx:
            await tx.kv.set(s, "kept", "yes")
        try:
            async with db.transaction() as tx:
                await tx.kv.set(s, "kept", "overwritten")
                await tx.kv.set(s, "sent", "x")
                await tx.kv.range(s)  # sends the buffered writes
                await tx.kv.set(s, "buffered", "y")
                await tx.kv.delete(s, "kept")
                raise _Rollback
        except _Rollback:
            pass
        async with db.transaction(readonly=True) as tx:
            _equal(await tx.kv.range(s), [("kept", "yes")], "after a rolled-back transaction")


async def check_typed_values(suite: _Suite) -> None:
    """Values of every kind the codec types round-trip and come back as their type."""
    cases: list[tuple[str, Any, Any]] = [
        ("int", int, -(2**60)),
        ("str", str, "ünïcödé ✓"),
        ("float", float, 0.1),
        ("bytes", bytes, bytes(range(256))),
        ("dataclass", _Point, _Point(3, -4)),
        ("model", _Model, _Model(name="m", tags=["a", "b"], nested={"p": _Point(1, 2)})),
        ("container", dict[str, list[int]], {"a": [1, 2], "b": []}),
        ("tuple", tuple[int, str], (7, "seven")),
        ("optional", int | None, None),
        ("union-c", _Celsius | _Fahrenheit, _Celsius(21.5)),
        ("union-f", _Celsius | _Fahrenheit, _Fahrenheit(21.5)),
        ("big", bytes, random.Random(1).randbytes(1024 * 1024)),
    ]
    async with suite.opened() as db:
        async with db.transaction() as tx:
            for name, tp, value in cases:
                await tx.kv.set(suite.space(f"typed-{name}", tp), "k", value)
        async with db.transaction(readonly=True) as tx:
            for name, tp, value in cases:
                got = await tx.kv.get(suite.space(f"typed-{name}", tp), "k", default="absent")
                _equal((type(got), got), (type(value), value), f"a {name} value")
        try:
            async with db.transaction() as tx:
                await tx.kv.set(suite.space("typed-int", int), "bad", "not an int")
        except TypeError:
            pass
        else:
            raise AssertionError("setting a str in an int keyspace must raise TypeError")


async def check_undecodable_values(suite: _Suite) -> None:
    """A value read under a type it does not fit raises StoreCorrupt, never a wrong value."""
    async with suite.opened() as db:
        async with db.transaction() as tx:
            await tx.kv.set(suite.space("retyped", str), "k", "not a point")
        async with db.transaction(readonly=True) as tx:
            try:
                await tx.kv.get(suite.space("retyped", _Point), "k")
            except StoreCorrupt:
                return
        raise AssertionError("reading a str under a dataclass keyspace must raise StoreCorrupt")


async def check_durable_reopen(suite: _Suite) -> None:
    """What was committed is there for a new database object after close."""
    if not suite.durable:
        raise Skip("the database is not durable (durable=False)")
    s = suite.space("durable", _Point)
    async with suite.opened() as db, db.transaction() as tx:
        await tx.kv.set(s, "p", _Point(1, 2))
    async with suite.opened() as db, db.transaction(readonly=True) as tx:
        _equal(await tx.kv.range(s), [("p", _Point(1, 2))], "after reopening")


_CHECKS: dict[str, Callable[[_Suite], Awaitable[None]]] = {
    "round_trip": check_round_trip,
    "keyspaces_are_isolated": check_keyspaces_are_isolated,
    "key_order": check_key_order,
    "bounds": check_bounds,
    "paging": check_paging,
    "read_your_writes": check_read_your_writes,
    "rollback": check_rollback,
    "typed_values": check_typed_values,
    "undecodable_values": check_undecodable_values,
    "durable_reopen": check_durable_reopen,
}

KV_CHECKS: tuple[str, ...] = tuple(_CHECKS)
"""The names of the checks, in the order :func:`check_kv` runs them."""


async def check_kv(make_database: Callable[[], Awaitable[Database]], *,
                   durable: bool = True) -> None:
    """Run every key-value conformance check against a database.

    Args:
        make_database: returns a new, not yet opened database object on the same location each
            call.
        durable: whether data survives closing the database (False skips the reopen check).

    Raises:
        AssertionError: a check failed; the message names it and what went wrong.
    """
    suite = _Suite(make_database, durable)
    await run_all(_CHECKS, "kv", suite)


class KVConformance:
    """pytest base class running the key-value checks, one test per check.

    Subclass it in a test module (its name must start with ``Test``) and provide
    ``async def make_database(self) -> Database`` returning a new, not yet opened database object
    on the same location each call; optionally set ``durable = False``. The tests are marked for
    anyio and run on every backend of the ``anyio_backend`` fixture.
    """

    pytestmark: ClassVar[list[Any]] = anyio_marks()
    durable: ClassVar[bool] = True

    async def make_database(self) -> Database:
        """A new, not yet opened database object on this test's location."""
        raise NotImplementedError(f"{type(self).__qualname__} must define make_database")

    async def _run_check(self, name: str) -> None:
        await run_as_test(_CHECKS, "kv", _Suite(self.make_database, self.durable), name)

    async def test_round_trip(self) -> None:
        await self._run_check("round_trip")

    async def test_keyspaces_are_isolated(self) -> None:
        await self._run_check("keyspaces_are_isolated")

    async def test_key_order(self) -> None:
        await self._run_check("key_order")

    async def test_bounds(self) -> None:
        await self._run_check("bounds")

    async def test_paging(self) -> None:
        await self._run_check("paging")

    async def test_read_your_writes(self) -> None:
        await self._run_check("read_your_writes")

    async def test_rollback(self) -> None:
        await self._run_check("rollback")

    async def test_typed_values(self) -> None:
        await self._run_check("typed_values")

    async def test_undecodable_values(self) -> None:
        await self._run_check("undecodable_values")

    async def test_durable_reopen(self) -> None:
        await self._run_check("durable_reopen")
