"""Optimizer-state pytrees <-> plain containers, for ``torch.save(weights_only=True)``.

Used by :class:`funcopt.FuncoptOptimizer`'s ``state_dict``: NamedTuples become tagged dicts,
every other node a plain list or dict, so the result holds only tensors and Python containers.
A NamedTuple's type is recorded under the name checkpoints use (:func:`funcopt.checkpoint.type_name`:
``"funcopt.ScaleByAdamState"`` for funcopt's state types, which does not change when a class
moves) and resolved the same way (:func:`funcopt.checkpoint.resolve_type_name`, which never
imports a module and still knows the names funcopt 0.1.0 recorded).
"""

from __future__ import annotations

from typing import Any

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree
from funcopt.checkpoint import resolve_type_name, type_name

__all__ = ["state_to_plain", "state_from_plain"]

_TAG = "__funcopt_type__"


def state_to_plain(tree: PyTree) -> Any:
    """Converts a pytree (NamedTuples included) to tensors in plain dicts/lists.

    Like ``flax.serialization.to_state_dict``: each container becomes a dict tagged with its
    kind (``{"__funcopt_type__": "namedtuple", "type": "funcopt.ScaleByAdamState", "fields": {...}}``,
    ``"tuple"``, ``"list"`` or ``"dict"``), so the result loads with
    ``torch.load(weights_only=True)`` (no pickled classes) and :func:`state_from_plain` rebuilds
    the original types. A NamedTuple is recorded under :func:`funcopt.checkpoint.type_name`: the
    stable name of a funcopt state type, the :func:`funcopt.checkpoint.register` name of a user
    class, else ``"module:QualName"``. Leaves may be tensors, Python scalars, strings or ``None``.

    Raises:
        TypeError: naming the path of a leaf of another type.
    """

    def enc(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            return node.detach()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            cls = type(node)
            return {
                _TAG: "namedtuple",
                "type": type_name(cls),
                "fields": {f: enc(v, f"{path}.{f}") for f, v in zip(node._fields, node)},
            }
        if isinstance(node, (tuple, list)):
            kind = "tuple" if isinstance(node, tuple) else "list"
            return {_TAG: kind, "items": [enc(v, f"{path}[{i}]") for i, v in enumerate(node)]}
        if isinstance(node, dict):
            for k in node:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"state_to_plain: dict key {k!r} at {path or '<root>'} is not a str or int.")
            return {
                _TAG: "dict",
                "keys": list(node),
                "values": [enc(v, f"{path}[{k!r}]") for k, v in node.items()],
            }
        raise TypeError(
            f"state_to_plain: leaf at {path or '<root>'} is a {type(node).__name__}; only tensors, "
            "Python scalars, strings, None, dicts, lists, tuples and NamedTuples can be saved."
        )

    return enc(tree, "")


def _resolve_namedtuple(name: Any, fields: list[str], path: str) -> type:
    cls = resolve_type_name(name)
    if cls is None:
        raise FuncoptError(
            f"state_from_plain: cannot rebuild the NamedTuple {name!r} at {path or '<root>'}: it is "
            "neither a funcopt state type nor registered. Call funcopt.checkpoint.register(YourClass) "
            "first, or pass like= (e.g. tx.init(params)) to rebuild from a template."
        )
    if list(cls._fields) != fields:
        raise FuncoptError(
            f"state_from_plain: the NamedTuple at {path or '<root>'} was saved as {name} with fields "
            f"{tuple(fields)}, but that class now has fields {tuple(cls._fields)}. Pass like= (e.g. "
            "tx.init(params)) and convert the state by hand."
        )
    return cls


def _names_match(name: Any, cls: type) -> bool:
    """Whether a recorded type name fits the template's class: it resolves to that class, or
    resolves to nothing (an unregistered user class) and names a class of the same name."""
    resolved = resolve_type_name(name)
    if resolved is not None:
        return resolved is cls
    return _short_name(name) == cls.__name__


def _short_name(name: Any) -> str:
    """``"ScaleByAdamState"`` for ``"funcopt.ScaleByAdamState"`` or ``"module:Outer.ScaleByAdamState"``."""
    return str(name).rpartition(":")[2].rpartition(".")[2]


def state_from_plain(plain: Any, like: PyTree | None = None) -> PyTree:
    """Inverse of :func:`state_to_plain`; with ``like=`` (a template such as ``tx.init(params)``)
    checks every container type, shape and dtype against it and moves each tensor to the device
    of the template's leaf (the ``map_location`` of ``torch.load`` done per leaf).

    Without ``like``, NamedTuple types are resolved by :func:`funcopt.checkpoint.resolve_type_name`
    (funcopt's state types, under their current or 0.1.0 names, and classes registered with
    :func:`funcopt.checkpoint.register`); nothing is imported or executed on load. Other user
    classes need ``like=``.

    Raises:
        FuncoptError: naming the first path where ``plain`` and ``like`` differ.
    """

    def mismatch(path: str, what: str) -> FuncoptError:
        return FuncoptError(
            f"state_from_plain: at {path or '<root>'}: {what}. The saved state does not fit this "
            "optimizer (was it saved from a different transformation or different params?)."
        )

    def dec(node: Any, tmpl: Any, path: str) -> Any:
        has_t = tmpl is not _NO_TEMPLATE
        if isinstance(node, torch.Tensor):
            if not has_t:
                return node
            if not isinstance(tmpl, torch.Tensor):
                raise mismatch(path, f"saved a tensor, expected {_tree._describe(tmpl)}")
            if node.shape != tmpl.shape or node.dtype != tmpl.dtype:
                raise mismatch(
                    path,
                    f"saved {node.dtype} of shape {tuple(node.shape)}, expected {tmpl.dtype} of "
                    f"shape {tuple(tmpl.shape)}",
                )
            return node.to(tmpl.device)
        if not isinstance(node, dict) or _TAG not in node:
            if has_t and (isinstance(tmpl, torch.Tensor) or type(node) is not type(tmpl)):
                raise mismatch(path, f"saved {_tree._describe(node)}, expected {_tree._describe(tmpl)}")
            return node
        kind = node[_TAG]
        if kind == "namedtuple":
            fields = list(node["fields"])
            if has_t:
                if not (isinstance(tmpl, tuple) and hasattr(tmpl, "_fields")):
                    raise mismatch(path, f"saved a NamedTuple {node['type']}, expected {_tree._describe(tmpl)}")
                cls = type(tmpl)
                if not _names_match(node["type"], cls) or fields != list(cls._fields):
                    saved_name = _short_name(node["type"])
                    raise mismatch(path, f"saved {saved_name}{tuple(fields)}, expected {_tree._describe(tmpl)}")
            else:
                cls = _resolve_namedtuple(node["type"], fields, path)
            return cls(
                *(
                    dec(node["fields"][f], getattr(tmpl, f) if has_t else _NO_TEMPLATE, f"{path}.{f}")
                    for f in fields
                )
            )
        if kind in ("tuple", "list"):
            items = node["items"]
            want = tuple if kind == "tuple" else list
            if has_t and (type(tmpl) is not want or len(tmpl) != len(items)):
                raise mismatch(path, f"saved a {kind} of length {len(items)}, expected {_tree._describe(tmpl)}")
            out = [dec(v, tmpl[i] if has_t else _NO_TEMPLATE, f"{path}[{i}]") for i, v in enumerate(items)]
            return want(out)
        if kind == "dict":
            keys = node["keys"]
            if has_t and (not isinstance(tmpl, dict) or set(tmpl) != set(keys)):
                raise mismatch(path, f"saved a dict with keys {sorted(map(str, keys))}, expected {_tree._describe(tmpl)}")
            return {
                k: dec(v, tmpl[k] if has_t else _NO_TEMPLATE, f"{path}[{k!r}]")
                for k, v in zip(keys, node["values"])
            }
        raise FuncoptError(f"state_from_plain: unknown container tag {kind!r} at {path or '<root>'}.")

    return dec(plain, _NO_TEMPLATE if like is None else like, "")


_NO_TEMPLATE = object()
