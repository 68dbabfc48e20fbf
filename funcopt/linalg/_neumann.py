"""Power iteration (the largest eigenvalue of a symmetric map) and the truncated Neumann
series :func:`solve_neumann`, whose default step size power iteration estimates."""

from __future__ import annotations

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

__all__ = ["power_iteration", "solve_neumann"]


# ---------------------------------------------------------------------- power iteration


def _default_start(like: PyTree) -> PyTree:
    """A fixed, dense start vector (no RNG, so it is deterministic and vmap-safe)."""
    offset = [0.0]

    def make(x):
        n = x.numel()
        idx = torch.arange(n, dtype=x.dtype if torch.is_floating_point(x) else torch.float32, device=x.device)
        out = torch.cos(idx * 0.6180339887 + offset[0]) + 1.5
        offset[0] += 1.0
        return out.reshape(x.shape).to(x.dtype)

    return _tree.map(make, like)


def power_iteration(
    matvec: MatVec, like: PyTree, *, iters: int = 20, init: PyTree | None = None
) -> tuple[torch.Tensor, PyTree]:
    """Estimates the eigenvalue of largest magnitude of a symmetric linear map by power iteration.

    Like ``scipy.sparse.linalg.eigsh(k=1)`` with a fixed iteration budget. The estimate is the
    Rayleigh quotient ``v^T A v`` of the last normalized iterate, which never exceeds the true
    largest eigenvalue of a positive semi-definite map (it approaches it from below).

    Args:
        matvec: the linear map (e.g. an :class:`HVPOperator`).
        like: a pytree shaped like the vectors ``matvec`` takes.
        iters: number of products (>= 1).
        init: start vector; defaults to a fixed deterministic dense vector.

    Returns:
        ``(eigenvalue, eigenvector)``: a 0-dim tensor and a unit-norm pytree shaped like ``like``.
    """
    _positive_int("iters", iters, "power_iteration")
    v = _default_start(like) if init is None else init
    v = _tree.scale(1.0 / _tree.norm(v), v)
    eig = None
    for _ in range(iters):
        av = matvec(v)
        eig = _tree.vdot(v, av)
        v = _tree.scale(1.0 / _tree.norm(av), av)
    return eig, v


# ---------------------------------------------------------------------------- Neumann


def solve_neumann(
    matvec: MatVec,
    b: PyTree,
    *,
    iters: int = 20,
    alpha: float | torch.Tensor | None = None,
    power_iters: int = 8,
    growth_tol: float = 1e-3,
    return_info: bool = False,
) -> PyTree | tuple[PyTree, SolveInfo]:
    """Approximates ``A^{-1} b`` by the truncated Neumann series ``alpha sum_{j<iters} (I - alpha A)^j b``.

    The approximation of Lorraine et al. for the inverse Hessian. It converges for a symmetric
    positive definite ``A`` when ``0 < alpha < 2 / lambda_max(A)``, and slowly: the error of
    mode ``i`` shrinks like ``(1 - alpha lambda_i)^iters``, so small eigenvalues are barely
    inverted (the result's norm is too small). Prefer :func:`solve_cg` for accuracy.

    With ``alpha=None`` the step is ``1 / lambda_max`` with ``lambda_max`` estimated by
    ``power_iters`` steps of :func:`power_iteration` (those products are counted in
    ``SolveInfo.matvecs``); any underestimate by less than a factor 2 still converges.

    Divergence is detected: for a convergent series the terms' norms never grow, so a term
    whose norm exceeds the previous one by more than ``growth_tol`` (relative) raises
    :class:`~funcopt.FuncoptError` (``alpha`` too large, or ``A`` indefinite).

    Args:
        matvec: the symmetric linear map ``A`` (e.g. an :class:`HVPOperator`).
        b: right-hand side pytree.
        iters: number of series terms (matrix products: ``iters - 1``); >= 1.
        alpha: step size, a positive float or tensor; ``None`` to estimate it.
        power_iters: power iterations used when ``alpha`` is ``None``.
        growth_tol: relative growth of a term's norm tolerated before declaring divergence.
        return_info: also return a :class:`SolveInfo`.

    Returns:
        The approximate solution shaped like ``b`` (and the info when asked).

    References: Lorraine, Vicol, Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020, arXiv:1911.02590 (Algorithm 3).
    """
    solver = "solve_neumann"
    leaves = _check_rhs(b, solver)
    _positive_int("iters", iters, solver)
    _positive_int("power_iters", power_iters, solver)
    _non_negative("growth_tol", growth_tol, solver)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and not alpha > 0:
        raise FuncoptError(f"{solver}: `alpha` must be > 0, got {alpha!r}; pass alpha=None to estimate it.")
    _check_finite_rhs(b, solver, leaves)
    matvec = _checked_matvec(matvec, b, solver)
    matvecs = 0
    if alpha is None:
        lam, _ = power_iteration(matvec, b, iters=power_iters)
        matvecs += power_iters
        if _is_true(~(torch.isfinite(lam) & (lam > 0))):
            raise FuncoptError(
                f"{solver}: power iteration estimated the largest eigenvalue as {float(lam):.4g}, so "
                "no safe step size exists; the matrix is not positive definite here (is the inner "
                "problem trained to a minimum?). Use solve_cg / solve_normal_cg or add damping."
            )
        alpha = 1.0 / lam
    term = b
    total = b
    prev_sq = _tree.sum_squares(b)
    grew = torch.zeros((), dtype=torch.bool, device=leaves[0].device)
    nonfinite = torch.zeros_like(grew)
    limit = (1.0 + growth_tol) ** 2
    for j in range(1, iters):
        aterm = matvec(term)
        matvecs += 1
        bad = ~_all_finite(aterm)
        if _is_true(bad):
            _raise_nonfinite(solver, j)
        nonfinite = nonfinite | bad
        term = _tree.add_scaled(term, -alpha, aterm)
        sq = _tree.sum_squares(term)
        step_grew = sq > limit * prev_sq
        if _is_true(step_grew):
            ratio = float(torch.sqrt(sq / prev_sq))
            raise FuncoptError(
                f"{solver}: the series diverges: term {j} is {ratio:.3g}x larger than term {j - 1} "
                f"(alpha={float(alpha):.4g}). It converges only for 0 < alpha < 2 / lambda_max and a "
                "positive definite matrix: pass a smaller alpha, or alpha=None to estimate "
                "1 / lambda_max by power iteration; if that fails too the matrix is indefinite "
                "(add damping or use solve_cg)."
            )
        grew = grew | step_grew
        prev_sq = sq
        total = _tree.add(total, term)
    x = _tree.scale(alpha, total)
    if not return_info:
        return x
    last = torch.sqrt(prev_sq) * alpha
    info = SolveInfo(
        iterations=torch.tensor(iters - 1),
        residual_norm=torch.as_tensor(last),
        converged=~grew & ~nonfinite,
        negative_curvature=grew,
        nonfinite=nonfinite,
        matvecs=matvecs,
    )
    return x, info
