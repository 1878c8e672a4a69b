"""Where in a value the codec fails: a walk used only after an encode already failed.

The codec's :class:`~fasm.persistence._codec.Unencodable` may come without a path (msgpack and
pydantic report the failure, not where it is). :func:`unencodable_path` walks the value (dataclass
fields, pydantic model fields, dicts, lists, tuples and sets) and tries to write each leaf on its
own, the way the codec would (pydantic's JSON-mode dump, then msgpack). It costs a walk of the
whole value, so it is called only on the failure path, never per commit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pydantic
import pydantic_core

__all__ = ("unencodable_path",)

_MAX_DEPTH = 200


def unencodable_path(value: Any) -> str:
    """The first place inside ``value`` that cannot be written, as a Python-like path
    (``"pending[3].user"``, ``"data['k']"``), or ``""`` when no single part fails on its own (the
    value as a whole is the problem, or it encodes)."""
    found = _walk(value, "", 0)
    return found or ""


def _leaf_fails(value: Any) -> bool:
    try:
        msgpack.packb(pydantic_core.to_jsonable_python(value), use_bin_type=True)
    except Exception:
        return True
    return False


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _walk(value: Any, path: str, depth: int) -> str | None:
    if depth > _MAX_DEPTH:
        return path if _leaf_fails(value) else None
    d = depth + 1
    children: list[tuple[str, Any]]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [(_join(path, f.name), getattr(value, f.name))
                    for f in dataclasses.fields(value)]
    elif isinstance(value, pydantic.BaseModel):
        children = [(_join(path, name), getattr(value, name)) for name in type(value).model_fields]
    elif isinstance(value, dict):
        children = []
        for k, v in value.items():
            if _leaf_fails(k):
                return f"{path}[{k!r}] (the key)"
            children.append((f"{path}[{k!r}]", v))
    elif isinstance(value, list | tuple):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, set | frozenset):
        children = [(f"{path}{{{v!r}}}", v) for v in value]
    else:
        return path if _leaf_fails(value) else None
    for child_path, child in children:
        found = _walk(child, child_path, d)
        if found is not None:
            return found
    return None
