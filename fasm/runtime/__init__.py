"""The Runtime that hosts a machine, and what it is configured with: executors and their retry
policy, clocks, and the events it reports to listeners."""

from __future__ import annotations

from ..errors import RuntimeClosed as RuntimeClosed
from ._clock import Clock as Clock
from ._clock import ManualClock as ManualClock
from ._clock import SystemClock as SystemClock
from ._engine import Rollback as Rollback
from ._events import ActionCompleted as ActionCompleted
from ._events import ActionDispatched as ActionDispatched
from ._events import ActionFailed as ActionFailed
from ._events import ActionRetried as ActionRetried
from ._events import ActionSlow as ActionSlow
from ._events import CheckpointFailed as CheckpointFailed
from ._events import DuplicateSubmitted as DuplicateSubmitted
from ._events import HandlerFailed as HandlerFailed
from ._events import Listener as Listener
from ._events import RuntimeEvent as RuntimeEvent
from ._events import TransactionRetried as TransactionRetried
from ._events import TransitionCommitted as TransitionCommitted
from ._events import TransitionRejected as TransitionRejected
from ._executors import ActionContext as ActionContext
from ._executors import Executor as Executor
from ._executors import ExecutorFn as ExecutorFn
from ._executors import Handler as Handler
from ._executors import HandlerContext as HandlerContext
from ._executors import RetryPolicy as RetryPolicy
from ._replay import DifferenceKind as DifferenceKind
from ._replay import ReplayDifference as ReplayDifference
from ._replay import ReplayReport as ReplayReport
from ._replay import replay as replay
from ._runtime import Committed as Committed
from ._runtime import Runtime as Runtime

__all__ = (
    "ActionCompleted",
    "ActionContext",
    "ActionDispatched",
    "ActionFailed",
    "ActionRetried",
    "CheckpointFailed",
    "ActionSlow",
    "Clock",
    "Committed",
    "DifferenceKind",
    "DuplicateSubmitted",
    "Executor",
    "ExecutorFn",
    "Handler",
    "HandlerContext",
    "HandlerFailed",
    "Listener",
    "ManualClock",
    "ReplayDifference",
    "ReplayReport",
    "RetryPolicy",
    "Rollback",
    "Runtime",
    "RuntimeClosed",
    "RuntimeEvent",
    "SystemClock",
    "TransactionRetried",
    "TransitionCommitted",
    "TransitionRejected",
    "replay",
)

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("fasm.runtime._"):
        _obj.__module__ = "fasm.runtime"
del _name, _obj
