"""The peers benchmark still runs: ``bench/bench_peers.py --quick`` in a subprocess.

It needs a python with the ``bench`` extra (eventsourcing, dbos, matplotlib), which the main
venv does not have: ``FASM_BENCH_PYTHON`` names it, defaulting to ``.venv-bench/bin/python``.
Without one the test is skipped with the commands that create it. It checks that the script
works and writes its report and chart, never how fast anything was.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ("python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]' "
         "(or set FASM_BENCH_PYTHON to a python that has fasm[bench])")


def _bench_python() -> str | None:
    named = os.environ.get("FASM_BENCH_PYTHON")
    if named:
        return named
    default = ROOT / ".venv-bench" / "bin" / "python"
    return str(default) if default.exists() else None


def _has_peers(python: str) -> bool:
    try:
        probe = subprocess.run([python, "-c", "import eventsourcing, dbos, matplotlib, fasm"],
                               capture_output=True, check=False)
    except OSError:  # FASM_BENCH_PYTHON names no runnable file
        return False
    return probe.returncode == 0


@pytest.mark.slow
def test_bench_peers_quick_runs(tmp_path: Path) -> None:
    python = _bench_python()
    if python is None:
        pytest.skip(f"no bench python: {SETUP}")
    if not _has_peers(python):
        pytest.skip(f"{python} lacks the bench extra: {SETUP}")
    out = tmp_path / "peers.md"
    result = subprocess.run(
        [python, str(ROOT / "bench" / "bench_peers.py"), "--quick", "--dir", str(tmp_path),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = out.read_text()
    for heading in ("### The limits of this disk", "### fasm", "### eventsourcing",
                    "### DBOS Transact", "### Targets"):
        assert heading in text
    assert "synchronous=FULL" in text
    assert "n/a | n/a | n/a" not in text, "a case produced no result"
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("peers-")], \
        "the run left its databases behind"
