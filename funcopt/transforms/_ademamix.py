"""AdEMAMix: Adam's direction plus a slow exponential moving average of the gradients.

Part of ``funcopt.transforms`` (import the block from there or from ``funcopt``). The numerics
follow ``optax.contrib.scale_by_ademamix`` (optax 0.2.8).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, ScalarOrSchedule, stable_name
from funcopt.transforms._common import _check_range, _value_at, check_beta
from funcopt.transforms._moments import _bias_corrections, _check_moment_args, _ema, _ema_of_squares, _moment_block

__all__ = ["ScaleByAdemamixState", "scale_by_ademamix"]


@stable_name("funcopt.ScaleByAdemamixState")
class ScaleByAdemamixState(NamedTuple):
    """State of :func:`scale_by_ademamix`: count, the fast and slow moving averages ``m1`` and
    ``m2`` and the second moment ``nu``, each shaped like the params."""

    count: torch.Tensor
    m1: PyTree
    m2: PyTree
    nu: PyTree


def scale_by_ademamix(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """Rescales updates by AdEMAMix (``optax.contrib.scale_by_ademamix``).

    ``m1``, ``m2`` and ``nu`` are moving averages of ``g``, ``g`` and ``g**2`` with decays
    ``b1``, ``b3`` and ``b2``; returns ``(m1_hat + alpha * m2) / (sqrt(nu_hat + eps_root) + eps)``
    with Adam's bias corrections on ``m1`` and ``nu`` only. ``b3`` and ``alpha`` may be
    schedules ``count -> value`` (the paper warms both up), evaluated at the 0-based count.

    References: Pagliardini et al., "The AdEMAMix Optimizer: Better, Faster, Older", 2024,
    arXiv 2409.03137.
    """
    _check_moment_args(b1, b2, eps, eps_root)
    if not callable(b3):
        check_beta("b3", b3)
    if not callable(alpha):
        _check_range("alpha", alpha)

    def advance(updates, state):
        c_b3 = _value_at(b3, state.count)
        c_alpha = _value_at(alpha, state.count)
        m1 = _ema(state.m1, updates, b1, names=("m1", "updates"))
        m2 = _ema(state.m2, updates, c_b3)
        nu = _ema_of_squares(state.nu, updates, b2)
        bc1, bc2 = _bias_corrections(state.count, b1, b2)
        direction = _tree.map(
            lambda a, b, v: ((a / bc1 + c_alpha * b) / (torch.sqrt(v / bc2 + eps_root) + eps)).to(a.dtype), m1, m2, nu
        )
        return direction, (m1, m2, nu)

    return _moment_block("scale_by_ademamix", ScaleByAdemamixState, 3, advance)
