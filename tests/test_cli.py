"""The ``fasm`` command against real stores written by a real Runtime."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from fasm.cli import main, open_url
from fasm.persistence import FileStore, SQLiteStore, Store
from tests._ledger import Deposit
from tests.runtime.conftest import make
from tests.runtime.test_replay import KEEP, Capped, record

MACHINE = "tests._ledger:LedgerMachine"


class Capped6(Capped):
    machine_name = "LedgerMachine"
    cap = 6
INITIAL = "tests.runtime.test_replay:initial"


@pytest.fixture(params=["sqlite", "file", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL whose store holds key "default" (history kept, checkpoints at 1 and 5,
    journal 6..7) and key "other" (one deposit), written by a Runtime."""
    made: Callable[[], Store]
    if request.param == "sqlite":
        path = tmp_path / "db.sqlite"
        made, address = (lambda: SQLiteStore(path)), f"sqlite://{path}"
    elif request.param == "file":
        path = tmp_path / "fs"
        made, address = (lambda: FileStore(path)), f"file://{path}"
    else:
        from fasm.persistence import PostgresStore

        dsn = request.getfixturevalue("pg_dsn")
        schema = request.getfixturevalue("pg_schema")
        made = lambda: PostgresStore(dsn, schema=schema)  # noqa: E731
        address = f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"

    async def write() -> None:
        await record(made(), KEEP)
        async with make(store=made(), key="other") as rt:  # type: ignore[arg-type]
            await rt.submit(Deposit("b", 3))

    anyio.run(write)
    return address


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_keys_lists_every_key_with_seq_and_pending(url: str) -> None:
    got = run("keys", url, "--machine", MACHINE)
    assert got.exit_code == 0, got.output
    lines = got.output.splitlines()
    assert lines[0].split() == ["KEY", "SEQ", "CHECKPOINT", "JOURNAL", "PENDING"]
    assert lines[2].split() == ["default", "7", "5", "2", "0"]
    assert lines[3].split() == ["other", "1", "1", "0", "0"]
    # without a machine: no pending column to compute
    assert run("keys", url).output.splitlines()[2].split() == ["default", "7", "5", "2", "-"]
    assert run("keys", url, "--after", "default").output.splitlines()[2].split()[0] == "other"


def test_show_prints_state_pending_and_journal_tail(url: str) -> None:
    got = run("show", url, "default", "--machine", MACHINE, "--tail", "1")
    assert got.exit_code == 0, got.output
    assert "seq 7, checkpoint at seq 5, 2 journal entries after it" in got.output
    assert "'a': 89" in got.output  # 100 + 5 - 10 + 1 - 7
    assert "pending tracked actions (0)" in got.output
    assert "journal tail (1 of 2)" in got.output and "Charged(ok=True)" in got.output


def test_replay_passes_on_the_same_code_and_fails_on_an_incompatible_change(url: str) -> None:
    got = run("replay", url, "--machine", MACHINE, "--initial", INITIAL)
    assert got.exit_code == 0, got.output
    assert "key 'default': replayed 7 input(s) from seq 0" in got.output and "OK" in got.output
    bad = run("replay", url, "--machine", "tests.runtime.test_replay:Fee", "--initial", INITIAL,
              "--key", "default")
    assert bad.exit_code == 1
    assert "seq 2: actions" in bad.output


def test_check_decodes_every_key(url: str) -> None:
    got = run("check", url, "--machine", MACHINE)
    assert got.exit_code == 0, got.output
    assert "2 of 2 key(s) open under the current code" in got.output
    # the journal tail of "default" (seq 6..7) holds a payment of 7: a machine that now refuses
    # payments above 6 cannot start on it
    bad = run("check", url, "--machine", "tests.test_cli:Capped6")
    assert bad.exit_code == 1
    assert "key 'default': NondeterminismError" in bad.output
    assert "1 of 2 key(s) open" in bad.output


def test_a_running_runtime_keeps_its_lock(tmp_path: Path) -> None:
    """Every command reads without the key's lock, beside a live runtime holding it."""
    path = tmp_path / "db.sqlite"

    async def main_() -> None:
        await record(SQLiteStore(path), KEEP)
        async with make(store=SQLiteStore(path)) as rt:  # type: ignore[arg-type]
            got = await anyio.to_thread.run_sync(
                lambda: run("keys", f"sqlite://{path}", "--machine", MACHINE))
            assert got.exit_code == 0 and "default" in got.output
            assert (await rt.submit(Deposit("a", 1))).seq == 8  # still the key's only writer

    anyio.run(main_)


def test_bad_addresses_are_refused_without_creating_anything(tmp_path: Path) -> None:
    got = CliRunner().invoke(main, ["keys", f"sqlite://{tmp_path}/nope.db"])
    assert got.exit_code == 2 and "no SQLite database" in got.output
    assert not (tmp_path / "nope.db").exists()
    got = CliRunner().invoke(main, ["keys", f"file://{tmp_path}/nodir"])
    assert got.exit_code == 2 and not (tmp_path / "nodir").exists()
    got = CliRunner().invoke(main, ["keys", "redis://x"])
    assert got.exit_code == 2 and "unknown store URL scheme" in got.output
    with pytest.raises(ValueError, match="scheme"):
        open_url("nothing")
    got = CliRunner().invoke(main, ["show", f"sqlite://{tmp_path}/x", "k", "--machine", "nomod"])
    assert got.exit_code == 2


def test_a_postgresql_address_without_a_store_is_refused_without_creating_tables(
        pg_dsn: str, pg_schema: str) -> None:
    import psycopg

    address = f"{pg_dsn}{'&' if '?' in pg_dsn else '?'}schema={pg_schema}"
    got = CliRunner().invoke(main, ["keys", address])
    assert got.exit_code == 2 and "no fasm store in PostgreSQL schema" in got.output
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                           (pg_schema,)).fetchone()
    assert row == (0,)


def test_without_click_the_command_says_which_extra_to_install() -> None:
    code = "import sys; sys.modules['click'] = None; import fasm.cli"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert got.returncode == 1 and "pip install 'fasm[cli]'" in got.stderr


def test_the_console_script_runs(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    anyio.run(record, SQLiteStore(path), KEEP)
    out = subprocess.run([sys.executable, "-m", "fasm.cli", "replay", f"sqlite://{path}",
                          "--machine", MACHINE], capture_output=True, text=True, check=False,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
