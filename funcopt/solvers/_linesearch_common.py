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

This module holds what both searches share: the status codes, the state types, the evaluation
of the objective and :func:`value_and_grad_from_state`; the searches themselves live in
``_backtracking`` and ``_zoom``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree, require_params, stable_name
from funcopt.transforms import init_count

__all__ = [
    "LINESEARCH_STATUS",
    "ScaleByBacktrackingLinesearchState",
    "ScaleByZoomLinesearchState",
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


@stable_name("funcopt.ScaleByBacktrackingLinesearchState")
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


@stable_name("funcopt.ScaleByZoomLinesearchState")
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
    count = init_count(params)
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
