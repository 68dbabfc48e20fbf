"""``dpsgd``: differentially private SGD (optax.contrib.dpsgd) over per-example gradients."""

from __future__ import annotations

import torch

from funcopt.base import GradientTransformation, chain
from funcopt.transforms import differentially_private_aggregate, scale_by_learning_rate, trace

__all__ = ["dpsgd"]


def dpsgd(
    learning_rate: float | torch.Tensor,
    l2_norm_clip: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    seed: int | torch.Tensor = 0,
    momentum: float | None = None,
    nesterov: bool = False,
) -> GradientTransformation:
    """DP-SGD: per-example clipping, Gaussian noise, then SGD (``optax.contrib.dpsgd``).

    ``update`` takes per-example gradients, each leaf shaped ``(batch, *param_shape)``::

        per_example = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))
        updates, state = tx.update(per_example(params, x, y), state, params)

    where ``loss_one(params, x_i, y_i)`` is the loss of one example. The chain is
    ``differentially_private_aggregate(l2_norm_clip, noise_multiplier, key=seed)``, heavy-ball
    momentum (``trace``) when ``momentum`` is given, and ``scale_by_learning_rate``.

    Args:
        learning_rate: the step size (a float, 0-dim tensor or schedule).
        l2_norm_clip: the largest per-example gradient norm.
        noise_multiplier: noise standard deviation over ``l2_norm_clip``.
        seed: the int seed of the noise, kept in the state.
        momentum: heavy-ball momentum, or None for none.
        nesterov: Nesterov momentum (with ``momentum``).

    References:
        Abadi et al., "Deep Learning with Differential Privacy", 2016 (arXiv 1607.00133).
    """
    parts = [differentially_private_aggregate(l2_norm_clip, noise_multiplier, key=seed)]
    if momentum is not None:
        parts.append(trace(momentum, nesterov=nesterov))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)
