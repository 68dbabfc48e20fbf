"""The backtracking (Armijo) line search as a transformation (``_linesearch_common`` says how
the objective reaches it and what the state records)."""

from __future__ import annotations

from funcopt.base import FuncoptError, GradientTransformation, check_state
from funcopt.solvers._linesearch_common import (
    ScaleByBacktrackingLinesearchState,
    _check_common,
    _finish,
    _init_state,
    _phi,
    _start,
)

__all__ = ["scale_by_backtracking_linesearch"]


def scale_by_backtracking_linesearch(
    max_backtracking_steps: int = 30,
    c1: float = 1e-4,
    decrease_factor: float = 0.5,
    initial_step_size: float = 1.0,
) -> GradientTransformation:
    """Scales the direction by a step satisfying the Armijo condition, like
    ``optax.scale_by_backtracking_linesearch``.

    Starting from ``a = initial_step_size``, multiplies ``a`` by ``decrease_factor`` until
    ``f(x + a d) <= f(x) + c1 * a * <g, d>`` (sufficient decrease), evaluating at most
    ``max_backtracking_steps`` trial points. Trial points with a non-finite value count as
    failing the condition. Returns ``a * d``.

    Fallbacks (recorded in ``state.status``, see :data:`LINESEARCH_STATUS`): a direction with
    ``<g, d> >= 0`` is replaced by ``-g``; if no trial decreases the loss, the step is zero.

    Args:
        max_backtracking_steps: most trial points per update (each one value+grad evaluation).
        c1: sufficient-decrease constant in (0, 1).
        decrease_factor: factor in (0, 1) applied to the step after a failed trial.
        initial_step_size: first trial step, > 0.

    ``update(updates, state, params, *, value_fn | value_and_grad_fn, value=None, grad=None)``:
    ``value``/``grad`` at ``params`` are evaluated (one evaluation) when not given.

    References: Armijo, "Minimization of functions having Lipschitz continuous first partial
    derivatives", 1966; Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, Alg. 3.1.
    """
    _check_common(max_backtracking_steps, c1, "max_backtracking_steps")
    if not (isinstance(decrease_factor, (int, float)) and 0.0 < decrease_factor < 1.0):
        raise FuncoptError(f"decrease_factor must lie in (0, 1), got {decrease_factor!r}.")
    if not (isinstance(initial_step_size, (int, float)) and initial_step_size > 0):
        raise FuncoptError(f"initial_step_size must be > 0, got {initial_step_size!r}.")
    name = "scale_by_backtracking_linesearch"

    def init(params):
        return _init_state(ScaleByBacktrackingLinesearchState, params)

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByBacktrackingLinesearchState, name)
        evaluate, value0, grad0, d, f0, slope, evals, reset = _start(name, updates, state, params, extra_args)
        cls = ScaleByBacktrackingLinesearchState
        if slope == 0.0:  # zero gradient: nothing to do
            return _finish(cls, state, d, 0.0, value0, grad0, evals, 0)
        a = float(initial_step_size)
        best = None
        for _ in range(max_backtracking_steps):
            fa, _, v, g = _phi(evaluate, params, d, a)
            evals += 1
            if fa <= f0 + c1 * a * slope:
                return _finish(cls, state, d, a, v, g, evals, 1 if reset else 0)
            if fa < f0 and (best is None or fa < best[0]):
                best = (fa, a, v, g)
            a *= decrease_factor
        if best is not None:
            return _finish(cls, state, d, best[1], best[2], best[3], evals, 2)
        return _finish(cls, state, d, 0.0, value0, grad0, evals, 3)

    return GradientTransformation(init, update)
