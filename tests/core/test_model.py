"""The core model: inputs, actions, containers, machine declaration, errors."""

from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Generic, Never, TypeVar

import pytest

import fasm
from fasm import (
    ActionList,
    ActionsFull,
    BoundedActions,
    DefinitionError,
    Normal,
    StateMachine,
    Tracked,
    TrackedActionCompleted,
    Untracked,
)
from fasm._machine import type_members

ROOT = pathlib.Path(__file__).resolve().parents[2]


def describe(x: Any) -> str:
    match x:
        case Normal(int(v)):
            return f"normal int {v}"
        case Normal(value=v):
            return f"normal {v!r}"
        case TrackedActionCompleted(id=i, result=r):
            return f"completed {i} -> {r}"
        case Tracked(i, a):
            return f"tracked {i} {a}"
        case Untracked(a):
            return f"untracked {a}"
    return "?"


def test_inputs_and_actions_match() -> None:
    assert describe(Normal(3)) == "normal int 3"
    assert describe(Normal("x")) == "normal 'x'"
    assert describe(TrackedActionCompleted(7, "ok")) == "completed 7 -> ok"
    assert describe(Tracked(1, "charge")) == "tracked 1 charge"
    assert describe(Untracked("ping")) == "untracked ping"
    assert Normal(1) == Normal(1) and Normal(1) != Normal(2)
    with pytest.raises(AttributeError):
        Normal(1).value = 2  # type: ignore[misc]


def test_action_list_keeps_order_and_clears() -> None:
    actions: ActionList[int, str, str] = ActionList()
    actions.add(Tracked(1, "a"))
    actions.add(Untracked("b"))
    assert list(actions) == [Tracked(1, "a"), Untracked("b")]
    assert len(actions) == 2
    actions.clear()
    assert list(actions) == []


def test_bounded_actions_raise_typed_error_when_full() -> None:
    actions: BoundedActions[int, str, str] = BoundedActions(1)
    actions.add(Untracked("one"))
    with pytest.raises(ActionsFull, match="capacity 1"):
        actions.add(Untracked("two"))
    assert len(actions) == 1
    with pytest.raises(ValueError, match="capacity"):
        BoundedActions(-1)


def test_machine_types_are_read_at_run_time() -> None:
    @dataclass
    class St:
        n: int = 0

    class M(StateMachine[St, int, int, str, bool, bytes]):
        async def stf(self, state: St, input: Any, actions: Any) -> None: ...

        async def restore(self, state: St, actions: Any) -> None: ...

    t = M.machine_types()
    assert (t.state, t.input, t.tracked_id, t.tracked_action, t.tracked_result, t.untracked) == (
        St, int, int, str, bool, bytes)
    assert M.machine_name.endswith("M")


def test_machine_name_is_stable_however_the_module_is_launched() -> None:
    class Named(StateMachine[int, int]):
        machine_name = "shop.v1"

        async def stf(self, state: int, input: Any, actions: Any) -> None: ...

        async def restore(self, state: int, actions: Any) -> None: ...

    class Child(Named):
        pass

    class Plain(StateMachine[int, int]):
        async def stf(self, state: int, input: Any, actions: Any) -> None: ...

        async def restore(self, state: int, actions: Any) -> None: ...

    # no module path in the default: `python app.py` and `import app` must agree
    assert Plain.machine_name == Plain.__qualname__
    assert "__main__" not in Plain.machine_name and __name__ not in Plain.machine_name
    assert Child.machine_name == "shop.v1"


def test_defaults_mean_no_actions() -> None:
    class Counter(StateMachine[int, int]):
        async def stf(self, state: int, input: Any, actions: Any) -> None: ...

        async def restore(self, state: int, actions: Any) -> None: ...

    t = Counter.machine_types()
    assert t.tracked_action is Never and t.untracked is Never
    assert type_members(t.tracked_action) == ()


def test_undeclared_types_fail_at_class_definition() -> None:
    with pytest.raises(DefinitionError, match="without its types"):
        class Bare(StateMachine):  # type: ignore[type-arg]
            async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

            async def restore(self, state: Any, actions: Any) -> None: ...


def test_sync_methods_fail_at_class_definition() -> None:
    with pytest.raises(DefinitionError, match="stf must be declared with 'async def'"):
        class Sync(StateMachine[int, int]):
            def stf(self, state: Any, input: Any, actions: Any) -> None: ...  # type: ignore[override]

            async def restore(self, state: Any, actions: Any) -> None: ...


S = TypeVar("S")


def test_generic_intermediate_class_is_resolved_or_refused() -> None:
    class Base(StateMachine[S, int], Generic[S]):
        async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

        async def restore(self, state: Any, actions: Any) -> None: ...

    class Concrete(Base[str]):
        pass

    assert Concrete.machine_types().state is str
    assert Concrete.machine_types().input is int
    with pytest.raises(DefinitionError, match="generic in state"):
        Base.machine_types()


def test_schema_version_and_migrations_are_checked() -> None:
    with pytest.raises(DefinitionError, match=r"outside 1\.\.1"):
        class M(StateMachine[int, int]):
            schema_version = 2
            migrations = {2: lambda d: d}  # noqa: RUF012

            async def stf(self, state: Any, input: Any, actions: Any) -> None: ...

            async def restore(self, state: Any, actions: Any) -> None: ...


def test_type_members() -> None:
    assert type_members(int | str) == (int, str)
    assert type_members(int) == (int,)
    assert type_members(Never) == ()


def test_error_hierarchy_has_one_root() -> None:
    for name in fasm.errors.__all__:
        cls = getattr(fasm.errors, name)
        assert issubclass(cls, fasm.FasmError), name
    assert issubclass(fasm.errors.StoreConflict, fasm.errors.StoreError)
    assert issubclass(fasm.errors.IncompatibleRecord, fasm.errors.StoreCorrupt)
    e = fasm.errors.StoreConflict("stale", store="file:/x", key="k", seq=3)
    assert "store=file:/x" in str(e) and "key='k'" in str(e) and "seq=3" in str(e)


def test_public_names_are_exported_and_documented() -> None:
    import fasm.persistence
    import fasm.runtime

    for module in (fasm, fasm.runtime, fasm.persistence, fasm.errors):
        assert isinstance(module.__all__, tuple)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"
    assert fasm.Normal.__module__ == "fasm"
    assert fasm.runtime.Runtime.__module__ == "fasm.runtime"


_FORBIDDEN = {"anyio", "trio", "asyncio", "aiofiles", "sqlite3", "psycopg", "socket", "os",
              "time", "random", "fasm.persistence", "fasm.runtime._runtime"}


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[: -node.level])
                base = f"{pkg}.{base}" if base else pkg
            names.add(base)
    return names


@pytest.mark.parametrize(
    "module",
    ["fasm/_inputs.py", "fasm/_actions.py", "fasm/_machine.py", "fasm/_timer.py",
     "fasm/errors.py", "fasm/runtime/_engine.py"],
)
def test_core_and_engine_do_no_io(module: str) -> None:
    imported = _imports(ROOT / module)
    bad = {n for n in imported for f in _FORBIDDEN if n == f or n.startswith(f + ".")}
    assert not bad, f"{module} imports {bad}"


def test_importing_fasm_does_not_import_anyio() -> None:
    code = "import sys, fasm; assert 'anyio' not in sys.modules, 'anyio leaked into fasm core'"
    subprocess.run([sys.executable, "-c", code], check=True)
