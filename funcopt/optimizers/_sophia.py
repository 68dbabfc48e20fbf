"""``sophia``: the Sophia optimizer (optax.contrib.sophia), a clipped diagonal-Hessian method."""

from __future__ import annotations

from typing import Any, Callable

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.optimizers._common import build, decay_weights
from funcopt.transforms import scale_by_learning_rate, scale_by_sophia

__all__ = ["sophia"]


def sophia(
    learning_rate: ScalarOrSchedule,
    b1: float | torch.Tensor = 0.965,
    b2: float | torch.Tensor = 0.99,
    eps: float | torch.Tensor = 1e-8,
    weight_decay: float | torch.Tensor = 1e-4,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    gamma: float | torch.Tensor = 0.01,
    clip_threshold: float | torch.Tensor | None = 1.0,
    update_interval: int = 10,
    hessian_diagonal_fn: GradientTransformation | None = None,
) -> GradientTransformation:
    """Sophia (``optax.contrib.sophia``): ``scale_by_sophia``, decoupled weight decay, learning rate.

    The step is ``-lr * (clip(m_hat / max(gamma * h, eps), -1, 1) + weight_decay * p)`` with
    ``h`` a running estimate of the Hessian diagonal refreshed every ``update_interval`` steps
    (see :func:`funcopt.scale_by_sophia`). With the default estimator (Hutchinson's, Sophia-H)
    every ``update`` needs the loss as a function of the params alone::

        tx = funcopt.sophia(learning_rate=1e-3)
        obj_fn = lambda p: loss(p, x, y)
        updates, state = tx.update(torch.func.grad(obj_fn)(params), state, params, obj_fn=obj_fn)

    For Sophia-G pass ``hessian_diagonal_fn=funcopt.gnb_estimator_diag_hessian(batch_size)``
    and ``sampled_grads=`` instead.

    Args:
        learning_rate: the step size (float, 0-dim tensor or schedule); no default, as in optax.
        b1: EMA rate of the gradient (0.965).
        b2: EMA rate of the Hessian estimates (0.99, refreshed every ``update_interval`` steps).
        eps: floor of the denominator (1e-8).
        weight_decay: decoupled weight decay (1e-4).
        weight_decay_mask: which leaves decay (a pytree of bools or a function of the params).
        gamma: scale of the Hessian estimate (0.01; raise it if too many coordinates clip).
        clip_threshold: elementwise clip of the direction (1.0), None for none.
        update_interval: steps between Hessian refreshes (10).
        hessian_diagonal_fn: the estimator; None for Hutchinson's (needs ``obj_fn=``).

    References:
        Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
        Language Model Pre-training", 2023 (arXiv 2305.14342).
    """
    return build(
        scale_by_sophia(b1, b2, eps, gamma, clip_threshold, update_interval, hessian_diagonal_fn),
        decay_weights(weight_decay, weight_decay_mask),
        scale_by_learning_rate(learning_rate),
    )
