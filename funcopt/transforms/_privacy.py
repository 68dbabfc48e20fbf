"""``differentially_private_aggregate``: DP-SGD's per-example clipping and Gaussian noise.

Part of ``funcopt.transforms`` (``optax.contrib.differentially_private_aggregate``). The noise
is drawn from the seed and step count held in the state (see ``_random``): reproducible,
``vmap``-able and bitwise on resume.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, batched_updates, check_state, stable_name
from funcopt.transforms._clipping_extra import per_example_global_norm_clip
from funcopt.transforms._common import _check_range, init_count
from funcopt.transforms._random import STREAM_PRIVACY, normal_like, seed_tensor

__all__ = ["DifferentiallyPrivateAggregateState", "differentially_private_aggregate"]


@stable_name("funcopt.DifferentiallyPrivateAggregateState")
class DifferentiallyPrivateAggregateState(NamedTuple):
    """State of :func:`differentially_private_aggregate`: ``rng_key``, the 0-dim int64 seed,
    and ``count``, the steps taken (0-dim int64; each step's noise comes from both)."""

    rng_key: torch.Tensor
    count: torch.Tensor


def differentially_private_aggregate(
    l2_norm_clip: float | torch.Tensor, noise_multiplier: float | torch.Tensor, key: int | torch.Tensor = 0
) -> GradientTransformation:
    """Aggregates per-example gradients the DP-SGD way (``optax.contrib.differentially_private_aggregate``).

    The incoming updates are per-example gradients: every leaf has shape ``(batch,
    *param_shape)``, as ``torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params,
    x, y)`` gives them. Each example's gradient is clipped to global norm ``l2_norm_clip``
    (:func:`per_example_global_norm_clip`), the clipped gradients are summed, Gaussian noise of
    standard deviation ``l2_norm_clip * noise_multiplier`` is added, and the result is divided
    by the batch size. The output is shaped like the params, so this block goes first in a
    chain; it is marked with :func:`funcopt.base.batched_updates`, so ``chain`` checks the
    updates it returns against the params instead of the per-example input. It does not combine with ``accumulate`` (the privacy accounting assumes one batch
    per step).

    Args:
        l2_norm_clip: the largest per-example gradient norm (>= 0).
        noise_multiplier: the noise's standard deviation in units of ``l2_norm_clip`` (>= 0).
        key: the int seed of the noise (the noise differs from JAX's; its law is the same).

    References:
        Abadi et al., "Deep Learning with Differential Privacy", 2016 (arXiv 1607.00133).
    """
    _check_range("l2_norm_clip", l2_norm_clip, 0.0)
    _check_range("noise_multiplier", noise_multiplier, 0.0)
    seed_tensor(key, None, "differentially_private_aggregate")

    def init(params):
        return DifferentiallyPrivateAggregateState(
            seed_tensor(key, params, "differentially_private_aggregate"), init_count(params)
        )

    def update(updates, state, params=None, **extra_args):
        check_state(state, DifferentiallyPrivateAggregateState, "differentially_private_aggregate")
        clipped, _ = per_example_global_norm_clip(updates, l2_norm_clip)
        batch = _tree.leaves(updates)[0].shape[0]
        noise = normal_like(clipped, state.rng_key, state.count, STREAM_PRIVACY)
        std = l2_norm_clip * noise_multiplier
        out = _tree.map(lambda g, n: (g + std * n) / batch, clipped, noise)
        return out, DifferentiallyPrivateAggregateState(state.rng_key, state.count + 1)

    return batched_updates(GradientTransformation(init, update))
