"""NovoGrad's scaling: a per-leaf (layer-wise) second moment of the gradient norm.

Part of ``funcopt.transforms``; numerics of optax 0.2.8's ``scale_by_novograd``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, check_state, require_params, stable_name
from funcopt.transforms._common import _lerp, check_non_negative, init_count, is_python_zero
from funcopt.transforms._moments import _check_moment_args

__all__ = ["ScaleByNovogradState", "scale_by_novograd"]


@stable_name("funcopt.ScaleByNovogradState")
class ScaleByNovogradState(NamedTuple):
    """State of :func:`scale_by_novograd`: the 0-dim int64 ``count``, the params-shaped momentum
    ``mu`` and ``nu``, one 0-dim tensor per leaf (the EMA of the leaf's squared gradient norm,
    in the leaf's dtype)."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def scale_by_novograd(
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """NovoGrad's rescaling (Ginsburg et al., "Stochastic Gradient Methods with Layer-wise
    Adaptive Moments for Training of Deep Networks", 2019, arXiv 1905.11286), as
    ``optax.scale_by_novograd``.

    Per leaf: ``nu = ||g||**2`` at the first step, then ``b2 * nu + (1 - b2) * ||g||**2``;
    ``a = g / (sqrt(nu + eps_root) + eps) + weight_decay * p``; ``mu = a`` at the first step,
    then ``b1 * mu + a``; returns ``mu``. Needs the params when ``weight_decay`` is non-zero.
    """
    _check_moment_args(b1, b2, eps, eps_root)
    check_non_negative("weight_decay", weight_decay)
    decays = not is_python_zero(weight_decay)

    def init(params):
        nu = _tree.map(lambda p: torch.zeros((), dtype=p.dtype, device=p.device), params)
        return ScaleByNovogradState(init_count(params), _tree.zeros_like(params), nu)

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByNovogradState, "scale_by_novograd")
        if decays:
            require_params(params, "scale_by_novograd (weight_decay > 0)")
        first = state.count == 0

        def second(n, g):
            sq = torch.linalg.vector_norm(g) ** 2
            return torch.where(first, sq, _lerp(n, sq, 1 - b2))

        nu = _tree.map(second, state.nu, updates, names=("nu", "updates"))

        def momentum(m, g, n, p=None):
            a = g / (torch.sqrt(n + eps_root) + eps)
            if p is not None:
                a = a + weight_decay * p
            return torch.where(first, a, b1 * m + a)

        if decays:
            mu = _tree.map(momentum, state.mu, updates, nu, params, names=("mu", "updates", "nu", "params"))
        else:
            mu = _tree.map(momentum, state.mu, updates, nu)
        return mu, ScaleByNovogradState(state.count + 1, mu, nu)

    return GradientTransformation(init, update)
