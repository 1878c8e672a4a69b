"""docs/04_testing.md tells the truth: its code is in tests/testing/docs_example.py, and its
outputs are what that file prints today. The page's pytest example runs here as a test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.testing import docs_example
from tests.testing.docs_example import test_payments_simulation as test_payments_simulation

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "04_testing.md").read_text()

_CODE = re.compile(r"<!-- from (?P<file>\S+) -->\n```python\n(?P<code>.*?)```", re.DOTALL)
_OUTPUT = re.compile(r"<!-- output of (?P<name>\S+) -->\n```text\n(?P<text>.*?)```", re.DOTALL)


def test_every_python_block_is_quoted_from_a_file_a_test_runs() -> None:
    blocks = list(_CODE.finditer(DOC))
    assert len(blocks) == DOC.count("```python") >= 4
    for block in blocks:
        source = [ln.strip() for ln in (ROOT / block["file"]).read_text().splitlines()]
        quoted = [ln.strip() for ln in block["code"].splitlines()]
        assert any(source[i:i + len(quoted)] == quoted for i in range(len(source))), (
            f"a block of docs/04_testing.md is not in {block['file']}:\n{block['code']}")


@pytest.mark.parametrize("name", ["first_failure", "fixed_counts"])
def test_seeded_outputs_are_what_the_code_prints(name: str) -> None:
    shown = {m["name"]: m["text"] for m in _OUTPUT.finditer(DOC)}
    assert shown[name].rstrip("\n") == docs_example.OUTPUTS[name]()


def test_shrunk_output_is_what_a_search_finds() -> None:
    # Shrinking is derandomized, but hypothesis may stop a slow shrink early on a loaded
    # machine: compare what matters, not every byte.
    shown = {m["name"]: m["text"] for m in _OUTPUT.finditer(DOC)}["shrunk_failure"]
    now = docs_example.OUTPUTS["shrunk_failure"]()
    assert now.splitlines()[0] == shown.splitlines()[0]  # check, step
    assert "(duplicate)" in now and "(duplicate)" in shown


def test_bench_output_is_from_the_benchmark() -> None:
    shown = {m["name"]: m["text"] for m in _OUTPUT.finditer(DOC)}["bench/bench_simulation.py"]
    assert "plain loop" in shown and "sim, invariants only" in shown and "vs plain" in shown


def test_the_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import bench_simulation

    bench_simulation.main(["--quick"])
    out = capsys.readouterr().out
    for row in ("plain loop", "engine + codec + store, by hand", "sim, invariants only",
                "sim, all checks"):
        assert row in out
    assert "clinic bookings (larger)" in out and "seed PaymentMachine" in out


def test_the_shrink_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import bench_shrink

    bench_shrink.main(["--quick"])
    out = capsys.readouterr().out
    assert "shrunk to" in out and "wallet: rare double refund" in out
    shown = {m["name"]: m["text"] for m in _OUTPUT.finditer(DOC)}["bench/bench_shrink.py"]
    assert shown.splitlines()[0] == out.splitlines()[0]
