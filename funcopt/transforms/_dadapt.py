"""D-Adaptation and Prodigy: Adam steps whose scale is a running estimate of the distance to a solution.

Part of ``funcopt.transforms`` (import the blocks from there or from ``funcopt``). The numerics
follow ``optax.contrib.dadapt_adamw`` and ``optax.contrib.prodigy`` (optax 0.2.8). The distance
estimate is a global reduction over every leaf (an inner product and an L1 norm per step), so
these blocks have no elementwise fast route. Every scalar of the state is a 0-dim tensor
(float64), read by no ``.item()``: the step runs under ``vmap``/``grad`` without a device sync.
"""

from __future__ import annotations

from typing import NamedTuple

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
    _float_step,
    _scalar_state,
    _value_at,
    check_beta,
    check_learning_rate,
    check_non_negative,
    init_count,
)

__all__ = ["ScaleByProdigyState", "ScaleByDadaptAdamState", "scale_by_prodigy", "scale_by_dadapt_adam"]


def _l1(tree: PyTree) -> torch.Tensor:
    total = None
    for x in _tree.leaves(tree):
        term = torch.sum(torch.abs(x))
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 leaves computed in float32 (``eps`` = 1e-8 is 0 in float16: 0/0 otherwise)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_args(name: str, learning_rate, betas, eps, estim_lr0, weight_decay) -> tuple:
    """Validates the hyperparameters both blocks take; returns ``betas``, the pair ``(b1, b2)``."""
    check_learning_rate(learning_rate)
    if not (isinstance(betas, tuple) and len(betas) == 2):
        raise FuncoptError(f"{name}: betas must be a tuple (b1, b2), got {betas!r}.")
    check_beta("betas[0]", betas[0])
    check_beta("betas[1]", betas[1])
    check_non_negative("eps", eps)
    _check_range("estim_lr0", estim_lr0, 0.0, low_open=True)
    check_non_negative("weight_decay", weight_decay)
    return betas


def _init_state(state_type: type, params: PyTree, estim_lr0: float, *params_copies: PyTree):
    """``state_type(count, exp_avg, exp_avg_sq, grad_sum, *params_copies, estim_lr, numerator_weighted)``:
    zero moments and sum, the distance estimate at ``estim_lr0``, a zero weighted numerator."""
    count = init_count(params)
    zeros = _tree.zeros_like
    return state_type(
        count, zeros(params), zeros(params), zeros(params), *params_copies,
        _scalar_state(estim_lr0, count), _scalar_state(0.0, count),
    )


def _step_size(state, learning_rate, b1: float, b2: float) -> torch.Tensor:
    """``dlr = d * learning_rate * sqrt(1 - b2**t) / (1 - b1**t)``: Adam's bias-corrected step
    size times the distance estimate ``d`` (``state.estim_lr``), at the 1-based step ``t``."""
    step = _float_step(state.count)
    return state.estim_lr * _value_at(learning_rate, state.count) * ((1 - b2**step) ** 0.5 / (1 - b1**step))


@stable_name("funcopt.ScaleByProdigyState")
class ScaleByProdigyState(NamedTuple):
    """State of :func:`scale_by_prodigy`.

    ``count``: 0-dim int64; ``exp_avg``, ``exp_avg_sq``: Adam's moments of ``d * g``;
    ``grad_sum``: the weighted sum of ``d * g`` the denominator is the L1 norm of;
    ``params0``: a copy of the initial params; ``estim_lr`` (the distance estimate ``d``) and
    ``numerator_weighted``: 0-dim float64 tensors.
    """

    count: torch.Tensor
    exp_avg: PyTree
    exp_avg_sq: PyTree
    grad_sum: PyTree
    params0: PyTree
    estim_lr: torch.Tensor
    numerator_weighted: torch.Tensor


def scale_by_prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
) -> GradientTransformation:
    """Prodigy's step, learning rate and sign included (``optax.contrib.prodigy``).

    Adam on ``d * g`` with step ``d * learning_rate * sqrt(1 - b2**t) / (1 - b1**t)``, where the
    distance estimate ``d`` (``estim_lr``, from ``estim_lr0``) only grows: ``d = max(d,
    estim_lr_coef * sum_k w_k <g_k, x_0 - x_k> / ||s||_1``. ``beta3`` (default
    ``sqrt(b2)``) weighs the sums; ``weight_decay`` is decoupled (times the step). Needs params.

    References: Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner", 2023, arXiv 2306.06101.
    """
    b1, b2 = _check_args("scale_by_prodigy", learning_rate, betas, eps, estim_lr0, weight_decay)
    b3 = b2**0.5 if beta3 is None else beta3
    check_beta("beta3", b3)
    check_non_negative("estim_lr_coef", estim_lr_coef)

    def init(params):
        return _init_state(ScaleByProdigyState, params, estim_lr0, _tree.map(torch.clone, params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByProdigyState, "scale_by_prodigy")
        require_params(params, "scale_by_prodigy")
        d = state.estim_lr
        dlr = _step_size(state, learning_rate, b1, b2)
        dg = _tree.map(lambda g: (d * g).to(g.dtype), updates)
        numerator = _tree.vdot(updates, _tree.map(lambda p0, p: p0 - p, state.params0, params))
        exp_avg = _tree.map(lambda m, x: b1 * m + (1 - b1) * x, state.exp_avg, dg, names=("exp_avg", "updates"))
        # (dg has the leaf dtype; the 0-dim float64 d, dlr would otherwise promote 0-dim leaves)
        exp_avg_sq = _tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, state.exp_avg_sq, dg)
        weight = d if safeguard_warmup else dlr
        grad_sum = _tree.map(lambda s, x: (b3 * s + weight * x / estim_lr0).to(s.dtype), state.grad_sum, dg)
        numerator_weighted = b3 * state.numerator_weighted + (d / estim_lr0) * dlr * numerator
        estimate = estim_lr_coef * numerator_weighted / _l1(grad_sum)
        new_d = torch.maximum(d, estimate)
        out = _tree.map(
            lambda m, v, p: (
                -weight_decay * dlr * _wide(p) - dlr * _wide(m) / (torch.sqrt(_wide(v)) + new_d * eps)
            ).to(p.dtype),
            exp_avg, exp_avg_sq, params,
        )
        new_state = ScaleByProdigyState(
            state.count + 1, exp_avg, exp_avg_sq, grad_sum, state.params0, new_d, numerator_weighted
        )
        return out, new_state

    return GradientTransformation(init, update)


@stable_name("funcopt.ScaleByDadaptAdamState")
class ScaleByDadaptAdamState(NamedTuple):
    """State of :func:`scale_by_dadapt_adam`.

    ``count``: 0-dim int64; ``exp_avg``, ``exp_avg_sq``: Adam's moments (the first of
    ``d * lr * g``); ``grad_sum``: the weighted sum whose L1 norm is the denominator;
    ``estim_lr`` (the distance estimate ``d``) and ``numerator_weighted``: 0-dim float64.
    """

    count: torch.Tensor
    exp_avg: PyTree
    exp_avg_sq: PyTree
    grad_sum: PyTree
    estim_lr: torch.Tensor
    numerator_weighted: torch.Tensor


def scale_by_dadapt_adam(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """D-Adaptation's Adam step, learning rate and sign included (``optax.contrib.dadapt_adamw``).

    Adam whose first moment accumulates ``dlr * g`` with ``dlr = d * learning_rate *
    sqrt(1 - b2**t) / (1 - b1**t)``; the distance estimate ``d`` (``estim_lr``, from
    ``estim_lr0``) only grows, ``d = max(d, sum_k w_k <g_k, s_k / (sqrt(v_k) + eps)> /
    ((1 - sqrt(b2)) ||s||_1))``. ``weight_decay`` is decoupled (times ``dlr``). Needs params.

    References: Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
    arXiv 2301.07733.
    """
    b1, b2 = _check_args("scale_by_dadapt_adam", learning_rate, betas, eps, estim_lr0, weight_decay)
    sb2 = b2**0.5

    def init(params):
        return _init_state(ScaleByDadaptAdamState, params, estim_lr0)

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByDadaptAdamState, "scale_by_dadapt_adam")
        require_params(params, "scale_by_dadapt_adam")
        dlr = _step_size(state, learning_rate, b1, b2)
        weighted = _tree.map(lambda s, v: _wide(s) / (torch.sqrt(_wide(v)) + eps), state.grad_sum, state.exp_avg_sq)
        numerator = _tree.vdot(updates, weighted)
        exp_avg = _tree.map(
            lambda m, g: (b1 * m + (1 - b1) * dlr * g).to(m.dtype), state.exp_avg, updates, names=("exp_avg", "updates")
        )
        exp_avg_sq = _tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.exp_avg_sq, updates)
        grad_sum = _tree.map(lambda s, g: (sb2 * s + (1 - sb2) * dlr * g).to(s.dtype), state.grad_sum, updates)
        numerator_weighted = sb2 * state.numerator_weighted + (1 - sb2) * dlr * numerator
        new_d = torch.maximum(state.estim_lr, numerator_weighted / ((1 - sb2) * _l1(grad_sum)))
        out = _tree.map(
            lambda m, v, p: (-weight_decay * dlr * _wide(p) - _wide(m) / (torch.sqrt(_wide(v)) + eps)).to(p.dtype),
            exp_avg, exp_avg_sq, params,
        )
        new_state = ScaleByDadaptAdamState(
            state.count + 1, exp_avg, exp_avg_sq, grad_sum, new_d, numerator_weighted
        )
        return out, new_state

    return GradientTransformation(init, update)
