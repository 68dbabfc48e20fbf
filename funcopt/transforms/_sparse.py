"""Lazy Adam for sparse gradients: only the rows present in the gradient move (torch.optim.SparseAdam)."""

from __future__ import annotations

from typing import Any

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, check_state
from funcopt.transforms._adaptive import ScaleByAdamState, _adam_init
from funcopt.transforms._common import _float_step, check_beta, check_non_negative

__all__ = ["scale_by_sparse_adam"]


def _sparse_like(grad: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A sparse COO tensor with ``grad``'s indices and size and the given values."""
    return torch.sparse_coo_tensor(grad._indices(), values, grad.size(), is_coalesced=True, check_invariants=False)


def scale_by_sparse_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction computed only where a sparse gradient has entries, like ``torch.optim.SparseAdam``.

    Each gradient leaf must be a sparse COO tensor (what ``nn.Embedding(sparse=True)``'s
    backward produces). For the entries it holds, the moments move as in Adam (``m += (1 - b1)
    * (g - m)``, ``v += (1 - b2) * (g^2 - v)``) and the direction is ``sqrt(1 - b2^t) / (1 -
    b1^t) * m / (sqrt(v) + eps)``; every other entry of the moments and of the params stays as
    it is. The direction is returned as a sparse COO tensor with the gradient's indices, so
    ``funcopt.apply_updates`` moves only those rows. The state is Adam's
    (:class:`ScaleByAdamState`), with one step count for the whole tree (torch keeps one per
    parameter, which differs only for parameters that get no gradient at all).

    Purity has a price here: the new moments are fresh dense tensors (a full copy each step),
    where torch updates the rows in place. ``torch.func.vmap``/``grad`` do not support sparse
    tensors, so this transformation runs eagerly only.

    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015, arXiv 1412.6980.
    """
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_non_negative("eps", eps)

    def init(params: PyTree) -> ScaleByAdamState:
        return _adam_init(params)

    def update(updates: PyTree, state: Any, params: PyTree | None = None, **extra_args: Any):
        check_state(state, ScaleByAdamState, "scale_by_sparse_adam")
        step = _float_step(state.count)
        scale = torch.sqrt(1 - b2**step) / (1 - b1**step)
        paths = _tree.paths(updates)
        grads, mus, nus = _tree.leaves(updates), _tree.leaves(state.mu), _tree.leaves(state.nu)
        if len(mus) != len(grads):
            _tree.check_same_structure(updates, state.mu, ("updates", "state.mu"))
        directions, new_mu, new_nu = [], [], []
        for path, g, m, v in zip(paths, grads, mus, nus):
            if not (isinstance(g, torch.Tensor) and g.layout is torch.sparse_coo):
                kind = f"a {g.layout} tensor" if isinstance(g, torch.Tensor) else type(g).__name__
                raise FuncoptError(
                    f"scale_by_sparse_adam: the gradient at {path} is {kind}; it needs sparse COO "
                    "gradients (e.g. from nn.Embedding(sparse=True)). Use funcopt.adam for dense ones."
                )
            g = g.coalesce()  # the update is non-linear, so each index must appear once
            values = g._values()
            if values.numel() == 0:  # nothing to move (torch skips the leaf, its step still counts)
                directions.append(_sparse_like(g, values))
                new_mu.append(m)
                new_nu.append(v)
                continue
            m_old = m.sparse_mask(g)._values()
            v_old = v.sparse_mask(g)._values()
            m_step = (values - m_old) * (1 - b1)
            v_step = (values * values - v_old) * (1 - b2)
            new_mu.append(m + _sparse_like(g, m_step))
            new_nu.append(v + _sparse_like(g, v_step))
            direction = (m_step + m_old) / (torch.sqrt(v_step + v_old) + eps)
            directions.append(_sparse_like(g, direction * scale.to(direction.dtype)))
        spec = _tree.structure(updates)
        unflatten = _tree.structure(state.mu).unflatten
        return spec.unflatten(directions), ScaleByAdamState(
            state.count + 1, unflatten(new_mu), unflatten(new_nu), ()
        )

    return GradientTransformation(init, update)
