"""What the conformance suites share: running named checks, skipping what does not apply, and
the bridge to pytest (optional: importing fasm.testing must not need pytest)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

__all__ = ("Skip", "anyio_marks", "run_all", "run_as_test", "run_check")

S = TypeVar("S")
Checks = Mapping[str, Callable[[S], Awaitable[None]]]


class Skip(Exception):
    """A check that does not apply to this backend (not durable, no corrupt hook)."""


async def run_check(checks: Checks[S], what: str, suite: S, name: str) -> None:
    """Run one check; any failure becomes an ``AssertionError`` naming it.

    Raises:
        Skip: the check does not apply.
        AssertionError: the check failed.
    """
    try:
        await checks[name](suite)
    except Skip:
        raise
    except AssertionError as e:
        raise AssertionError(f"{what} check {name!r} failed: {e}") from e
    except Exception as e:
        raise AssertionError(
            f"{what} check {name!r} failed: unexpected {type(e).__name__}: {e}") from e


async def run_all(checks: Checks[S], what: str, suite: S) -> None:
    """Run every check in order, passing over those that do not apply."""
    for name in checks:
        try:
            await run_check(checks, what, suite, name)
        except Skip:
            continue


async def run_as_test(checks: Checks[S], what: str, suite: S, name: str) -> None:
    """Run one check inside a pytest test: a check that does not apply is a pytest skip."""
    try:
        await run_check(checks, what, suite, name)
    except Skip as e:
        import pytest

        pytest.skip(str(e))


def anyio_marks() -> list[Any]:
    """``[pytest.mark.anyio]`` when pytest is installed, else nothing."""
    try:
        import pytest
    except ImportError:  # pragma: no cover
        return []
    return [pytest.mark.anyio]
