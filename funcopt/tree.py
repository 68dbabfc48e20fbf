"""Pytree helpers used throughout funcopt, built on optree.

A pytree is a nested structure of dicts, lists, tuples, NamedTuples and ``None`` whose leaves
are tensors (or Python scalars). Every helper here is pure: it returns new tensors and never
writes into its arguments, so it runs under ``torch.func.grad``, ``vmap`` and ``torch.compile``.

Paths in error messages use optree's accessor syntax, e.g. ``['layer1']['weight']`` or
``[0].mu['w']``, so the reader can find the offending leaf.
"""

from __future__ import annotations

from typing import Any, Callable
from collections.abc import Sequence

import optree
import torch

__all__ = [
    "PyTree",
    "leaves",
    "structure",
    "paths",
    "path_str",
    "map",
    "map_with_path",
    "check_same_structure",
    "add",
    "sub",
    "scale",
    "add_scaled",
    "vdot",
    "sum_squares",
    "norm",
    "zeros_like",
    "ones_like",
    "full_like",
    "cast",
    "where",
    "stack",
    "unstack",
    "ravel",
    "num_elements",
]

PyTree = Any
"""A nested structure of dicts, lists, tuples, NamedTuples and ``None`` with tensor leaves."""

_NONE_IS_LEAF = False


def leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in optree order (dict keys sorted); ``None`` is not a leaf."""
    return optree.tree_leaves(tree, none_is_leaf=_NONE_IS_LEAF)


def structure(tree: PyTree) -> optree.PyTreeSpec:
    """The optree treespec of ``tree``."""
    return optree.tree_structure(tree, none_is_leaf=_NONE_IS_LEAF)


def path_str(accessor: Any) -> str:
    """Formats an optree accessor (or path tuple) as ``['a'][0].mu``; the root is ``<root>``."""
    if hasattr(accessor, "codify"):
        text = accessor.codify("")
    else:
        text = "".join(f"[{k!r}]" if isinstance(k, str) else f"[{k}]" for k in accessor)
    return text or "<root>"


def paths(tree: PyTree) -> list[str]:
    """Readable paths of the leaves of ``tree``, in the order of :func:`leaves`."""
    accessors = optree.tree_accessors(tree, none_is_leaf=_NONE_IS_LEAF)
    return [path_str(a) for a in accessors]


def _describe(node: Any) -> str:
    if isinstance(node, torch.Tensor):
        return f"a tensor of shape {tuple(node.shape)}"
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return f"{type(node).__name__}{tuple(node._fields)}"
    if isinstance(node, dict):
        return f"a dict with keys {sorted(str(k) for k in node)}"
    if isinstance(node, (list, tuple)):
        return f"a {type(node).__name__} of length {len(node)}"
    return f"{type(node).__name__}"


def _first_mismatch(a: PyTree, b: PyTree, prefix: str = "") -> str | None:
    """Walks two trees together; returns a message naming the first differing path."""
    where = prefix or "<root>"
    a_leaf = optree.treespec_is_leaf(structure(a)) if a is not None else False
    b_leaf = optree.treespec_is_leaf(structure(b)) if b is not None else False
    if a_leaf and b_leaf:
        return None
    if type(a) is not type(b) and not (
        isinstance(a, dict) and isinstance(b, dict)
    ):
        return f"at {where}: {_describe(a)} vs {_describe(b)}"
    if isinstance(a, dict):
        if set(a) != set(b):
            only_a = sorted(str(k) for k in set(a) - set(b))
            only_b = sorted(str(k) for k in set(b) - set(a))
            return f"at {where}: keys only in the first: {only_a}, only in the second: {only_b}"
        for key in sorted(a, key=str):
            sub = _first_mismatch(a[key], b[key], f"{prefix}[{key!r}]")
            if sub:
                return sub
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"at {where}: {_describe(a)} vs {_describe(b)}"
        fields = getattr(a, "_fields", None)
        for i, (x, y) in enumerate(zip(a, b)):
            step = f".{fields[i]}" if fields else f"[{i}]"
            sub = _first_mismatch(x, y, prefix + step)
            if sub:
                return sub
        return None
    if structure(a) != structure(b):
        return f"at {where}: {structure(a)} vs {structure(b)}"
    return None


def check_same_structure(
    a: PyTree, b: PyTree, names: tuple[str, str] = ("first tree", "second tree")
) -> None:
    """Raises ``ValueError`` naming the first path where ``a`` and ``b`` differ in structure."""
    if structure(a) == structure(b):
        return
    detail = _first_mismatch(a, b) or f"{structure(a)} vs {structure(b)}"
    raise ValueError(
        f"{names[0]} and {names[1]} have different pytree structures {detail}. "
        f"They must have the same nesting and keys (e.g. grads computed for the same params)."
    )


def map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, names: Sequence[str] | None = None) -> PyTree:
    """Like ``optree.tree_map``: applies ``fn`` leaf-wise over trees of the same structure.

    ``None`` nodes are kept as ``None``. A structure mismatch raises ``ValueError`` naming the
    path (``names`` labels the trees in that message).
    """
    if rest:
        spec = structure(tree)
        for i, other in enumerate(rest):
            if structure(other) != spec:
                labels = names or [f"tree {j}" for j in range(len(rest) + 1)]
                check_same_structure(tree, other, (labels[0], labels[i + 1]))
    return optree.tree_map(fn, tree, *rest, none_is_leaf=_NONE_IS_LEAF)


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like :func:`map`, but ``fn(path, *leaves)`` also gets the leaf's readable path."""
    spec = structure(tree)
    for other in rest:
        if structure(other) != spec:
            check_same_structure(tree, other)
    accessors = optree.tree_accessors(tree, none_is_leaf=_NONE_IS_LEAF)
    flat = [leaves(t) for t in (tree, *rest)]
    out = [fn(path_str(acc), *xs) for acc, *xs in zip(accessors, *flat)]
    return optree.tree_unflatten(spec, out)


def add(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a + b``."""
    return map(torch.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a - b``."""
    return map(torch.sub, a, b)


def scale(s: float | torch.Tensor, tree: PyTree) -> PyTree:
    """Leaf-wise ``s * x`` for a scalar (or 0-dim tensor) ``s``."""
    return map(lambda x: x * s, tree)


def add_scaled(a: PyTree, s: float | torch.Tensor, b: PyTree) -> PyTree:
    """Leaf-wise ``a + s * b`` (an axpy)."""
    return map(lambda x, y: x + s * y, a, b)


def vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """Sum over leaves of ``<a_i, b_i>``; a 0-dim tensor."""
    if structure(a) != structure(b):
        check_same_structure(a, b)
    total = None
    for x, y in zip(leaves(a), leaves(b)):
        term = torch.sum(x * y)
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


def sum_squares(tree: PyTree) -> torch.Tensor:
    """Sum of squares of all elements of all leaves; a 0-dim tensor."""
    return vdot(tree, tree)


def norm(tree: PyTree) -> torch.Tensor:
    """Global L2 norm over all leaves (``optax.global_norm``); a 0-dim tensor."""
    return torch.sqrt(sum_squares(tree))


def zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of zeros shaped like ``tree``."""
    return map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def ones_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of ones shaped like ``tree``."""
    return map(lambda x: torch.ones_like(x, dtype=dtype), tree)


def full_like(tree: PyTree, value: float, dtype: torch.dtype | None = None) -> PyTree:
    """A tree filled with ``value`` shaped like ``tree``."""
    return map(lambda x: torch.full_like(x, value, dtype=dtype), tree)


def cast(tree: PyTree, dtype: torch.dtype | None) -> PyTree:
    """Casts floating-point leaves to ``dtype`` (integer and bool leaves are kept)."""
    if dtype is None:
        return tree
    return map(lambda x: x.to(dtype) if torch.is_floating_point(x) else x, tree)


def where(condition: torch.Tensor, a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``torch.where(condition, a, b)`` with one scalar condition for all leaves."""
    return map(lambda x, y: torch.where(condition, x, y), a, b)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks K trees of equal structure along a new leading axis (``jnp.stack`` on leaves)."""
    if not trees:
        raise ValueError("stack needs at least one tree.")
    for i, t in enumerate(trees[1:], start=1):
        if structure(t) != structure(trees[0]):
            check_same_structure(trees[0], t, ("tree 0", f"tree {i}"))
    return map(lambda *xs: torch.stack(xs), trees[0], *trees[1:])


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: splits every leaf along its leading axis into K trees."""
    flat, spec = optree.tree_flatten(tree, none_is_leaf=_NONE_IS_LEAF)
    if not flat:
        raise ValueError("unstack needs a tree with at least one tensor leaf.")
    sizes = {x.shape[0] if x.dim() else None for x in flat}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"unstack needs every leaf to share one leading axis; found leading sizes {sizes}."
        )
    k = sizes.pop()
    return [optree.tree_unflatten(spec, [x[i] for x in flat]) for i in range(k)]


def ravel(tree: PyTree) -> tuple[torch.Tensor, Callable[[torch.Tensor], PyTree]]:
    """Flattens all leaves into one 1-D vector; returns it and the inverse ``unravel``.

    Leaves are promoted to a common dtype in the vector and cast back by ``unravel``.
    """
    flat, spec = optree.tree_flatten(tree, none_is_leaf=_NONE_IS_LEAF)
    shapes = [x.shape for x in flat]
    dtypes = [x.dtype for x in flat]
    sizes = [x.numel() for x in flat]
    if flat:
        common = flat[0].dtype
        for x in flat[1:]:
            common = torch.promote_types(common, x.dtype)
        vector = torch.cat([x.reshape(-1).to(common) for x in flat])
    else:
        vector = torch.zeros(0)

    def unravel(v: torch.Tensor) -> PyTree:
        if v.shape != (sum(sizes),):
            raise ValueError(f"unravel expects a vector of shape ({sum(sizes)},), got {tuple(v.shape)}.")
        parts = torch.split(v, sizes) if sizes else []
        out = [p.reshape(s).to(d) for p, s, d in zip(parts, shapes, dtypes)]
        return optree.tree_unflatten(spec, out)

    return vector, unravel


def num_elements(tree: PyTree) -> int:
    """Total number of elements over all tensor leaves."""
    return sum(x.numel() for x in leaves(tree))
