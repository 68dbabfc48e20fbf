"""The learning-rate ladder of :func:`~funcopt.lr_finder.lr_find` and ``lr_sweep``, and the
argument checks the LR finder shares (Python values only; nothing here touches a tensor)."""

from __future__ import annotations

import math
from typing import Any

from funcopt.base import FuncoptError

__all__ = ["lr_ladder"]

_MODES = ("exponential", "linear")


# ---------------------------------------------------------------------------------------------
# Argument checks (Python values only; the loops below never branch on tensor values)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise FuncoptError(f"{name} must be an integer >= {low}, got {value!r}.")


def lr_ladder(min_lr: float, max_lr: float, num: int, mode: str = "exponential") -> list[float]:
    """The ``num`` learning rates of a range test, like ``numpy.geomspace`` (or ``linspace``).

    ``mode='exponential'`` spaces them evenly in log space, ``'linear'`` evenly in linear
    space. Both endpoints are hit exactly: the first rung is ``min_lr``, the last ``max_lr``.

    Args:
        min_lr: the first learning rate, > 0.
        max_lr: the last learning rate, > ``min_lr``.
        num: the number of rungs, >= 2.
        mode: ``'exponential'`` (default) or ``'linear'``.

    Returns:
        A list of ``num`` increasing Python floats.
    """
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise FuncoptError(f"{name} must be a finite number > 0, got {value!r}.")
    if not max_lr > min_lr:
        raise FuncoptError(f"max_lr ({max_lr!r}) must be greater than min_lr ({min_lr!r}).")
    _check_int("the number of learning rates", num, 2)
    if mode not in _MODES:
        raise FuncoptError(f"mode must be 'exponential' or 'linear', got {mode!r}.")
    last = num - 1
    if mode == "exponential":
        lo, hi = math.log(min_lr), math.log(max_lr)
        out = [math.exp(lo + (hi - lo) * i / last) for i in range(num)]
    else:
        out = [min_lr + (max_lr - min_lr) * i / last for i in range(num)]
    out[0], out[-1] = float(min_lr), float(max_lr)
    return out
