"""The names NamedTuple types are recorded under in checkpoints and state_dicts, and how a name is resolved.

A funcopt state type is recorded under its stable name (``"funcopt.ScaleByAdamState"``, given by
:func:`funcopt.base.stable_name`), which does not depend on the module that defines the class,
so moving a class inside funcopt never breaks a saved file. A user class is recorded under the
name given to :func:`register`, else as ``"module:QualName"``.

Resolving a name (:func:`resolve_type_name`) only looks it up in tables, in this order: the
user registry (:func:`register`), funcopt's stable names, then :data:`ALIASES`. It never imports
a module and never reads an attribute named by a file.

:data:`ALIASES` maps every name an earlier funcopt release recorded for one of its types
(``"module:QualName"`` in 0.1.0) to that type's stable name. Files written by those releases
stay on disk for years, so entries are never removed; only added, when an old name turns up.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from funcopt.base import FuncoptError, stable_name_of, type_of_stable_name

__all__ = [
    "ALIASES",
    "register",
    "type_name",
    "resolve_type_name",
    "short_name",
    "names_match",
    "is_namedtuple_class",
]

ALIASES: MappingProxyType[str, str] = MappingProxyType(
    {
        # funcopt 0.1.0: "module:QualName" as the class reported it.
        "funcopt.base:EmptyState": "funcopt.EmptyState",
        "funcopt.inject:InjectHyperparamsState": "funcopt.InjectHyperparamsState",
        "funcopt.lbfgs:ScaleByLbfgsState": "funcopt.ScaleByLbfgsState",
        "funcopt.linalg_common:SolveInfo": "funcopt.SolveInfo",
        "funcopt.linesearch:ScaleByBacktrackingLinesearchState": "funcopt.ScaleByBacktrackingLinesearchState",
        "funcopt.linesearch:ScaleByZoomLinesearchState": "funcopt.ScaleByZoomLinesearchState",
        "funcopt.minimize:MinimizeResult": "funcopt.MinimizeResult",
        "funcopt.plateau:ReduceOnPlateauState": "funcopt.ReduceOnPlateauState",
        "funcopt.sweep_result:BestConfig": "funcopt.BestConfig",
        "funcopt.transforms:ScaleByAdamState": "funcopt.ScaleByAdamState",
        "funcopt.transforms:ScaleByAdamaxState": "funcopt.ScaleByAdamaxState",
        "funcopt.transforms:ScaleByLionState": "funcopt.ScaleByLionState",
        "funcopt.transforms:ScaleByNadamState": "funcopt.ScaleByNadamState",
        "funcopt.transforms:ScaleByRmsState": "funcopt.ScaleByRmsState",
        "funcopt.transforms:ScaleByRssState": "funcopt.ScaleByRssState",
        "funcopt.transforms:ScaleByScheduleState": "funcopt.ScaleByScheduleState",
        "funcopt.transforms:TraceState": "funcopt.TraceState",
        "funcopt.wrappers:AccumulateState": "funcopt.AccumulateState",
        "funcopt.wrappers:ApplyIfFiniteState": "funcopt.ApplyIfFiniteState",
        "funcopt.wrappers:MaskedState": "funcopt.MaskedState",
        "funcopt.wrappers:MultiTransformState": "funcopt.MultiTransformState",
        # Before linalg and sweep were split into several modules (also 0.1.0 development).
        "funcopt.linalg:SolveInfo": "funcopt.SolveInfo",
        "funcopt.sweep:BestConfig": "funcopt.BestConfig",
    }
)
"""Old name -> stable name, for every name an earlier funcopt recorded. Never remove an entry."""

_REGISTRY: dict[str, type] = {}
_REGISTERED_NAMES: dict[type, str] = {}


def is_namedtuple_class(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple)


def _reserved(name: str) -> bool:
    return name == "funcopt" or name.startswith(("funcopt.", "funcopt:"))


def register(cls: type, *, name: str | None = None) -> type:
    """Allows :func:`load` (without ``like``) to rebuild the user NamedTuple ``cls``.

    funcopt's own state types are known without registration (under their stable names, such as
    ``"funcopt.ScaleByAdamState"``). Usable as a class decorator. ``name`` is what files record
    for ``cls``; it defaults to ``"module:QualName"``. Pass a name that does not depend on the
    module (``name="myproject.MyState"``) to keep checkpoints loadable after moving the class;
    files saved before keep loading if the class is also registered under its old name (the name
    registered last is the one files record).
    Names starting with ``funcopt.`` are reserved for funcopt's own types.

    Example:
        >>> @funcopt.checkpoint.register
        ... class MyState(NamedTuple):
        ...     count: torch.Tensor
        ...     ema: dict
    """
    if not is_namedtuple_class(cls):
        raise TypeError(
            f"register expects a NamedTuple class, got {cls!r}. Only NamedTuple types can be "
            "rebuilt from a checkpoint; other containers must be dicts, lists or tuples."
        )
    stable = stable_name_of(cls)
    if stable is not None:
        if name is None or name == stable:
            return cls  # a funcopt type: already known under its stable name
        raise FuncoptError(
            f"register: {cls.__qualname__} is a funcopt state type, always saved under its stable name "
            f"{stable!r}; it cannot be registered under {name!r}. Register your own NamedTuple instead."
        )
    key = name if name is not None else f"{cls.__module__}:{cls.__qualname__}"
    if not isinstance(key, str) or not key:
        raise TypeError(f"register: name must be a non-empty string, got {name!r}.")
    if _reserved(key):
        raise FuncoptError(
            f"register: the name {key!r} starts with 'funcopt', which is reserved for funcopt's own "
            f"state types. Pass a name of your own, e.g. register({cls.__qualname__}, "
            f"name='myproject.{cls.__qualname__}')."
        )
    other = _REGISTRY.get(key)
    if other is not None and other is not cls and (other.__module__, other.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise FuncoptError(
            f"register: the name {key!r} is already taken by {other.__module__}.{other.__qualname__}. "
            "Pass a different name=."
        )
    _REGISTRY[key] = cls
    _REGISTERED_NAMES[cls] = key
    return cls


def type_name(cls: type) -> str:
    """The name files record for the NamedTuple type ``cls``.

    The name given to :func:`register`, else funcopt's stable name (``"funcopt.ScaleByAdamState"``),
    else ``"module:QualName"`` (which :func:`resolve_type_name` resolves only once registered).
    """
    registered = _REGISTERED_NAMES.get(cls)
    if registered is not None:
        return registered
    stable = stable_name_of(cls)
    if stable is not None:
        return stable
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_type_name(name: str) -> type | None:
    """The NamedTuple type a file's type name stands for, or None when it is unknown.

    Looks ``name`` up in the user registry (:func:`register`), then among funcopt's stable names,
    then among the names earlier funcopt versions recorded (``"funcopt.transforms:ScaleByAdamState"``).
    Never imports a module, so a file cannot make funcopt run code.
    """
    if not isinstance(name, str):
        return None
    cls = _REGISTRY.get(name)
    if cls is None:
        cls = type_of_stable_name(name)
    if cls is None and name in ALIASES:
        cls = type_of_stable_name(ALIASES[name])
    return cls


def short_name(name: str) -> str:
    """The class name in a recorded type name: ``"ScaleByAdamState"`` for both
    ``"funcopt.ScaleByAdamState"`` and ``"funcopt.transforms:ScaleByAdamState"``."""
    return str(name).rpartition(":")[2].rpartition(".")[2]


def names_match(name: str, cls: type) -> bool:
    """Whether a recorded type name fits the template class ``cls`` (``like=`` loading): the name
    resolves to ``cls``, or resolves to nothing and names a class called like ``cls``."""
    resolved = resolve_type_name(name)
    if resolved is not None:
        return resolved is cls
    return short_name(name) == cls.__name__
