"""The ``simulation_test`` decorator. It needs no pytest import: the test it makes asks for the
``fasm_sim`` fixture, which the fasm pytest plugin (``fasm.testing._pytest_plugin``, registered
as an entry point) provides along with the ``--fasm-*`` options."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._sim import Simulation
    from ._sim_report import SimReport

__all__ = ("SimRunnerLike", "simulation_test")


class SimRunnerLike(Protocol):
    """What the ``fasm_sim`` fixture gives a test (see ``fasm.testing._pytest_plugin``)."""

    def check(self, sim: Simulation[Any, Any], *, seeds: int = 20, steps: int | None = None,
              budget: float | None = None) -> SimReport: ...


def simulation_test(
    *, seeds: int = 20, steps: int | None = None, budget: float | None = None
) -> Callable[[Callable[[], Simulation[Any, Any]]], Callable[[SimRunnerLike], None]]:
    """Turn a function that builds a :class:`Simulation` into a pytest test that runs it.

    ``seeds``, ``steps`` and ``budget`` are the defaults for a plain ``pytest`` run; the command
    line overrides them (``--fasm-seed``, ``--fasm-seeds``, ``--fasm-steps``, ``--fasm-budget``),
    so CI can run a short budget and a nightly job a long one without code changes. A failure's
    message holds the whole report and the command that replays its seed.

    Example::

        @simulation_test(seeds=50, steps=300)
        def test_payments() -> Simulation[PaymentSystem, Process]:
            return Simulation(PaymentMachine(), initial_state=..., inputs=..., executors=...)
    """

    def decorate(build: Callable[[], Simulation[Any, Any]]) -> Callable[[SimRunnerLike], None]:
        def test(fasm_sim: SimRunnerLike) -> None:
            fasm_sim.check(build(), seeds=seeds, steps=steps, budget=budget)

        # Not functools.wraps: pytest would follow __wrapped__ to build()'s signature and not
        # pass the fixture.
        test.__name__ = build.__name__
        test.__qualname__ = build.__qualname__
        test.__module__ = build.__module__
        test.__doc__ = build.__doc__
        return test

    return decorate
