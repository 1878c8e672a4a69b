"""The README's main demo runs non-interactively, and survives being killed mid-flight."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from examples.payments.machine import (
    Charge,
    Charged,
    CheckStatus,
    Declined,
    InsufficientCredit,
    OpenAccount,
    Pay,
    Payments,
    PaymentsMachine,
)
from fasm import ActionList, Normal, Tracked, TrackedActionCompleted

SERVICE = Path(__file__).resolve().parents[2] / "examples" / "payments" / "service.py"


def run_service(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SERVICE), "--data", str(data), "--quiet",
                           "--seed", "7", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_demo_runs_to_a_consistent_report(tmp_path: Path, store: str) -> None:
    result = run_service(tmp_path, "--payments", "15", "--store", store)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CONSISTENT" in result.stdout
    assert "started at seq 0" in result.stdout


@pytest.mark.slow
def test_demo_killed_mid_flight_recovers_pending_charges(tmp_path: Path) -> None:
    restored = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(SERVICE), "--data", str(tmp_path),
                                 "--quiet", "--forever"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        seen = ""
        while "committed seq" not in seen:  # kill it mid-flight, however slow the start was
            line = proc.stdout.readline()
            assert line, f"the service exited before committing anything: {seen}"
            seen += line
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert "committed seq" in seen + out
        again = run_service(tmp_path, "--payments", "0")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "CONSISTENT" in again.stdout
        first = again.stdout.splitlines()[0]
        restored += int(first.split("restore re-dispatched ")[1].split()[0])
    assert restored > 0, "no kill caught a charge in flight"


@pytest.mark.anyio
async def test_machine_reserves_confirms_and_releases() -> None:
    machine, state, actions = PaymentsMachine(), Payments(), ActionList()
    await machine.stf(state, Normal(OpenAccount("ada", 100)), actions)
    await machine.stf(state, Normal(Pay("ada", 60)), actions)
    assert next(iter(actions)) == Tracked(0, Charge("ada", 60))
    assert state.credit["ada"] == 40
    with pytest.raises(InsufficientCredit):
        await machine.stf(state, Normal(Pay("ada", 60)), actions)
    await machine.stf(state, Normal(Pay("ada", 30)), actions)
    await machine.stf(state, TrackedActionCompleted(0, Charged("t1")), actions)
    await machine.stf(state, TrackedActionCompleted(1, Declined("no")), actions)
    assert (state.payments[0].status, state.payments[1].status) == ("confirmed", "declined")
    assert state.credit["ada"] == 40
    actions.clear()
    await machine.restore(state, actions)
    assert list(actions) == []
    state.payments[0].status = "pending"
    await machine.restore(state, actions)
    assert list(actions) == [Tracked(0, CheckStatus("ada", 60))]
