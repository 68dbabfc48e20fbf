"""Polyak SGD (``optax.polyak_sgd``): SGD with the Polyak step size, from ``value=`` (the loss)."""

from __future__ import annotations

from funcopt.base import FuncoptError, GradientTransformation, ScalarOrSchedule
from funcopt.optimizers._common import build
from funcopt.transforms import scale_by_learning_rate, scale_by_polyak

__all__ = ["polyak_sgd"]


def polyak_sgd(
    max_learning_rate: float = 1.0,
    scaling: ScalarOrSchedule = 1.0,
    f_min: float = 0.0,
    eps: float = 0.0,
    variant: str = "sps",
) -> GradientTransformation:
    """SGD with the stochastic Polyak step size, as ``optax.polyak_sgd``.

    Each step is ``-step * scaling * g`` with ``step = min((loss - f_min) / ||scaling * g||**2,
    max_learning_rate)`` (:func:`funcopt.transforms.scale_by_polyak`; ``variant="sps+"`` clips a
    negative gap at 0). ``update`` needs the loss: ``tx.update(grads, state, params,
    value=loss)`` (``funcopt.make_step`` passes it); without it a FuncoptError says so.
    ``f_min`` is a lower bound of the loss (0 for most losses).

    References: Loizou et al., "Stochastic Polyak Step-size for SGD: An Adaptive Learning Rate
    for Fast Convergence", AISTATS 2021, arXiv 2002.10542.
    """
    if isinstance(max_learning_rate, (int, float)) and max_learning_rate < 0:
        raise FuncoptError(
            f"polyak_sgd: max_learning_rate must be >= 0, got {max_learning_rate!r}. It caps the Polyak step; "
            "to ascend a function, give polyak_sgd its negation (there is no maximize=True here)."
        )
    return build(scale_by_learning_rate(scaling), scale_by_polyak(f_min, max_learning_rate, eps, variant))
