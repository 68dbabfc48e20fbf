"""Optimizers that scale each leaf by norms: NovoGrad, Fromage and LARS (optax's aliases).

Their steps read per-leaf norms, so they have no elementwise fast route.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from funcopt import tree as _tree
from funcopt.base import EmptyState, GradientTransformation, ScalarOrSchedule, check_state, require_params
from funcopt.optimizers._common import Mask, build, decay_weights
from funcopt.transforms import (
    ScaleByScheduleState,
    check_learning_rate,
    init_count,
    masked,
    scale,
    scale_by_learning_rate,
    scale_by_novograd,
    scale_by_schedule,
    scale_by_trust_ratio,
    trace,
)

__all__ = ["novograd", "fromage", "lars"]


def novograd(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """NovoGrad, as ``optax.novograd``: a second moment per leaf (of the squared gradient norm)
    and momentum over the normalized gradients plus ``weight_decay * params``
    (:func:`funcopt.transforms.scale_by_novograd`).

    References: Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments
    for Training of Deep Networks", 2019, arXiv 1905.11286.
    """
    return build(scale_by_novograd(b1, b2, eps, eps_root, weight_decay), scale_by_learning_rate(learning_rate))


def _add_params_times(factor: Any) -> GradientTransformation:
    """Adds ``factor * params`` to the updates; ``factor`` a number, a 0-dim tensor, or a
    schedule ``count -> value`` (then the state counts the steps). Negative factors allowed."""
    scheduled = callable(factor)

    def init(params):
        return ScaleByScheduleState(init_count(params)) if scheduled else EmptyState()

    def update(updates, state, params=None, **extra_args):
        require_params(params, "fromage")
        if scheduled:
            check_state(state, ScaleByScheduleState, "fromage")
            f, state = factor(state.count), ScaleByScheduleState(state.count + 1)
        else:
            f = factor
        return _tree.map(lambda u, p: u + f * p, updates, params, names=("updates", "params")), state

    return GradientTransformation(init, update)


def fromage(learning_rate: ScalarOrSchedule, min_norm: float = 1e-6) -> GradientTransformation:
    """Fromage, as ``optax.fromage``: per leaf, ``p <- (p - lr * ||p|| / ||g|| * g) / sqrt(1 + lr**2)``
    (norms floored at ``min_norm``), a step of relative size ``lr`` that keeps the norms bounded.

    References: Bernstein et al., "On the distance between two neural networks and the
    stability of learning", NeurIPS 2020, arXiv 2002.03432.
    """
    check_learning_rate(learning_rate)
    if callable(learning_rate):
        lr: Callable[[torch.Tensor], Any] = learning_rate

        def mult(count):
            return 1 / (1 + lr(count) ** 2) ** 0.5

        return build(
            scale_by_trust_ratio(min_norm),
            scale_by_schedule(lambda count: -(mult(count) * lr(count))),
            _add_params_times(lambda count: mult(count) - 1),
        )
    mult = 1 / (1 + learning_rate**2) ** 0.5
    return build(scale_by_trust_ratio(min_norm), scale(-(learning_rate * mult)), _add_params_times(mult - 1))


def _mask_or_all(mask: Any) -> tuple[bool, Mask]:
    """(whether any leaf is selected, the mask to pass on: None for all leaves)."""
    if mask is True:
        return True, None
    if mask is False:
        return False, None
    return True, mask


def lars(
    learning_rate: ScalarOrSchedule,
    weight_decay: float = 0.0,
    weight_decay_mask: Mask | bool = True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask: Mask | bool = True,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> GradientTransformation:
    """LARS, as ``optax.lars``: weight decay, then the per-leaf trust ratio
    ``trust_coefficient * ||p|| / (||u|| + eps)``, then the learning rate, then momentum
    (``trace``: the momentum accumulates the scaled steps).

    The masks (``True``: every leaf; a pytree of bools or a function of the params) choose
    the leaves that get weight decay and the trust ratio.

    References: You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
    arXiv 1708.03888.
    """
    decay_any, decay_mask = _mask_or_all(weight_decay_mask)
    trust_any, trust_mask = _mask_or_all(trust_ratio_mask)
    trust = scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)
    return build(
        decay_weights(weight_decay, decay_mask) if decay_any else None,
        (trust if trust_mask is None else masked(trust, trust_mask)) if trust_any else None,
        scale_by_learning_rate(learning_rate),
        trace(momentum, nesterov=nesterov),
    )
