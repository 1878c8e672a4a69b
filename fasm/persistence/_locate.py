"""Where in a value the codec fails: a walk used only after an encode already failed.

The codec's :class:`~fasm.persistence._codec.Unencodable` may come without a path (msgpack and
pydantic report the failure, not where it is). :func:`locate` walks the value (dataclass fields,
pydantic model fields, dicts, lists, tuples and sets) and tries to write each leaf on its own, the
way the codec would (pydantic's JSON-mode dump, then msgpack). It costs a walk of the whole value,
so it is called only on the failure path, never per commit. The :class:`Location` it returns can
then be checked cheaply on other versions of the value (the state after each replayed
transition), which is how the runtime finds the transition that put the value there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import msgpack
import pydantic
import pydantic_core

__all__ = ("Location", "leaf_fails", "locate", "unencodable_path")

_MAX_DEPTH = 200

Step: TypeAlias = tuple[Literal["attr", "item", "key", "member"], Any]
"""One move into a value: an attribute, a dict item or list index, a dict key itself, or a set
member."""

_MISSING = object()


@dataclass(frozen=True, slots=True)
class Location:
    """Where a value fails to encode: ``path`` for messages, ``steps`` to find it again."""

    path: str
    steps: tuple[Step, ...]

    def fails_in(self, value: Any) -> bool:
        """Whether ``value`` has something at this location that cannot be written on its own
        (False when the location does not exist in it)."""
        for kind, arg in self.steps:
            value = _move(value, kind, arg)
            if value is _MISSING:
                return False
        return leaf_fails(value)


def unencodable_path(value: Any) -> str:
    """The first place inside ``value`` that cannot be written, as a Python-like path
    (``"pending[3].user"``, ``"data['k']"``), or ``""`` when no single part fails on its own (the
    value as a whole is the problem, or it encodes)."""
    found = locate(value)
    return found.path if found is not None else ""


def locate(value: Any) -> Location | None:
    """The first place inside ``value`` that cannot be written on its own, or None (also for
    ``value`` itself failing as a leaf: there is no place inside to name)."""
    found = _walk(value, "", (), 0)
    return found if found is not None and found.steps else None


def leaf_fails(value: Any) -> bool:
    """Whether ``value`` alone cannot be written (pydantic's JSON-mode dump, then msgpack)."""
    try:
        msgpack.packb(pydantic_core.to_jsonable_python(value), use_bin_type=True)
    except Exception:
        return True
    return False


def _move(value: Any, kind: str, arg: Any) -> Any:
    try:
        if kind == "attr":
            return getattr(value, arg, _MISSING)
        if kind == "item":
            if isinstance(value, dict):
                return value.get(arg, _MISSING)
            if isinstance(value, list | tuple) and -len(value) <= arg < len(value):
                return value[arg]
            return _MISSING
        if kind in ("key", "member"):
            return arg if arg in value else _MISSING
    except TypeError:  # another shape at this step of the history (unhashable, not a container)
        return _MISSING
    return _MISSING


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _walk(value: Any, path: str, steps: tuple[Step, ...], depth: int) -> Location | None:
    if depth > _MAX_DEPTH:
        return Location(path, steps) if leaf_fails(value) else None
    d = depth + 1
    children: list[tuple[str, Step, Any]]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [(_join(path, f.name), ("attr", f.name), getattr(value, f.name))
                    for f in dataclasses.fields(value)]
    elif isinstance(value, pydantic.BaseModel):
        children = [(_join(path, name), ("attr", name), getattr(value, name))
                    for name in type(value).model_fields]
    elif isinstance(value, dict):
        children = []
        for k, v in value.items():
            if leaf_fails(k):
                return Location(f"{path}[{k!r}] (the key)", (*steps, ("key", k)))
            children.append((f"{path}[{k!r}]", ("item", k), v))
    elif isinstance(value, list | tuple):
        children = [(f"{path}[{i}]", ("item", i), v) for i, v in enumerate(value)]
    elif isinstance(value, set | frozenset):
        children = [(f"{path}{{{v!r}}}", ("member", v), v) for v in value]
    else:
        return Location(path, steps) if leaf_fails(value) else None
    for child_path, step, child in children:
        found = _walk(child, child_path, (*steps, step), d)
        if found is not None:
            return found
    return None
