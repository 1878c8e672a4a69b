"""fasm: Fallible Async State Machines.

Write a deterministic ``stf(state, input, actions)`` and ``restore(state, actions)``; the
:class:`~fasm.runtime.Runtime` makes every committed transition durable, dispatches tracked
actions to executors and feeds their results back, and on restart calls ``restore`` so nothing in
flight is lost. :mod:`fasm.testing` runs the same engine under seeded crashes and faults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._actions import Action as Action
from ._actions import ActionList as ActionList
from ._actions import ActionsContainer as ActionsContainer
from ._actions import BoundedActions as BoundedActions
from ._actions import Tracked as Tracked
from ._actions import Untracked as Untracked
from ._inputs import Input as Input
from ._inputs import Normal as Normal
from ._inputs import TrackedActionCompleted as TrackedActionCompleted
from ._machine import MachineTypes as MachineTypes
from ._machine import StateMachine as StateMachine
from ._send import Delivered as Delivered
from ._send import Refused as Refused
from ._send import Send as Send
from ._timer import Timer as Timer
from ._timer import TimerFired as TimerFired
from .errors import ActionsFull as ActionsFull
from .errors import ConstraintViolation as ConstraintViolation
from .errors import DefinitionError as DefinitionError
from .errors import FasmError as FasmError
from .errors import InvalidInput as InvalidInput
from .errors import Rejected as Rejected
from .errors import RestoreFailed as RestoreFailed
from .errors import TransitionFailed as TransitionFailed

if TYPE_CHECKING:
    from .persistence._store import KeyCommit as KeyCommit

__all__ = (
    "Action",
    "ActionList",
    "ActionsContainer",
    "ActionsFull",
    "BoundedActions",
    "ConstraintViolation",
    "DefinitionError",
    "Delivered",
    "FasmError",
    "Input",
    "InvalidInput",
    "KeyCommit",
    "MachineTypes",
    "Normal",
    "Refused",
    "Rejected",
    "RestoreFailed",
    "Send",
    "StateMachine",
    "Timer",
    "TimerFired",
    "Tracked",
    "TrackedActionCompleted",
    "TransitionFailed",
    "Untracked",
)

__version__ = "0.1.0"

# Show public names in tracebacks and reprs (anyio and trio do the same).
for _name in __all__:
    if _name not in globals():
        continue  # loaded on first use (__getattr__ below)
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("fasm._"):
        _obj.__module__ = "fasm"
del _name, _obj


def __getattr__(name: str) -> Any:
    # The store's data types live in fasm.persistence, which imports anyio: load them only when
    # asked, so that the core model stays free of I/O libraries.
    if name == "KeyCommit":
        from .persistence._store import KeyCommit

        return KeyCommit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
