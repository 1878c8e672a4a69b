"""Proof by killing real processes: a Runtime on FileStore and SQLiteStore under load is killed
with SIGKILL at random moments and restarted; nothing acknowledged is lost, nothing is torn, and
every tracked action completes exactly once after the last restart.

FASM_KILLS sets the number of kills per backend (default 50, as CI runs it);
bench/bench_kill9.py runs thousands and prints the counts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.persistence._kill import kill_after, ready

CHILD = Path(__file__).with_name("kill_child.py")
KILLS = int(os.environ.get("FASM_KILLS", "50"))


@dataclass
class Tally:
    kills: int = 0
    acked: dict[int, int] = field(default_factory=dict)  # ref -> seq acknowledged
    restored_pending: int = 0


def _start(kind: str, data: Path, seed: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CHILD), kind, str(data), str(seed), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_kills(kind: str, data: Path, kills: int, seed: int) -> Tally:
    """Kill the child ``kills`` times at random moments, collecting every acknowledgement."""
    rng = random.Random(seed)
    tally = Tally()
    for round_ in range(kills):
        proc = _start(kind, data, seed * 1000 + round_)
        _, seq, refs, pending = ready(proc)
        assert int(refs) >= len(tally.acked), "acknowledged records missing after restart"
        tally.restored_pending += int(pending)
        # Collect acknowledgements for a random while, then kill without warning.
        for line in kill_after(proc, rng.uniform(0.05, 0.4)):
            if line.startswith("ACK"):
                _, ref, seq = line.split()
                tally.acked[int(ref)] = int(seq)
        tally.kills += 1
    return tally


def drain(kind: str, data: Path) -> dict[str, dict[str, int]]:
    proc = _start(kind, data, 0, "--drain")
    ready(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    line = next(x for x in out.splitlines() if x.startswith("STATE "))
    state: dict[str, dict[str, int]] = json.loads(line[len("STATE "):])
    return state


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "file", "sqlite-snapshot", "file-snapshot"])
def test_kill9_loses_nothing_acknowledged(kind: str, tmp_path: Path) -> None:
    kills = KILLS if not kind.endswith("-snapshot") else max(5, KILLS // 5)
    tally = run_kills(kind, tmp_path, kills, seed=hash(kind) % 1000)
    state = drain(kind, tmp_path)
    refs = {int(k): v for k, v in state["refs"].items()}
    done = {int(k): v for k, v in state["done"].items()}
    assert tally.kills == kills
    assert len(tally.acked) > kills, "the load was too light to prove anything"
    lost = sorted(set(tally.acked) - set(refs))
    assert not lost, f"acknowledged but not recovered: {lost[:10]}"
    assert state["pending"] == {}, "tracked actions still pending after the final restart"
    assert set(done) == set(refs), "a recorded ref whose work never completed"
    assert all(n == 1 for n in done.values()), "a result applied more than once"
    assert tally.restored_pending > 0, "no kill ever caught work in flight"
    print(f"{kind}: {tally.kills} kills, {len(tally.acked)} acknowledged, "
          f"{len(refs)} recovered, {tally.restored_pending} pending actions restored")
