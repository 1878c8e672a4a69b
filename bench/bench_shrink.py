"""How fast and how far ``Simulation.shrink_seed`` shrinks real failures.

    python bench/bench_shrink.py [--quick]

For each broken machine (tests/testing/gap_machines.py, tests/testing/machines.py and the seed
README's), the first failing seed of 200-step runs is shrunk with the default 10 s budget. The
table shows the step the seed failed at, the step the shrunk run fails at, how many runs the
search took and its wall time. The target: at most 10 s and at most 10 steps for a bug found
within 200 steps. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fasm.testing import Checks, FaultPlan, Simulation, Weighted


def cases() -> list[tuple[str, Callable[[], Simulation[Any, Any]]]]:
    from tests.testing import gap_machines as g
    from tests.testing import machines as m
    from tests.testing import test_finds_bugs as t

    def wallet(machine: g.WalletMachine, **options: Any) -> Callable[[], Simulation[Any, Any]]:
        return lambda: Simulation(
            machine, initial_state=g.Wallet, inputs=g.wallet_inputs,
            executors={g.Charge: Weighted((g.Charged(), 3), (g.Declined(), 1))},
            invariants=[g.books_balance], steps=200, **options)

    return [
        ("wallet: rare double refund", wallet(g.RareDoubleRefund())),
        ("wallet: reused ids", wallet(g.ReusesIds())),
        ("wallet: decline kept pending", wallet(g.DeclineKeepsPending(),
                                                checks=Checks(restore=False))),
        ("wallet: restore forgets charges", wallet(g.ForgetsCharges())),
        ("wallet: forgets timers (liveness)", wallet(g.ForgetsTimers(),
                                                     checks=Checks(restore=False))),
        ("desk: mutates then raises", lambda: m.desk_sim(m.MutatesThenRaises(), steps=200)),
        ("desk: restore forgets", lambda: m.desk_sim(m.RestoreForgets(), steps=200)),
        ("desk: ignores lost", lambda: m.desk_sim(m.IgnoresLost(), steps=200)),
        ("desk: calls in set order", lambda: m.desk_sim(m.CallsInSetOrder(), steps=200)),
        ("desk: counts duplicates", lambda: m.desk_sim(
            m.CountsDuplicates(), steps=200, faults=FaultPlan.at_least_once())),
        ("seed README: overdraft", lambda: t.payment_sim(invariants=[t.no_overdraft],
                                                         steps=200)),
        ("seed README: duplicated results", lambda: t.payment_sim(
            faults=FaultPlan.at_least_once(), steps=200)),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the first three machines only")
    parser.add_argument("--budget", type=float, default=10.0)
    args = parser.parse_args(argv)
    rows = cases()[:3] if args.quick else cases()
    print(f"{'machine':<36} {'seed':>4} {'check':<12} {'found at':>8} {'shrunk to':>9} "
          f"{'runs':>5} {'seconds':>8}")
    for name, build in rows:
        try:
            sim = build()
        except Exception as e:  # a machine this checkout does not have
            print(f"{name:<36} skipped: {e!r}")
            continue
        seed = next((s for s in range(200) if not sim.run_seed(s, trace_limit=0).ok), None)
        if seed is None:
            print(f"{name:<36} no failing seed in 0..199")
            continue
        found = sim.run_seed(seed, trace_limit=0).failure
        assert found is not None
        started = time.perf_counter()
        shrunk = sim.shrink_seed(seed, budget=args.budget)
        took = time.perf_counter() - started
        assert shrunk is not None
        runs = shrunk.replay.split(" in ")[-1].split(" runs")[0]
        print(f"{name:<36} {seed:>4} {found.check:<12} {found.step:>8} {shrunk.step:>9} "
              f"{runs:>5} {took:>8.2f}")


if __name__ == "__main__":
    main()
