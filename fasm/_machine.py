"""The StateMachine base class and the run-time view of its declared types."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Never, get_args, get_origin

from typing_extensions import TypeVar

from ._actions import ActionsContainer
from ._inputs import Input
from .errors import DefinitionError

S = TypeVar("S")
I = TypeVar("I")
TId = TypeVar("TId", default=Never)
TA = TypeVar("TA", default=Never)
TR = TypeVar("TR", default=Never)
U = TypeVar("U", default=Never)

__all__ = ("MachineTypes", "StateMachine", "type_members")

_PARAM_NAMES = ("state", "input", "tracked_id", "tracked_action", "tracked_result", "untracked")


@dataclass(frozen=True, slots=True)
class MachineTypes:
    """The types a machine class declared, readable at run time.

    The runtime uses them to validate submitted inputs and the persistence codec to (de)serialize
    state, inputs and results. ``typing.Never`` means "this machine has none of these".
    """

    state: Any
    input: Any
    tracked_id: Any
    tracked_action: Any
    tracked_result: Any
    untracked: Any


def type_members(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a declared type: the members of a union, nothing for ``Never``,
    otherwise the type itself."""
    if tp is Never or tp is typing.NoReturn:
        return ()
    origin = get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        out: list[Any] = []
        for arg in get_args(tp):
            out.extend(type_members(arg))
        return tuple(out)
    if origin is typing.Annotated:
        return type_members(get_args(tp)[0])
    return (tp,)


class StateMachine(Generic[S, I, TId, TA, TR, U]):
    """Base class of a user's machine: subclass it with concrete types and write ``stf`` and
    ``restore``.

    ``StateMachine[State, InputType, TrackedId, TrackedAction, TrackedResult, UntrackedAction]``;
    the last four default to ``Never`` (no tracked or no untracked actions). The types are read at
    run time, so a subclass that leaves them out fails when it is defined, and one that is still
    generic fails when a runtime is built with it.

    Class attributes a machine may set:

    * ``machine_name``: the name written into stored records and into executors' idempotency keys
      (default: the class's qualified name, which does not depend on how the module was
      launched). Records written under another name are refused: set it explicitly so that
      renaming the class does not orphan them.
    * ``schema_version`` and ``migrations``: bump the version when the shape of state or inputs
      changes, and give ``migrations[n]``, a function from the plain data of version ``n`` to that
      of ``n + 1``, so records written by older code still load. A migration that raises stops
      the load with :class:`~fasm.errors.MigrationFailed`.
    * ``dropped_fields``: field names whose stored data may be dropped on load, per part
      (``"state"``, ``"input"``, ``"tracked_result"``, ``"tracked_id"``), e.g.
      ``{"state": ("old_total",)}``. Without it, a stored record with a field the declared type
      no longer has (at any depth) is refused with :class:`~fasm.errors.IncompatibleRecord`
      rather than loaded with that data silently gone.

    Both methods must be deterministic: no clock, randomness, or outside reads; all of that
    arrives as inputs.
    """

    machine_name: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1
    migrations: ClassVar[Mapping[int, Callable[[Any], Any]]] = {}
    dropped_fields: ClassVar[Mapping[str, Collection[str]]] = {}

    __fasm_named__: ClassVar[bool] = False  # machine_name set explicitly here or in a base
    # The declared type arguments (possibly still TypeVars in a generic intermediate subclass).
    __fasm_args__: ClassVar[tuple[Any, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__fasm_args__ = _resolve_args(cls)
        if "machine_name" in cls.__dict__:
            cls.__fasm_named__ = True
        elif not cls.__fasm_named__:
            # The class name alone: the module path would differ between `python app.py`
            # (__main__) and an import, orphaning stored records and changing the idempotency
            # keys executors send out. An explicit name is inherited by subclasses.
            cls.machine_name = cls.__qualname__
        for name in ("stf", "restore"):
            fn = getattr(cls, name)
            if not inspect.iscoroutinefunction(fn):
                raise DefinitionError(
                    f"{cls.__qualname__}.{name} must be declared with 'async def'"
                )
        if not isinstance(cls.schema_version, int) or cls.schema_version < 1:
            raise DefinitionError(
                f"{cls.__qualname__}.schema_version must be an int >= 1, "
                f"got {cls.schema_version!r}"
            )
        for version in cls.migrations:
            if not 1 <= version < cls.schema_version:
                raise DefinitionError(
                    f"{cls.__qualname__}.migrations has a step from version {version}, "
                    f"outside 1..{cls.schema_version - 1}"
                )
        parts = ("state", "input", "tracked_id", "tracked_result")
        for part, names in cls.dropped_fields.items():
            if part not in parts or isinstance(names, str) or not all(
                    isinstance(n, str) for n in names):
                raise DefinitionError(
                    f"{cls.__qualname__}.dropped_fields maps one of {parts} to a tuple of field "
                    f"names, got {part!r}: {names!r}"
                )

    @classmethod
    def machine_types(cls) -> MachineTypes:
        """The declared types of this machine class.

        Raises:
            DefinitionError: the class is still generic (some type is a TypeVar).
        """
        found: MachineTypes | None = cls.__dict__.get("__fasm_types__")
        if found is not None:  # made once per class: every engine (every key loaded) asks
            return found
        args = cls.__fasm_args__
        unresolved = [n for n, a in zip(_PARAM_NAMES, args, strict=True) if isinstance(a, TypeVar)]
        if unresolved or not args:
            raise DefinitionError(
                f"{cls.__qualname__} is generic in {', '.join(unresolved)}: subclass it with "
                "concrete types, e.g. StateMachine[State, Input, int, Action, Result, Untracked]"
            )
        types = MachineTypes(*args)
        type.__setattr__(cls, "__fasm_types__", types)
        return types

    async def stf(
        self, state: S, input: Input[I, TId, TR], actions: ActionsContainer[TId, TA, U]
    ) -> None:
        """The state transition function: validate ``input``, mutate ``state``, add action
        descriptions to ``actions``.

        Raise :class:`~fasm.errors.Rejected` (or a subclass) for an expected refusal; any other
        exception is a failed transition. Either way the runtime keeps the state as it was.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement stf")

    async def restore(self, state: S, actions: ActionsContainer[TId, TA, U]) -> None:
        """Emit again every tracked action that ``state`` records as pending.

        Called at start, after the state is loaded, with a cleared container. A pure function of
        ``state``: it may only add :class:`~fasm.Tracked` actions.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement restore")


def _resolve_args(cls: type) -> tuple[Any, ...]:
    """Find the StateMachine type arguments of ``cls``, substituting through generic bases."""
    for base in getattr(cls, "__orig_bases__", ()):
        origin = get_origin(base)
        if origin is StateMachine:
            args = get_args(base)
            return tuple(args)
        if isinstance(origin, type) and issubclass(origin, StateMachine):
            parent_args: tuple[Any, ...] = origin.__fasm_args__
            mapping = dict(zip(getattr(origin, "__parameters__", ()), get_args(base), strict=False))
            return tuple(mapping.get(a, a) if isinstance(a, TypeVar) else a for a in parent_args)
    for base in cls.__bases__:
        if base is StateMachine:
            raise DefinitionError(
                f"{cls.__qualname__} subclasses StateMachine without its types: write "
                f"class {cls.__qualname__}(StateMachine[State, Input, TrackedId, TrackedAction, "
                "TrackedResult, UntrackedAction]) (the last four default to Never)"
            )
        if isinstance(base, type) and issubclass(base, StateMachine):
            return base.__fasm_args__
    return ()
