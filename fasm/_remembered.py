"""What the runtime keeps of a committed idempotency key: a plain record shared by the engine
(which decides duplicates) and the codec (which writes it into checkpoints)."""

from __future__ import annotations

from typing import Any, TypeAlias

from ._actions import Tracked, Untracked

__all__ = ("AnyAction", "Remembered")

AnyAction: TypeAlias = Tracked[Any, Any] | Untracked[Any]


class Remembered:
    """What the engine keeps of a committed idempotency key (the engine's rule 6).

    Attributes:
        seq: the transition that first used the key.
        at: when it was committed (the caller's clock, seconds), or None when not known (a key
            written by an older fasm: it is dated when the engine first sees the time).
        actions: the actions that transition emitted, or None when they are only held encoded
            (``packed``, read from a store) or not known at all (written by an older fasm).
        packed: the actions as the codec encoded them (kept so that they are encoded once).
    """

    __slots__ = ("actions", "at", "packed", "seq")

    def __init__(self, seq: int, at: float | None = None,
                 actions: tuple[AnyAction, ...] | None = None, packed: bytes | None = None) -> None:
        self.seq = seq
        self.at = at
        self.actions = actions
        self.packed = packed

    def __repr__(self) -> str:
        return f"Remembered(seq={self.seq}, at={self.at})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Remembered):
            return (self.seq, self.at) == (other.seq, other.at)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]
