"""The store conformance suite: the checks every :class:`~fasm.persistence.Store` must pass.

One implementation, two ways in:

* :func:`check_store` runs every check against a store factory and raises ``AssertionError``
  naming the check that failed (like ``trio.testing.check_one_way_stream``);
* :class:`StoreConformance` is a pytest base class with one test per check; a subclass provides
  ``make_store`` (and optionally ``corrupt`` and ``delete_checkpoint``).

The factory returns a new, not yet opened store object on the *same location* every time it is
called (same directory, database file, DSN and schema): the suite opens two objects at once to
check that keys are exclusive between them, and reopens to check durability. Checks use keys
unique to each run, except the unicode-key check, which also uses fixed keys such as ``""`` and
starts from whatever is stored under them.

The corruption check and its hook: ``corrupt(key)`` must damage the stored bytes of one committed
record of ``key`` (flip bits in a checkpoint or a journal entry) behind the store's back, as bit
rot would. It is called with the store open, after a checkpoint at seq 1 and journal entries 2..5
were committed. Then ``load`` (on the open store, and on a fresh one when ``durable``) must either
raise :class:`~fasm.errors.StoreCorrupt`, or return exactly the committed records except that
every record whose bytes differ fails :class:`~fasm.persistence.Codec` decoding (the codec's
checksum catches it). Returning fewer records, other seqs, or different bytes that decode is
silent corruption and fails. A hook that changes nothing ``load`` returns fails too. Removing
records is not what the hook is for: a torn tail of a commit that never returned is the backend's
business, tested by its own tests.

The lost-checkpoint check and its hook: ``delete_checkpoint(key)`` must remove the stored
checkpoint of ``key`` behind the store's back, as a person or a cleanup tool would (delete its
file or row, or clear the column that holds it), and leave everything else. It is called with the
store open, once on a key holding only a checkpoint (at seq 3, as under ``Snapshot``) and once on
a key with a checkpoint at seq 1 and journal entries 2..5. Then ``load`` (on the open store, and
on a fresh one when ``durable``) must raise :class:`~fasm.errors.StoreCorrupt`: loading the key as
never committed, or as its journal without the checkpoint, is losing acknowledged data in silence.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Never

import anyio

from .._actions import ActionsContainer
from .._inputs import Input, Normal
from .._machine import StateMachine
from ..errors import StoreConflict, StoreCorrupt
from ..persistence._codec import Codec
from ..persistence._store import KeyCommit, Store, StoredRecords
from ._suite_runner import Skip, anyio_marks, run_all, run_as_test

__all__ = ("STORE_CHECKS", "StoreConformance", "check_store")

MiB = 1024 * 1024


class _Probe(StateMachine[dict[str, int], str]):
    """A machine the suite encodes records for, so that a damaged record can be decoded."""

    machine_name = "fasm.testing.store-conformance"

    async def stf(self, state: dict[str, int], input: Input[str, Never, Never],
                  actions: ActionsContainer[Never, Never, Never]) -> None:
        state["n"] = state.get("n", 0) + 1

    async def restore(self, state: dict[str, int],
                      actions: ActionsContainer[Never, Never, Never]) -> None:
        return None


@dataclass
class _Suite:
    make_store: Callable[[], Awaitable[Store]]
    durable: bool
    corrupt: Callable[[str], Awaitable[None]] | None
    big_state_bytes: int
    delete_checkpoint: Callable[[str], Awaitable[None]] | None = None
    run: str = field(default_factory=lambda: f"{random.getrandbits(48):012x}")

    def key(self, name: str) -> str:
        return f"fasm-suite-{self.run}/{name}"

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Store]:
        store = await self.make_store()
        await store.open()
        try:
            yield store
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _show(records: StoredRecords | None) -> str:
    if records is None:
        return "None"
    cp = records.checkpoint
    shown = "None" if cp is None else (
        repr(cp) if len(cp) <= 16 else f"{cp[:16]!r}... ({len(cp)} bytes)")
    return (f"StoredRecords(seq={records.seq}, checkpoint={shown}, "
            f"checkpoint_seq={records.checkpoint_seq}, "
            f"journal seqs={[s for s, _ in records.journal]})")


def _expect(got: StoredRecords | None, seq: int, checkpoint: bytes | None, checkpoint_seq: int,
            journal: Sequence[tuple[int, bytes]], what: str) -> None:
    want = StoredRecords(seq, checkpoint, checkpoint_seq, tuple(journal))
    _check(got is not None, f"{what}: load returned None, expected {_show(want)}")
    assert got is not None
    same = (got.seq == seq and got.checkpoint == checkpoint
            and got.checkpoint_seq == checkpoint_seq
            and [(s, bytes(e)) for s, e in got.journal] == list(journal))
    _check(same, f"{what}: load returned {_show(got)}, expected {_show(want)}")


async def _raises(exc: type[BaseException], call: Awaitable[Any], what: str) -> None:
    try:
        await call
    except exc:
        return
    except BaseException as e:
        raise AssertionError(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: expected {exc.__name__}, nothing was raised")


async def _seq_of(store: Store, key: str) -> int:
    got = await store.load(key)
    return 0 if got is None else got.seq


# -- the checks ------------------------------------------------------------------------------


async def check_round_trip(suite: _Suite) -> None:
    """A checkpoint and journal entries load back exactly; an unknown key loads as None."""
    async with suite.opened() as store:
        k = suite.key("round-trip")
        _check(await store.load(k) is None, "load of a key never committed must return None")
        await store.commit(k, expected_seq=0, seq=1, checkpoint=b"state@1")
        _expect(await store.load(k), 1, b"state@1", 1, (), "after a checkpoint")
        await store.commit(k, expected_seq=1, seq=4, entries=[b"e2", b"e3", b"e4"])
        _expect(await store.load(k), 4, b"state@1", 1, [(2, b"e2"), (3, b"e3"), (4, b"e4")],
                "after a checkpoint and three entries")
        k2 = suite.key("round-trip-journal-only")
        await store.commit(k2, expected_seq=0, seq=2, entries=(b"e1", b"e2"))
        _expect(await store.load(k2), 2, None, 0, [(1, b"e1"), (2, b"e2")],
                "a key with entries and no checkpoint")


async def check_sequence(suite: _Suite) -> None:
    """Sequence numbers only grow, and the journal after the checkpoint has no gaps."""
    async with suite.opened() as store:
        k = suite.key("sequence")
        steps: list[tuple[int, int, list[bytes], bytes | None]] = [
            (0, 1, [b"a"], None), (1, 3, [b"b", b"c"], None), (3, 5, [], b"ckpt@5"),
            (5, 6, [b"f"], None), (6, 10, [b"g", b"h", b"i", b"j"], None),
        ]
        last = 0
        for expected, seq, entries, checkpoint in steps:
            await store.commit(k, expected_seq=expected, seq=seq, entries=entries,
                               checkpoint=checkpoint)
            got = await store.load(k)
            _check(got is not None and got.seq == seq > last,
                   f"after commit {expected}->{seq}: load says {_show(got)}")
            assert got is not None
            seqs = [s for s, _ in got.journal]
            _check(seqs == list(range(got.checkpoint_seq + 1, seq + 1)),
                   f"after commit {expected}->{seq}: journal seqs {seqs} are not "
                   f"{got.checkpoint_seq + 1}..{seq}")
            last = seq
        _expect(await store.load(k), 10, b"ckpt@5", 5,
                [(6, b"f"), (7, b"g"), (8, b"h"), (9, b"i"), (10, b"j")], "after five commits")


async def check_stale_writer(suite: _Suite) -> None:
    """A commit whose expected_seq is not the stored seq raises StoreConflict, writes nothing."""
    async with suite.opened() as store:
        k = suite.key("stale-writer")
        await _raises(StoreConflict, store.commit(k, expected_seq=1, seq=2, entries=[b"x"]),
                      "commit with expected_seq=1 on a new key")
        _check(await store.load(k) is None, "a refused commit on a new key wrote something")
        await store.commit(k, expected_seq=0, seq=2, entries=[b"a", b"b"])
        for expected in (0, 1, 3):
            await _raises(StoreConflict, store.commit(k, expected_seq=expected, seq=expected + 1,
                                                      entries=[b"stale"]),
                          f"commit with expected_seq={expected} when the key is at 2")
            await _raises(StoreConflict, store.commit(k, expected_seq=expected, seq=7,
                                                      checkpoint=b"stale"),
                          f"checkpoint with expected_seq={expected} when the key is at 2")
        _expect(await store.load(k), 2, None, 0, [(1, b"a"), (2, b"b")],
                "after refused stale commits")
        await store.commit(k, expected_seq=2, seq=3, entries=[b"c"])
        _expect(await store.load(k), 3, None, 0, [(1, b"a"), (2, b"b"), (3, b"c")],
                "a commit with the right expected_seq after refusals")


async def check_argument_rules(suite: _Suite) -> None:
    """Malformed commits raise ValueError and write nothing."""
    async with suite.opened() as store:
        k = suite.key("argument-rules")
        await store.commit(k, expected_seq=0, seq=1, entries=[b"a"])
        bad: list[tuple[str, int, int, list[bytes], bytes | None]] = [
            ("seq equal to expected_seq", 1, 1, [], b"c"),
            ("seq below expected_seq", 1, 0, [], b"c"),
            ("negative expected_seq", -1, 1, [b"x", b"y"], None),
            ("too few entries", 1, 3, [b"x"], None),
            ("too many entries", 1, 2, [b"x", b"y"], None),
            ("neither entries nor checkpoint", 1, 2, [], None),
        ]
        for what, expected, seq, entries, checkpoint in bad:
            await _raises(ValueError, store.commit(k, expected_seq=expected, seq=seq,
                                                   entries=entries, checkpoint=checkpoint), what)
        _expect(await store.load(k), 1, None, 0, [(1, b"a")], "after malformed commits")


async def check_checkpoint_drops_entries(suite: _Suite) -> None:
    """A checkpoint at seq N replaces the old one; load returns no entry at or below N."""
    async with suite.opened() as store:
        k = suite.key("checkpoint-drops")
        await store.commit(k, expected_seq=0, seq=3, entries=[b"1", b"2", b"3"])
        await store.commit(k, expected_seq=3, seq=4, checkpoint=b"c4")
        _expect(await store.load(k), 4, b"c4", 4, (), "checkpoint after three entries")
        await store.commit(k, expected_seq=4, seq=6, entries=[b"5", b"6"])
        _expect(await store.load(k), 6, b"c4", 4, [(5, b"5"), (6, b"6")],
                "entries after the checkpoint")
        await store.commit(k, expected_seq=6, seq=8, entries=[b"7", b"8"], checkpoint=b"c8")
        _expect(await store.load(k), 8, b"c8", 8, (),
                "a checkpoint given with entries covers them")


async def check_journal(suite: _Suite) -> None:
    """Appends of all sizes replay in order; group commits and truncation by checkpoint."""
    rng = random.Random(7)
    async with suite.opened() as store:
        k = suite.key("journal")
        written: list[tuple[int, bytes]] = []
        sizes = [0, 1, 2, 100, 4096, 65536, *(rng.randrange(300) for _ in range(44))]
        for seq, size in enumerate(sizes, start=1):
            entry = rng.randbytes(size)
            await store.commit(k, expected_seq=seq - 1, seq=seq, entries=[entry])
            written.append((seq, entry))
        _expect(await store.load(k), 50, None, 0, written, "fifty single appends")
        group = [rng.randbytes(rng.randrange(200)) for _ in range(100)]
        await store.commit(k, expected_seq=50, seq=150, entries=group)
        written += list(zip(range(51, 151), group, strict=True))
        _expect(await store.load(k), 150, None, 0, written, "a group commit of 100 entries")
        await store.commit(k, expected_seq=150, seq=151, checkpoint=b"c151")
        await store.commit(k, expected_seq=151, seq=152, entries=[b"after"])
        _expect(await store.load(k), 152, b"c151", 151, [(152, b"after")],
                "journal truncated by a checkpoint")


async def check_durable_reopen(suite: _Suite) -> None:
    """What was committed is there for a new store object after close."""
    if not suite.durable:
        raise Skip("the store is not durable (durable=False)")
    k = suite.key("durable")
    async with suite.opened() as store:
        await store.acquire(k)
        await store.commit(k, expected_seq=0, seq=1, checkpoint=b"c1")
        await store.commit(k, expected_seq=1, seq=3, entries=[b"e2", b"e3"])
    async with suite.opened() as store:
        _expect(await store.load(k), 3, b"c1", 1, [(2, b"e2"), (3, b"e3")], "after reopening")
        await store.acquire(k)
        await store.commit(k, expected_seq=3, seq=4, entries=[b"e4"])
    async with suite.opened() as store:
        _expect(await store.load(k), 4, b"c1", 1, [(2, b"e2"), (3, b"e3"), (4, b"e4")],
                "after reopening twice")


async def check_identity(suite: _Suite) -> None:
    """The store's identity (part of every executor idempotency key) is there once the store is
    open, and stays the same for the same data after reopening, so a provider never sees one
    action under two keys (a new store, with new data, gets a new one: see the store tests)."""
    async with suite.opened() as store:
        first = store.identity
        _check(isinstance(first, str) and bool(first),
               f"identity after open: expected a non-empty str, got {first!r}")
    if not suite.durable:
        return
    async with suite.opened() as store:
        _check(store.identity == first,
               f"identity after reopening: {store.identity!r}, was {first!r}")


async def check_acquire(suite: _Suite) -> None:
    """Keys are exclusive between store objects; release and close give them up."""
    k, other = suite.key("acquire"), suite.key("acquire-other")
    async with suite.opened() as a, suite.opened() as b:
        await a.acquire(k)
        await a.acquire(k)  # holding it already: a no-op
        await _raises(StoreConflict, b.acquire(k), "acquire of a key another store holds")
        await b.acquire(other)  # another key is independent
        await b.release(k)  # not held by b: does nothing
        await _raises(StoreConflict, b.acquire(k), "acquire after a release by a non-holder")
        await a.release(k)
        await b.acquire(k)
        await _raises(StoreConflict, a.acquire(k), "acquire of a key released to another store")
        await _raises(StoreConflict, a.acquire(other), "acquire of the other held key")
        await b.close()
        await a.acquire(k)  # close released it
        await a.acquire(other)


async def _refused(exc: type[BaseException], call: Awaitable[Any], what: str,
                   key: str | None = None) -> None:
    """Like _raises; with ``key``, the error must name it (``error.key``)."""
    try:
        await call
    except exc as e:
        if key is not None:
            _check(getattr(e, "key", None) == key,
                   f"{what}: the error names key {getattr(e, 'key', None)!r}, not {key!r}")
        return
    except BaseException as e:
        raise AssertionError(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: expected {exc.__name__}, nothing was raised")


async def check_commit_many(suite: _Suite) -> None:
    """commit_many writes every part or, refused (stale key, repeated key, bad part, key not
    held), nothing; it survives reopening."""
    k1, k2, k3 = (suite.key(f"many-{i}") for i in range(3))
    async with suite.opened() as store:
        for k in (k1, k2, k3):
            await store.acquire(k)
        await store.commit_many([])  # nothing to do
        await store.commit(k3, expected_seq=0, seq=1, entries=[b"c1"])
        await store.commit_many([
            KeyCommit(k1, 0, 2, [b"a1", b"a2"]),
            KeyCommit(k2, 0, 3, checkpoint=b"b@3"),
            KeyCommit(k3, 1, 2, [b"c2"]),
        ])
        want = {k1: (2, None, 0, [(1, b"a1"), (2, b"a2")]), k2: (3, b"b@3", 3, []),
                k3: (2, None, 0, [(1, b"c1"), (2, b"c2")])}

        async def same(what: str, s: Store) -> None:
            for k, (seq, cp, cps, journal) in want.items():
                _expect(await s.load(k), seq, cp, cps, journal, f"{what}: {k}")

        await same("after a commit_many of three keys", store)
        await _refused(StoreConflict, store.commit_many([
            KeyCommit(k1, 2, 3, [b"a3"]), KeyCommit(k2, 2, 4, checkpoint=b"stale"),
            KeyCommit(k3, 2, 3, [b"c3"])]), "commit_many with one stale key", key=k2)
        await same("after a commit_many refused for one stale key", store)
        await _raises(ValueError, store.commit_many([
            KeyCommit(k1, 2, 3, [b"a3"]), KeyCommit(k1, 3, 4, [b"a4"])]),
            "commit_many naming a key twice")
        await _raises(ValueError, store.commit_many([
            KeyCommit(k1, 2, 3, [b"a3"]), KeyCommit(k3, 2, 2, checkpoint=b"x")]),
            "commit_many with a part whose seq does not grow")
        await same("after refused malformed commit_many calls", store)
        free = suite.key("many-not-held")
        await _refused(StoreConflict, store.commit_many([
            KeyCommit(k1, 2, 3, [b"a3"]), KeyCommit(free, 0, 1, [b"f1"])]),
            "commit_many with a key this store object does not hold", key=free)
        await same("after a commit_many refused for a key not held", store)
        _check(await store.load(free) is None, "a refused commit_many wrote its unheld key")
        async with suite.opened() as other:
            await _refused(StoreConflict, other.commit_many([KeyCommit(k1, 2, 3, [b"x"])]),
                           "commit_many on a key another store object holds", key=k1)
        await same("after another store's refused commit_many", store)
    if suite.durable:
        async with suite.opened() as store:
            await same("after reopening", store)


async def check_in_flight(suite: _Suite) -> None:
    """The in-flight mark: set and cleared with commits (None leaves it), loaded with the key,
    listed by keys_in_flight, untouched by refused commits, kept across reopening."""
    a, b, c = (suite.key(f"in-flight-{i}") for i in range(3))

    async def marked(store: Store) -> list[str]:
        return [k for k in await store.keys_in_flight() if k.startswith(suite.key(""))]

    async def flags(store: Store, what: str, want: dict[str, bool]) -> None:
        for k, flag in want.items():
            got = await store.load(k)
            _check(got is not None and got.in_flight is flag,
                   f"{what}: load({k!r}).in_flight is "
                   f"{None if got is None else got.in_flight}, expected {flag}")
        listed = await marked(store)
        expected = sorted(k for k, flag in want.items() if flag)
        _check(listed == expected, f"{what}: keys_in_flight lists {listed}, expected {expected}")

    async with suite.opened() as store:
        for k in (a, b, c):
            await store.acquire(k)
        await store.commit(a, expected_seq=0, seq=1, entries=[b"a1"])
        await flags(store, "a key committed without a mark", {a: False})
        await store.commit(a, expected_seq=1, seq=2, entries=[b"a2"], in_flight=True)
        await flags(store, "after in_flight=True", {a: True})
        await store.commit(a, expected_seq=2, seq=3, entries=[b"a3"])
        await flags(store, "after a commit with in_flight=None", {a: True})
        await store.commit(a, expected_seq=3, seq=4, checkpoint=b"a@4", in_flight=False)
        await flags(store, "after a checkpoint with in_flight=False", {a: False})
        await store.commit_many([KeyCommit(a, 4, 5, [b"a5"], in_flight=True),
                                 KeyCommit(b, 0, 1, checkpoint=b"b@1", in_flight=True),
                                 KeyCommit(c, 0, 1, [b"c1"])])
        await flags(store, "after commit_many marking two keys", {a: True, b: True, c: False})
        await _refused(StoreConflict, store.commit_many([
            KeyCommit(a, 5, 6, [b"a6"], in_flight=False),
            KeyCommit(c, 0, 1, [b"stale"], in_flight=True)]),
            "commit_many with a stale key", key=c)
        await _refused(StoreConflict, store.commit(b, expected_seq=0, seq=1, entries=[b"x"],
                                                   in_flight=False), "a stale commit")
        await flags(store, "after refused commits", {a: True, b: True, c: False})
        await store.commit_many([KeyCommit(a, 5, 6, [b"a6"], in_flight=False),
                                 KeyCommit(c, 1, 2, [b"c2"], in_flight=True)])
        await flags(store, "after commit_many clearing one and marking another",
                    {a: False, b: True, c: True})
    if suite.durable:
        async with suite.opened() as store:
            await flags(store, "after reopening", {a: False, b: True, c: True})


async def check_load_many(suite: _Suite) -> None:
    """load_many returns, for each key asked for, exactly what load returns: a key with a
    journal, one with a checkpoint and a journal after it, one never committed (None), and
    nothing for an empty list."""
    a, b, never = (suite.key(f"load-many-{i}") for i in range(3))
    async with suite.opened() as store:
        await store.acquire_all()
        await store.commit(a, expected_seq=0, seq=2, entries=[b"a1", b"a2"], in_flight=True)
        await store.commit(b, expected_seq=0, seq=1, checkpoint=b"b@1")
        await store.commit(b, expected_seq=1, seq=2, entries=[b"b2"])
        got = await store.load_many([a, b, never])
        _check(set(got) == {a, b, never}, f"load_many returned keys {sorted(got)}, "
                                          f"expected {sorted([a, b, never])}")
        for k in (a, b, never):
            one = await store.load(k)
            _check(got[k] == one, f"load_many()[{k!r}] is {got[k]!r}, load({k!r}) is {one!r}")
        _check(await store.load_many([]) == {}, "load_many([]) is not empty")


async def check_in_flight_many_keys(suite: _Suite) -> None:
    """keys_in_flight finds exactly the marked keys among many, committed in groups."""
    keys = [suite.key(f"busy-{i:04d}") for i in range(600)]
    async with suite.opened() as store:
        await store.acquire_all()
        for start in range(0, len(keys), 100):
            await store.commit_many([KeyCommit(k, 0, 1, [b"e"], in_flight=(i % 20 == 0))
                                     for i, k in enumerate(keys[start:start + 100], start)])
        await store.commit_many([KeyCommit(keys[0], 1, 2, [b"f"], in_flight=False),
                                 KeyCommit(keys[1], 1, 2, [b"f"], in_flight=True)])
        want = sorted([keys[1], *(k for i, k in enumerate(keys) if i % 20 == 0 and i)])
        got = [k for k in await store.keys_in_flight() if k.startswith(suite.key("busy-"))]
        _check(got == want, f"keys_in_flight found {len(got)} of {len(keys)} keys "
                            f"({got[:3]}...), expected the {len(want)} marked ({want[:3]}...)")


async def check_acquire_all(suite: _Suite) -> None:
    """acquire_all conflicts both ways with another object's acquire; it lets commit_many
    write keys never acquired one by one; release_all and close give it up."""
    k, other = suite.key("all-1"), suite.key("all-2")
    async with suite.opened() as a, suite.opened() as b:
        await a.acquire_all()
        await a.acquire_all()  # holding it already: a no-op
        await _raises(StoreConflict, b.acquire(k), "acquire while another store holds all")
        await _raises(StoreConflict, b.acquire_all(), "acquire_all while another store holds it")
        await a.commit_many([KeyCommit(k, 0, 1, [b"k1"]), KeyCommit(other, 0, 1, [b"o1"])])
        _expect(await a.load(k), 1, None, 0, [(1, b"k1")], "commit_many under acquire_all")
        await b.release_all()  # not held by b: does nothing
        await _raises(StoreConflict, b.acquire(k), "acquire after a release_all by a non-holder")
        await a.release_all()
        await b.acquire(k)
        await _raises(StoreConflict, a.acquire_all(),
                      "acquire_all while another store holds a key")
        await a.acquire(other)  # another key is independent
        await b.release(k)
        await _raises(StoreConflict, b.acquire_all(),
                      "acquire_all while another store holds a key (the other way)")
        await a.release(other)
        await b.acquire_all()
        await _raises(StoreConflict, a.acquire(other), "acquire after the store changed hands")
        await b.close()
        await a.acquire_all()  # close released it
        await a.release_all()
        await a.acquire(k)


async def check_corruption(suite: _Suite) -> None:
    """A record damaged behind the store's back is never loaded as valid data."""
    if suite.corrupt is None:
        raise Skip("no corrupt hook given")
    codec = Codec(_Probe)
    k = suite.key("corruption")
    checkpoint = codec.encode_checkpoint(1, {"n": 1}, {})
    entries = [(s, codec.encode_entry(s, Normal(f"input {s}"), None)) for s in range(2, 6)]
    async with suite.opened() as store:
        await store.commit(k, expected_seq=0, seq=1, checkpoint=checkpoint)
        await store.commit(k, expected_seq=1, seq=3, entries=[e for _, e in entries[:2]])
        await store.commit(k, expected_seq=3, seq=5, entries=[e for _, e in entries[2:]])
        await suite.corrupt(k)
        await _judge_corruption(store, k, codec, checkpoint, entries, "load on the open store")
    if suite.durable:
        async with suite.opened() as store:
            await _judge_corruption(store, k, codec, checkpoint, entries,
                                    "load on a reopened store")


async def _judge_corruption(store: Store, key: str, codec: Codec, checkpoint: bytes,
                            entries: list[tuple[int, bytes]], what: str) -> None:
    try:
        got = await store.load(key)
    except StoreCorrupt:
        return
    _check(got is not None and got.seq == 5 and got.checkpoint_seq == 1
           and got.checkpoint is not None and [s for s, _ in got.journal] == [2, 3, 4, 5],
           f"{what}: after corrupt() load neither raised StoreCorrupt nor returned the "
           f"committed records (damaged or not): {_show(got)}")
    assert got is not None and got.checkpoint is not None
    changed = 0
    if got.checkpoint != checkpoint:
        changed += 1
        await _raises(StoreCorrupt, _decode(codec.decode_checkpoint, got.checkpoint, 1),
                      f"{what}: the damaged checkpoint load returned must fail decoding")
    for (seq, entry), (_, original) in zip(got.journal, entries, strict=True):
        if bytes(entry) != original:
            changed += 1
            await _raises(StoreCorrupt, _decode(codec.decode_entry, bytes(entry), seq),
                          f"{what}: the damaged entry {seq} load returned must fail decoding")
    _check(changed > 0, f"{what}: load returned every record as committed: the corrupt hook "
                        "must damage a committed record's stored bytes")


async def _decode(decode: Callable[[bytes, int], object], data: bytes, seq: int) -> None:
    decode(data, seq)


async def check_lost_checkpoint(suite: _Suite) -> None:
    """A checkpoint deleted behind the store's back is refused, never loaded as less data."""
    if suite.delete_checkpoint is None:
        raise Skip("no delete_checkpoint hook given")
    only, journal = suite.key("lost-checkpoint-only"), suite.key("lost-checkpoint-journal")
    async with suite.opened() as store:
        await store.commit(only, expected_seq=0, seq=1, checkpoint=b"state@1")
        await store.commit(only, expected_seq=1, seq=3, checkpoint=b"state@3")
        await store.commit(journal, expected_seq=0, seq=1, checkpoint=b"state@1")
        await store.commit(journal, expected_seq=1, seq=5, entries=[b"e2", b"e3", b"e4", b"e5"])
        for k in (only, journal):
            await suite.delete_checkpoint(k)
        for k, what in ((only, "a key holding only a checkpoint"),
                        (journal, "a key with a checkpoint and a journal")):
            await _raises(StoreCorrupt, store.load(k),
                          f"load of {what} whose checkpoint was deleted, on the open store")
    if suite.durable:
        async with suite.opened() as store:
            for k, what in ((only, "a key holding only a checkpoint"),
                            (journal, "a key with a checkpoint and a journal")):
                await _raises(StoreCorrupt, store.load(k),
                              f"load of {what} whose checkpoint was deleted, after reopening")


async def check_big_checkpoint(suite: _Suite) -> None:
    """A large checkpoint (50 MiB of random bytes by default) round-trips, and shrinks again."""
    data = random.Random(0x5EED).randbytes(suite.big_state_bytes)
    k = suite.key("big-checkpoint")
    async with suite.opened() as store:
        await store.commit(k, expected_seq=0, seq=1, checkpoint=data)
        _expect(await store.load(k), 1, data, 1, (), f"a {len(data)}-byte checkpoint")
        await store.commit(k, expected_seq=1, seq=2, entries=[b"after"])
    if suite.durable:
        async with suite.opened() as store:
            _expect(await store.load(k), 2, data, 1, [(2, b"after")],
                    f"a {len(data)}-byte checkpoint after reopening")
    async with suite.opened() as store:
        await store.commit(k, expected_seq=2, seq=3, checkpoint=b"small")
        _expect(await store.load(k), 3, b"small", 3, (), "a small checkpoint replacing a big one")


async def check_many_keys(suite: _Suite) -> None:
    """1,000 keys, committed and loaded concurrently, keep their own records."""
    keys = [suite.key(f"many/{i}") for i in range(1000)]
    limiter = anyio.CapacityLimiter(16)

    async def commit(store: Store, i: int) -> None:
        async with limiter:
            await store.commit(keys[i], expected_seq=0, seq=1, entries=[f"key {i}".encode()])

    loaded: dict[int, StoredRecords | None] = {}

    async def load(store: Store, i: int) -> None:
        async with limiter:
            loaded[i] = await store.load(keys[i])

    async with suite.opened() as store:
        async with anyio.create_task_group() as tg:
            for i in range(len(keys)):
                tg.start_soon(commit, store, i)
        async with anyio.create_task_group() as tg:
            for i in range(len(keys)):
                tg.start_soon(load, store, i)
        for i in range(len(keys)):
            _expect(loaded[i], 1, None, 0, [(1, f"key {i}".encode())], f"key {keys[i]!r}")
        _check(await store.load(suite.key("many/1000")) is None,
               "a key next to 1,000 committed ones must load as None")


async def check_unicode_keys(suite: _Suite) -> None:
    """Keys are any string: unicode, '/', '', '..', and case-distinct keys never alias."""
    odd = ["ключ/🔑", "", " ", "a/b", "../escape", "..", ".", "CaseKey", "casekey",
           "line\nbreak", "tab\tkey", "back\\slash", "%2F", "k-6162", "日本語のキー", "x" * 300]
    keys = odd + [suite.key(name) for name in odd]
    async with suite.opened() as store:
        for i, key in enumerate(keys):
            seq = await _seq_of(store, key)
            await store.commit(key, expected_seq=seq, seq=seq + 1,
                               checkpoint=f"{suite.run}:{i}".encode())
        for i, key in enumerate(keys):
            got = await store.load(key)
            _check(got is not None and got.checkpoint == f"{suite.run}:{i}".encode(),
                   f"key {key!r}: load returned {_show(got)}, not its own checkpoint")
        await store.acquire("ключ/🔑")
        await store.acquire("")
        await store.release("ключ/🔑")
        await store.release("")


async def check_keys(suite: _Suite) -> None:
    """``keys`` lists exactly the committed keys, sorted by code point, a page at a time: keys
    of every shape (unicode, long ones a backend may hash), never a key only acquired."""
    prefix = suite.key("list/")
    names = ["b", "a", "ключ", "日本", "Z", "a/b", "", "x" * 300, "é", "\U0001f511"]
    keys = [prefix + n for n in names]
    async with suite.opened() as store:
        await _raises(ValueError, store.keys(limit=0), "keys(limit=0)")
        for i, key in enumerate(keys):
            if i % 2:
                await store.commit(key, expected_seq=0, seq=1, checkpoint=b"c")
            else:
                await store.commit(key, expected_seq=0, seq=2, entries=[b"e1", b"e2"])
        await store.acquire(prefix + "only-acquired")
        want = sorted(keys)
        for reopen in (False, True):
            if reopen and not suite.durable:
                break
            if reopen:
                await store.close()
                store = await suite.make_store()
                await store.open()
            listed: list[str] = []
            after = prefix[:-1]  # just before every key under the prefix, "" included
            while True:
                page = await store.keys(after=after, limit=3)
                _check(page == sorted(page) and all(k > after for k in page),
                       f"keys(after={after!r}, limit=3) returned {page!r}: not sorted after it")
                _check(len(page) <= 3, f"keys(limit=3) returned {len(page)} keys")
                mine = [k for k in page if k.startswith(prefix)]
                listed += mine
                if len(page) < 3 or any(k > prefix and not k.startswith(prefix) for k in page):
                    break
                after = page[-1]
            _check(listed == want, f"keys listed {listed!r} under the suite's prefix, expected "
                   f"{want!r}{' after a reopen' if reopen else ''}")
        everything = await store.keys(limit=10**9)
        _check(set(want) <= set(everything) and everything == sorted(everything),
               "keys() without after must list every committed key, sorted")
        await store.close()


async def check_history(suite: _Suite) -> None:
    """A checkpoint with ``keep_journal`` keeps the entries it covers for ``history`` (``load``
    still returns only what follows it); one without drops them all."""
    key = suite.key("history")
    e = [f"entry {i}".encode() for i in range(8)]
    async with suite.opened() as store:
        _check(await store.history(key) == (), "history of a key never committed must be ()")
        await _raises(ValueError, store.commit(key, expected_seq=0, seq=1, checkpoint=b"c",
                                               keep_journal=True),
                      "keep_journal without the commit's entries")
        await store.commit(key, expected_seq=0, seq=2, entries=e[1:3])
        await store.commit(key, expected_seq=2, seq=3, entries=e[3:4], checkpoint=b"cp3",
                           keep_journal=True)
        await store.commit(key, expected_seq=3, seq=5, entries=e[4:6])
    for reopen in (False, True):
        if reopen and not suite.durable:
            break
        async with suite.opened() as store:
            _expect(await store.load(key), 5, b"cp3", 3, [(4, e[4]), (5, e[5])],
                    "load after a checkpoint that kept its journal")
            got = [(s, bytes(d)) for s, d in await store.history(key)]
            _check(got == [(i, e[i]) for i in range(1, 6)],
                   f"history returned seqs {[s for s, _ in got]}, expected 1..5")
    async with suite.opened() as store:
        await store.acquire(key)  # the second kept checkpoint goes through a group commit
        await store.commit_many([KeyCommit(key, 5, 6, e[6:7], b"cp6", in_flight=True,
                                           keep_journal=True)])
        seqs = [s for s, _ in await store.history(key)]
        _check(seqs == [1, 2, 3, 4, 5, 6],
               f"history after a kept checkpoint in commit_many: {seqs}")
        got6 = await store.load(key)
        _check(got6 is not None and got6.in_flight and got6.checkpoint == b"cp6",
               "commit_many with keep_journal must set the checkpoint and the mark")
        await store.commit(key, expected_seq=6, seq=7, checkpoint=b"cp7")
        _expect(await store.load(key), 7, b"cp7", 7, [], "load after a checkpoint")
        seqs = [s for s, _ in await store.history(key)]
        _check(seqs == [], f"a checkpoint without keep_journal must drop the history, got {seqs}")


async def check_history_base(suite: _Suite) -> None:
    """A kept checkpoint with ``history_base`` stores that older checkpoint and drops the
    kept entries up to it (``history`` starts right after it), in ``commit`` and in
    ``commit_many``; a checkpoint without ``keep_journal`` drops the base with the history."""
    key = suite.key("history-base")
    e = [f"entry {i}".encode() for i in range(9)]

    async def seen(store: Store) -> tuple[list[int], tuple[int, bytes] | None]:
        base = await store.history_base(key)
        return ([s for s, _ in await store.history(key)],
                None if base is None else (base[0], bytes(base[1])))

    async with suite.opened() as store:
        _check(await store.history_base(key) is None,
               "history_base of a key never committed must be None")
        await store.commit(key, expected_seq=0, seq=2, entries=e[1:3], checkpoint=b"cp2",
                           keep_journal=True)
        await store.commit(key, expected_seq=2, seq=4, entries=e[3:5], checkpoint=b"cp4",
                           keep_journal=True)
        _check(await seen(store) == ([1, 2, 3, 4], None), "no base before one is given")
        await _raises(ValueError, store.commit(key, expected_seq=4, seq=6, entries=e[5:7],
                                               checkpoint=b"cp6", history_base=(2, b"cp2")),
                      "history_base without keep_journal")
        await _raises(ValueError, store.commit(key, expected_seq=4, seq=6, entries=e[5:7],
                                               checkpoint=b"cp6", keep_journal=True,
                                               history_base=(5, b"cp5")),
                      "a history_base after expected_seq")
        _check(await _seq_of(store, key) == 4, "a refused history_base must write nothing")
        await store.commit(key, expected_seq=4, seq=6, entries=e[5:7], checkpoint=b"cp6",
                           keep_journal=True, history_base=(2, b"cp2"))
    for reopen in (False, True):
        if reopen and not suite.durable:
            break
        async with suite.opened() as store:
            got = await seen(store)
            _check(got == ([3, 4, 5, 6], (2, b"cp2")),
                   f"after a commit with history_base (2): history and base {got}")
            _expect(await store.load(key), 6, b"cp6", 6, [], "load after a history_base")
    async with suite.opened() as store:
        await store.acquire(key)
        await store.commit_many([KeyCommit(key, 6, 8, e[7:9], b"cp8", in_flight=True,
                                           keep_journal=True, history_base=(4, b"cp4"))])
        got = await seen(store)
        _check(got == ([5, 6, 7, 8], (4, b"cp4")),
               f"after commit_many with history_base (4): history and base {got}")
        await store.commit(key, expected_seq=8, seq=9, checkpoint=b"cp9")
        got = await seen(store)
        _check(got == ([], None),
               f"a checkpoint without keep_journal must drop history and base, got {got}")


async def check_tiny_state(suite: _Suite) -> None:
    """A one-byte and an empty checkpoint, and an empty entry, are kept as given."""
    async with suite.opened() as store:
        for name, checkpoint in (("one-byte", b"\x00"), ("empty", b"")):
            k = suite.key(f"tiny-{name}")
            await store.commit(k, expected_seq=0, seq=1, checkpoint=checkpoint)
            _expect(await store.load(k), 1, checkpoint, 1, (), f"a {name} checkpoint")
        k = suite.key("tiny-entry")
        await store.commit(k, expected_seq=0, seq=1, entries=[b""])
        _expect(await store.load(k), 1, None, 0, [(1, b"")], "an empty journal entry")


async def check_close_twice(suite: _Suite) -> None:
    """close() twice is safe, also while holding a key."""
    store = await suite.make_store()
    await store.open()
    k = suite.key("close-twice")
    try:
        await store.acquire(k)
        await store.commit(k, expected_seq=0, seq=1, entries=[b"a"])
    finally:
        await store.close()
    await store.close()
    async with suite.opened() as other:
        await other.acquire(k)  # the first store's close released it


_CHECKS: dict[str, Callable[[_Suite], Awaitable[None]]] = {
    "round_trip": check_round_trip,
    "sequence": check_sequence,
    "stale_writer": check_stale_writer,
    "argument_rules": check_argument_rules,
    "checkpoint_drops_entries": check_checkpoint_drops_entries,
    "journal": check_journal,
    "durable_reopen": check_durable_reopen,
    "identity": check_identity,
    "acquire": check_acquire,
    "commit_many": check_commit_many,
    "in_flight": check_in_flight,
    "load_many": check_load_many,
    "in_flight_many_keys": check_in_flight_many_keys,
    "acquire_all": check_acquire_all,
    "corruption": check_corruption,
    "lost_checkpoint": check_lost_checkpoint,
    "big_checkpoint": check_big_checkpoint,
    "many_keys": check_many_keys,
    "unicode_keys": check_unicode_keys,
    "keys": check_keys,
    "history": check_history,
    "history_base": check_history_base,
    "tiny_state": check_tiny_state,
    "close_twice": check_close_twice,
}

STORE_CHECKS: tuple[str, ...] = tuple(_CHECKS)
"""The names of the checks, in the order :func:`check_store` runs them."""


async def check_store(
    make_store: Callable[[], Awaitable[Store]],
    *,
    durable: bool = True,
    corrupt: Callable[[str], Awaitable[None]] | None = None,
    big_state_bytes: int = 50 * MiB,
    delete_checkpoint: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Run every conformance check against a store.

    Args:
        make_store: returns a new, not yet opened store object on the same location each call.
        durable: whether data survives closing the store (False skips the reopen checks).
        corrupt: damages one committed record of a key behind the store's back (see the module
            documentation for what it must do); without it the corruption check is skipped.
        big_state_bytes: the size of the large-checkpoint check.
        delete_checkpoint: removes the stored checkpoint of a key behind the store's back (see
            the module documentation); without it the lost-checkpoint check is skipped.

    Raises:
        AssertionError: a check failed; the message names it and what went wrong.
    """
    suite = _Suite(make_store, durable, corrupt, big_state_bytes, delete_checkpoint)
    await run_all(_CHECKS, "store", suite)


class StoreConformance:
    """pytest base class running the conformance checks, one test per check.

    Subclass it in a test module (its name must start with ``Test``) and provide
    ``async def make_store(self) -> Store`` returning a new, not yet opened store object on the
    same location each call; per-test locations come from fixtures, e.g. an autouse fixture that
    stores ``tmp_path`` on ``self``. Optionally define ``async def corrupt(self, key: str)`` and
    ``async def delete_checkpoint(self, key: str)``, and set ``durable = False`` or a smaller
    ``big_state_bytes``. The tests are marked for anyio and
    run on every backend of the ``anyio_backend`` fixture.
    """

    pytestmark: ClassVar[list[Any]] = anyio_marks()
    durable: ClassVar[bool] = True
    big_state_bytes: ClassVar[int] = 50 * MiB
    corrupt: Callable[[str], Awaitable[None]] | None = None
    delete_checkpoint: Callable[[str], Awaitable[None]] | None = None

    async def make_store(self) -> Store:
        """A new, not yet opened store object on this test's location."""
        raise NotImplementedError(f"{type(self).__qualname__} must define make_store")

    async def _run_check(self, name: str) -> None:
        suite = _Suite(self.make_store, self.durable, self.corrupt, self.big_state_bytes,
                       self.delete_checkpoint)
        await run_as_test(_CHECKS, "store", suite, name)

    async def test_round_trip(self) -> None:
        await self._run_check("round_trip")

    async def test_sequence(self) -> None:
        await self._run_check("sequence")

    async def test_stale_writer(self) -> None:
        await self._run_check("stale_writer")

    async def test_argument_rules(self) -> None:
        await self._run_check("argument_rules")

    async def test_checkpoint_drops_entries(self) -> None:
        await self._run_check("checkpoint_drops_entries")

    async def test_journal(self) -> None:
        await self._run_check("journal")

    async def test_durable_reopen(self) -> None:
        await self._run_check("durable_reopen")

    async def test_identity(self) -> None:
        await self._run_check("identity")

    async def test_acquire(self) -> None:
        await self._run_check("acquire")

    async def test_commit_many(self) -> None:
        await self._run_check("commit_many")

    async def test_in_flight(self) -> None:
        await self._run_check("in_flight")

    async def test_load_many(self) -> None:
        await self._run_check("load_many")

    async def test_in_flight_many_keys(self) -> None:
        await self._run_check("in_flight_many_keys")

    async def test_acquire_all(self) -> None:
        await self._run_check("acquire_all")

    async def test_corruption(self) -> None:
        await self._run_check("corruption")

    async def test_lost_checkpoint(self) -> None:
        await self._run_check("lost_checkpoint")

    async def test_big_checkpoint(self) -> None:
        await self._run_check("big_checkpoint")

    async def test_many_keys(self) -> None:
        await self._run_check("many_keys")

    async def test_unicode_keys(self) -> None:
        await self._run_check("unicode_keys")

    async def test_keys(self) -> None:
        await self._run_check("keys")

    async def test_history(self) -> None:
        await self._run_check("history")

    async def test_history_base(self) -> None:
        await self._run_check("history_base")

    async def test_tiny_state(self) -> None:
        await self._run_check("tiny_state")

    async def test_close_twice(self) -> None:
        await self._run_check("close_twice")
