"""ADOPT: Adam with the second moment taken before the current gradient, and clipping.

Part of ``funcopt.transforms`` (import the block from there or from ``funcopt``). The numerics
follow ``optax.contrib.scale_by_adopt`` (optax 0.2.8).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, stable_name
from funcopt.transforms._common import _lerp
from funcopt.transforms._moments import _check_moment_args, _moment_block

__all__ = ["ScaleByAdoptState", "scale_by_adopt"]


@stable_name("funcopt.ScaleByAdoptState")
class ScaleByAdoptState(NamedTuple):
    """State of :func:`scale_by_adopt`: count, first moment ``mu`` (of the normalized
    gradients) and second moment ``nu`` (of the gradients), both shaped like the params."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def _default_clip_value(count: torch.Tensor) -> torch.Tensor:
    """ADOPT's default clipping bound ``count ** 0.25`` (``count``: the 0-based step, float64)."""
    return count**0.25


def scale_by_adopt(
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GradientTransformation:
    """Rescales updates by ADOPT (``optax.contrib.scale_by_adopt``).

    The gradient is normalized by the *previous* second moment and clipped,
    ``n = clip(g / max(sqrt(nu), eps), -c, c)`` with ``c = clip_value_fn(t)`` (``t`` the 0-based
    step as a float64 0-dim tensor; ``None``: ``t ** 0.25``); then
    ``mu = b1 * mu + (1 - b1) * n`` and ``nu = b2 * nu + (1 - b2) * g**2``. The first step only
    sets ``nu = g**2`` (its update is zero). Returns ``mu`` (with ``nesterov=True``,
    ``b1 * mu + (1 - b1) * n``).

    References: Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the
    Optimal Rate", NeurIPS 2024, arXiv 2411.02853.
    """
    _check_moment_args(b1, b2, eps)
    clip_fn = _default_clip_value if clip_value_fn is None else clip_value_fn

    def advance(updates, state):
        first = state.count == 0
        nu = _tree.map(
            lambda v, g: torch.where(first, g * g, _lerp(v, g * g, 1 - b2)), state.nu, updates, names=("nu", "updates")
        )
        if use_clipping:
            bound = clip_fn(state.count.to(torch.float64))

            def normalized(g, v):
                n = g / torch.clamp_min(torch.sqrt(v), eps)
                return torch.minimum(torch.maximum(n, -bound.to(n.dtype)), bound.to(n.dtype))

        else:

            def normalized(g, v):
                return g / torch.clamp_min(torch.sqrt(v), eps)

        n = _tree.map(normalized, updates, state.nu)
        mu = _tree.map(lambda m, x: torch.where(first, m, _lerp(m, x, 1 - b1)), state.mu, n)
        out = _tree.map(lambda m, x: torch.where(first, m, _lerp(m, x, 1 - b1)), mu, n) if nesterov else mu
        return out, (mu, nu)

    return _moment_block("scale_by_adopt", ScaleByAdoptState, 2, advance)
