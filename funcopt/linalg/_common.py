"""What the linear solvers of :mod:`funcopt.linalg` share: the ``MatVec`` type, the
:class:`SolveInfo` diagnostics, and the private checks of right-hand sides, products and
options (including whether Python may read a tensor's value, not under ``vmap``/``compile``)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree, float_leaves, stable_name

__all__ = ["SolveInfo"]

MatVec = Callable[[PyTree], PyTree]


@stable_name("funcopt.SolveInfo")
class SolveInfo(NamedTuple):
    """Diagnostics of a linear solve (returned with ``return_info=True``).

    Attributes:
        iterations: 0-dim int tensor, the number of iterations that changed the solution.
        residual_norm: 0-dim tensor: ``||b - A x||`` as tracked by CG (of the normal equations
            for normal CG), computed exactly by the dense solver, and for Neumann the norm of the
            last series term times ``alpha`` (what the next term would add, roughly).
        converged: 0-dim bool tensor; CG reached ``rtol``/``atol``; Neumann terms never grew.
        negative_curvature: 0-dim bool tensor; CG met a direction with ``p^T A p <= 0``, or a
            Neumann term grew (``alpha`` too large, or an indefinite matrix).
        nonfinite: 0-dim bool tensor; a matrix-vector product was ``nan`` or ``inf``.
        matvecs: number of matrix-vector products used (a Python int).
    """

    iterations: torch.Tensor
    residual_norm: torch.Tensor
    converged: torch.Tensor
    negative_curvature: torch.Tensor
    nonfinite: torch.Tensor
    matvecs: int


# ----------------------------------------------------------------------------- helpers


def _inspectable(x: torch.Tensor) -> bool:
    """True when Python may read the value of ``x`` (not under vmap or torch.compile)."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            return False
        x = functorch.get_unwrapped(x)
    return True


def _is_true(flag: torch.Tensor) -> bool:
    """``bool(flag)`` where Python may read it; ``False`` under vmap or torch.compile."""
    return _inspectable(flag) and bool(flag)


def _all_finite(t: PyTree) -> torch.Tensor:
    flags = [torch.isfinite(x).all() for x in _tree.leaves(t)]
    if not flags:
        return torch.tensor(True)
    return torch.stack(flags).all()


def _check_rhs(b: PyTree, solver: str) -> list[torch.Tensor]:
    return float_leaves(b, "b", solver)


def _checked_matvec(matvec: MatVec, b: PyTree, solver: str) -> MatVec:
    """Wraps ``matvec`` to check that its output has the structure and shapes of ``b``."""
    spec = _tree.structure(b)
    shapes = [x.shape for x in _tree.leaves(b)]

    def wrapped(v):
        out = matvec(v)
        out_leaves, out_spec = optree.tree_flatten(out, none_is_leaf=False)
        if out_spec != spec:
            _tree.check_same_structure(out, b, (f"{solver}: matvec(v)", "b"))
        if [o.shape for o in out_leaves] != shapes:
            for path, o, s in zip(_tree.paths(b), out_leaves, shapes):
                if o.shape != s:
                    raise FuncoptError(
                        f"{solver}: matvec returned a leaf of shape {tuple(o.shape)} at {path}, but "
                        f"`b` has shape {tuple(s)} there. matvec must map a pytree shaped like `b` to "
                        "one of the same shapes."
                    )
        return out

    return wrapped


def _check_finite_rhs(b: PyTree, solver: str, leaves: list[torch.Tensor]) -> None:
    for path, x in zip(_tree.paths(b), leaves):
        if _is_true(~torch.isfinite(x).all()):
            raise FuncoptError(
                f"{solver}: the right-hand side is not finite (nan or inf) at leaf {path}. It is "
                "usually the gradient of the outer loss: check that loss at these parameters."
            )


def _raise_nonfinite(solver: str, iteration: int) -> None:
    raise FuncoptError(
        f"{solver}: the matrix-vector product at iteration {iteration} is not finite (nan or "
        "inf). The Hessian at these parameters is not finite: check the inner loss for "
        "overflow (log of 0, exp of large values), train the inner problem to a finite point, "
        "or use float64."
    )


def _positive_int(name: str, value: Any, solver: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FuncoptError(f"{solver}: `{name}` must be a positive int, got {value!r}.")


def _non_negative(name: str, value: Any, solver: str) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
        raise FuncoptError(f"{solver}: `{name}` must be >= 0, got {value!r}.")
