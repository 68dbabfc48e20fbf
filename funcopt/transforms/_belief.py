"""AdaBelief's scaling: Adam whose second moment tracks the gradient's deviation from its EMA.

Part of ``funcopt.transforms``; numerics of optax 0.2.8's ``scale_by_belief``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, stable_name
from funcopt.transforms._common import _lerp
from funcopt.transforms._moments import _bias_corrections, _check_moment_args, _ema, _moment_block

__all__ = ["ScaleByBeliefState", "scale_by_belief"]


@stable_name("funcopt.ScaleByBeliefState")
class ScaleByBeliefState(NamedTuple):
    """State of :func:`scale_by_belief`: the 0-dim int64 ``count``, the gradient EMA ``mu`` and
    ``nu``, the EMA of ``(g - mu)**2`` (plus ``eps_root`` each step), both params-shaped."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def scale_by_belief(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """AdaBelief's rescaling (Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the
    Belief in Observed Gradients", NeurIPS 2020, arXiv 2010.07468), as ``optax.scale_by_belief``.

    ``mu = b1 * mu + (1 - b1) * g``; ``nu = b2 * nu + (1 - b2) * (g - mu)**2 + eps_root``;
    returns ``mu_hat / (sqrt(nu / (1 - b2**t)) + eps)`` with ``mu_hat = mu / (1 - b1**t)``, or
    with ``nesterov=True`` ``b1 * mu / (1 - b1**(t+1)) + (1 - b1) * g / (1 - b1**t)``.
    """
    _check_moment_args(b1, b2, eps, eps_root)

    def advance(updates, state):
        mu = _ema(state.mu, updates, b1, names=("mu", "updates"))

        def second(v, g, m):
            d = g - m
            return _lerp(v, d * d, 1 - b2) + eps_root

        nu = _tree.map(second, state.nu, updates, mu, names=("nu", "updates", "mu"))
        bc1, bc2 = _bias_corrections(state.count, b1, b2)
        if nesterov:
            (bc1_next,) = _bias_corrections(state.count + 1, b1)
            mu_hat = _tree.map(lambda m, g: b1 * (m / bc1_next) + (1 - b1) * (g / bc1), mu, updates)
        else:
            mu_hat = _tree.map(lambda m: m / bc1, mu)
        out = _tree.map(lambda m, v: m / (torch.sqrt(v / bc2) + eps), mu_hat, nu)
        return out, (mu, nu)

    return _moment_block("scale_by_belief", ScaleByBeliefState, 2, advance)
