"""The zoom (strong Wolfe) line search as a transformation (``_linesearch_common`` says how
the objective reaches it and what the state records)."""

from __future__ import annotations

import math

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, check_state
from funcopt.solvers._linesearch_common import (
    ScaleByZoomLinesearchState,
    _check_common,
    _finish,
    _init_state,
    _phi,
    _start,
)

__all__ = ["scale_by_zoom_linesearch"]


def _cubic_min(a0: float, f0: float, d0: float, a1: float, f1: float, d1: float) -> float | None:
    """Minimizer of the cubic matching values and slopes at ``a0`` and ``a1`` (N&W eq. 3.59)."""
    if a0 == a1 or not all(math.isfinite(x) for x in (f0, d0, f1, d1)):
        return None
    t1 = d0 + d1 - 3.0 * (f0 - f1) / (a0 - a1)
    disc = t1 * t1 - d0 * d1
    if disc < 0.0:
        return None
    t2 = math.copysign(math.sqrt(disc), a1 - a0)
    denom = d1 - d0 + 2.0 * t2
    if denom == 0.0:
        return None
    a = a1 - (a1 - a0) * (d1 + t2 - t1) / denom
    return a if math.isfinite(a) else None


def scale_by_zoom_linesearch(
    max_linesearch_steps: int = 25,
    c1: float = 1e-4,
    c2: float = 0.9,
    initial_guess_strategy: str = "one",
    max_step_size: float = 1e10,
    approx_dec_rtol: float | None = None,
) -> GradientTransformation:
    """Scales the direction by a step satisfying the strong Wolfe conditions, like
    ``optax.scale_by_zoom_linesearch`` (and torch.optim.LBFGS's ``strong_wolfe``).

    Finds ``a`` with ``f(x + a d) <= f(x) + c1 a <g, d>`` (sufficient decrease) and
    ``|<g(x + a d), d>| <= c2 |<g, d>|`` (curvature), by the bracketing phase and the ``zoom``
    phase of Nocedal & Wright's Algorithms 3.5 and 3.6, with safeguarded cubic interpolation
    (trial points kept at least 10% of the bracket away from its ends). A trial point with a
    non-finite value or slope counts as "too far" and shrinks the bracket.

    Steps accepted by the exact test have ``state.status`` 0; steps accepted only through the
    approximate decrease test (``approx_dec_rtol``) have status 4.

    Fallbacks (recorded in ``state.status``, see :data:`LINESEARCH_STATUS`): a direction with
    ``<g, d> >= 0`` is replaced by ``-g``; after ``max_linesearch_steps`` evaluations without a
    strong-Wolfe point, the lowest point satisfying sufficient decrease is taken (status 2),
    or a zero step when there is none (status 3).

    Args:
        max_linesearch_steps: most trial points per update (each one value+grad evaluation).
        c1: sufficient-decrease constant, ``0 < c1 < c2 < 1``.
        c2: curvature constant (0.9 suits quasi-Newton directions, 0.1 nonlinear CG).
        initial_guess_strategy: ``"one"`` starts each search at ``a = 1`` (right for
            quasi-Newton directions); ``"keep"`` starts at the previously accepted step.
        max_step_size: upper bound on ``a`` during bracketing.
        approx_dec_rtol: relative rounding slack ``eps_f`` on loss values. A trial point also
            counts as sufficiently decreasing if ``f(x + a d) <= f(x) + eps_f |f(x)|`` and
            ``<g(x + a d), d> <= (2 c1 - 1) <g, d>`` (Hager & Zhang's approximate Wolfe
            condition), and loss differences below the slack do not order bracket ends. Near
            the optimum, where the decrease falls below the rounding error of ``f``, this lets
            the search keep following the slope instead of stalling. ``None`` means 100 times
            the machine epsilon of the params' dtype; ``0`` gives the exact strong Wolfe test.

    ``update(updates, state, params, *, value_fn | value_and_grad_fn, value=None, grad=None)``:
    ``value``/``grad`` at ``params`` are evaluated (one evaluation) when not given.

    References: Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, Sec. 3.5 (Alg. 3.5,
    3.6); Moré & Thuente, "Line search algorithms with guaranteed sufficient decrease", 1994;
    Hager & Zhang, "A new conjugate gradient method with guaranteed descent and an efficient
    line search", SIAM J. Optim., 2005 (approximate Wolfe conditions).
    """
    _check_common(max_linesearch_steps, c1, "max_linesearch_steps")
    if not (isinstance(c2, (int, float)) and c1 < c2 < 1.0):
        raise FuncoptError(f"c2 (curvature) must satisfy c1 < c2 < 1, got c1={c1!r}, c2={c2!r}.")
    if initial_guess_strategy not in ("one", "keep"):
        raise FuncoptError(
            f"initial_guess_strategy must be 'one' or 'keep', got {initial_guess_strategy!r}."
        )
    if not (isinstance(max_step_size, (int, float)) and max_step_size > 0):
        raise FuncoptError(f"max_step_size must be > 0, got {max_step_size!r}.")
    if approx_dec_rtol is not None and not (isinstance(approx_dec_rtol, (int, float)) and approx_dec_rtol >= 0):
        raise FuncoptError(f"approx_dec_rtol must be a number >= 0 or None, got {approx_dec_rtol!r}.")
    name = "scale_by_zoom_linesearch"
    cls = ScaleByZoomLinesearchState

    def init(params):
        return _init_state(cls, params)

    def update(updates, state, params=None, **extra_args):
        check_state(state, cls, name)
        evaluate, value0, grad0, d, f0, slope, evals, reset = _start(name, updates, state, params, extra_args)
        if slope == 0.0:
            return _finish(cls, state, d, 0.0, value0, grad0, evals, 0)
        ok = 1 if reset else 0
        # Smallest meaningful bracket width: below it the trial points are indistinguishable.
        dmax = max((float(x.abs().max()) for x in _tree.leaves(d) if x.numel()), default=1.0) or 1.0
        xmax = max((float(x.abs().max()) for x in _tree.leaves(params) if x.numel()), default=0.0)
        tiny = torch.finfo(state.value.dtype).eps * max(1.0, xmax) / dmax

        a = 1.0
        if initial_guess_strategy == "keep" and int(state.count) > 0:
            a = float(state.step_size) or 1.0
        a = min(a, max_step_size)
        rtol = 100 * torch.finfo(state.value.dtype).eps if approx_dec_rtol is None else approx_dec_rtol
        slack = rtol * abs(f0)

        def decreased(a: float, fa: float, da: float) -> bool:
            """Sufficient decrease, or its approximate form when f changes at rounding level."""
            if fa <= f0 + c1 * a * slope:
                return True
            return fa <= f0 + slack and da <= (2 * c1 - 1) * slope

        def worse(fa: float, f_ref: float) -> bool:
            """Higher than a bracket end; differences within rounding slack do not count."""
            return fa > f_ref + slack if slack > 0 else fa >= f_ref

        prev = (0.0, f0, slope, value0, grad0)  # (a, f, slope, value tensor, grad)
        lo = hi = None
        trials = 0
        # Bracketing phase (N&W Alg. 3.5): grow the step until a bracket is found.
        while trials < max_linesearch_steps:
            fa, da, v, g = _phi(evaluate, params, d, a)
            trials += 1
            cur = (a, fa, da, v, g)
            if not decreased(a, fa, da) or (prev[0] > 0 and worse(fa, prev[1])):
                lo, hi = prev, cur
                break
            if abs(da) <= -c2 * slope:
                return _finish(cls, state, d, a, v, g, evals + trials, ok if fa <= f0 + c1 * a * slope else 4)
            if da >= 0:
                lo, hi = cur, prev
                break
            if a >= max_step_size:
                lo = cur
                break
            guess = _cubic_min(prev[0], prev[1], prev[2], a, fa, da)
            low, high = a + 0.01 * (a - prev[0]), min(10.0 * a, max_step_size)
            prev = cur
            a = high if guess is None else min(max(guess, low), high)
        else:
            lo = prev

        # Zoom phase (N&W Alg. 3.6): shrink [lo, hi]; lo always satisfies sufficient decrease.
        while hi is not None and trials < max_linesearch_steps:
            width = abs(hi[0] - lo[0])
            if width <= tiny:
                break
            left, right = min(lo[0], hi[0]), max(lo[0], hi[0])
            guess = _cubic_min(lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])
            margin = 0.1 * width
            a = 0.5 * (left + right) if guess is None else min(max(guess, left + margin), right - margin)
            fa, da, v, g = _phi(evaluate, params, d, a)
            trials += 1
            cur = (a, fa, da, v, g)
            if not decreased(a, fa, da) or worse(fa, lo[1]):
                hi = cur
                continue
            if abs(da) <= -c2 * slope:
                return _finish(cls, state, d, a, v, g, evals + trials, ok if fa <= f0 + c1 * a * slope else 4)
            if da * (hi[0] - lo[0]) >= 0:
                hi = lo
            lo = cur

        evals += trials
        if lo is not None and lo[0] > 0 and lo[1] < f0:
            return _finish(cls, state, d, lo[0], lo[3], lo[4], evals, 2)
        return _finish(cls, state, d, 0.0, value0, grad0, evals, 3)

    return GradientTransformation(init, update)
