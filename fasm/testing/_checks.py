"""The simulation's checks and the tools they share.

The checks compare states by their *plain data* (pydantic's python-mode dump of the declared state
type): two states are equal when everything the store would keep of them is equal, whatever their
Python identity, and sets compare as sets. A copy "as a restarted process would load it" goes
through the machine's own codec, and its sets are rebuilt with another iteration order, so a
transition that depends on set order (which changes between processes with ``PYTHONHASHSEED``)
shows up as nondeterminism inside one process.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import pydantic

from ..persistence._codec import Codec, Unencodable
from ..persistence._locate import unencodable_path

__all__ = (
    "Invariant",
    "StateTools",
    "Violation",
    "check_invariants",
    "diff",
    "name_of",
    "run_sync",
    "short",
)

T = TypeVar("T")

Invariant = Callable[[Any], object]
"""A function of state that raises, or returns ``False`` or a message, when the state is wrong;
``None`` and ``True`` mean it holds."""


class Violation(Exception):
    """A check failed. Raised inside a simulated run and turned into a :class:`Failure`."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


class SuspendedError(RuntimeError):
    """A coroutine the simulator drives synchronously tried to suspend."""


def run_sync(coro: Coroutine[Any, Any, T], what: str) -> T:
    """Run a coroutine that never suspends (an stf or restore over in-memory state, a
    MemoryStore call) to its end, synchronously.

    The simulator runs many thousands of transitions per second this way, without an event loop,
    and stays deterministic: no scheduler decides anything.

    Raises:
        SuspendedError: the coroutine awaited something that suspends (real I/O, a sleep); the
            simulator cannot drive it. Whatever the coroutine itself raises propagates.
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise SuspendedError(
        f"{what} suspended (it awaited real I/O or a sleep): the simulator drives stf, restore "
        "and the store synchronously, so they must not wait on anything outside the state"
    )


def check_invariants(invariants: Sequence[Invariant], state: Any) -> None:
    """Run the user's invariants on ``state``.

    Raises:
        Violation: one raised, returned ``False``, or returned a message.
    """
    for inv in invariants:
        try:
            verdict = inv(state)
        except Exception as e:
            raise Violation("invariant", f"{name_of(inv)} raised {e!r}") from e
        if verdict is None or verdict is True:
            continue
        if verdict is False:
            raise Violation("invariant", f"{name_of(inv)} returned False")
        raise Violation("invariant", f"{name_of(inv)}: {verdict}")


def name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class StateTools:
    """Plain-data views and process-like copies of a machine's state."""

    def __init__(self, codec: Codec, state_type: Any) -> None:
        self.codec = codec
        self.adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(state_type)
        self.has_sets = _schema_has_sets(self.adapter.core_schema)

    def plain(self, state: Any) -> Any:
        """What the state is, as data: equal plain data means equal states."""
        return self.adapter.dump_python(state)

    def encode(self, state: Any, after: str = "the simulation holds") -> bytes:
        """The state as a checkpoint record (what a commit would store).

        Raises:
            Violation: it cannot be encoded (check ``encodable``); the message names the field
                and says ``after`` what.
        """
        try:
            return self.codec.encode_checkpoint(0, state, {})
        except Unencodable as e:
            raise Violation("encodable", unencodable_message(e, state, after)) from e

    def check_encodable(self, state: Any, after: str) -> None:
        """That ``state`` encodes as a checkpoint (see :meth:`encode`, which raises)."""
        self.encode(state, after)

    def loaded(self, record: bytes) -> Any:
        """The state a new process would load from ``record``, with every set's iteration order
        changed where it can be (see the module docstring)."""
        state = self.codec.decode_checkpoint(record).state
        return perturb_sets(state) if self.has_sets else state


def unencodable_message(error: Unencodable, state: Any, after: str) -> str:
    """Why a state cannot be stored, naming the field (found by a walk when the codec gives no
    path) and what the Runtime would do about it."""
    path = error.path or unencodable_path(state)
    where = f" at {path}" if path else ""
    return (f"the state {after} cannot be encoded{where}: {error.reason}. The Runtime would "
            "skip checkpoints under Journal (the journal grows until the state encodes again) "
            "and refuse the input under Snapshot: keep only values the declared state type can "
            "write in the state")


def _schema_has_sets(schema: Any) -> bool:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") in ("set", "frozenset"):
                return True
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


_ATOMS = (int, float, str, bytes, bool, type(None))
_PAD_BASE = 1 << 40


def perturb_sets(obj: Any, _depth: int = 0) -> Any:
    """Rebuild every mutable ``set`` reachable through dicts, lists, tuples, dataclasses and
    pydantic models in ``obj`` (which must be a fresh copy: it is changed in place) so that it
    iterates in another order. Returns ``obj`` or its replacement.

    Frozensets and other classes are left alone: their order cannot be changed from outside.
    """
    if isinstance(obj, (*_ATOMS, enum.Enum)) or _depth > 100:
        return obj
    d = _depth + 1
    if type(obj) is set:
        return _reordered(obj)
    if isinstance(obj, dict):
        for key, value in obj.items():
            new = perturb_sets(value, d)
            if new is not value:
                obj[key] = new
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            new = perturb_sets(value, d)
            if new is not value:
                obj[i] = new
    elif isinstance(obj, tuple):
        items = [perturb_sets(v, d) for v in obj]
        if any(n is not o for n, o in zip(items, obj, strict=True)):
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            new = perturb_sets(value, d)
            if new is not value:
                object.__setattr__(obj, f.name, new)
    elif isinstance(obj, pydantic.BaseModel):
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            new = perturb_sets(value, d)
            if new is not value:
                object.__setattr__(obj, name, new)
    return obj


def _reordered(s: set[Any]) -> set[Any]:
    """An equal set that iterates in another order, if one can be made.

    A set's order follows its elements' hashes modulo its table size, and the table size follows
    its history: so the same elements in a set whose table once grew larger iterate differently.
    Another process (another ``PYTHONHASHSEED``) changes the order for strings too; this is the
    in-process stand-in.
    """
    if len(s) < 2:
        return s
    original = list(s)
    for pad in (8, 32, 128, 512):
        # Integers hash to themselves, so the padding (and the order it leaves) is the same in
        # every run; padding equal to an element is skipped so that no element is removed.
        padding = [p for p in range(_PAD_BASE, _PAD_BASE + pad * len(s)) if p not in s]
        t: set[Any] = set(padding)
        t.update(original)
        t.difference_update(padding)
        if list(t) != original:
            return t
    return s


def diff(before: Any, after: Any, *, path: str = "state", limit: int = 6) -> list[str]:
    """Where two plain-data values differ, as ``path: before -> after`` lines (at most
    ``limit``)."""
    out: list[str] = []
    _diff(before, after, path, out, limit)
    return out


def _diff(a: Any, b: Any, path: str, out: list[str], limit: int) -> None:
    if len(out) >= limit or a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            p = f"{path}[{key!r}]"
            if key not in b:
                out.append(f"{p}: {short(a[key])} -> (absent)")
            elif key not in a:
                out.append(f"{p}: (absent) -> {short(b[key])}")
            else:
                _diff(a[key], b[key], p, out, limit)
            if len(out) >= limit:
                return
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out, limit)
    elif isinstance(a, set | frozenset) and isinstance(b, set | frozenset):
        gone = sorted(map(repr, a - b))
        new = sorted(map(repr, b - a))
        out.append(f"{path}: removed {{{', '.join(gone)}}}, added {{{', '.join(new)}}}")
    else:
        out.append(f"{path}: {short(a)} -> {short(b)}")


_FROZEN_ATOMS: set[type] = {
    int, float, str, bytes, bool, type(None), complex, range, datetime.datetime, datetime.date,
    datetime.time, datetime.timedelta, datetime.timezone, decimal.Decimal, uuid.UUID,
    fractions.Fraction}
# Per type: the names of the fields to look into (a frozen dataclass or model), or None when
# an instance can be changed in place.
_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _frozen_fields(tp: type) -> tuple[str, ...] | None:
    if dataclasses.is_dataclass(tp):
        params = getattr(tp, "__dataclass_params__", None)
        return tuple(f.name for f in dataclasses.fields(tp)) if params and params.frozen else None
    if issubclass(tp, pydantic.BaseModel) and tp.model_config.get("frozen", False):
        return tuple(tp.model_fields)
    return None


def deeply_immutable(value: Any, _depth: int = 0) -> bool:
    """Whether nothing reachable from ``value`` can be changed in place: atoms, enum members,
    tuples and frozensets of such, frozen dataclasses and frozen pydantic models whose fields are
    such. The simulation shares such a value between replays instead of decoding it again (a
    value that could be mutated is decoded afresh, as a new process would)."""
    tp = type(value)
    if tp in _FROZEN_ATOMS or isinstance(value, enum.Enum):
        return True
    if _depth > 50:
        return False
    if tp is tuple or tp is frozenset:
        return all(deeply_immutable(v, _depth + 1) for v in value)
    try:
        names = _FIELDS[tp]
    except KeyError:
        names = _FIELDS[tp] = _frozen_fields(tp)
    if names is None:
        return False
    if isinstance(value, pydantic.BaseModel) and (
            value.__pydantic_extra__ or getattr(value, "__pydantic_private__", None)):
        return False
    return all(deeply_immutable(getattr(value, n), _depth + 1) for n in names)


def short(value: Any, width: int = 100) -> str:
    """``repr(value)``, cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_actions(actions: Iterable[Any], width: int = 160) -> str:
    """A one-line list of actions for traces and messages."""
    return short(list(actions), width)
