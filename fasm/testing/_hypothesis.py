"""Hypothesis glue: draw inputs from strategies, and shrink a failing simulation.

Under hypothesis every random choice of a run (which input, whether to crash here, how long an
attempt takes, how many inputs share a commit) is drawn from hypothesis's data through
``st.randoms(use_true_random=False)``. Its shrinker then reduces those choices, and because every
fault decision is written so that a choice of 0 means "no fault" and every input may be skipped,
a shrunk run keeps only the inputs and faults that the failure needs. The failure is reported as
the run's full trace: a script of submits, results, commits, crashes and restarts.

Hypothesis is imported only when these functions are called.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._sim_report import Failure, SimulationFailed

if TYPE_CHECKING:
    import hypothesis

    from ._sim import Simulation

__all__ = ("hypothesis_test", "shrink", "strategy_sampler")

_SKIP = 0.25  # chance an arrival brings no input; shrinking raises it to "always skip"


def strategy_sampler(strategy: Any, rng: random.Random) -> Callable[[Any], Any]:
    """Draw inputs from a hypothesis strategy outside a hypothesis test, deterministically
    from ``rng`` (for seeded runs with a strategy as the input source).

    This uses hypothesis's internal ``ConjectureData``, the object its own engine draws with.

    Raises:
        RuntimeError: (when drawing) this hypothesis version's internals differ; use a function
            input source or :meth:`Simulation.hypothesis_test` instead.
    """
    try:
        from hypothesis.control import BuildContext
        from hypothesis.internal.conjecture.data import ConjectureData
    except ImportError as e:  # pragma: no cover - depends on the installed hypothesis
        raise RuntimeError(_INTERNALS) from e

    def draw(state: Any) -> Any:
        try:
            data = ConjectureData(random=random.Random(rng.getrandbits(64)))
            with BuildContext(data, wrapped_test=_no_test):
                value = data.draw(strategy)
            data.freeze()
        except TypeError as e:  # pragma: no cover - signature changed
            raise RuntimeError(_INTERNALS) from e
        return value

    return draw


def _no_test() -> None:  # BuildContext wants the test it runs for; there is none
    return None


_INTERNALS = ("drawing from a hypothesis strategy in a seeded run needs hypothesis internals that "
              "this version does not have: give the Simulation a function input source "
              "fn(rng, state), or use sim.hypothesis_test()")


class _IntegerRandom(random.Random):
    """A ``Random`` whose every choice is one integer drawn from hypothesis.

    Hypothesis's own random draws a float for ``random()`` and ``uniform()``, several times
    slower than an integer; routing everything through ``getrandbits`` keeps a shrinking run
    fast, and integers shrink toward 0 just the same ("no fault", the first choice).

    ``random()`` reverses the bits of its integer: hypothesis generates small integers far more
    often than large ones, and reversed, their random low bits become the high bits of a float
    spread over [0, 1), while 0 still shrinks to 0.0.
    """

    def __init__(self, source: random.Random) -> None:
        super().__init__(0)
        self._source = source

    def random(self) -> float:
        return int(f"{self._source.getrandbits(24):024b}"[::-1], 2) / _ONE

    def getrandbits(self, k: int, /) -> int:
        return self._source.getrandbits(k)


_ONE = float(1 << 24)


def hypothesis_test(sim: Simulation[Any, Any], *, steps: int,
                    settings: hypothesis.settings | None,
                    replay: str = "run the hypothesis test again (it replays the failure it "
                                  "saved in its example database)") -> Callable[[], None]:
    """A hypothesis test that runs ``sim`` with hypothesis-drawn choices (see the module
    docstring), ``steps`` inputs at most per example.

    Raises:
        SimulationFailed: (when called) a check failed; hypothesis shrinks it first.
    """
    from hypothesis import given
    from hypothesis import strategies as st

    strategy = sim.inputs if sim._strategy else None
    source: Any = None if strategy is not None else sim.inputs

    @given(st.data())
    def test(data: Any) -> None:
        rng = _IntegerRandom(data.draw(st.randoms(use_true_random=False, note_method_calls=False)))
        if strategy is not None:
            def draw_input(state: Any) -> Any:
                return data.draw(strategy)
        else:
            def draw_input(state: Any) -> Any:
                return source(rng, state)
        result = sim.execute((rng, rng, rng), draw_input, steps * 4, seed=None, trace_limit=None,
                             keep_trace=False, skip=_SKIP, max_arrivals=steps, replay=replay)
        if result.failure is not None:
            raise SimulationFailed(
                result.failure,
                f"fasm simulation of {sim.name} under hypothesis: shrunk to this run "
                f"({result.failure.step} steps, {len(result.failure.faults)} fault(s)):")

    test.__name__ = f"test_{sim.name}_hypothesis"
    test.__qualname__ = test.__name__
    if settings is not None:
        return settings(test)
    return test


def shrink(sim: Simulation[Any, Any], *, steps: int, max_examples: int,
           derandomize: bool) -> Failure | None:
    """Search for a failure with hypothesis and return it shrunk, or None.

    Raises:
        Exception: anything but a check failure (the input source raised, say).
    """
    from hypothesis import HealthCheck, Verbosity, settings

    replay = (f"sim.shrink(steps={steps}, max_examples={max_examples}) (derandomized: the same "
              "search finds the same run)" if derandomize else "not replayable (random search)")
    test = hypothesis_test(sim, steps=steps, replay=replay, settings=settings(
        max_examples=max_examples, derandomize=derandomize, database=None, deadline=None,
        verbosity=Verbosity.quiet, print_blob=False,
        suppress_health_check=list(HealthCheck)))
    try:
        test()
    except SimulationFailed as e:
        return e.failure
    return None
