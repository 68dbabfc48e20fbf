"""Fast routes on DTensor shards (FSDP2): an elementwise step runs its kernel on each rank's
local shards (``to_local()``) and wraps the results back into DTensors of the same placement.

A declared fast route's kernel is elementwise (CONTRIBUTING: only elementwise optimizers
declare one), so on tensors sharded alike (gradient, parameter and every state buffer of a leaf
with one mesh, one placement, one global shape) the step of the local shards is the local
shard of the step: no communication, the same numbers as the reference chain on the DTensors.
A ``Partial`` placement (a pending reduction) or leaves sharded differently keep the reference
chain, and :func:`funcopt.fast.explain` says why.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import optree

from funcopt.base import PyTree

__all__: list[str] = []

_ON_SHARDS = " on local DTensor shards"


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless it is loaded
    return None if module is None else module.DTensor


def _leaves(tree: PyTree) -> list[Any]:
    return optree.tree_leaves(tree, none_is_leaf=False)


def has_dtensor(grads: PyTree) -> bool:
    """Whether ``grads`` holds a DTensor leaf (cheap when DTensor was never imported)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(x, dtensor) for x in _leaves(grads))


def _spec(x: Any) -> tuple:
    return (x.device_mesh, tuple(x.placements), tuple(x.shape), x.dtype)


def _describe(x: Any) -> str:
    return f"{tuple(x.placements)} of shape {tuple(x.shape)}"


def localize(fp: Any, grads: PyTree, state: Any, params: PyTree | None) -> tuple[tuple, Callable, Callable] | str:
    """``((local grads, local state, local params), wrap_updates, wrap_state)``, or why the
    step cannot run on local shards.

    Every DTensor leaf of the three trees is replaced by its ``to_local()`` (no copy). The
    gradient, parameter and declared state buffers of each leaf must be DTensors of one spec
    (mesh, placements, global shape, dtype) without a ``Partial`` placement.
    """
    dtensor = _dtensor_type()
    g_leaves, g_spec = optree.tree_flatten(grads, none_is_leaf=False)
    columns: list[tuple[str, list[Any]]] = [("grads", g_leaves)]
    if params is not None:
        p_leaves, p_spec = optree.tree_flatten(params, none_is_leaf=False)
        if p_spec != g_spec:
            return "params and grads have different tree structures"
        columns.append(("params", p_leaves))
    try:
        layout = fp.layout()
        for name, (i, k) in layout.buffers.items():
            sub, spec = optree.tree_flatten(state[i][k], none_is_leaf=False)
            if spec != g_spec:
                return f"the state's {name} is not shaped like the grads"
            columns.append((f"state {name}", sub))
    except (TypeError, IndexError, AttributeError):
        return "the state is not laid out as this optimizer's init builds it"
    for j, ref in enumerate(g_leaves):
        if not isinstance(ref, dtensor):
            return "grads mix DTensor and plain tensor leaves"
        if any(p.is_partial() for p in ref.placements):
            return f"a gradient DTensor has a Partial placement {_describe(ref)} (a pending reduction)"
        want = _spec(ref)
        for name, column in columns[1:]:
            x = column[j]
            if not isinstance(x, dtensor) or _spec(x) != want:
                other = _describe(x) if isinstance(x, dtensor) else f"a plain {type(x).__name__}"
                return f"{name} leaf {j} is {other}, its gradient {_describe(ref)}: not sharded alike"

    def to_local(tree: PyTree) -> PyTree:
        return optree.tree_map(lambda x: x.to_local() if isinstance(x, dtensor) else x, tree, none_is_leaf=False)

    s_leaves = _leaves(state)
    s_refs = [x if isinstance(x, dtensor) else None for x in s_leaves]

    def wrap(local: Any, ref: Any) -> Any:
        return dtensor.from_local(local, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride())

    def wrap_updates(out: PyTree) -> PyTree:
        return optree.tree_unflatten(g_spec, [wrap(u, r) for u, r in zip(_leaves(out), g_leaves)])

    def wrap_state(new_state: Any) -> Any:
        leaves, spec = optree.tree_flatten(new_state, none_is_leaf=False)
        return optree.tree_unflatten(spec, [x if r is None else wrap(x, r) for x, r in zip(leaves, s_refs)])

    local = (to_local(grads), to_local(state), None if params is None else to_local(params))
    return local, wrap_updates, wrap_state


def update_on_shards(fp: Any, grads: PyTree, state: Any, params: PyTree | None) -> tuple[PyTree, Any] | None:
    """The fast route's pure ``update`` on local shards (DTensors out), or None where it does
    not apply (no DTensor leaves, shards not alike, or the local step has no fast route)."""
    if not has_dtensor(grads):
        return None
    found = localize(fp, grads, state, params)
    if isinstance(found, str):
        return None
    (g, s, p), wrap_updates, wrap_state = found
    from funcopt.fast._plan import Plan

    plan = fp.plan(g, s, p, donate=False)
    if type(plan) is not Plan:
        return None
    result = fp.run_backend(plan, s, write_params=False)
    out, new_state = result if result is not None else fp.run(plan, s, donate=False)
    return wrap_updates(optree.tree_unflatten(plan.spec, out)), wrap_state(new_state)


def explain_on_shards(explain: Callable, tx: Any, fp: Any, grads: PyTree, state: Any, params: PyTree | None) -> Any:
    """:func:`funcopt.fast.explain` of an ``update`` whose grads are DTensors: the route of the
    local step, marked as running on local shards, or the reference route and why."""
    from funcopt.fast._explain import Route

    found = localize(fp, grads, state, params)
    if isinstance(found, str):
        return Route("reference", None, (f"DTensor leaves cannot run on local shards: {found}",))
    (g, s, p), _, _ = found
    route = explain(tx, g, s, p)
    if route.route == "reference":
        return route
    return Route(route.route + _ON_SHARDS, route.backend, route.reasons)
