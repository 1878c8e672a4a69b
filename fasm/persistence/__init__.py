"""Persistence: stores keyed by machine key, the codec, the durability strategies, and
transactional state.

Backends implement :class:`Store` (bytes in, bytes out, fenced by sequence number); the codec
turns state and inputs into checked records; :class:`Snapshot` and :class:`Journal` decide what
is written after each committed transition. Alternatively, state is a database transaction:
:class:`SQLiteDatabase` or :class:`PostgresDatabase` hands the stf a :class:`Transaction`, with
SQL and an ordered key-value layer (:class:`KV` over :class:`Keyspace` s).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._codec import Codec as Codec
from ._durability import Durability as Durability
from ._durability import Journal as Journal
from ._durability import Snapshot as Snapshot
from ._file import FileStore as FileStore
from ._kv import KV as KV
from ._kv import Keyspace as Keyspace
from ._memory import MemoryStore as MemoryStore
from ._sqlite import SQLiteStore as SQLiteStore
from ._store import KeyCommit as KeyCommit
from ._store import Store as Store
from ._store import StoredRecords as StoredRecords
from ._txn import Database as Database
from ._txn import Transaction as Transaction
from ._txn_sqlite import SQLiteDatabase as SQLiteDatabase

if TYPE_CHECKING:
    from ._postgres import PostgresStore as PostgresStore
    from ._txn_postgres import PostgresDatabase as PostgresDatabase

__all__ = (
    "KV",
    "Codec",
    "Database",
    "Durability",
    "FileStore",
    "Journal",
    "KeyCommit",
    "Keyspace",
    "MemoryStore",
    "PostgresDatabase",
    "PostgresStore",
    "SQLiteDatabase",
    "SQLiteStore",
    "Snapshot",
    "Store",
    "StoredRecords",
    "Transaction",
)


def __getattr__(name: str) -> Any:
    # The PostgreSQL backends need psycopg (the "postgres" extra): import them only when asked.
    if name == "PostgresStore":
        from ._postgres import PostgresStore

        return PostgresStore
    if name == "PostgresDatabase":
        from ._txn_postgres import PostgresDatabase

        return PostgresDatabase
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
