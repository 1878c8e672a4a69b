"""Shared test configuration: every async test runs on asyncio and on trio; a PostgreSQL DSN
(skipped or failed when unreachable) and a fresh schema per test, for every test that needs them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


PG_DSN = os.environ.get("FASM_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The DSN of a reachable PostgreSQL. Unreachable: fail under CI, skip otherwise."""
    psycopg = pytest.importorskip("psycopg")
    from fasm.persistence._postgres import safe_dsn

    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            pass
    except psycopg.Error as e:
        message = (f"PostgreSQL not reachable at {safe_dsn(PG_DSN)}; start it (pg_ctlcluster "
                   "--skip-systemctl-redirect $(ls /etc/postgresql) main start) or set "
                   "FASM_PG_DSN")
        if os.environ.get("CI"):
            pytest.fail(f"{message} ({e})")
        pytest.skip(message)
    return PG_DSN


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A schema name unique to the test, dropped afterwards (the store creates it)."""
    import psycopg
    from psycopg import sql

    name = f"fasm_test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
