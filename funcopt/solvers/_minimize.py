"""A small full-batch driver: ``minimize(fun, params, tx)`` runs an optimizer to convergence.

Like ``scipy.optimize.minimize`` for pytrees of tensors, with any funcopt transformation as the
method (L-BFGS with a zoom line search by default). It counts every evaluation of the objective
(value and gradient together count as one) and stops when the gradient norm is below ``tol``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, apply_updates, stable_name
from funcopt.solvers._linesearch_common import _find_linesearch_state, value_and_grad

__all__ = ["MinimizeResult", "minimize"]


@stable_name("funcopt.MinimizeResult")
class MinimizeResult(NamedTuple):
    """What :func:`minimize` returns.

    Attributes:
        params: the final params (same structure, shapes and dtypes as the input).
        value: 0-dim tensor, the objective at ``params``.
        grad: the gradient at ``params``.
        grad_norm: float, global L2 norm of ``grad``.
        num_steps: int, number of optimizer updates made by this call.
        num_evals: int, number of objective evaluations (value and gradient count as one) made
            by this call.
        converged: bool, whether ``grad_norm <= tol``.
        message: str, why the run stopped.
        state: the optimizer state; pass it back as ``state=`` to continue the run exactly.
    """

    params: PyTree
    value: torch.Tensor
    grad: PyTree
    grad_norm: float
    num_steps: int
    num_evals: int
    converged: bool
    message: str
    state: Any


def minimize(
    fun: Callable[[PyTree], torch.Tensor],
    params: PyTree,
    tx: GradientTransformation | None = None,
    max_steps: int = 100,
    tol: float = 1e-6,
    *,
    state: Any = None,
    max_evals: int | None = None,
    callback: Callable[[int, PyTree, torch.Tensor, Any], Any] | None = None,
) -> MinimizeResult:
    """Minimizes ``fun(params)`` with the transformation ``tx``, like ``scipy.optimize.minimize``.

    Each step evaluates (or, after a line search, reuses) the value and gradient at ``params``,
    stops if ``|grad|_2 <= tol``, and otherwise applies ``tx.update(grad, state, params,
    value=value, grad=grad, value_fn=fun)``. Gradients come from ``torch.autograd`` (one forward and one backward pass per evaluation).
    The run is deterministic: continuing from a returned ``state`` (``minimize(fun,
    result.params, tx, state=result.state)``) follows bitwise the same path as an uninterrupted
    run, also after a save/load of the state.

    Args:
        fun: objective ``params -> 0-dim tensor``, differentiable by ``torch.autograd``.
        params: initial params (a pytree of floating tensors).
        tx: the optimizer; default ``funcopt.lbfgs()``. Any funcopt transformation works
            (e.g. ``funcopt.adam(1e-2)`` for a fixed-step method).
        max_steps: most optimizer updates in this call.
        tol: stop when the global L2 norm of the gradient is at most ``tol``.
        state: an optimizer state to continue from (``tx.init(params)`` if ``None``).
        max_evals: optional cap on objective evaluations in this call (checked between steps).
        callback: called as ``callback(step, params, value, state)`` after every update, with
            the new params and their value; if it returns ``True`` the run stops.

    Returns:
        A :class:`MinimizeResult`. ``converged`` is ``False`` (with a message) when the step or
        evaluation budget ran out or a line search could not decrease the objective.

    Raises:
        FuncoptError: for a non-finite objective or gradient at the starting point (or one
            reached by a fixed-step method), or invalid arguments.

    Example:
        >>> result = funcopt.minimize(loss_fn, params, max_steps=200, tol=1e-8)
        >>> result.converged, result.num_evals
    """
    from funcopt.solvers._lbfgs import lbfgs  # local import: lbfgs is the default method only

    if tx is None:
        tx = lbfgs()
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"tx must be a GradientTransformation (e.g. funcopt.lbfgs()), got {type(tx).__name__}.")
    if not callable(fun):
        raise TypeError(f"fun must be callable params -> 0-dim tensor, got {type(fun).__name__}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise FuncoptError(f"max_steps must be an int >= 0, got {max_steps!r}.")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise FuncoptError(f"tol must be a number >= 0, got {tol!r}.")
    if not _tree.leaves(params):
        raise FuncoptError("minimize needs params with at least one tensor leaf.")

    evals = 0

    def counted(p: PyTree) -> torch.Tensor:
        nonlocal evals
        evals += 1
        return fun(p)

    def evaluate(p: PyTree) -> tuple[torch.Tensor, PyTree]:
        return value_and_grad(counted, p, "minimize: fun")

    if state is None:
        state = tx.init(params)
    steps = 0
    message = f"reached max_steps={max_steps}"
    while True:
        ls = _find_linesearch_state(state)
        if ls is not None and int(ls.count) > 0 and bool(torch.isfinite(ls.value)):
            value, grad = ls.value, ls.grad
        else:
            value, grad = evaluate(params)
        if not bool(torch.isfinite(value)):
            raise FuncoptError(
                f"minimize: the objective is {float(value)} at step {steps}. Start from params "
                "where the loss is finite (or use a line search, which shrinks steps that "
                "overflow)."
            )
        grad_norm = float(_tree.norm(grad))
        if not math.isfinite(grad_norm):
            bad = [p for p, g in zip(_tree.paths(grad), _tree.leaves(grad)) if not bool(torch.isfinite(g).all())]
            raise FuncoptError(f"minimize: the gradient is not finite at leaf {bad[0]} at step {steps}.")
        if steps > 0 and callback is not None and callback(steps, params, value, state) is True:
            message = "stopped by callback"
            converged = grad_norm <= tol
            break
        if grad_norm <= tol:
            message = f"converged: gradient norm {grad_norm:.3g} <= tol {tol:g}"
            converged = True
            break
        converged = False
        if steps >= max_steps:
            break
        if max_evals is not None and evals >= max_evals:
            message = f"reached max_evals={max_evals}"
            break
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=counted)
        params = apply_updates(params, updates)
        steps += 1
        ls = _find_linesearch_state(state)
        if ls is not None and int(ls.status) == 3:
            value, grad = ls.value, ls.grad
            grad_norm = float(_tree.norm(grad))
            converged = grad_norm <= tol
            message = (
                "stopped: the line search found no decrease along the search direction (the "
                f"params are at a minimum to working precision or the gradient is wrong); "
                f"gradient norm {grad_norm:.3g}"
            )
            break
    return MinimizeResult(
        params=params,
        value=value,
        grad=grad,
        grad_norm=grad_norm,
        num_steps=steps,
        num_evals=evals,
        converged=converged,
        message=message,
        state=state,
    )
