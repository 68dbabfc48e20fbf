"""Resolving masks and labels against the params tree (private helpers of ``masked`` and
``multi_transform``).

Labels and masks may be given as a full tree (one entry per leaf) or as a *prefix* of the params
tree: ``{"encoder": "frozen", "head": "adam"}`` labels every leaf under ``params["encoder"]``
``"frozen"``. A callable ``fn(params) -> tree`` is evaluated on the params (or the updates when
``update`` gets no params). Masks and labels are static Python values (bools and hashable
labels), resolved by plain structural recursion so that the wrappers run under
``torch.func.vmap`` and ``torch.compile``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, Callable

import torch

from funcopt.base import FuncoptError, PyTree

MaskOrFn = Any
"""A pytree of Python bools (full or a prefix of the params) or ``fn(params) -> such a tree``."""


def _is_container(node: Any) -> bool:
    return node is None or isinstance(node, (dict, list, tuple))


def _rebuild(node: Any, children: Any) -> Any:
    """A container of ``node``'s type holding ``children`` (a dict or a list)."""
    if isinstance(node, dict):
        if type(node) is dict:
            return children
        try:
            return type(node)(children)
        except TypeError:  # e.g. defaultdict needs its factory
            return dict(children)
    if hasattr(node, "_fields"):
        return type(node)(*children)
    return type(node)(children)


def _zip_map(fn: Callable[..., Any], tree: Any, *others: Any) -> Any:
    """Applies ``fn(leaf, *matching)`` over the leaves of ``tree`` by structural recursion.

    ``tree`` leads: its dicts, lists, tuples, NamedTuples and ``None`` are walked, and ``others``
    are indexed the same way (they may hold anything at ``tree``'s leaf positions). Plain Python
    recursion instead of optree: under ``torch.compile`` dynamo cannot take the treespec of a
    tree of bools or labels built in the graph, and its pytree polyfill does not promise
    optree's dict-key order, so leaves are matched by position, never by leaf order.
    """
    if tree is None:
        return None
    if isinstance(tree, dict):
        return _rebuild(tree, {k: _zip_map(fn, tree[k], *(o[k] for o in others)) for k in tree})
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [_zip_map(fn, c, *(o[i] for o in others)) for i, c in enumerate(tree)])
    return fn(tree, *others)


def _dict_keys(node: dict) -> list:
    """Keys in optree's leaf order: sorted for dict/defaultdict when sortable, else insertion."""
    if isinstance(node, OrderedDict):
        return list(node)
    try:
        return sorted(node)
    except TypeError:
        return list(node)


def _entries(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a tree of entries, in optree's order (used for error messages)."""
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [e for k in _dict_keys(tree) for e in _entries(tree[k], f"{path}[{k!r}]")]
    if isinstance(tree, (list, tuple)):
        fields = getattr(tree, "_fields", None)
        return [
            e for i, c in enumerate(tree) for e in _entries(c, path + (f".{fields[i]}" if fields else f"[{i}]"))
        ]
    return [(path or "<root>", tree)]


def _describe(node: Any) -> str:
    if isinstance(node, torch.Tensor):
        return f"a tensor of shape {tuple(node.shape)}"
    if isinstance(node, dict):
        return f"a dict with keys {sorted(map(str, node))}"
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return f"a {type(node).__name__}"
    if isinstance(node, (list, tuple)):
        return f"a {type(node).__name__} of length {len(node)}"
    return repr(node)


def _expand(
    spec: Any, target: Any, path: str, what: str, is_entry: Callable[[Any], bool], entry_help: str
) -> Any:
    """Broadcasts ``spec`` (a full tree or prefix of ``target``) to one entry per leaf of ``target``.

    Returns a tree with the structure of ``target`` whose leaves are the entries; ``None``
    nodes of ``target`` stay ``None``. Raises ``FuncoptError`` naming the path on mismatch.
    """
    where = path or "<root>"
    if is_entry(spec):
        return _zip_map(lambda _: spec, target)
    if not _is_container(spec):
        raise FuncoptError(f"{what} at {where} is {spec!r} ({type(spec).__name__}); {entry_help}")
    if target is None:
        if spec is None:
            return None
        raise FuncoptError(f"{what} at {where} is {_describe(spec)} but the params hold None there.")
    if spec is None:
        raise FuncoptError(f"{what} at {where} is None but the params hold {_describe(target)}; {entry_help}")
    if isinstance(target, dict):
        if not isinstance(spec, dict):
            raise FuncoptError(
                f"{what} at {where} is {_describe(spec)} but the params hold {_describe(target)}. "
                "Give a dict with the same keys, or a single entry for the whole subtree."
            )
        missing = sorted(map(str, set(target) - set(spec)))
        extra = sorted(map(str, set(spec) - set(target)))
        if missing or extra:
            raise FuncoptError(
                f"{what} at {where} does not match the params' keys: missing {missing}, "
                f"unexpected {extra}. Give one entry per key (or a single entry for the subtree)."
            )
        return _rebuild(
            target, {k: _expand(spec[k], target[k], f"{path}[{k!r}]", what, is_entry, entry_help) for k in target}
        )
    if isinstance(target, (list, tuple)):
        if not isinstance(spec, (list, tuple)) or len(spec) != len(target):
            raise FuncoptError(
                f"{what} at {where} is {_describe(spec)} but the params hold {_describe(target)}. "
                "Give a sequence of the same length, or a single entry for the whole subtree."
            )
        fields = getattr(target, "_fields", None)
        children = [
            _expand(s, t, path + (f".{fields[i]}" if fields else f"[{i}]"), what, is_entry, entry_help)
            for i, (s, t) in enumerate(zip(spec, target))
        ]
        return _rebuild(target, children)
    # target is a leaf (tensor) but spec is a container
    raise FuncoptError(
        f"{what} at {where} is {_describe(spec)} but the params hold {_describe(target)} there; "
        f"{entry_help}"
    )


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _is_label(x: Any) -> bool:
    return (
        not _is_container(x)
        and not isinstance(x, torch.Tensor)
        and isinstance(x, Hashable)
    )


_MASK_HELP = "mask entries must be Python bools (True or False), one per leaf or one per subtree."
_LABEL_HELP = (
    "labels must be hashable non-container values such as strings, one per leaf or one per subtree."
)


def _resolve_mask(mask: MaskOrFn, tree: PyTree, what: str) -> PyTree:
    """The mask as a tree of bools with the structure of ``tree`` (prefixes broadcast)."""
    spec = mask(tree) if callable(mask) else mask
    if isinstance(spec, torch.Tensor):
        raise FuncoptError(f"{what}: the mask is a tensor; {_MASK_HELP}")
    return _expand(spec, tree, "", f"{what} mask", _is_bool, _MASK_HELP)


def _resolve_labels(labels: Any, tree: PyTree, known: Mapping[Hashable, Any], what: str) -> PyTree:
    """The labels as a tree with the structure of ``tree``; unknown labels raise naming the path."""
    spec = labels(tree) if callable(labels) else labels
    full = _expand(spec, tree, "", f"{what} labels", _is_label, _LABEL_HELP)
    unknown = [(p, lab) for p, lab in _entries(full) if lab not in known]
    if unknown:
        shown = ", ".join(f"{p} -> {lab!r}" for p, lab in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise FuncoptError(
            f"{what}: label(s) with no transformation: {shown}{more}. The transformations are "
            f"keyed by {sorted(map(repr, known))}; add the missing key(s) or fix the labels."
        )
    return full


def _placeholder(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.new_empty((0,))
    return torch.empty((0,))


def _select(tree: PyTree, keep: PyTree) -> PyTree:
    """Replaces the leaves of ``tree`` where ``keep`` is False by empty tensors of shape ``(0,)``.

    Empty tensors rather than ``None``/``()`` keep the tree's structure and leaf kinds unchanged
    (``torch.func.vmap`` needs tensor outputs; ``torch.compile`` cannot take the treespec of a
    dict it built whose leaves are not tensors) while costing no memory; elementwise blocks and
    global norms treat them as nothing. Leaves are matched by position, never by leaf order
    (dynamo's pytree polyfill may order dict keys differently from optree).
    """
    return _zip_map(lambda x, k: x if k else _placeholder(x), tree, keep)


def _merge(full: PyTree, keep: PyTree, part: PyTree, what: str) -> PyTree:
    """Takes the selected leaves from ``part`` and the others from ``full`` (same structure)."""
    try:
        return _zip_map(lambda x, k, q: q if k else x, full, keep, part)
    except (KeyError, IndexError, TypeError) as e:
        raise FuncoptError(
            f"{what}: the inner transformation returned updates whose structure differs from its "
            f"input ({type(e).__name__}: {e}); it must keep the structure of the updates."
        ) from None
