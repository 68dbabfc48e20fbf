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
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree

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

HVP_MODES = ("rev", "fwd")
"""The Hessian-vector product modes: reverse-over-reverse (default) and forward-over-reverse."""

MatVec = Callable[[PyTree], PyTree]


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
    leaves = _tree.leaves(b)
    if not leaves:
        raise FuncoptError(f"{solver}: the right-hand side `b` has no tensor leaves.")
    for path, x in zip(_tree.paths(b), leaves):
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(
                f"{solver}: leaf {path} of `b` is {type(x).__name__}"
                + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else "")
                + "; every leaf must be a floating-point tensor."
            )
    return leaves


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


# ------------------------------------------------------------------ Hessian-vector products


def _check_mode(mode: str) -> None:
    if mode not in HVP_MODES:
        raise FuncoptError(
            f"unknown HVP mode {mode!r}; use 'rev' (vjp of grad, linearized once and reused) "
            "or 'fwd' (jvp of grad)."
        )


class HVPOperator:
    """The linear map ``v -> H v + damping * v`` with ``H`` the Hessian of ``f`` at ``params``.

    Built by :func:`hvp_operator`; call it like a function (``op(v)``). In ``"rev"`` mode the
    gradient is linearized once at construction and every call reuses the pullback (one
    backward pass per product); in ``"fwd"`` mode each call runs ``jvp`` of ``grad``.

    Attributes:
        mode: ``"rev"`` or ``"fwd"``.
        params: the point the Hessian is taken at.
        damping: the multiple of the identity added to ``H``.
        num_matvecs: how many products have been computed (a Python counter).
        grad: the gradient of ``f`` at ``params`` (computed by ``"rev"`` mode for free,
            ``None`` in ``"fwd"`` mode).
    """

    def __init__(
        self, f: Callable[..., torch.Tensor], params: PyTree, args: tuple, mode: str, damping: float
    ):
        _check_mode(mode)
        _non_negative("damping", damping, "hvp_operator")
        self.mode = mode
        self.params = params
        self.damping = damping
        self.num_matvecs = 0
        self._spec = _tree.structure(params)

        def grad_at(p):
            return torch.func.grad(f)(p, *args)

        self._grad_fn = grad_at
        if mode == "rev":
            self.grad, self._pullback = torch.func.vjp(grad_at, params)
        else:
            self.grad, self._pullback = None, None

    def __call__(self, v: PyTree) -> PyTree:
        if _tree.structure(v) != self._spec:
            _tree.check_same_structure(v, self.params, ("v", "params"))
        self.num_matvecs += 1
        if self.mode == "rev":
            (out,) = self._pullback(v)
        else:
            _, out = torch.func.jvp(self._grad_fn, (self.params,), (v,))
        if not (isinstance(self.damping, (int, float)) and self.damping == 0):
            out = _tree.add_scaled(out, self.damping, v)
        return out

    def __repr__(self) -> str:
        return f"HVPOperator(mode={self.mode!r}, damping={self.damping!r}, num_matvecs={self.num_matvecs})"


def hvp_operator(
    f: Callable[..., torch.Tensor], params: PyTree, *args: Any, mode: str = "rev", damping: float = 0.0
) -> HVPOperator:
    """Returns the Hessian of ``f`` at ``params`` as a reusable matrix-free operator.

    Like :func:`hvp`, but linearizes once: ``op = hvp_operator(f, params, X, y)`` then
    ``op(v1)``, ``op(v2)``, ... each cost about one backward pass in ``"rev"`` mode. Pass the
    operator as ``matvec`` to any solver of this module.

    Args:
        f: scalar function ``f(params, *args)``; differentiated with respect to ``params``.
        params: pytree of floating-point tensors, the point the Hessian is taken at.
        *args: further arguments of ``f``, held fixed (data, hyperparameters).
        mode: ``"rev"`` (default; vjp of grad, linearized once) or ``"fwd"`` (jvp of grad).
        damping: adds ``damping * v`` to every product (solves ``(H + damping I) x = b``);
            makes an almost singular or slightly indefinite Hessian invertible.

    Returns:
        An :class:`HVPOperator`; ``op(v)`` has the structure and shapes of ``params``.
    """
    return HVPOperator(f, params, args, mode, damping)


def hvp(f: Callable[..., torch.Tensor], params: PyTree, v: PyTree, *args: Any, mode: str = "rev") -> PyTree:
    """Returns the Hessian-vector product ``H v`` of a scalar ``f(params, *args)`` at ``params``.

    Like ``torch.autograd.functional.hvp``, but over pytrees and built from ``torch.func``
    (composes with ``grad``/``vmap``). For several products at the same point use
    :func:`hvp_operator`, which linearizes once.

    Args:
        f: scalar function ``f(params, *args)``.
        params: pytree of tensors.
        v: pytree shaped like ``params``.
        *args: further arguments of ``f``, held fixed.
        mode: ``"rev"`` (vjp of grad) or ``"fwd"`` (jvp of grad); the results agree to rounding.

    Returns:
        A pytree shaped like ``params``.
    """
    return hvp_operator(f, params, *args, mode=mode)(v)


def mixed_vjp(f: Callable[..., torch.Tensor], params: PyTree, hparams: PyTree, v: PyTree) -> PyTree:
    """Returns ``(d^2 f / d hparams d params) v``: the mixed second derivative applied to ``v``.

    Computes ``grad_hparams <grad_params f(params, hparams), v>`` with one ``torch.func.vjp``
    of the parameter gradient taken as a function of ``hparams``. In the implicit hypergradient
    this is the product ``(d^2 L_T / d lambda d w) H^{-1} dL_V/dw``.

    Args:
        f: scalar function ``f(params, hparams)``.
        params: pytree of tensors (the point, held fixed).
        hparams: pytree of tensors, the variables of the outer derivative.
        v: pytree shaped like ``params``.

    Returns:
        A pytree shaped like ``hparams``.
    """
    if _tree.structure(v) != _tree.structure(params):
        _tree.check_same_structure(v, params, ("v", "params"))

    def grad_params(h):
        return torch.func.grad(f, argnums=0)(params, h)

    _, pullback = torch.func.vjp(grad_params, hparams)
    (out,) = pullback(v)
    return out


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
