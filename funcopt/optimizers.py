"""User-facing optimizers: chains of building blocks with torch.optim's defaults and numerics.

Each function returns a ``GradientTransformation``. ``learning_rate`` may be a float, a 0-dim
tensor, or a schedule ``count -> value`` everywhere. Where torch.optim has the algorithm, the
parameters after any number of steps equal torch's to float tolerance (see
``tests/test_parity.py``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from funcopt import fused as _fused
from funcopt.base import GradientTransformation, PyTree, ScalarOrSchedule, chain
from funcopt.transforms_common import _is_zero, check_learning_rate
from funcopt.transforms import (
    add_decayed_weights,
    scale,
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    scale_by_rss,
    scale_by_trust_ratio,
    trace,
)

__all__ = ["sgd", "adam", "adamw", "adamax", "nadam", "radam", "rmsprop", "adagrad", "lion", "lamb"]

Mask = PyTree | Callable[[PyTree], PyTree] | None


def _build(*parts: GradientTransformation | None) -> GradientTransformation:
    return chain(*[p for p in parts if p is not None])


def _sign(maximize: bool) -> GradientTransformation | None:
    return scale(-1.0) if maximize else None


def _l2(weight_decay: Any) -> GradientTransformation | None:
    return None if _is_zero(weight_decay) else add_decayed_weights(weight_decay)


@_fused.fast_path("sgd")
def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent with optional momentum, like ``torch.optim.SGD``.

    ``g += weight_decay * p``; with momentum ``b = g`` at the first step, then
    ``b = momentum * b + (1 - dampening) * g``; the step is ``-lr * b`` (or
    ``-lr * (g + momentum * b)`` with ``nesterov=True``).

    Example:
        >>> tx = funcopt.sgd(0.1, momentum=0.9)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(grads, state, params)
        >>> params = funcopt.apply_updates(params, updates)

    References: Sutskever et al., "On the importance of initialization and momentum in deep
    learning", 2013.
    """
    check_learning_rate(learning_rate)
    return _build(
        _sign(maximize),
        _l2(weight_decay),
        None if _is_zero(momentum) and not nesterov else trace(momentum, dampening=dampening, nesterov=nesterov),
        scale_by_learning_rate(learning_rate),
    )


@_fused.fast_path("adam")
def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """Adam, like ``torch.optim.Adam`` (``weight_decay`` is L2 added to the gradient).

    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015, arXiv 1412.6980.
    """
    return _build(
        _sign(maximize),
        _l2(weight_decay),
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        scale_by_learning_rate(learning_rate),
    )


@_fused.fast_path("adamw")
def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: Mask = None,
) -> GradientTransformation:
    """AdamW: Adam with decoupled weight decay, like ``torch.optim.AdamW``.

    ``mask`` (pytree of bools or function of params) limits the decay to some leaves.

    References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019,
    arXiv 1711.05101.
    """
    return _build(
        _sign(maximize),
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        None if _is_zero(weight_decay) else add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def adamax(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """Adamax, like ``torch.optim.Adamax``.

    References: Kingma & Ba, 2015, arXiv 1412.6980, section 7.
    """
    return _build(
        _sign(maximize),
        _l2(weight_decay),
        scale_by_adamax(b1, b2, eps),
        scale_by_learning_rate(learning_rate),
    )


def nadam(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """NAdam, like ``torch.optim.NAdam`` (with its ``momentum_decay`` schedule).

    References: Dozat, "Incorporating Nesterov Momentum into Adam", 2016.
    """
    decay = None if _is_zero(weight_decay) else add_decayed_weights(weight_decay)
    return _build(
        _sign(maximize),
        None if decoupled_weight_decay else decay,
        scale_by_nadam(b1, b2, eps, momentum_decay),
        decay if decoupled_weight_decay else None,
        scale_by_learning_rate(learning_rate),
    )


def radam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """RAdam, like ``torch.optim.RAdam``.

    References: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", 2020,
    arXiv 1908.03265.
    """
    decay = None if _is_zero(weight_decay) else add_decayed_weights(weight_decay)
    return _build(
        _sign(maximize),
        None if decoupled_weight_decay else decay,
        scale_by_radam(b1, b2, eps),
        decay if decoupled_weight_decay else None,
        scale_by_learning_rate(learning_rate),
    )


@_fused.fast_path("rmsprop")
def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """RMSprop, like ``torch.optim.RMSprop`` (``alpha`` is the decay of the mean square).

    References: Tieleman & Hinton, Lecture 6.5, COURSERA: Neural Networks for Machine Learning, 2012.
    """
    return _build(
        _sign(maximize),
        _l2(weight_decay),
        scale_by_rms(alpha, eps, centered=centered),
        None if _is_zero(momentum) else trace(momentum),
        scale_by_learning_rate(learning_rate),
    )


@_fused.fast_path("adagrad")
def adagrad(
    learning_rate: ScalarOrSchedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
) -> GradientTransformation:
    """Adagrad, like ``torch.optim.Adagrad``: the k-th step uses ``lr / (1 + (k - 1) * lr_decay)``.

    References: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011.
    """
    check_learning_rate(learning_rate)
    if _is_zero(lr_decay):
        lr = learning_rate
    else:
        base = learning_rate

        def lr(count):
            value = base(count) if callable(base) else base
            # true division, as torch's Python-double lr / (1 + (step - 1) * lr_decay) (float / tensor
            # would compute reciprocal * float and differ in the last bit)
            return torch.div(torch.as_tensor(value, dtype=torch.float64), 1 + count.to(torch.float64) * lr_decay)

    return _build(
        _sign(maximize),
        _l2(weight_decay),
        scale_by_rss(initial_accumulator_value, eps),
        scale_by_learning_rate(lr),
    )


@_fused.fast_path("lion")
def lion(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    mask: Mask = None,
) -> GradientTransformation:
    """Lion: the sign of an interpolated momentum, with decoupled weight decay (``optax.lion``).

    Use a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.

    References: Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023,
    arXiv 2302.06675.
    """
    return _build(
        scale_by_lion(b1, b2),
        None if _is_zero(weight_decay) else add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def lamb(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> GradientTransformation:
    """LAMB: Adam's direction plus decoupled decay, scaled per leaf by ``||p|| / ||u||`` (``optax.lamb``).

    References: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", 2020, arXiv 1904.00962.
    """
    return _build(
        scale_by_adam(b1, b2, eps),
        None if _is_zero(weight_decay) else add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )
