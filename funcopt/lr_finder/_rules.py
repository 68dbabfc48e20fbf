"""The suggestion rules of the LR finder (``steepest``, ``valley``, ``minimum``, ``best``).

Plain Python over lists of floats: :meth:`funcopt.lr_finder.LRFinderResult.suggestion` calls
:func:`_suggest` with the recorded curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from funcopt.base import FuncoptError
from funcopt.lr_finder._ladder import _check_int

__all__ = ["SUGGESTION_METHODS"]

SUGGESTION_METHODS = ("steepest", "valley", "minimum", "best")
"""The rules :meth:`LRFinderResult.suggestion` knows."""

_MIN_POINTS = {"steepest": 2, "valley": 2, "minimum": 1, "best": 1}


# ---------------------------------------------------------------------------------------------
# Suggestion rules over plain Python lists


def _window(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int, skip_end: int
) -> tuple[list[int], list[float], list[float]]:
    """The points between the skips whose loss is finite: (indices, log lrs, losses)."""
    keep = [i for i in range(skip_begin, len(lrs) - skip_end) if math.isfinite(losses[i])]
    return keep, [math.log(lrs[i]) for i in keep], [losses[i] for i in keep]


def _slopes(x: list[float], y: list[float]) -> list[float]:
    """dy/dx at every point, with ``numpy.gradient``'s rule for uneven spacing.

    Interior points use the second-order central difference, the two ends one-sided first
    differences. Uneven spacing arises when non-finite points were dropped.
    """
    n = len(x)
    out = [(y[1] - y[0]) / (x[1] - x[0])]
    for i in range(1, n - 1):
        hd, hs = x[i] - x[i - 1], x[i + 1] - x[i]
        out.append((hd * hd * y[i + 1] - hs * hs * y[i - 1] + (hs * hs - hd * hd) * y[i]) / (hs * hd * (hd + hs)))
    out.append((y[-1] - y[-2]) / (x[-1] - x[-2]))
    return out


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


def _longest_descent(y: list[float]) -> tuple[int, int]:
    """(start, length in steps) of the first longest strictly decreasing run of ``y``."""
    best_start, best_len, run_start = 0, 0, 0
    for i in range(1, len(y)):
        if y[i] < y[i - 1]:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
        else:
            run_start = i
    return best_start, best_len


def _suggest(lrs: Sequence[float], losses: Sequence[float], method: str, skip_begin: int, skip_end: int) -> float:
    if method not in SUGGESTION_METHODS:
        raise FuncoptError(f"Unknown suggestion method {method!r}; choose one of {list(SUGGESTION_METHODS)}.")
    _check_int("skip_begin", skip_begin, 0)
    _check_int("skip_end", skip_end, 0)
    keep, x, y = _window(lrs, losses, skip_begin, skip_end)
    need = _MIN_POINTS[method]
    if len(x) < need:
        raise FuncoptError(
            f"The {method!r} suggestion needs at least {need} finite loss value(s) after skipping the "
            f"first {skip_begin} and last {skip_end} of the {len(lrs)} recorded points, but found "
            f"{len(x)}. Record more points (a larger num_steps, a wider lr range, a larger "
            "diverge_threshold) or pass smaller skip_begin/skip_end."
        )
    if method == "steepest":
        index = _argmin(_slopes(x, y))
    elif method == "valley":
        start, length = _longest_descent(y)
        index = start + length // 3 + length // 6
    else:
        index = _argmin(y)
    lr = lrs[keep[index]]
    return lr / 10.0 if method == "minimum" else lr
