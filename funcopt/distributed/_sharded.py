"""The functional route under FSDP2: a sharded module's parameters and gradients as pytrees of
DTensors, updates written back in place, and what a rank holds (:func:`local_nbytes`).

``fully_shard(model)`` turns every parameter into a ``DTensor`` shard (dim 0 split over the
ranks) and every gradient into a shard of the same placement. funcopt's transformations are
pytree maps, so ``tx.init``/``tx.update`` take those DTensors as they are: the state is built
with ``zeros_like`` of each parameter and is sharded like it (each rank holds 1/N), pointwise
math runs on the local shards, and norms (global-norm clipping, trust ratios, Adafactor's
factors) reduce over the whole tensor through DTensor's own reductions. Part of
:mod:`funcopt.distributed`, which re-exports every public name here.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree

__all__ = [
    "module_params",
    "module_grads",
    "apply_updates_",
    "module_step",
    "local_nbytes",
    "full_tensors",
    "distribute_like",
]


def _dtensor_module() -> Any:
    """``torch.distributed.tensor`` if it is loaded (no DTensor can exist otherwise), else None."""
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (without importing that module)."""
    module = _dtensor_module()
    return module is not None and isinstance(x, module.DTensor)


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    if not isinstance(model, torch.nn.Module):
        raise FuncoptError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


def module_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` as ``{name: tensor}``, detached, sharing storage.

    Under ``fully_shard`` each value is the parameter's ``DTensor`` (this rank's shard plus its
    placement); use it as ``params`` for ``tx.init``/``tx.update``. The names are those of
    ``model.named_parameters()``; parameters with ``requires_grad=False`` are left out.
    """
    return {k: p.detach() for k, p in _trainable(model)}


def module_grads(model: torch.nn.Module, *, missing: str = "error") -> dict[str, torch.Tensor]:
    """The ``.grad`` of every trainable parameter of ``model`` as ``{name: tensor}``
    (the gradient ``DTensor`` shards under ``fully_shard``, already averaged over the ranks).

    Args:
        missing: what to do for a parameter without a gradient (unused in this backward):
            ``"error"`` (default: ``FuncoptError`` naming it) or ``"zeros"`` (a zero gradient;
            note that weight decay and momentum still move such a parameter, unlike
            ``torch.optim``, which skips it).
    """
    if missing not in ("error", "zeros"):
        raise FuncoptError(f"module_grads: missing must be 'error' or 'zeros', got {missing!r}.")
    out = {}
    for k, p in _trainable(model):
        g = p.grad
        if g is None:
            if missing == "error":
                raise FuncoptError(
                    f"module_grads: parameter [{k!r}] has no gradient (not used in the loss, or "
                    "backward() not called). Call loss.backward() first, set requires_grad=False on "
                    "unused parameters, or pass missing='zeros'."
                )
            g = torch.zeros_like(p.detach())
        out[k] = g
    return out


def apply_updates_(model: torch.nn.Module, updates: PyTree) -> None:
    """Adds ``updates[name]`` to each parameter of ``model`` in place (``p += u`` without grad).

    The in-place counterpart of :func:`funcopt.apply_updates` for a module's own parameters,
    e.g. the sharded ones of FSDP2: each rank adds its shard of the update to its shard of the
    parameter. An update whose placement differs from its parameter's (say ``Replicate``
    where the parameter is ``Shard(0)``) is first redistributed to the parameter's placement.

    Raises:
        FuncoptError: naming a name that is not a trainable parameter, or a shape mismatch.
    """
    own = dict(_trainable(model))
    extra = sorted(set(updates) - set(own))
    if extra:
        raise FuncoptError(
            f"apply_updates_: {extra[:5]} are not trainable parameters of the module. Pass the "
            "updates of tx.update(module_grads(model), state, module_params(model))."
        )
    targets, sources = [], []
    with torch.no_grad():
        for k, u in updates.items():
            p = own[k]
            if u.shape != p.shape:
                raise FuncoptError(
                    f"apply_updates_: the update [{k!r}] has shape {tuple(u.shape)}, the parameter "
                    f"{tuple(p.shape)}."
                )
            if is_dtensor(p) and is_dtensor(u):
                if tuple(u.placements) != tuple(p.placements):
                    u = u.redistribute(p.device_mesh, p.placements)
                p, u = p.to_local(), u.to_local()  # shards alike: add locally, one multi-tensor add
            if not is_dtensor(p) and not is_dtensor(u) and p.dtype == u.dtype and p.device == u.device:
                targets.append(p)
                sources.append(u)
            else:
                p.add_(u.to(p.dtype))
        if targets:
            torch._foreach_add_(targets, sources)


def module_step(tx: GradientTransformation, state: Any, model: torch.nn.Module) -> Any:
    """One optimizer step of ``model`` with ``tx``: returns the new state.

    The functional route for a module trained with ``loss.backward()`` (FSDP2 included)::

        params = funcopt.distributed.module_params(model)
        state = tx.init(params)                    # sharded like the params under fully_shard
        for batch in loader:
            loss_fn(model, batch).backward()
            state = funcopt.distributed.module_step(tx, state, model)
            model.zero_grad()

    It is ``updates, state = tx.update(module_grads(model), state, module_params(model))``
    then :func:`apply_updates_`. Call it on every rank: norms of sharded tensors communicate.
    """
    updates, state = tx.update(module_grads(model), state, module_params(model))
    apply_updates_(model, updates)
    return state


def local_nbytes(tree: PyTree) -> int:
    """Bytes of tensor data this rank holds for ``tree``: a DTensor leaf counts its local shard,
    a plain tensor all of it (e.g. the optimizer state per rank under FSDP2)."""
    total = 0
    for x in _tree.leaves(tree):
        if is_dtensor(x):
            x = x.to_local()
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
    return total


def full_tensors(tree: PyTree) -> PyTree:
    """``tree`` with every DTensor leaf replaced by the whole tensor (``full_tensor()``, an
    all-gather: call it on every rank); other leaves are kept. For exporting a sharded run to
    a single-process format such as :func:`funcopt.checkpoint.save`."""
    return _tree.map(lambda x: x.full_tensor() if is_dtensor(x) else x, tree)


def distribute_like(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` (whole tensors, the same on every rank) as DTensors placed like the DTensor
    leaves of ``like``: each rank keeps its own shard, without communication. Leaves whose
    ``like`` is not a DTensor are kept. The inverse of :func:`full_tensors`, e.g. to resume a
    sharded run from a single-process checkpoint.

    Raises:
        FuncoptError: when the trees differ in structure or a leaf's shape differs.
    """
    try:
        _tree.check_same_structure(like, tree, ("like", "tree"))
    except ValueError as e:
        raise FuncoptError(f"distribute_like: {e}") from None

    def place(path: str, x: Any, ref: Any) -> Any:
        if not is_dtensor(ref):
            return x
        if not isinstance(x, torch.Tensor) or x.shape != ref.shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise FuncoptError(f"distribute_like: leaf {path} is {shape}, but like{path} is {tuple(ref.shape)}.")
        module = _dtensor_module()
        x = x.to(device=ref.device, dtype=ref.dtype)
        return module.distribute_tensor(x, ref.device_mesh, ref.placements, src_data_rank=None)

    paths = _tree.paths(like)
    leaves = [place(p, x, r) for p, x, r in zip(paths, _tree.leaves(tree), _tree.leaves(like))]
    return _tree.structure(like).unflatten(leaves)
