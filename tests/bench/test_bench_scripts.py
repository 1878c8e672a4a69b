"""The benchmarks of the main venv still run: each script's ``--quick`` mode in a subprocess.

They check that a script works end to end and prints its tables and target lines, never how
fast anything was (performance targets live in the printed tables, not in assertions).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_bench_persistence_quick(tmp_path: Path) -> None:
    out = run("bench_persistence.py", "--quick", "--dir", str(tmp_path))
    for line in ("1. physical limits", "fasm's worker thread",
                 "sqlite, journal, sequential, inline", "file, journal, 64 submitters",
                 "3. per-transition cost", "4. recovery time", "targets (issue 3)",
                 "group commit"):
        assert line in out
    assert not any(tmp_path.iterdir()), "the run left its files behind"


@pytest.mark.slow
@pytest.mark.postgres
def test_bench_transactional_quick(tmp_path: Path, pg_dsn: str) -> None:
    out = run("bench_transactional.py", "--quick", "--dir", str(tmp_path), "--postgres", pg_dsn)
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("sqlite", "postgres"))]
    assert [r[1] for r in rows if r[0] == "postgres"] == ["1", "64"]  # the submitter counts
    assert len(rows) == 6, out
    assert "target (issue 5)" in out


@pytest.mark.slow
def test_bench_runtime_quick() -> None:
    out = run("bench_runtime.py", "--quick")
    assert "plain loop" in out and "64 submitters" in out


@pytest.mark.slow
def test_bench_kill9_counts(tmp_path: Path) -> None:
    out = run("bench_kill9.py", "--kills", "3")
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("sqlite", "file"))}
    assert set(rows) == {"sqlite", "file"}
    for row in rows.values():
        assert row[1] == "3" and row[4] == "0" and "FAILED" not in row, out


@pytest.mark.slow
def test_bench_http_quick(tmp_path: Path) -> None:
    out = run("bench_http.py", "--quick", "--dir", str(tmp_path))
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "32", "32"], out  # the client counts; the restart
    assert "requests/s" in out and "backlog" in out and "restart with the backlog" in out
    assert not any(tmp_path.iterdir()), "the run left its files behind"


@pytest.mark.slow
def test_bench_multikey_quick(tmp_path: Path) -> None:
    out = run("bench_multikey.py", "--quick", "--dir", str(tmp_path))
    for line in ("1. commit_many of 64 keys", "sqlite", "file", "2. start-up", "20,000"):
        assert line in out
    assert not any(tmp_path.iterdir()), "the run left its files behind"


@pytest.mark.slow
def test_bench_restore_runs() -> None:
    out = run("bench_restore.py", "--pending", "2000")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("2,000", "asyncio"), ("2,000", "trio")], out
    assert "ready s" in out and "tasks" in out


@pytest.mark.slow
def test_bench_keyed_quick(tmp_path: Path) -> None:
    out = run("bench_keyed.py", "--quick", "--dir", str(tmp_path))
    for line in ("1. durable transitions/s", "keyed, 5,000 accounts stored", "single instance",
                 "target (issue 12): keyed >= single-instance", "2. memory", "50,000",
                 "(target: within 2x)", "3. Runtime start-up", "20,000",
                 "(target: under 2 s, flat in the idle keys)"):
        assert line in out, out
    start = [r for r in (line.split() for line in out.splitlines())
             if len(r) == 5 and r[0] in ("10,000", "20,000")]  # the start-up rows
    assert [r[3:] for r in start] == [["1,000", "1,000"]] * 2, out  # restored, dispatched
    assert not any(tmp_path.iterdir()), "the run left its files behind"
