"""Sign-based blocks: ``scale_by_sign`` and the ``ema`` it follows in signum.

Part of ``funcopt.transforms``; numerics of optax 0.2.8's ``scale_by_sign`` and ``ema``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, stable_name
from funcopt.transforms._common import _init_empty, check_beta
from funcopt.transforms._moments import _bias_corrections, _ema, _moment_block

__all__ = ["EmaState", "ema", "scale_by_sign"]


def scale_by_sign() -> GradientTransformation:
    """Replaces each element of the updates by its sign (-1, 0 or 1), as ``optax.scale_by_sign``
    (Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018)."""

    def update(updates, state, params=None, **extra_args):
        return _tree.map(torch.sign, updates), state

    return GradientTransformation(_init_empty, update)


@stable_name("funcopt.EmaState")
class EmaState(NamedTuple):
    """State of :func:`ema`: the 0-dim int64 ``count`` and the params-shaped average ``ema``."""

    count: torch.Tensor
    ema: PyTree


def ema(decay: float, debias: bool = True) -> GradientTransformation:
    """Exponential moving average of the updates, as ``optax.ema``: ``e = decay * e + (1 - decay) * u``.

    Returns ``e / (1 - decay**t)`` (``debias=True``) or ``e`` itself. (``trace`` instead sums
    ``decay * b + u``, torch's SGD momentum.)
    """
    check_beta("decay", decay)

    def advance(updates, state):
        new = _ema(state.ema, updates, decay, names=("ema", "updates"))
        if debias:
            (bc,) = _bias_corrections(state.count, decay)
            out = _tree.map(lambda e: e / bc, new)
        else:
            out = new
        return out, (new,)

    return _moment_block("ema", EmaState, 1, advance)
