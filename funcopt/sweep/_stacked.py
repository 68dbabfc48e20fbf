"""Training K stacked configurations: stacking and the stacked optimizer step.

This is the engine under :mod:`funcopt.sweep` (which re-exports the stacking helpers).

A sweep keeps K configurations as pytrees whose every leaf has a leading axis of size K (the
layout ``torch.func.vmap`` produces with ``out_dims=0``, and what :func:`funcopt.tree.stack`
builds from K ordinary trees): params ``(K, *shape)``, the optimizer state likewise, and each
injected hyperparameter ``(K,)``.

:func:`vmapped_update` is the reference: ``torch.func.vmap`` of ``tx.update``. It is exact, but
vmap dispatches every per-leaf elementwise op through its batching rules, which dominates the
time of a step on small models. :func:`stacked_update` calls ``tx.update`` once, outside vmap,
on a reshaped view of the same trees, so each op runs as one plain kernel over all K
configurations:

- every leaf of rank >= 2, ``(K, *shape)``, is viewed as ``(K, n)``;
- every floating ``(K,)`` leaf (a hyperparameter, or a per-configuration scalar of the state
  such as NAdam's momentum product) becomes ``(K, 1)`` in the parameters' dtype, so it
  broadcasts along the leading axis of every ``(K, n)`` leaf;
- every integer ``(K,)`` leaf (a step count) becomes the 0-dim count shared by all K (all
  configurations of a sweep step together).

This equals the vmapped reference for every optimizer built from elementwise operations (all
of funcopt's optimizers except those with norms: ``lamb``, ``scale_by_trust_ratio``,
``clip_by_global_norm``). :func:`check_stacked_update` compares the two on random probe
gradients of very different scales per configuration; ``funcopt.sweep`` runs it once and falls
back to the vmapped step when they differ.

The training loop over these steps is in ``_engine``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, apply_updates
from funcopt.transforms import injected_states, set_hyperparams

__all__ = [
    "stacked_update",
    "vmapped_update",
    "check_stacked_update",
    "select_configs",
    "stack_params",
    "init_stacked",
    "stack_states",
    "select",
    "unstack",
]


def _compute_dtype(params: PyTree | list[Any]) -> torch.dtype:
    dtype = None
    for leaf in params if isinstance(params, list) else _tree.leaves(params):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            dtype = leaf.dtype if dtype is None else torch.promote_types(dtype, leaf.dtype)
    return dtype or torch.get_default_dtype()


def _leading(tree: PyTree, what: str) -> int:
    sizes = set()
    for i, leaf in enumerate(_tree.leaves(tree)):
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
            path = _tree.paths(tree)[i]
            raise FuncoptError(
                f"{what} leaf at {path} has no leading configuration axis (got "
                f"{type(leaf).__name__}{'' if not isinstance(leaf, torch.Tensor) else ' of shape ()'}). "
                "Stacked trees hold K configurations along axis 0 of every leaf; build them with "
                "funcopt.sweep.stack_params / stack_states."
            )
        sizes.add(leaf.shape[0])
    if len(sizes) > 1:
        raise FuncoptError(f"{what} leaves have different leading sizes {sorted(sizes)}; all must be K.")
    return sizes.pop() if sizes else 0


def _to_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if x.ndim >= 2:
        return x.reshape(x.shape[0], -1)
    if x.is_floating_point():
        return x.reshape(-1, 1).to(dtype)
    if x.shape[0] == 1 or torch.equal(x, x[:1].expand_as(x)):
        return x[0]  # a count shared by all configurations (the usual case)
    return x.reshape(-1, 1)  # counts that differ per configuration: broadcast them too


def _from_rows(y: Any, like: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """The stacked-layout value of ``y`` (the update's output for ``like``), None if impossible."""
    if y is rows:
        return like  # passed through unchanged (e.g. a hyperparameter that is not scheduled)
    if not isinstance(y, torch.Tensor):
        return None
    k = like.shape[0]
    if like.ndim == 1 and y.ndim == 0:
        # A value shared by all configurations (a count, or a schedule of the shared count).
        return y.to(like.dtype).reshape(1).expand(k).clone()
    if like.ndim == 1 and not like.is_floating_point():
        return y.reshape(k).to(like.dtype) if y.numel() == k else None
    if y.numel() != like.numel():
        return None
    out = y.reshape(like.shape)
    if like.ndim == 1 and out.dtype != like.dtype:
        # Keep the exact stored value where the step did not change it (hyperparameters).
        return torch.where(out == rows.reshape(-1), like, out.to(like.dtype))
    return out if out.dtype == like.dtype else out.to(like.dtype)


class _Flat:
    """A tree flattened once: its leaves, its spec, and its rows-layout leaves."""

    def __init__(self, tree: PyTree, what: str, dtype: torch.dtype | None):
        self.tree, self.what = tree, what
        self.leaves, self.spec = optree.tree_flatten(tree, none_is_leaf=False)
        if dtype is None:
            dtype = _compute_dtype(self.leaves)
        self.dtype = dtype
        for x in self.leaves:
            if not isinstance(x, torch.Tensor) or x.ndim == 0:
                _leading(tree, what)  # raises with the path
        self.rows = [_to_rows(x, dtype) for x in self.leaves]

    def rows_tree(self) -> PyTree:
        return optree.tree_unflatten(self.spec, self.rows)

    def unrows(self, out: PyTree) -> PyTree:
        flat_out, out_spec = optree.tree_flatten(out, none_is_leaf=False)
        if out_spec != self.spec:
            _tree.check_same_structure(self.tree, out, (self.what, f"new {self.what}"))
        result = []
        for i, (y, x, r) in enumerate(zip(flat_out, self.leaves, self.rows)):
            v = _from_rows(y, x, r)
            if v is None:
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise FuncoptError(
                    f"stacked update changed {self.what}{_tree.paths(self.tree)[i]} from shape "
                    f"{tuple(x.shape)} to {shape}: the optimizer is not elementwise across "
                    "configurations (it uses a norm or a reduction). Use step_mode='vmap' for it."
                )
            result.append(v)
        return optree.tree_unflatten(self.spec, result)


def stacked_update(
    tx: GradientTransformation, grads: PyTree, state: PyTree, params: PyTree, **extra_args: Any
) -> tuple[PyTree, PyTree]:
    """Runs ``tx.update`` once on K stacked configurations, like ``vmap(tx.update)`` but faster.

    Args:
        tx: the optimizer (usually built with ``funcopt.inject_hyperparams``).
        grads: gradients, every leaf ``(K, *shape)``.
        state: the stacked optimizer state, every leaf with leading axis K (counts ``(K,)``,
            hyperparameters ``(K,)``).
        params: the stacked parameters.
        **extra_args: passed to ``tx.update`` unchanged.

    Returns:
        ``(updates, new_state)`` in the same stacked layout as the inputs.

    Raises:
        FuncoptError: when a leaf lacks the leading axis, or the optimizer is not elementwise
            across configurations (a result leaf changed shape).
    """
    p = _Flat(params, "params", None)
    g = _Flat(grads, "updates", p.dtype)
    st = _Flat(state, "state", p.dtype)
    u_rows, new_rows = tx.update(g.rows_tree(), st.rows_tree(), p.rows_tree(), **extra_args)
    return g.unrows(u_rows), st.unrows(new_rows)


def vmapped_update(
    tx: GradientTransformation, grads: PyTree, state: PyTree, params: PyTree, **extra_args: Any
) -> tuple[PyTree, PyTree]:
    """``torch.func.vmap(tx.update)`` over the leading axis of every leaf: the exact reference
    for :func:`stacked_update`, valid for any optimizer (norms included)."""

    dtype = _compute_dtype(params)

    def cast(x: torch.Tensor) -> torch.Tensor:
        # Per-configuration float scalars (hyperparameters) in the parameters' dtype, as in
        # stacked_update: under vmap a float64 (K,) hyperparameter is a batched tensor, which
        # ops such as torch.lerp reject as the weight of a float32 tensor.
        return x.to(dtype) if x.ndim == 1 and x.is_floating_point() else x

    def restore(y: torch.Tensor, like: torch.Tensor, cast_like: torch.Tensor) -> torch.Tensor:
        if y.dtype == like.dtype:
            return y
        return torch.where(y == cast_like, like, y.to(like.dtype))

    def one(g: PyTree, s: PyTree, p: PyTree) -> tuple[PyTree, PyTree]:
        return tx.update(g, s, p, **extra_args)

    cast_state = _tree.map(cast, state)
    updates, new_state = torch.func.vmap(one)(grads, cast_state, params)
    return updates, _tree.map(restore, new_state, state, cast_state)


def select_configs(tree: PyTree, index: int | torch.Tensor | list[int] | slice) -> PyTree:
    """Indexes the leading (configuration) axis of every leaf: ``tree[index]`` leaf-wise.

    An int gives one ordinary (unstacked) tree; a list, slice or index tensor a smaller stack.
    """
    if isinstance(index, list):
        index = torch.as_tensor(index, dtype=torch.long)
    return _tree.map(lambda x: x[index], tree)


def check_stacked_update(
    tx: GradientTransformation,
    params: PyTree,
    state: PyTree,
    *,
    steps: int = 3,
    max_configs: int = 3,
    seed: int = 0,
) -> tuple[bool, str]:
    """Tests whether :func:`stacked_update` equals :func:`vmapped_update` for this optimizer.

    Runs ``steps`` updates of both on the first ``max_configs`` configurations with random
    gradients whose scale differs by 10**3 between configurations (so that a norm or a
    reduction over the stacked axis shows), and compares updates and states per configuration.

    Returns:
        ``(ok, reason)``; ``reason`` says what differed when ``ok`` is False.
    """
    k = min(_leading(params, "params"), max_configs)
    if k == 0:
        return True, ""
    dtype = _compute_dtype(params)
    rtol = 1e-9 if dtype == torch.float64 else 1e-3
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.linspace(-2.0, 1.0, k, dtype=torch.float64)
    p_s = p_v = select_configs(params, slice(0, k))
    s_s = s_v = select_configs(state, slice(0, k))

    def probe(x: torch.Tensor) -> torch.Tensor:
        r = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        return (r * scales.reshape(-1, *([1] * (x.ndim - 1)))).to(device=x.device, dtype=x.dtype)

    for step in range(steps):
        grads = _tree.map(probe, p_s)
        if step == steps - 1 and k > 1:
            # A non-finite gradient in configuration 0 only: shows checks that look at all
            # configurations together (e.g. apply_if_finite's "all finite" test).
            first = _tree.leaves(grads)[0]
            first.view(k, -1)[0, 0] = float("nan")
        try:
            with torch.no_grad():
                u_s, s_s = stacked_update(tx, grads, s_s, p_s)
        except (FuncoptError, RuntimeError) as e:
            return False, f"the stacked step failed: {e}"
        with torch.no_grad():
            u_v, s_v = vmapped_update(tx, grads, s_v, p_v)
        for what, a, b in (("updates", u_s, u_v), ("state", s_s, s_v)):
            for path, x, y in zip(_tree.paths(b), _tree.leaves(a), _tree.leaves(b)):
                if x.shape != y.shape or x.is_floating_point() != y.is_floating_point():
                    return False, f"{what}{path}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
                if not x.is_floating_point():
                    if not torch.equal(x, y):
                        return False, f"{what}{path} differs at step {step}"
                    continue
                xf, yf = x.reshape(k, -1).double(), y.reshape(k, -1).double()
                if not torch.equal(torch.isnan(xf), torch.isnan(yf)):
                    return False, f"{what}{path}: NaNs differ at step {step}"
                xf, yf = torch.nan_to_num(xf, nan=0.0), torch.nan_to_num(yf, nan=0.0)
                err = (xf - yf).abs().amax(dim=1)
                ref = yf.abs().amax(dim=1)
                if not bool(torch.all(err <= rtol * ref + 1e-30)):
                    return False, f"{what}{path} differs at step {step} (relative error {float((err / ref.clamp_min(1e-30)).max()):.2e})"
        p_s, p_v = apply_updates(p_s, u_s), apply_updates(p_v, u_v)
    return True, ""


# ---------------------------------------------------------------------------------------------
# Stacking building blocks (re-exported by funcopt.sweep)


def _detach(tree: PyTree) -> PyTree:
    return _tree.map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def stack_params(params: PyTree, k: int) -> PyTree:
    """K copies of ``params`` stacked along a new leading axis (every leaf ``(K, *shape)``)."""
    if k < 1:
        raise FuncoptError(f"stack_params needs k >= 1, got {k}.")
    return _tree.map(lambda x: x.detach().unsqueeze(0).expand(k, *x.shape).clone(), params)


def init_stacked(init_fn: Callable[[int], PyTree], seeds: Sequence[int]) -> PyTree:
    """Stacks ``init_fn(seed)`` for each seed: K independently initialized parameter trees."""
    if not callable(init_fn):
        raise FuncoptError("init_stacked needs a function seed -> params.")
    return _tree.stack([_detach(init_fn(int(s))) for s in seeds])


def _hp_names(state: Any) -> list[str]:
    return sorted(set().union(*(s.hyperparams for s in injected_states(state))))


def stack_states(
    optimizer: GradientTransformation, params: PyTree, hparams: Mapping[str, Sequence[float]]
) -> PyTree:
    """The stacked optimizer state of K configurations, hyperparameter k taken from ``hparams``.

    ``params`` is stacked (leading axis K). Each configuration's state is
    ``optimizer.init(params[k])`` with ``set_hyperparams(..., name=hparams[name][k])``;
    the K states are stacked like the params, so hyperparameters become ``(K,)`` tensors.
    """
    k = _tree.leaves(params)[0].shape[0]
    states = []
    for i in range(k):
        s = optimizer.init(select(params, i))
        if hparams:
            s = set_hyperparams(s, **{n: v[i] for n, v in hparams.items()})
        states.append(s)
    return _tree.stack(states)


def select(tree: PyTree, index: int) -> PyTree:
    """Configuration ``index`` of a stacked tree as an ordinary tree (``tree[index]`` leaf-wise)."""
    return select_configs(tree, index)


def unstack(tree: PyTree) -> list[PyTree]:
    """All K configurations of a stacked tree as a list of ordinary trees."""
    return _tree.unstack(tree)
