"""The Polyak step size: scale by ``(f(x) - f*) / ||g||**2``, from the loss passed as ``value=``.

Part of ``funcopt.transforms``; numerics of optax 0.2.8's ``scale_by_polyak``.
"""

from __future__ import annotations

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation
from funcopt.transforms._common import _check_range, _init_empty, _missing_value, check_non_negative

__all__ = ["scale_by_polyak"]

_VARIANTS = ("sps", "sps+")
_FLOAT64_EPS = torch.finfo(torch.float64).eps  # optax compares with jnp.finfo(float).eps


def scale_by_polyak(
    f_min: float = 0.0, max_learning_rate: float = 1.0, eps: float = 0.0, variant: str = "sps"
) -> GradientTransformation:
    """Scales the updates by the Polyak step size, as ``optax.scale_by_polyak``.

    ``update(updates, state, params, value=loss)`` returns ``step * updates`` with
    ``step = min((loss - f_min) / (||u||**2 + eps), max_learning_rate)`` (the norm is over all
    leaves), or 0 where ``||u||**2 + eps`` is at most float64's machine epsilon. ``variant="sps+"``
    clips a negative gap ``loss - f_min`` at 0. ``value=`` is required (a FuncoptError says so).

    References: Loizou et al., "Stochastic Polyak Step-size for SGD: An Adaptive Learning Rate
    for Fast Convergence", AISTATS 2021, arXiv 2002.10542; Garrigos et al., "Function value
    learning: Adaptive learning rates based on the Polyak stepsize and function splitting in
    ERM", 2023, arXiv 2307.14528 (``sps+``).
    """
    if variant not in _VARIANTS:
        raise FuncoptError(f"scale_by_polyak: variant must be one of {_VARIANTS}, got {variant!r}.")
    _check_range("f_min", f_min)
    check_non_negative("max_learning_rate", max_learning_rate)
    check_non_negative("eps", eps)

    def update(updates, state, params=None, *, value=None, **extra_args):
        if value is None:
            raise _missing_value("scale_by_polyak")
        leaves = _tree.leaves(updates)
        if not leaves:
            return updates, state
        wide = torch.promote_types(torch.float32, _promoted_dtype(leaves))
        sq = sum(torch.sum(torch.square(u.to(wide))) for u in leaves)
        gap = torch.as_tensor(value, device=sq.device).to(wide) - f_min
        if variant == "sps+":
            gap = torch.relu(gap)
        denom = sq + eps
        step = torch.where(
            denom <= _FLOAT64_EPS, torch.zeros_like(denom), torch.minimum(gap / denom, torch.as_tensor(max_learning_rate).to(denom))
        )
        return _tree.map(lambda u: u * step.to(u.dtype), updates), state

    return GradientTransformation(_init_empty, update)


def _promoted_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    """The promoted dtype of ``leaves``."""
    dtype = leaves[0].dtype
    for x in leaves[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype
