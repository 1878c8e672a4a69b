"""Persistence: stores keyed by machine key, the codec, and the durability strategies.

Backends implement :class:`Store` (bytes in, bytes out, fenced by sequence number); the codec
turns state and inputs into checked records; :class:`Snapshot` and :class:`Journal` decide what
is written after each committed transition.
"""

from __future__ import annotations

from ._codec import Codec as Codec
from ._durability import Durability as Durability
from ._durability import Journal as Journal
from ._durability import Snapshot as Snapshot
from ._memory import MemoryStore as MemoryStore
from ._store import Store as Store
from ._store import StoredRecords as StoredRecords

__all__ = (
    "Codec",
    "Durability",
    "Journal",
    "MemoryStore",
    "Snapshot",
    "Store",
    "StoredRecords",
)
