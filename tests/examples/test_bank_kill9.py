"""Proof by killing a real process: the bank of 10,000 keyed accounts on SQLite, under load from
64 submitters (deposits, transfers between random accounts, cash withdrawals through a slow
executor), with state objects in a SQLiteStore or in SQL tables (``database=``), is killed with
SIGKILL at random moments and restarted. After the last restart every acknowledged deposit is in
its account, every transfer and withdrawal in flight on any key has completed, and the money held
is exactly the money deposited (no message applied twice or lost).

FASM_BANK_KILLS sets the number of kills (default 12, as CI runs it).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.persistence._kill import kill_after, ready

CHILD = Path(__file__).with_name("bank_kill_child.py")
KILLS = int(os.environ.get("FASM_BANK_KILLS", "12"))


def _start(data: Path, seed: int, *mode: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, str(CHILD), str(data), str(seed), *mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready(proc)


def _acks(lines: list[str], deposits: Counter[str], kinds: Counter[str]) -> None:
    for line in lines:
        if line.startswith("ACK "):
            _, kind, key, what = line.split()
            kinds[kind] += 1
            if kind == "D":
                deposits[key] += int(what)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["store", "sql"])
def test_bank_of_10000_keys_killed_under_load_loses_nothing(tmp_path: Path, kind: str) -> None:
    rng = random.Random(12)
    deposits: Counter[str] = Counter()  # key -> money acknowledged as deposited
    kinds: Counter[str] = Counter()
    sql = ("--sql",) if kind == "sql" else ()
    proc, _ = _start(tmp_path, 0, "--open", *sql)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _acks(out.splitlines(), deposits, kinds)
    assert len(deposits) == 10_000

    keys_restored = actions_restored = 0
    for round_ in range(KILLS):
        proc, (_, keys, actions) = _start(tmp_path, round_ + 1, *sql)
        keys_restored += int(keys)
        actions_restored += int(actions)
        _acks(kill_after(proc, rng.uniform(0.3, 1.5)), deposits, kinds)

    proc, (_, keys, actions) = _start(tmp_path, 0, "--drain", *sql)
    keys_restored += int(keys)
    actions_restored += int(actions)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    state = json.loads(next(x for x in out.splitlines() if x.startswith("STATE "))[6:])

    assert kinds["T"] > 100 and kinds["W"] > 10, f"the load was too light: {kinds}"
    lost = {k: (v, state["deposited"][k]) for k, v in deposits.items()
            if state["deposited"][k] < v}
    assert not lost, f"acknowledged deposits missing after restart: {list(lost.items())[:5]}"
    assert state["sending"] == 0 and state["dispensing"] == 0 and state["in_flight"] == 0, (
        "transfers or withdrawals still in flight after the last restart")
    assert state["negative"] == 0
    assert state["held"] == state["total_deposited"], (
        f"money not conserved: held {state['held']}, deposited {state['total_deposited']}")
    assert actions_restored > 0, "no kill ever caught a transfer or withdrawal in flight"
    print(f"{kind}: {KILLS} kills, {sum(kinds.values())} acknowledged ({dict(kinds)}), "
          f"{keys_restored} keys with {actions_restored} actions restored at start, "
          f"{state['received']} credited, {state['paid_out']} paid out")
