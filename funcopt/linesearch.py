"""Line searches as transformations: backtracking (Armijo) and zoom (strong Wolfe).

Like ``optax.scale_by_backtracking_linesearch`` and ``optax.scale_by_zoom_linesearch``: the
incoming ``updates`` are a search direction ``d`` (already signed, e.g. ``-H g``), and the
transformation returns ``a * d`` for a step size ``a`` chosen by evaluating the objective along
``params + a * d``. The objective reaches the line search through ``update``'s extra keyword
arguments::

    updates, state = tx.update(grads, state, params, value=loss, grad=grads, value_fn=loss_fn)

``value_fn(params) -> 0-dim tensor`` is differentiated with ``torch.autograd`` (one forward and one
backward pass, :func:`value_and_grad`); pass
``value_and_grad_fn(params) -> (value, grad)`` instead to supply gradients another way. Each
evaluation of value and gradient counts as one function evaluation.

The state records the value and gradient at the accepted point and the number of evaluations,
so the next step reuses them (:func:`value_and_grad_from_state`). Put the line search last in a
chain: the stored value and gradient are those at ``params + returned updates``.

Line searches compare loss values in Python to decide where to evaluate next, so they
synchronize with the device and cannot run under ``torch.func.vmap`` or ``torch.compile``
(the L-BFGS direction itself, :func:`funcopt.scale_by_lbfgs`, is pure tensor code).

Failures never hang: every search stops after a fixed number of evaluations, and
``state.status`` says what happened (see :data:`LINESEARCH_STATUS`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, check_state, require_params
from funcopt.transforms_common import _init_count

__all__ = [
    "LINESEARCH_STATUS",
    "ScaleByBacktrackingLinesearchState",
    "ScaleByZoomLinesearchState",
    "scale_by_backtracking_linesearch",
    "scale_by_zoom_linesearch",
    "value_and_grad",
    "value_and_grad_from_state",
]

LINESEARCH_STATUS = {
    0: "success: the step satisfies the line search's conditions",
    1: "success after replacing a non-descent direction by the negative gradient",
    2: "conditions not met within the evaluation budget; took the lowest sufficient-decrease step",
    3: "no decrease found along the direction; took a zero step (params unchanged)",
    4: "success with the approximate sufficient decrease of Hager & Zhang (zoom only): the loss "
    "changed at rounding level, the slope conditions hold",
}
"""Meaning of ``state.status`` of both line searches (0-dim int64 tensor)."""


class ScaleByBacktrackingLinesearchState(NamedTuple):
    """State of :func:`scale_by_backtracking_linesearch`.

    Attributes:
        count: 0-dim int64, number of updates so far.
        value: 0-dim float, objective at the accepted point (``inf`` before the first update).
        grad: gradient at the accepted point, shaped like the params (zeros before any update).
        step_size: 0-dim float, the last accepted step size ``a``.
        num_evals: 0-dim int64, total function evaluations made by this line search.
        status: 0-dim int64, outcome of the last search (:data:`LINESEARCH_STATUS`).
    """

    count: torch.Tensor
    value: torch.Tensor
    grad: PyTree
    step_size: torch.Tensor
    num_evals: torch.Tensor
    status: torch.Tensor


class ScaleByZoomLinesearchState(NamedTuple):
    """State of :func:`scale_by_zoom_linesearch`: the fields (and meanings) of
    :class:`ScaleByBacktrackingLinesearchState`, as a distinct type so that a state is never
    fed to the other line search."""

    count: torch.Tensor
    value: torch.Tensor
    grad: PyTree
    step_size: torch.Tensor
    num_evals: torch.Tensor
    status: torch.Tensor


_LinesearchState = (ScaleByBacktrackingLinesearchState, ScaleByZoomLinesearchState)


# ---------------------------------------------------------------------------------------------
# Shared machinery


def _value_dtype(params: PyTree) -> torch.dtype:
    dtype = None
    for leaf in _tree.leaves(params):
        if isinstance(leaf, torch.Tensor) and torch.is_floating_point(leaf):
            dtype = leaf.dtype if dtype is None else torch.promote_types(dtype, leaf.dtype)
    return dtype or torch.get_default_dtype()


def _init_state(cls: type, params: PyTree) -> Any:
    count = _init_count(params)
    dtype = _value_dtype(params)
    return cls(
        count=count,
        value=torch.full((), math.inf, dtype=dtype, device=count.device),
        grad=_tree.zeros_like(params),
        step_size=torch.ones((), dtype=dtype, device=count.device),
        num_evals=torch.zeros_like(count),
        status=torch.zeros_like(count),
    )


def _check_scalar(name: str, v: Any) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() != 0:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise FuncoptError(
            f"{name}: the objective must return a 0-dim tensor, got {shape}. Reduce the loss "
            "(e.g. .mean()) and return auxiliary outputs separately."
        )


def value_and_grad(fn: Callable[[PyTree], torch.Tensor], params: PyTree, name: str = "value_fn") -> tuple[torch.Tensor, PyTree]:
    """``(fn(params), grad)`` like ``torch.func.grad_and_value`` with the outputs swapped.

    Runs one forward and one backward pass with ``torch.autograd`` on detached copies of the
    leaves (cheaper per call than ``torch.func`` for the small full-batch objectives L-BFGS is
    used on). Leaves the loss does not depend on get zero gradients. Both outputs are detached.
    """
    leaves, spec = optree.tree_flatten(params, none_is_leaf=False)
    inputs = [x.detach().requires_grad_(True) for x in leaves]
    with torch.enable_grad():
        v = fn(optree.tree_unflatten(spec, inputs))
        _check_scalar(name, v)
        if v.requires_grad:
            grads = torch.autograd.grad(v, inputs, allow_unused=True)
        else:
            grads = [None] * len(inputs)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return v.detach(), optree.tree_unflatten(spec, grads)


def _evaluator(name: str, value_fn: Any, value_and_grad_fn: Any) -> Callable[[PyTree], tuple]:
    """Returns ``params -> (value, grad)`` from the objective passed to ``update``."""
    if value_and_grad_fn is not None:
        if not callable(value_and_grad_fn):
            raise FuncoptError(f"{name}: value_and_grad_fn must be callable params -> (value, grad).")
        fn = value_and_grad_fn
    elif value_fn is not None:
        if not callable(value_fn):
            raise FuncoptError(f"{name}: value_fn must be callable params -> 0-dim loss tensor.")

        def fn(p):
            return value_and_grad(value_fn, p, name)

    else:
        raise FuncoptError(
            f"{name} needs the objective to evaluate trial points: call "
            "`tx.update(grads, state, params, value=loss, grad=grads, value_fn=loss_fn)` where "
            "loss_fn(params) returns the 0-dim loss (or pass value_and_grad_fn=)."
        )

    def evaluate(p: PyTree) -> tuple[torch.Tensor, PyTree]:
        out = fn(p)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise FuncoptError(f"{name}: value_and_grad_fn must return a (value, grad) pair.")
        v, g = out
        _check_scalar(name, v)
        return v.detach(), _tree.map(lambda x: x.detach(), g)

    return evaluate


def _check_finite(name: str, value: torch.Tensor, grad: PyTree) -> None:
    if not bool(torch.isfinite(value)):
        raise FuncoptError(
            f"{name}: the objective at the current params is {float(value)}. A line search "
            "needs a finite starting value: check the loss (log of 0, overflow) and the params."
        )
    leaves = _tree.leaves(grad)
    if leaves and bool(torch.isfinite(sum(x.sum() for x in leaves))):
        return  # a NaN or inf entry would make the sum non-finite
    for path, g in zip(_tree.paths(grad), leaves):
        if not bool(torch.isfinite(g).all()):
            raise FuncoptError(
                f"{name}: the gradient at the current params has non-finite entries at leaf "
                f"{path}. Check the loss for NaN/inf gradients (e.g. sqrt or log at 0)."
            )


def _start(
    name: str, updates: PyTree, state: Any, params: PyTree, extra: dict
) -> tuple[Callable, torch.Tensor, PyTree, PyTree, float, float, int, bool]:
    """Common prologue: the evaluator, the start value/grad, the descent direction and slope."""
    require_params(params, name)
    evaluate = _evaluator(name, extra.get("value_fn"), extra.get("value_and_grad_fn"))
    value, grad = extra.get("value"), extra.get("grad")
    evals = 0
    if value is None or grad is None:
        value, grad = evaluate(params)
        evals = 1
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, dtype=state.value.dtype, device=state.value.device)
    value = value.detach()
    _check_finite(name, value, grad)
    direction = updates
    slope = float(_tree.vdot(grad, direction))
    reset = False
    if not slope < 0.0:
        # Not a descent direction (or a NaN direction): fall back to steepest descent.
        direction = _tree.map(lambda g: -g, grad)
        slope = -float(_tree.sum_squares(grad))
        reset = slope < 0.0
    return evaluate, value, grad, direction, float(value), slope, evals, reset


def _finish(
    cls: type,
    state: Any,
    direction: PyTree,
    step: float,
    value: torch.Tensor,
    grad: PyTree,
    evals: int,
    status: int,
) -> tuple[PyTree, Any]:
    dtype = state.value.dtype
    updates = _tree.map(lambda d: d * step, direction)
    new_state = cls(
        count=state.count + 1,
        value=value.to(dtype=dtype, device=state.value.device),
        grad=_tree.map(lambda g, ref: g.to(ref.dtype), grad, state.grad),
        step_size=torch.full_like(state.step_size, step),
        num_evals=state.num_evals + evals,
        status=torch.full_like(state.status, status),
    )
    return updates, new_state


def _phi(evaluate: Callable, params: PyTree, direction: PyTree, a: float):
    """Objective and directional derivative at ``params + a * direction`` (non-finite -> inf)."""
    v, g = evaluate(_tree.add_scaled(params, a, direction))
    fv = float(v)
    dv = float(_tree.vdot(g, direction))
    if not (math.isfinite(fv) and math.isfinite(dv)):
        fv, dv = math.inf, math.nan
    return fv, dv, v, g


def _check_common(max_steps: int, c1: float, what: str) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise FuncoptError(f"{what} must be a positive int, got {max_steps!r}.")
    if not (isinstance(c1, (int, float)) and 0.0 < c1 < 1.0):
        raise FuncoptError(f"c1 (sufficient decrease) must lie in (0, 1), got {c1!r}.")


# ---------------------------------------------------------------------------------------------
# Backtracking (Armijo)


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


# ---------------------------------------------------------------------------------------------
# Zoom (strong Wolfe)


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


# ---------------------------------------------------------------------------------------------
# Reusing the stored value and gradient


def _find_linesearch_state(state: Any) -> Any:
    if isinstance(state, _LinesearchState):
        return state
    if isinstance(state, (tuple, list)):
        for child in state:
            found = _find_linesearch_state(child)
            if found is not None:
                return found
    elif isinstance(state, dict):
        for child in state.values():
            found = _find_linesearch_state(child)
            if found is not None:
                return found
    return None


def value_and_grad_from_state(
    value_fn: Callable[[PyTree], torch.Tensor],
) -> Callable[[PyTree, Any], tuple[torch.Tensor, PyTree]]:
    """Returns ``fn(params, state) -> (value, grad)`` that reuses a line search's stored result.

    Like ``optax.value_and_grad_from_state``: after a line-search step, the state already holds
    the objective and its gradient at the new params, so evaluating them again would waste one
    function evaluation per step. ``fn`` returns the stored pair when ``state`` contains a
    line-search state that has made at least one step (and holds a finite value); otherwise it
    evaluates the value and gradient (:func:`value_and_grad`). It assumes ``params`` are the
    params the last update produced (the line search must be last in its chain).

    Example:
        >>> vg = funcopt.value_and_grad_from_state(loss_fn)
        >>> value, grad = vg(params, state)
        >>> updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
    """
    def fn(params: PyTree, state: Any) -> tuple[torch.Tensor, PyTree]:
        ls = _find_linesearch_state(state)
        if ls is not None and int(ls.count) > 0 and bool(torch.isfinite(ls.value)):
            return ls.value, ls.grad
        return value_and_grad(value_fn, params, "value_and_grad_from_state")

    return fn
