"""The dense solver :func:`solve_dense`: materializes the matrix with ``n`` products (vmapped)
and calls ``torch.linalg.solve``; for small problems and tests."""

from __future__ import annotations

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree
from funcopt.linalg._common import (
    MatVec,
    SolveInfo,
    _check_finite_rhs,
    _check_rhs,
    _checked_matvec,
    _inspectable,
    _is_true,
    _raise_nonfinite,
)

__all__ = ["solve_dense"]


# ------------------------------------------------------------------------------ dense


def solve_dense(
    matvec: MatVec,
    b: PyTree,
    *,
    max_size: int = 10_000,
    return_info: bool = False,
) -> PyTree | tuple[PyTree, SolveInfo]:
    """Solves ``A x = b`` exactly by materializing ``A`` (``n`` products) and ``torch.linalg.solve``.

    For small problems and tests only: it costs ``n`` matrix-vector products (vectorized with
    ``torch.func.vmap`` over the unit vectors) and ``n^2`` memory, ``n`` the number of elements
    of ``b``. A singular or non-finite matrix raises :class:`~funcopt.FuncoptError`.

    Args:
        matvec: the linear map ``A`` (need not be symmetric).
        b: right-hand side pytree.
        max_size: refuse problems with more than this many unknowns.
        return_info: also return a :class:`SolveInfo`.

    Returns:
        The solution shaped like ``b`` (and the info when asked).
    """
    solver = "solve_dense"
    leaves = _check_rhs(b, solver)
    _check_finite_rhs(b, solver, leaves)
    matvec = _checked_matvec(matvec, b, solver)
    flat_b, unravel = _tree.ravel(b)
    n = flat_b.numel()
    if n > max_size:
        raise FuncoptError(
            f"{solver}: the system has {n} unknowns (> max_size={max_size}); materializing it "
            f"needs {n * n * flat_b.element_size() / 1e9:.2f} GB and {n} products. Use solve_cg, or "
            "raise max_size if you mean it."
        )
    eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)

    def column(e):
        return _tree.ravel(matvec(unravel(e)))[0]

    # vmap over unit vectors e_i gives the rows A^T e_i... of the columns A e_i, stacked as rows.
    matrix = torch.func.vmap(column)(eye).transpose(0, 1)
    bad = ~torch.isfinite(matrix).all()
    if _is_true(bad):
        _raise_nonfinite(solver, 0)
    if _inspectable(matrix):
        try:
            flat_x = torch.linalg.solve(matrix, flat_b)
        except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
            raise FuncoptError(
                f"{solver}: the {n}x{n} matrix is singular ({err}). The Hessian has a zero "
                "eigenvalue here: add damping (hvp_operator(..., damping=...)) or regularize the "
                "inner problem."
            ) from err
    else:
        flat_x = torch.linalg.solve(matrix, flat_b)
    x = unravel(flat_x)
    if not return_info:
        return x
    residual = torch.linalg.vector_norm(matrix @ flat_x - flat_b)
    info = SolveInfo(
        iterations=torch.tensor(1),
        residual_norm=residual,
        converged=torch.isfinite(residual) & ~bad,
        negative_curvature=torch.zeros((), dtype=torch.bool),
        nonfinite=bad,
        matvecs=n,
    )
    return x, info
