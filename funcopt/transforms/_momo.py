"""MoMo: momentum SGD whose step size is a Polyak-type model of the loss (it reads the loss value).

Part of ``funcopt.transforms`` (import the block from there or from ``funcopt``). The numerics
follow ``optax.contrib.momo`` (optax 0.2.8). The step size comes from inner products over every
leaf, so this block has no elementwise fast route; its scalars are 0-dim float64 tensors.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    FuncoptError,
    GradientTransformation,
    PyTree,
    ScalarOrSchedule,
    check_state,
    require_params,
    stable_name,
)
from funcopt.transforms._common import (
    _check_range,
    _missing_value,
    _scalar_state,
    _value_at,
    check_beta,
    check_learning_rate,
    init_count,
)

__all__ = ["ScaleByMomoState", "scale_by_momo"]

_FLOAT64_EPS = torch.finfo(torch.float64).eps


@stable_name("funcopt.ScaleByMomoState")
class ScaleByMomoState(NamedTuple):
    """State of :func:`scale_by_momo`: ``count`` (0-dim int64), ``exp_avg`` (the momentum,
    shaped like the params) and the 0-dim float64 moving averages ``barf`` (of the loss) and
    ``gamma`` (of ``<g, x>``), and ``lb`` (the loss lower bound)."""

    count: torch.Tensor
    exp_avg: PyTree
    barf: torch.Tensor
    gamma: torch.Tensor
    lb: torch.Tensor


def _loss_value(value: Any, like: torch.Tensor) -> torch.Tensor:
    if value is None:
        raise _missing_value("momo")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise FuncoptError(
                f"momo: value= must be the scalar loss, got a tensor of shape {tuple(value.shape)}. Pass loss.mean() "
                "or loss.sum(), the number whose gradient the grads are."
            )
        return value.reshape(()).to(dtype=like.dtype, device=like.device)
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def scale_by_momo(
    learning_rate: ScalarOrSchedule = 1.0,
    beta: float = 0.9,
    lower_bound: float = 0.0,
    weight_decay: float = 0.0,
    adapt_lower_bound: bool = False,
) -> GradientTransformation:
    """MoMo's step, learning rate and sign included (``optax.contrib.momo``).

    ``update(grads, state, params, value=loss)``: with the moving averages ``d`` of ``g``,
    ``f`` of the loss and ``gamma`` of ``<g, x>`` (all starting at the first step's values),
    the step size is ``tau = min(lr, max((1 + lr wd)(f - lb - gamma) + <d, x>, 0) / ||d||**2)``
    and the update ``-lr wd / (1 + lr wd) x - tau d``. ``lower_bound`` is a lower bound of the
    loss (0 for most losses); ``adapt_lower_bound=True`` raises it online. A schedule is
    evaluated at the 0-based count.

    References: Schaipp, Ohana, Eickenberg, Defazio & Gower, "MoMo: Momentum Models for
    Adaptive Learning Rates", ICML 2024, arXiv 2305.07583.
    """
    check_learning_rate(learning_rate)
    check_beta("beta", beta)
    _check_range("lower_bound", lower_bound)
    _check_range("weight_decay", weight_decay, 0.0)

    def init(params):
        count = init_count(params)
        barf, gamma, lb = _scalar_state(0.0, count), _scalar_state(0.0, count), _scalar_state(lower_bound, count)
        return ScaleByMomoState(count, _tree.zeros_like(params), barf, gamma, lb)

    def update(updates, state, params=None, *, value=None, **extra_args):
        check_state(state, ScaleByMomoState, "scale_by_momo")
        require_params(params, "scale_by_momo")
        loss = _loss_value(value, state.barf)
        bt = torch.where(state.count == 0, 0.0, torch.as_tensor(beta, dtype=state.barf.dtype, device=state.barf.device))
        barf = bt * state.barf + (1 - bt) * loss
        exp_avg = _tree.map(
            lambda m, g: (bt * m + (1 - bt) * g).to(m.dtype), state.exp_avg, updates, names=("exp_avg", "updates")
        )
        gamma = bt * state.gamma + (1 - bt) * _tree.vdot(updates, params)
        norm_sq = _tree.sum_squares(exp_avg)
        iprod = _tree.vdot(exp_avg, params)
        alpha = _value_at(learning_rate, state.count)
        shrink = 1 + alpha * weight_decay
        if adapt_lower_bound:
            cap = shrink * (barf - gamma) + iprod
            lowered = torch.clamp_min(cap / (2 * shrink), lower_bound)
            this_lb = torch.where(cap < shrink * state.lb, lowered, state.lb)
        else:
            this_lb = state.lb
        t1 = torch.clamp_min(shrink * (barf - this_lb - gamma) + iprod, 0.0) / norm_sq
        t1 = torch.where(norm_sq <= _FLOAT64_EPS, 0.0, t1)
        tau = torch.minimum(torch.as_tensor(alpha, dtype=t1.dtype, device=t1.device), t1)
        decay = (alpha * weight_decay) / shrink
        out = _tree.map(lambda m, p: (-decay * p - tau * m).to(p.dtype), exp_avg, params)
        if adapt_lower_bound:
            new_lb = torch.clamp_min((barf + iprod - gamma) - 0.5 * tau * norm_sq, lower_bound)
        else:
            new_lb = state.lb
        return out, ScaleByMomoState(state.count + 1, exp_avg, barf, gamma, new_lb)

    return GradientTransformation(init, update)
