"""Adan's scaling: Nesterov-style momentum from EMAs of the gradient and of its differences.

Part of ``funcopt.transforms``; numerics of optax 0.2.8's ``scale_by_adan``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, stable_name
from funcopt.transforms._common import _lerp, check_beta, check_non_negative
from funcopt.transforms._moments import _bias_corrections, _ema, _moment_block

__all__ = ["ScaleByAdanState", "scale_by_adan"]


@stable_name("funcopt.ScaleByAdanState")
class ScaleByAdanState(NamedTuple):
    """State of :func:`scale_by_adan`, all params-shaped except the 0-dim int64 ``count``:
    ``mu`` (EMA of g), ``diff_ema`` (EMA of g - g_prev), ``nu`` (EMA of the squared
    Nesterov-corrected gradient) and ``prev_grad`` (the last gradient, a copy)."""

    count: torch.Tensor
    mu: PyTree
    diff_ema: PyTree
    nu: PyTree
    prev_grad: PyTree


def scale_by_adan(
    b1: float = 0.98, b2: float = 0.92, b3: float = 0.99, eps: float = 1e-8, eps_root: float = 0.0
) -> GradientTransformation:
    """Adan's rescaling (Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models", 2022, arXiv 2208.06677, Algorithm 1), as ``optax.scale_by_adan``.

    With ``d = g - g_prev`` (0 at the first step): ``mu``, ``diff_ema`` and ``nu`` are EMAs
    (decays ``b1``, ``b2``, ``b3``) of ``g``, ``d`` and ``(g + (1 - b2) * d)**2``; returns
    ``(mu_hat + (1 - b2) * diff_hat) / (sqrt(nu_hat + eps_root) + eps)``, each bias-corrected.
    """
    for name, b in (("b1", b1), ("b2", b2), ("b3", b3)):
        check_beta(name, b)
    check_non_negative("eps", eps)
    check_non_negative("eps_root", eps_root)

    def advance(updates, state):
        first = state.count == 0
        diff = _tree.map(
            lambda g, prev: torch.where(first, torch.zeros_like(g), g - prev),
            updates, state.prev_grad, names=("updates", "prev_grad"),
        )
        mu = _ema(state.mu, updates, b1)
        diff_ema = _ema(state.diff_ema, diff, b2)

        def second(n, g, d):
            s = g + (1 - b2) * d
            return _lerp(n, s * s, 1 - b3)

        nu = _tree.map(second, state.nu, updates, diff)
        bc1, bc2, bc3 = _bias_corrections(state.count, b1, b2, b3)

        def direction(m, v, n):
            return (m / bc1 + (1 - b2) * (v / bc2)) / (torch.sqrt(n / bc3 + eps_root) + eps)

        out = _tree.map(direction, mu, diff_ema, nu)
        prev = _tree.map(torch.clone, updates)  # a copy: in-place steps write the state buffers
        return out, (mu, diff_ema, nu, prev)

    return _moment_block("scale_by_adan", ScaleByAdanState, 4, advance)
