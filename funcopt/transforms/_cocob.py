"""COCOB-Backprop: learning-rate-free steps by coin betting.

Part of ``funcopt.transforms`` (import the block from there or from ``funcopt``). The numerics
follow ``optax.contrib.scale_by_cocob`` (optax 0.2.8).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, check_state, require_params, stable_name
from funcopt.transforms._common import _check_range, check_non_negative, init_count

__all__ = ["ScaleByCocobState", "scale_by_cocob"]


@stable_name("funcopt.ScaleByCocobState")
class ScaleByCocobState(NamedTuple):
    """State of :func:`scale_by_cocob`: ``count`` (0-dim int64) and, shaped like the params,
    ``init_particles`` (a copy of the initial params), ``cumulative_gradients`` (``-sum g``),
    ``scale`` (the largest ``|g|``, from ``eps``), ``subgradients`` (``sum |g|``) and
    ``reward``."""

    count: torch.Tensor
    init_particles: PyTree
    cumulative_gradients: PyTree
    scale: PyTree
    subgradients: PyTree
    reward: PyTree


def scale_by_cocob(alpha: float = 100.0, eps: float = 1e-8) -> GradientTransformation:
    """COCOB-Backprop's step, sign included (``optax.contrib.scale_by_cocob``).

    Per element, with ``L`` the largest ``|g|`` so far, ``G = sum |g|``, ``C = -sum g`` and the
    reward ``R = max(R - g (x - x0), 0)``: returns ``x0 + C (L + R) / (L max(G + L, alpha L)) - x``
    (``x``: the params, so it needs them). ``alpha`` bounds the first steps.

    References: Orabona & Tommasi, "Training Deep Networks without Learning Rates Through Coin
    Betting", NeurIPS 2017, arXiv 1705.07795.
    """
    _check_range("alpha", alpha, 0.0, low_open=True)
    check_non_negative("eps", eps)

    def init(params):
        zeros = _tree.zeros_like
        return ScaleByCocobState(
            init_count(params),
            _tree.map(torch.clone, params),
            zeros(params),
            _tree.map(lambda p: (eps * torch.ones_like(p)).to(p.dtype), params),
            zeros(params),
            zeros(params),
        )

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByCocobState, "scale_by_cocob")
        require_params(params, "scale_by_cocob")
        scale = _tree.map(lambda a, g: torch.maximum(a, torch.abs(g)), state.scale, updates, names=("scale", "updates"))
        subgradients = _tree.map(lambda a, g: a + torch.abs(g), state.subgradients, updates)
        reward = _tree.map(
            lambda r, g, p, p0: torch.clamp_min(r - g * (p - p0), 0.0),
            state.reward, updates, params, state.init_particles,
        )
        cumulative = _tree.map(lambda c, g: c - g, state.cumulative_gradients, updates)

        def step(p, p0, c, lim, g_sum, r):
            return -p + (p0 + c / (lim * torch.maximum(g_sum + lim, alpha * lim)) * (lim + r))

        out = _tree.map(step, params, state.init_particles, cumulative, scale, subgradients, reward)
        new_state = ScaleByCocobState(state.count + 1, state.init_particles, cumulative, scale, subgradients, reward)
        return out, new_state

    return GradientTransformation(init, update)
