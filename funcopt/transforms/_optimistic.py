"""Optimistic gradient: extrapolation from the previous gradient (games, min-max problems).

Part of ``funcopt.transforms``; numerics of optax 0.2.8's ``scale_by_optimistic_gradient``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, check_state, stable_name
from funcopt.transforms._common import _check_range, init_count

__all__ = ["ScaleByOptimisticGradientState", "scale_by_optimistic_gradient"]


@stable_name("funcopt.ScaleByOptimisticGradientState")
class ScaleByOptimisticGradientState(NamedTuple):
    """State of :func:`scale_by_optimistic_gradient`: the 0-dim int64 ``count`` and the
    params-shaped ``previous_gradient`` (a copy of the last input)."""

    count: torch.Tensor
    previous_gradient: PyTree


def scale_by_optimistic_gradient(alpha: float = 1.0, beta: float = 1.0) -> GradientTransformation:
    """Optimistic gradient as ``optax.scale_by_optimistic_gradient``: returns
    ``(alpha + beta) * g - beta * g_prev``, with ``g_prev = g`` at the first step.

    References: Mokhtari et al., "A Unified Analysis of Extra-gradient and Optimistic Gradient
    Methods for Saddle Point Problems", AISTATS 2020, arXiv 1901.08511.
    """
    _check_range("alpha", alpha)
    _check_range("beta", beta)

    def init(params):
        return ScaleByOptimisticGradientState(init_count(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByOptimisticGradientState, "scale_by_optimistic_gradient")
        first = state.count == 0

        def step(g, prev):
            prev = torch.where(first, g, prev)
            return (alpha + beta) * g - beta * prev

        out = _tree.map(step, updates, state.previous_gradient, names=("updates", "previous_gradient"))
        # a copy in the state's dtype (in-place steps write the state buffers; an upstream 0-dim
        # float64 bias correction may have promoted a 0-dim leaf's update)
        prev = _tree.map(lambda g, p: g.to(p.dtype, copy=True), updates, state.previous_gradient)
        return out, ScaleByOptimisticGradientState(state.count + 1, prev)

    return GradientTransformation(init, update)
