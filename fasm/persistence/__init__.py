"""Persistence: stores keyed by machine key, the codec, and the durability strategies.

Backends implement :class:`Store` (bytes in, bytes out, fenced by sequence number); the codec
turns state and inputs into checked records; :class:`Snapshot` and :class:`Journal` decide what
is written after each committed transition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._codec import Codec as Codec
from ._durability import Durability as Durability
from ._durability import Journal as Journal
from ._durability import Snapshot as Snapshot
from ._file import FileStore as FileStore
from ._memory import MemoryStore as MemoryStore
from ._sqlite import SQLiteStore as SQLiteStore
from ._store import Store as Store
from ._store import StoredRecords as StoredRecords

if TYPE_CHECKING:
    from ._postgres import PostgresStore as PostgresStore

__all__ = (
    "Codec",
    "Durability",
    "FileStore",
    "Journal",
    "MemoryStore",
    "PostgresStore",
    "SQLiteStore",
    "Snapshot",
    "Store",
    "StoredRecords",
)


def __getattr__(name: str) -> Any:
    # PostgresStore needs psycopg (the "postgres" extra): import it only when asked for.
    if name == "PostgresStore":
        from ._postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
