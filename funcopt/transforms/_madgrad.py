"""MADGRAD: momentumized, adaptive, dual-averaged gradient steps.

Part of ``funcopt.transforms`` (import the block from there or from ``funcopt``). The numerics
follow ``optax.contrib.scale_by_madgrad`` (optax 0.2.8).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, ScalarOrSchedule, check_state, require_params, stable_name
from funcopt.transforms._common import _value_at, check_beta, check_learning_rate, check_non_negative, init_count

__all__ = ["ScaleByMadgradState", "scale_by_madgrad"]


@stable_name("funcopt.ScaleByMadgradState")
class ScaleByMadgradState(NamedTuple):
    """State of :func:`scale_by_madgrad`: count, the weighted sums of squared gradients
    ``grad_sum_sq`` and of gradients ``s``, and the initial params ``x0`` (a copy), each shaped
    like the params."""

    count: torch.Tensor
    grad_sum_sq: PyTree
    s: PyTree
    x0: PyTree


def scale_by_madgrad(
    learning_rate: ScalarOrSchedule, momentum: float = 0.9, eps: float = 1e-6
) -> GradientTransformation:
    """MADGRAD's step, learning rate and sign included (``optax.contrib.scale_by_madgrad``).

    With ``lam = (learning_rate + eps) * sqrt(k + 1)`` at the 0-based step ``k``:
    ``grad_sum_sq += lam * g**2``, ``s += lam * g``, ``z = x0 - s / (cbrt(grad_sum_sq) + eps)``;
    returns ``(1 - momentum) * z + momentum * x - x`` (``x``: the params, so it needs them).
    A schedule is evaluated at the 0-based count.

    References: Defazio & Jelassi, "Adaptivity without Compromise: A Momentumized, Adaptive,
    Dual Averaged Gradient Method for Stochastic Optimization", 2021, arXiv 2101.11075.
    """
    check_learning_rate(learning_rate)
    check_beta("momentum", momentum)
    check_non_negative("eps", eps)

    def init(params):
        zeros = _tree.zeros_like
        return ScaleByMadgradState(init_count(params), zeros(params), zeros(params), _tree.map(torch.clone, params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByMadgradState, "scale_by_madgrad")
        require_params(params, "scale_by_madgrad")
        lr = _value_at(learning_rate, state.count)
        lam = (lr + eps) * torch.sqrt((state.count + 1).to(torch.float64))
        grad_sum_sq = _tree.map(
            lambda a, g: a + lam.to(g.dtype) * (g * g), state.grad_sum_sq, updates, names=("grad_sum_sq", "updates")
        )
        s = _tree.map(lambda a, g: a + lam.to(g.dtype) * g, state.s, updates)

        def step(x, x0, s_k, gsq):
            z = x0 - s_k / (torch.pow(gsq, 1 / 3) + eps)
            return (1 - momentum) * z + momentum * x - x

        out = _tree.map(step, params, state.x0, s, grad_sum_sq, names=("params", "x0", "s", "grad_sum_sq"))
        return out, ScaleByMadgradState(state.count + 1, grad_sum_sq, s, state.x0)

    return GradientTransformation(init, update)
