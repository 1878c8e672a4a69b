"""``?`` and ``:name`` placeholders on PostgreSQL: what is rewritten and what is left alone."""

from __future__ import annotations

import pytest

pytest.importorskip("psycopg")

from fasm.persistence._txn_postgres import to_pyformat


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM t WHERE a = ? AND b = ?", "SELECT * FROM t WHERE a = %s AND b = %s"),
        ("SELECT :a, :b_2", "SELECT %(a)s, %(b_2)s"),
        ("SELECT x::int, ?::text", "SELECT x::int, %s::text"),
        ("SELECT '?', 'it''s ?', ?", "SELECT '?', 'it''s ?', %s"),
        ("SELECT E'\\'?', ?", "SELECT E'\\'?', %s"),
        ('SELECT "odd?col", ?', 'SELECT "odd?col", %s'),
        ("SELECT ? -- why?\n, ?", "SELECT %s -- why?\n, %s"),
        ("SELECT /* ? /* nested ? */ ? */ ?", "SELECT /* ? /* nested ? */ ? */ %s"),
        ("SELECT $$ ? :a $$, $tag$ ? $tag$, ?", "SELECT $$ ? :a $$, $tag$ ? $tag$, %s"),
        ("SELECT a % 2 FROM t WHERE b LIKE 'x%' AND c = ?",
         "SELECT a %% 2 FROM t WHERE b LIKE 'x%%' AND c = %s"),
        ("SELECT ':a', ?", "SELECT ':a', %s"),
        ("SELECT arr[1:2]", "SELECT arr[1:2]"),
    ],
)
def test_placeholders_are_rewritten_outside_literals(sql: str, expected: str) -> None:
    assert to_pyformat(sql) == expected


def test_mixing_the_two_styles_is_refused() -> None:
    with pytest.raises(ValueError, match="mixes"):
        to_pyformat("SELECT ?, :a")
