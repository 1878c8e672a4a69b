"""What a simulation fixes once and shares between its seeds: the machine, its codec and
validators, the executors, invariants, fault plan and checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._machine import StateMachine, type_members
from ..persistence._codec import Codec
from ..persistence._durability import Durability
from ..runtime._engine import Engine, Rollback, StrictValidator
from ._checks import Invariant, StateTools
from ._sim_config import Checks, FaultPlan, SimExecutor, lookup
from ._sim_report import Effects

__all__ = ("Setup",)

_CACHE = 4096  # validated result objects remembered per simulation


@dataclass(eq=False)
class Setup:
    """Everything about a simulation that does not change between seeds (built once)."""

    machine: StateMachine[Any, Any, Any, Any, Any, Any]
    initial: Callable[[str], Any]  # the initial state of a key
    executors: dict[type[Any], SimExecutor[Any, Any]]
    invariants: tuple[Invariant, ...]
    effects: tuple[Callable[[Effects], object], ...]
    plan: FaultPlan
    checks: Checks
    durability: Durability
    rollback: Rollback
    key: str
    idempotency_window: int
    keyed: Any = None  # a KeyedConfig: a keyed simulation (fasm/testing/_sim_keyed.py)
    codec: Codec = field(init=False)
    tools: StateTools = field(init=False)
    validator: Engine = field(init=False)
    results: StrictValidator | None = field(init=False)

    def __post_init__(self) -> None:
        types = type(self.machine).machine_types()
        self.codec = Codec(type(self.machine))
        self.tools = StateTools(self.codec, types.state)
        # One engine kept for Engine.validate, so the input validator is built once per
        # simulation and not once per simulated restart.
        self.validator = Engine(self.machine, state=None)
        self.results = _strict_adapter(types.tracked_result) if _declares(types.tracked_result) \
            else None
        # Results already validated, by identity (the object is kept, so its id stays its
        # own): a Weighted distribution hands out the same few objects again and again.
        self._valid_results: dict[int, Any] = {}
        self._executor_cache: dict[type[Any], SimExecutor[Any, Any]] = {}

    @property
    def machine_name(self) -> str:
        """The name production writes into executors' idempotency keys."""
        return type(self.machine).machine_name

    def executor_for(self, action_type: type[Any]) -> SimExecutor[Any, Any]:
        """The simulated executor of an action class (its own, or its nearest base's)."""
        spec = self._executor_cache.get(action_type)
        if spec is None:
            spec = self._executor_cache[action_type] = lookup(self.executors, action_type)
        return spec

    def result_known_valid(self, result: Any) -> bool:
        return self._valid_results.get(id(result)) is result

    def remember_valid_result(self, result: Any) -> None:
        if len(self._valid_results) < _CACHE:
            self._valid_results[id(result)] = result


def _declares(tp: Any) -> bool:
    return bool(type_members(tp))


def _strict_adapter(tp: Any) -> StrictValidator:
    # As the Runtime checks executor results: dataclass instances are revalidated too.
    return StrictValidator(tp)

