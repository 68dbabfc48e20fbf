"""Hessian-vector products and matrix-free linear solvers over pytrees.

Everything here is built from ``torch.func`` calls and pure pytree arithmetic, so it composes
with ``torch.func.grad``, ``vjp`` and ``vmap``. The Hessian is never materialized, except by
:func:`solve_dense`, which exists for small problems and tests.

Hessian-vector products come in two modes:

* ``"rev"`` (reverse-over-reverse): ``torch.func.vjp`` of ``torch.func.grad``. The gradient is
  linearized once by :func:`hvp_operator` and the pullback is reused for every product of a
  solve, so each product costs about one backward pass. This is the default: on CPU it
  measured faster than ``"fwd"`` (see ``benchmarks/bench_hypergrad.py``).
* ``"fwd"`` (forward-over-reverse): ``torch.func.jvp`` of ``torch.func.grad``; nothing is
  stored between products, each product re-runs the forward and backward pass.

Every linear solver has one signature, ``solve(matvec, b, **options) -> x`` (the solution,
shaped like ``b``), like ``jax.scipy.sparse.linalg.cg``. With ``return_info=True`` it returns
``(x, SolveInfo)``. Problems are reported, never returned silently: a non-finite product
raises :class:`~funcopt.FuncoptError`, CG reports negative curvature, a Neumann series whose
terms grow (step ``alpha`` too large, or an indefinite matrix) raises. Under ``torch.func.vmap``
or ``torch.compile`` no Python decision can be taken on tensor values; the solvers then run
their full iteration budget with masked updates and report the same conditions in ``SolveInfo``.

The code is split by concept: :mod:`funcopt.linalg_hvp` (Hessian-vector products),
:mod:`funcopt.linalg_neumann` (power iteration, Neumann series), :mod:`funcopt.linalg_cg`
(CG, normal CG), :mod:`funcopt.linalg_dense` (the dense solver) and
:mod:`funcopt.linalg_common` (``SolveInfo`` and the solvers' shared checks). Every public
name is importable from here.
"""

from __future__ import annotations

from funcopt.linalg._cg import solve_cg, solve_normal_cg
from funcopt.linalg._common import MatVec as MatVec
from funcopt.linalg._common import SolveInfo
from funcopt.linalg._dense import solve_dense
from funcopt.linalg._hvp import HVP_MODES, HVPOperator, hvp, hvp_operator, mixed_vjp
from funcopt.linalg._neumann import power_iteration, solve_neumann

__all__ = [
    "HVP_MODES",
    "SolveInfo",
    "HVPOperator",
    "hvp",
    "hvp_operator",
    "mixed_vjp",
    "power_iteration",
    "solve_neumann",
    "solve_cg",
    "solve_normal_cg",
    "solve_dense",
]
