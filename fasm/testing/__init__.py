"""Testing toolkit: deterministic simulation, fault plans, checkers, the store conformance suite
that every :class:`~fasm.persistence.Store`, ours or a user's, runs, and the key-value
conformance suite every :class:`~fasm.persistence.Database` runs."""

from __future__ import annotations

from ._checks import SuspendedError as SuspendedError
from ._kv_suite import KV_CHECKS as KV_CHECKS
from ._kv_suite import KVConformance as KVConformance
from ._kv_suite import check_kv as check_kv
from ._sim import InputSource as InputSource
from ._sim import Simulation as Simulation
from ._sim import simulate as simulate
from ._sim_config import CRASH_POINTS as CRASH_POINTS
from ._sim_config import Checks as Checks
from ._sim_config import CrashPoint as CrashPoint
from ._sim_config import ExecutorSpec as ExecutorSpec
from ._sim_config import FaultPlan as FaultPlan
from ._sim_config import SimExecutor as SimExecutor
from ._sim_config import Weighted as Weighted
from ._sim_keyed import KeyedInputSource as KeyedInputSource
from ._sim_keyed import KeyedSimulation as KeyedSimulation
from ._sim_pytest import simulation_test as simulation_test
from ._sim_report import Effects as Effects
from ._sim_report import Failure as Failure
from ._sim_report import Progress as Progress
from ._sim_report import SeedResult as SeedResult
from ._sim_report import SimReport as SimReport
from ._sim_report import SimulationFailed as SimulationFailed
from ._store_suite import STORE_CHECKS as STORE_CHECKS
from ._store_suite import StoreConformance as StoreConformance
from ._store_suite import check_store as check_store

__all__ = (
    "STORE_CHECKS",
    "StoreConformance",
    "check_store",
    # the key-value layer of transactional state
    "KV_CHECKS",
    "KVConformance",
    "check_kv",
    # simulation
    "CRASH_POINTS",
    "Checks",
    "CrashPoint",
    "Effects",
    "ExecutorSpec",
    "Failure",
    "FaultPlan",
    "InputSource",
    "KeyedInputSource",
    "KeyedSimulation",
    "Progress",
    "SeedResult",
    "SimExecutor",
    "SimReport",
    "Simulation",
    "SimulationFailed",
    "SuspendedError",
    "Weighted",
    "simulate",
    "simulation_test",
)

# Show public names in tracebacks and reprs, as fasm and fasm.runtime do.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("fasm.testing._"):
        _obj.__module__ = "fasm.testing"
del _name, _obj
