"""Deterministic solvers: L-BFGS, line searches, and ``minimize`` (a loop to convergence).

L-BFGS keeps its history ``(s, y, rho)`` in its state like any other transformation; the line
searches take the loss through ``update(..., value=, grad=, value_fn=)`` extra arguments.
"""

from funcopt.solvers._backtracking import scale_by_backtracking_linesearch
from funcopt.solvers._lbfgs import ScaleByLbfgsState, lbfgs, scale_by_lbfgs
from funcopt.solvers._linesearch_common import (
    LINESEARCH_STATUS,
    ScaleByBacktrackingLinesearchState,
    ScaleByZoomLinesearchState,
    value_and_grad_from_state,
)
from funcopt.solvers._minimize import MinimizeResult, minimize
from funcopt.solvers._zoom import scale_by_zoom_linesearch

__all__ = [
    "ScaleByLbfgsState",
    "scale_by_lbfgs",
    "lbfgs",
    "LINESEARCH_STATUS",
    "ScaleByBacktrackingLinesearchState",
    "ScaleByZoomLinesearchState",
    "scale_by_backtracking_linesearch",
    "scale_by_zoom_linesearch",
    "value_and_grad_from_state",
    "MinimizeResult",
    "minimize",
]
