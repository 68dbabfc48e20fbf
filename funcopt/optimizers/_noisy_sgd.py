"""Noisy SGD (``optax.noisy_sgd``): SGD on gradients plus annealed Gaussian noise."""

from __future__ import annotations

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.optimizers._common import build
from funcopt.transforms import add_noise, scale_by_learning_rate

__all__ = ["noisy_sgd"]


def noisy_sgd(
    learning_rate: ScalarOrSchedule, eta: float = 0.01, gamma: float = 0.55, key: int | torch.Tensor = 0
) -> GradientTransformation:
    """Noisy SGD, as ``optax.noisy_sgd``: ``p -= learning_rate * (g + n_t)`` with ``n_t`` Gaussian
    of variance ``eta / t**gamma`` at step ``t = 1, 2, ...`` (:func:`funcopt.transforms.add_noise`).

    ``key`` is an int seed kept in the state: the noise of step ``t`` is a pure function of
    ``(key, t)``, so runs reproduce, resume bitwise from a checkpoint and run under
    ``torch.func.vmap`` (stack different seeds into the state's ``rng_key`` to give ensemble
    members different noise). The noise values differ from optax's (JAX draws other numbers);
    their distribution is the same.

    References: Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep
    Networks", 2015, arXiv 1511.06807.
    """
    return build(add_noise(eta, gamma, key), scale_by_learning_rate(learning_rate))
