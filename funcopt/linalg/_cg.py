"""Conjugate gradients over pytrees: :func:`solve_cg` for symmetric positive definite maps and
:func:`solve_normal_cg` (CG on the normal equations) for indefinite or non-symmetric ones."""

from __future__ import annotations

import warnings

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree
from funcopt.linalg._common import (
    MatVec,
    SolveInfo,
    _all_finite,
    _check_finite_rhs,
    _check_rhs,
    _checked_matvec,
    _is_true,
    _non_negative,
    _positive_int,
    _raise_nonfinite,
)

__all__ = ["solve_cg", "solve_normal_cg"]


# --------------------------------------------------------------------------------- CG

_NEG_CURV_CHOICES = ("raise", "warn", "ignore")


def _cg_loop(matvec, b, x0, maxiter, rtol, atol, on_negative_curvature, solver):
    leaves = _check_rhs(b, solver)
    _positive_int("maxiter", maxiter, solver)
    _non_negative("rtol", rtol, solver)
    _non_negative("atol", atol, solver)
    if on_negative_curvature not in _NEG_CURV_CHOICES:
        raise FuncoptError(f"{solver}: on_negative_curvature must be one of {_NEG_CURV_CHOICES}, got {on_negative_curvature!r}.")
    _check_finite_rhs(b, solver, leaves)
    matvec = _checked_matvec(matvec, b, solver)
    matvecs = 0
    if x0 is None:
        x = _tree.zeros_like(b)
        r = b
    else:
        _tree.check_same_structure(x0, b, ("x0", "b"))
        x = x0
        r = _tree.sub(b, matvec(x0))
        matvecs += 1
    p = r
    rs = _tree.sum_squares(r)
    threshold = torch.clamp(rtol * torch.sqrt(_tree.sum_squares(b)), min=atol) ** 2
    active = rs > threshold
    negative = torch.zeros_like(active)
    nonfinite = torch.zeros_like(active)
    iterations = torch.zeros((), dtype=torch.int64, device=leaves[0].device)
    for k in range(maxiter):
        if _is_true(~active):
            break
        ap = matvec(p)
        matvecs += 1
        bad = ~_all_finite(ap)
        if _is_true(bad):
            _raise_nonfinite(solver, k)
        pap = _tree.vdot(p, ap)
        curv = active & ~bad & (pap <= 0)
        if _is_true(curv):
            msg = (
                f"{solver}: negative curvature at iteration {k}: p^T A p = {float(pap):.4g} <= 0, so "
                "the matrix is not positive definite here (an indefinite Hessian: the inner problem "
                "is not at a strict local minimum). The solve stopped at the last iterate. Fix: train "
                "the inner problem further, add damping (hvp_operator(..., damping=...)), or use "
                "solve_normal_cg, which works for indefinite matrices."
            )
            if on_negative_curvature == "raise":
                raise FuncoptError(msg)
            if on_negative_curvature == "warn":
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
        ok = active & ~bad & ~curv
        negative = negative | curv
        nonfinite = nonfinite | (active & bad)
        step = torch.where(ok, rs / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = _tree.add_scaled(x, step, p)
        r = _tree.add_scaled(r, -step, ap)
        rs_new = _tree.sum_squares(r)
        beta = torch.where(ok, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = _tree.where(ok, _tree.add_scaled(r, beta, p), p)
        rs = torch.where(ok, rs_new, rs)
        iterations = iterations + ok.to(torch.int64)
        active = ok & (rs > threshold)
    converged = (rs <= threshold) & ~nonfinite
    info = SolveInfo(iterations, torch.sqrt(rs), converged, negative, nonfinite, matvecs)
    return x, info


def solve_cg(
    matvec: MatVec,
    b: PyTree,
    *,
    maxiter: int = 100,
    rtol: float = 1e-10,
    atol: float = 0.0,
    x0: PyTree | None = None,
    on_negative_curvature: str = "warn",
    return_info: bool = False,
) -> PyTree | tuple[PyTree, SolveInfo]:
    """Solves ``A x = b`` for symmetric positive definite ``A`` by conjugate gradients over pytrees.

    Like ``jax.scipy.sparse.linalg.cg`` / ``scipy.sparse.linalg.cg``. Stops when
    ``||b - A x|| <= max(rtol ||b||, atol)`` or after ``maxiter`` products. A fixed small
    ``maxiter`` (5-20) gives the truncated CG used for hypergradients; each iteration costs one
    product, and per product CG is far more accurate than the Neumann series.

    Negative curvature (``p^T A p <= 0``, the matrix is not positive definite) stops the
    iteration at the last iterate and is reported by ``on_negative_curvature``: ``"warn"``
    (default, a ``RuntimeWarning``), ``"raise"`` (:class:`~funcopt.FuncoptError`) or
    ``"ignore"``; it is also recorded in ``SolveInfo.negative_curvature``. A non-finite product
    raises. Under ``vmap`` each batch member stops independently (masked updates).

    Args:
        matvec: the linear map ``A`` (e.g. an :class:`HVPOperator`).
        b: right-hand side pytree.
        maxiter: maximum number of iterations (products).
        rtol: relative tolerance on the residual norm.
        atol: absolute tolerance on the residual norm.
        x0: start point (default zeros; costs one extra product when given).
        on_negative_curvature: ``"warn"``, ``"raise"`` or ``"ignore"``.
        return_info: also return a :class:`SolveInfo`.

    Returns:
        The solution shaped like ``b`` (and the info when asked).

    References: Hestenes and Stiefel, "Methods of Conjugate Gradients for Solving Linear
    Systems", 1952.
    """
    x, info = _cg_loop(matvec, b, x0, maxiter, rtol, atol, on_negative_curvature, "solve_cg")
    return (x, info) if return_info else x


def solve_normal_cg(
    matvec: MatVec,
    b: PyTree,
    *,
    maxiter: int = 100,
    rtol: float = 1e-10,
    atol: float = 0.0,
    symmetric: bool = False,
    rmatvec: MatVec | None = None,
    return_info: bool = False,
) -> PyTree | tuple[PyTree, SolveInfo]:
    """Solves ``A x = b`` for any invertible ``A`` by CG on the normal equations ``A^T A x = A^T b``.

    Like ``jaxopt.linear_solve.solve_normal_cg``. ``A^T A`` is positive semi-definite whatever
    ``A`` is, so this works where :func:`solve_cg` meets negative curvature (an indefinite
    Hessian away from a minimum), at twice the products per iteration and a squared condition
    number. The transpose is ``matvec`` itself when ``symmetric=True`` (a Hessian), ``rmatvec``
    when given, and otherwise obtained by ``torch.func.vjp`` of ``matvec``.

    Args:
        matvec: the linear map ``A``.
        b: right-hand side pytree.
        maxiter: maximum number of CG iterations on the normal equations.
        rtol: relative tolerance on the normal-equations residual.
        atol: absolute tolerance on the normal-equations residual.
        symmetric: ``A`` is symmetric (then ``A^T = A``).
        rmatvec: the transpose map ``v -> A^T v``, if known.
        return_info: also return a :class:`SolveInfo` (of the normal-equations CG).

    Returns:
        The solution shaped like ``b`` (and the info when asked).
    """
    solver = "solve_normal_cg"
    _check_rhs(b, solver)
    matvec = _checked_matvec(matvec, b, solver)
    if rmatvec is None:
        if symmetric:
            rmatvec = matvec
        else:
            _, pullback = torch.func.vjp(matvec, _tree.zeros_like(b))

            def rmatvec(v):
                return pullback(v)[0]

    def normal(v):
        return rmatvec(matvec(v))

    rhs = rmatvec(b)
    if _is_true(~_all_finite(rhs)):
        _raise_nonfinite(solver, 0)
    x, info = _cg_loop(normal, rhs, None, maxiter, rtol, atol, "raise", solver)
    info = info._replace(matvecs=2 * info.matvecs + 1)
    return (x, info) if return_info else x
