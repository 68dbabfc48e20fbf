"""SM3 (``optax.sm3``): Adagrad-like scaling with one accumulator per slice along each axis."""

from __future__ import annotations

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.optimizers._common import build
from funcopt.transforms import scale_by_learning_rate, scale_by_sm3

__all__ = ["sm3"]


def sm3(learning_rate: ScalarOrSchedule, momentum: float = 0.9) -> GradientTransformation:
    """SM3, as ``optax.sm3``: :func:`funcopt.transforms.scale_by_sm3` (its ``b1`` is ``momentum``)
    then the learning rate. The state of a ``(m, n)`` leaf holds ``m + n`` accumulators, not
    ``m * n``. (optax takes a constant learning rate; funcopt also takes a schedule.)

    References: Anil et al., "Memory-Efficient Adaptive Optimization", NeurIPS 2019, arXiv
    1901.11150.
    """
    return build(scale_by_sm3(momentum), scale_by_learning_rate(learning_rate))
