"""The ``fasm`` command: look inside a store, and check it against the current code.

Install it with the ``cli`` extra (``pip install 'fasm[cli]'``, which adds click); the core
install does not need it. Stores are named by URL:

* ``sqlite:///var/lib/app/fasm.db`` (everything after ``sqlite://`` is the path, so three
  slashes make it absolute);
* ``file:///var/lib/app/fasm-store`` (a :class:`~fasm.persistence.FileStore` directory);
* ``postgresql://user@host/db?schema=app&table_prefix=fasm_`` (``schema`` and ``table_prefix``
  are taken out of the URL and given to :class:`~fasm.persistence.PostgresStore`; the rest is
  the DSN).

Every command only reads, and none takes a key's lock, so they run beside a live runtime (the
numbers they show are as of the moment each key is read). A SQLite file or store directory that
does not exist is refused rather than created. Machines are named ``module:Class`` and built with
no arguments; ``--initial module:name`` names the runtime's initial state (a value or a factory),
needed to replay a key's history from seq 0 and to show a key that has no checkpoint.

Commands: ``keys`` (a table of keys: seq, checkpoint, journal length and pending tracked
actions), ``show`` (one key's state, pending tracked actions and journal tail), ``replay`` (the
replay check of :func:`fasm.runtime.replay`, exit status 1 on a difference) and ``check`` (the
store opens and every key decodes and replays under the current code and migrations, exit status
1 otherwise).
"""

from __future__ import annotations

import copy
import importlib
import os
import pprint
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio

try:
    import click
except ImportError as e:  # the core install: the command is in the cli extra
    raise SystemExit("the fasm command needs the cli extra: pip install 'fasm[cli]'") from e

from ._machine import StateMachine
from .errors import FasmError
from .persistence._codec import Codec, JournalEntry
from .persistence._durability import decode_records
from .persistence._file import FileStore
from .persistence._sqlite import SQLiteStore
from .persistence._store import Store
from .runtime._engine import Engine
from .runtime._replay import replay as replay_key

__all__ = ("main", "open_url")

_T = TypeVar("_T")
AnyMachine = StateMachine[Any, Any, Any, Any, Any, Any]


def open_url(url: str) -> Store:
    """The (unopened) store a URL names (see the module documentation).

    Raises:
        ValueError: the scheme is unknown, or a SQLite file, store directory or PostgreSQL store
            (its keys table) does not exist.
    """
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        if rest != ":memory:" and not os.path.isfile(rest):
            raise ValueError(f"no SQLite database at {rest!r}")
        return SQLiteStore(rest)
    if scheme == "file":
        if not os.path.isdir(rest):
            raise ValueError(f"no store directory at {rest!r}")
        return FileStore(rest)
    if scheme in ("postgresql", "postgres"):
        from .persistence._postgres import PostgresStore

        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        schema = query.pop("schema", "public")
        prefix = query.pop("table_prefix", "fasm_")
        dsn = urlunsplit(parts._replace(query=urlencode(query)))
        if _pg_store_exists(dsn, schema, prefix) is False:
            raise ValueError(f"no fasm store in PostgreSQL schema {schema!r} (no table "
                             f"{prefix}keys)")
        return PostgresStore(dsn, schema=schema, table_prefix=prefix)
    raise ValueError(f"unknown store URL scheme {scheme!r}: use sqlite:///path, file:///dir or "
                     "postgresql://...")


def _pg_store_exists(dsn: str, schema: str, prefix: str) -> bool | None:
    """Whether the store's keys table is there, so that a mistyped address is refused rather
    than given new tables by the store's ``open``. None: the database could not be asked, and
    the store's own ``open`` reports why (with any password scrubbed)."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            name = sql.Identifier(schema, f"{prefix}keys").as_string(conn)
            row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
    except (psycopg.Error, ValueError):
        return None
    return row is not None and row[0] is not None


def _load_object(spec: str) -> Any:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise click.BadParameter(f"{spec!r} is not module:name")
    sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise click.BadParameter(f"cannot import {module!r}: {e}") from e
    finally:
        sys.path.pop(0)
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise click.BadParameter(f"{module!r} has no {name!r}") from None
    return obj


def _machine(spec: str) -> AnyMachine:
    cls = _load_object(spec)
    if not (isinstance(cls, type) and issubclass(cls, StateMachine)):
        raise click.BadParameter(f"{spec!r} is not a StateMachine class")
    return cls()


@dataclass
class _Recovered:
    """One key brought back as a runtime would, without its lock."""

    engine: Engine
    pending: list[Any]  # the tracked actions restore re-emits
    journal: tuple[JournalEntry, ...]
    checkpoint_seq: int


async def _recover(machine: AnyMachine, store: Store, key: str,
                   initial: Any | None) -> _Recovered:
    """Decode a key's records and replay its journal tail, then run restore (read-only).

    Raises:
        StoreCorrupt: a record does not decode under the current code (IncompatibleRecord,
            MigrationFailed ...).
        NondeterminismError: a journaled input raises on replay.
        RestoreFailed: restore raised.
        LookupError: no checkpoint and no initial state to replay from.
    """
    codec = Codec(type(machine))
    records = await store.load(key)
    if records is None:
        raise LookupError(f"no key {key!r}")
    recovered = decode_records(codec, records, store=store.description, key=key)
    cp = recovered.checkpoint
    if cp is not None:
        engine = Engine(machine, state=cp.state, seq=cp.seq, idempotency=cp.idempotency.items(),
                        idempotency_window=None, idempotency_ttl=None)
    elif initial is not None:
        state = initial() if callable(initial) else copy.deepcopy(initial)
        engine = Engine(machine, state=state, seq=0, idempotency_window=None,
                        idempotency_ttl=None)
    else:
        raise LookupError("the key has no checkpoint: give --initial to replay its journal")
    await engine.replay((e.seq, e.input, e.idempotency_key, e.at) for e in recovered.journal)
    release = await engine.restore()
    return _Recovered(engine, list(release.tracked), recovered.journal,
                      records.checkpoint_seq)


async def _all_keys(store: Store, keys: Sequence[str]) -> list[str]:
    if keys:
        return list(keys)
    found: list[str] = []
    after: str | None = None
    while True:
        page = await store.keys(after=after, limit=1000)
        found += page
        if len(page) < 1000:
            return found
        after = page[-1]


def _run(url: str, body: Callable[[Store], Awaitable[_T]]) -> _T:
    """Open the store a URL names, run ``body`` on it, close it; errors become click's."""
    try:
        store = open_url(url)
    except ValueError as e:
        raise click.UsageError(str(e)) from e

    async def go() -> _T:
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    try:
        return anyio.run(go)
    except FasmError as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from e


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Iterator[str]:
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        yield "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        if n == 0:
            yield "  ".join("-" * w for w in widths)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_machine_option = click.option("--machine", "machine_spec", metavar="MODULE:CLASS",
                               help="The machine class (built with no arguments).")
_initial_option = click.option("--initial", "initial_spec", metavar="MODULE:NAME",
                               help="The runtime's initial state (a value or a factory).")


@click.group()
@click.version_option(package_name="fasm")
def main() -> None:
    """Look inside a fasm store and check it against the current code. Read-only: no command
    writes or takes a key's lock."""


@main.command()
@click.argument("url")
@_machine_option
@_initial_option
@click.option("--after", default=None, help="List keys after this one.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1),
              help="At most this many keys.")
def keys(url: str, machine_spec: str | None, initial_spec: str | None, after: str | None,
         limit: int) -> None:
    """List keys with their seq and (with --machine) pending tracked actions."""
    machine = _machine(machine_spec) if machine_spec else None
    initial = _load_object(initial_spec) if initial_spec else None

    async def body(store: Store) -> list[list[Any]]:
        rows: list[list[Any]] = []
        for key in await store.keys(after=after, limit=limit):
            records = await store.load(key)
            if records is None:
                continue  # gone since it was listed
            pending: Any = "-"
            if machine is not None:
                try:
                    pending = len((await _recover(machine, store, key, initial)).pending)
                except (FasmError, LookupError) as e:
                    pending = f"error: {type(e).__name__}"
            rows.append([key, records.seq, records.checkpoint_seq, len(records.journal),
                         pending])
        return rows

    rows = _run(url, body)
    for line in _table(["KEY", "SEQ", "CHECKPOINT", "JOURNAL", "PENDING"], rows):
        click.echo(line)
    if len(rows) == limit:
        click.echo(f"(more keys may follow: --after {rows[-1][0]!r})")


@main.command()
@click.argument("url")
@click.argument("key")
@_machine_option
@_initial_option
@click.option("--tail", default=10, show_default=True, type=click.IntRange(0),
              help="How many journal entries to show.")
def show(url: str, key: str, machine_spec: str | None, initial_spec: str | None,
         tail: int) -> None:
    """Show one key: its state, pending tracked actions and journal tail."""
    if not machine_spec:
        raise click.UsageError("show needs --machine to decode the key's records")
    machine = _machine(machine_spec)
    initial = _load_object(initial_spec) if initial_spec else None

    async def body(store: Store) -> _Recovered:
        try:
            return await _recover(machine, store, key, initial)
        except LookupError as e:
            raise click.ClickException(str(e)) from e

    got = _run(url, body)
    click.echo(f"key {key!r}: seq {got.engine.seq}, checkpoint at seq {got.checkpoint_seq}, "
               f"{len(got.journal)} journal entries after it")
    click.echo("\nstate:")
    click.echo(pprint.pformat(got.engine.state, width=100))
    click.echo(f"\npending tracked actions ({len(got.pending)}):")
    for line in _table(["ID", "ACTION"], [[repr(a.id), _short(a.action, 80)]
                                          for a in got.pending]):
        click.echo(line)
    shown = got.journal[-tail:] if tail else ()
    click.echo(f"\njournal tail ({len(shown)} of {len(got.journal)}):")
    for line in _table(["SEQ", "INPUT", "IDEMPOTENCY KEY"],
                       [[e.seq, _short(e.input, 80), e.idempotency_key or ""] for e in shown]):
        click.echo(line)


@main.command(name="replay")
@click.argument("url")
@_machine_option
@_initial_option
@click.option("--key", "keys_", multiple=True, help="Replay this key (repeatable; default all).")
def replay_command(url: str, machine_spec: str | None, initial_spec: str | None,
                   keys_: tuple[str, ...]) -> None:
    """Replay recorded history through the current code; exit 1 on a difference."""
    if not machine_spec:
        raise click.UsageError("replay needs --machine")
    machine = _machine(machine_spec)
    initial = _load_object(initial_spec) if initial_spec else None

    async def body(store: Store) -> bool:
        ok = True
        for key in await _all_keys(store, keys_):
            try:
                report = await replay_key(machine, store, key=key, initial_state=initial)
            except KeyError as e:
                raise click.ClickException(str(e.args[0])) from e
            click.echo(str(report))
            ok = ok and report.ok
        return ok

    if not _run(url, body):
        click.echo("replay found a difference: the current code does not agree with the record",
                   err=True)
        sys.exit(1)


@main.command()
@click.argument("url")
@_machine_option
@_initial_option
def check(url: str, machine_spec: str | None, initial_spec: str | None) -> None:
    """Check that the store opens and every key decodes, replays and restores under the current
    code and migrations; exit 1 otherwise."""
    if not machine_spec:
        raise click.UsageError("check needs --machine")
    machine = _machine(machine_spec)
    initial = _load_object(initial_spec) if initial_spec else None

    async def body(store: Store) -> tuple[int, list[tuple[str, str]]]:
        failed: list[tuple[str, str]] = []
        keys = await _all_keys(store, ())
        for key in keys:
            try:
                await _recover(machine, store, key, initial)
            except (FasmError, LookupError) as e:
                failed.append((key, f"{type(e).__name__}: {e}"))
        return len(keys), failed

    count, failed = _run(url, body)
    for key, error in failed:
        click.echo(f"key {key!r}: {error}")
    click.echo(f"{count - len(failed)} of {count} key(s) open under the current code")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
