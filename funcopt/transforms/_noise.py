"""``add_noise``: annealed Gaussian gradient noise, seeded from the state.

Part of ``funcopt.transforms``. The noise is a pure function of the seed and step count held in
:class:`AddNoiseState` (see ``_random``), so runs reproduce, resume bitwise from a checkpoint and
run under ``torch.func.vmap``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, check_state, stable_name
from funcopt.transforms._common import _check_range, _scalar_dtype, init_count
from funcopt.transforms._random import STREAM_ADD_NOISE, normal_like, seed_tensor

__all__ = ["AddNoiseState", "add_noise"]


@stable_name("funcopt.AddNoiseState")
class AddNoiseState(NamedTuple):
    """State of :func:`add_noise`: the 0-dim int64 step ``count`` and ``rng_key``, the 0-dim
    int64 seed (constant; each step's noise is drawn from the seed and the count)."""

    count: torch.Tensor
    rng_key: torch.Tensor


def add_noise(eta: float | torch.Tensor, gamma: float | torch.Tensor, key: int | torch.Tensor = 0) -> GradientTransformation:
    """Adds Gaussian noise of variance ``eta / t**gamma`` at step ``t = 1, 2, ...`` (``optax.add_noise``).

    ``updates + sqrt(eta / t**gamma) * n`` with ``n`` standard normal, drawn independently for
    every element. Unlike optax, the key is an int seed (or a 0-dim integer tensor) kept in the
    state; the noise of step ``t`` is a pure function of ``(key, t)``, the same on every device
    and in a resumed run. To give the members of a ``vmap`` ensemble different noise, stack
    different seeds into ``state.rng_key``. The noise itself differs from optax's (JAX's
    generator draws other numbers); its distribution is the same.

    Args:
        eta: base variance of the noise (>= 0).
        gamma: decay exponent of the variance (optax's examples use 0.55).
        key: the seed (default 0).

    Returns:
        A ``GradientTransformation`` with state :class:`AddNoiseState`.

    References:
        Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks",
        2015 (arXiv 1511.06807).
    """
    _check_range("eta", eta, 0.0)
    _check_range("gamma", gamma)
    seed_tensor(key, None, "add_noise")  # validates the key now

    def init(params: Any) -> AddNoiseState:
        return AddNoiseState(count=init_count(params), rng_key=seed_tensor(key, params, "add_noise"))

    def update(updates, state, params=None, **extra_args):
        check_state(state, AddNoiseState, "add_noise")
        count = state.count + 1
        std = torch.sqrt(eta / count.to(_scalar_dtype(count)) ** gamma)
        noise = normal_like(updates, state.rng_key, state.count, STREAM_ADD_NOISE)
        out = _tree.map(lambda u, n: u + (std * n).to(u.dtype), updates, noise)
        return out, AddNoiseState(count=count, rng_key=state.rng_key)

    return GradientTransformation(init, update)
