"""The framework's own checks on a simulated run (see :class:`~fasm.testing.Checks`): determinism
by re-execution on a replica, restore completeness, results absorbed, duplicates refused.

A mixin of :class:`~fasm.testing._sim_world.Run`: the run performs, these methods judge. They raise
:class:`~fasm.testing._checks.Violation` with a message meant for the failure report.
"""

from __future__ import annotations

from typing import Any

from .._actions import ActionList, Tracked
from .._inputs import Input
from ..errors import Rejected
from ..runtime._engine import Accepted, Engine, Failed
from ._checks import Violation, diff, run_sync, short
from ._sim_config import Checks
from ._sim_setup import Setup

__all__ = ("Verifier",)


class Verifier:
    """Checks over the state of a :class:`Run` (the attributes below are the run's)."""

    s: Setup
    checks: Checks
    engine: Engine
    durable: dict[Any, Any]
    shadow: Any
    snap: Any

    def compare_restore(self, emitted: list[Tracked[Any, Any]], when: str) -> None:
        seen: dict[Any, Any] = {}
        twice = []
        for a in emitted:
            if a.id in seen:
                twice.append(a.id)
            seen[a.id] = a.action
        lost = [i for i in self.durable if i not in seen]
        invented = [i for i in seen if i not in self.durable]
        if not (lost or invented or twice):
            return
        lines = [f"restore {when} did not re-emit exactly the pending tracked actions"]
        for i in lost:
            lines.append(f"lost: {i!r} ({short(self.durable[i])}) was emitted and committed, and "
                         "no result was committed for it; restore forgot it, so it never "
                         "completes")
        for i in invented:
            lines.append(f"invented: {i!r} ({short(seen[i])}) is not pending (never emitted, "
                         "or its result was already committed)")
        for i in twice:
            lines.append(f"emitted twice: {i!r}")
        raise Violation("restore", "\n".join(lines))

    def rerun(self, inp: Input[Any, Any, Any], step: Accepted) -> Any:
        """Determinism: the same input on the replica must give the same actions and state.
        Returns the plain post-state (reused by later checks)."""
        actions: ActionList[Any, Any, Any] = ActionList()
        what = f"re-running {short(inp)} on a copy of the state before it"
        try:
            run_sync(self.s.machine.stf(self.shadow, inp, actions), "stf (re-run)")
        except Exception as e:
            raise Violation("determinism", f"{what} raised {e!r}; the first run "
                                           "returned") from e
        again = tuple(actions)
        if again != step.actions:
            raise Violation("determinism", f"{what} emitted different actions:\n"
                            f"first:  {short(list(step.actions), 300)}\n"
                            f"re-run: {short(list(again), 300)}\n(ids from randomness or the "
                            "clock, or iteration over a set, differ between runs)")
        tools = self.s.tools
        now, then = tools.plain(self.engine.state), tools.plain(self.shadow)
        if now != then:
            raise Violation("determinism", f"{what} left a different state: "
                            f"{'; '.join(diff(now, then))}")
        return now

    def rerun_failed(self, inp: Input[Any, Any, Any], step: Failed, *, checked: bool) -> None:
        first = step.error if isinstance(step.error, Rejected) else step.error.__cause__
        error: Exception | None = None
        try:
            run_sync(self.s.machine.stf(self.shadow, inp, ActionList()), "stf (re-run)")
        except Exception as e:
            error = e
        if error is None or type(error) is not type(first):
            raise Violation("determinism", f"re-running {short(inp)} on a copy of the state "
                            f"before it gave {error!r}; the first run raised {first!r}")
        tools = self.s.tools
        now = self.snap if self.snap is not None else tools.plain(self.engine.state)
        self.snap = now
        if tools.plain(self.shadow) != now:
            if checked:
                # The first run was atomic (checked above), so the re-run changing its copy
                # before raising is a different behaviour on equal state.
                raise Violation("determinism", f"re-running {short(inp)} on a copy of the state "
                                "before it changed the copy before raising; the first run did "
                                "not change state")
            self.shadow = tools.loaded(tools.encode(self.engine.state))

    def check_result_step(self, inp: Any, pending: bool, pre: Any, post: Any,
                          error: BaseException | None = None) -> None:
        checks = self.checks
        if pending and checks.absorbed:
            if post is None:
                raise Violation("absorbed", f"stf refused {short(inp)}, the result of a pending "
                                f"tracked action, with {error!r}: the Runtime drops it, and the "
                                "action stays pending until a restart")
            if post == pre:
                raise Violation("absorbed", f"{short(inp)} completed a pending tracked action "
                                "but changed nothing in state: state still says it is pending, "
                                "so restore would re-emit it after every restart")
        elif not pending and checks.duplicates and post is not None and post != pre:
            raise Violation("duplicates", f"{short(inp)} is not pending (a duplicated or "
                            f"late delivery) and changed state: {'; '.join(diff(pre, post))}. A "
                            "result delivered twice must be refused or change nothing")

    def probe_restore(self) -> None:
        actions: ActionList[Any, Any, Any] = ActionList()
        try:
            run_sync(self.s.machine.restore(self.engine.state, actions), "restore")
        except Exception as e:
            raise Violation("restore", f"restore raised {e!r} on the committed state") from e
        emitted = []
        for a in actions:
            if not isinstance(a, Tracked):
                raise Violation("restore", f"restore emitted {short(a)}: it may only re-emit "
                                           "pending tracked actions")
            emitted.append(a)
        self.compare_restore(emitted, f"run on the state committed at seq "
                                      f"{self.engine.committed_seq}")
