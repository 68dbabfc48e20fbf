"""Hypergradients by the implicit function theorem, and unrolled hypergradients to check them.

For inner parameters ``w*(lambda) = argmin_w L_T(w, lambda)`` and an outer objective
``L_V(w, lambda)``, the hypergradient is

    dL_V/dlambda = dL_V/dlambda|_w - (d^2 L_T / dlambda dw) H^{-1} dL_V/dw,   H = d^2 L_T / dw dw,

all evaluated at ``w*``. :func:`hypergradient` computes it with Hessian-vector products and a
matrix-free solver from :mod:`funcopt.linalg`; :func:`custom_root` wraps any inner solver so
that ``torch.func.grad``/``vjp``/``jvp``/``vmap`` differentiate its output by the same theorem;
:func:`unrolled_hypergradient` differentiates through ``K`` optimizer steps instead (the
reference the implicit results are compared with).

The inner problem must be solved well for the implicit result to be meaningful: the theorem
holds at a stationary point of ``L_T`` with an invertible Hessian.

References: Lorraine, Vicol, Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020, arXiv:1911.02590; Blondel et al., "Efficient and Modular
Implicit Differentiation", NeurIPS 2022, arXiv:2105.15183.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, apply_updates, float_leaves
from funcopt.linalg import hvp_operator, mixed_vjp, solve_cg

__all__ = ["hypergradient", "custom_root", "unrolled_hypergradient", "minimize_inner"]

Solve = Callable[..., PyTree]


def _check_solution(x: PyTree, like: PyTree, what: str) -> None:
    if _tree.structure(x) != _tree.structure(like):
        _tree.check_same_structure(x, like, (f"the result of {what}", "the right-hand side"))
    for path, a, b in zip(_tree.paths(like), _tree.leaves(x), _tree.leaves(like)):
        if a.shape != b.shape:
            raise FuncoptError(
                f"{what} returned a leaf of shape {tuple(a.shape)} at {path}, expected "
                f"{tuple(b.shape)}. A solver must return the solution shaped like `b`."
            )


def _check_tensor_tree(t: PyTree, name: str, where: str) -> None:
    float_leaves(
        t, name, where, " (hyperparameters that are Python floats cannot be differentiated: pass torch.tensor(value))"
    )


def hypergradient(
    inner_loss: Callable[[PyTree, PyTree], torch.Tensor],
    outer_loss: Callable[[PyTree, PyTree], torch.Tensor],
    params: PyTree,
    hparams: PyTree,
    *,
    solve: Solve | None = None,
    mode: str = "rev",
    damping: float = 0.0,
) -> PyTree:
    """Returns ``dL_V/dlambda`` at an inner minimizer by the implicit function theorem.

    Like ``torchopt.diff.implicit`` or ``jaxopt.implicit_diff``, as one function call: given
    ``params`` ~ ``argmin_w inner_loss(w, hparams)`` (trained by any means), it computes
    ``v = H^{-1} dL_V/dw`` with ``solve`` over Hessian-vector products of ``inner_loss``
    (linearized once in ``"rev"`` mode), then
    ``dL_V/dlambda - (d^2 L_T / dlambda dw) v`` with one mixed vector-Jacobian product.
    Cost: one gradient of ``L_V``, one linearization of ``grad L_T``, one product per solver
    iteration and one mixed product.

    Args:
        inner_loss: ``L_T(params, hparams)``, a scalar; ``params`` must be (close to) its
            minimizer for the current ``hparams``.
        outer_loss: ``L_V(params, hparams)``, a scalar (may ignore ``hparams``).
        params: the inner solution, a pytree of floating-point tensors.
        hparams: the hyperparameters, a pytree of floating-point tensors.
        solve: ``solve(matvec, b) -> x`` from :mod:`funcopt.linalg` (configure it with
            ``functools.partial``, e.g. ``partial(solve_neumann, iters=5)``); default
            :func:`~funcopt.linalg.solve_cg` with its defaults (100 iterations, rtol 1e-10).
        mode: Hessian-vector product mode, ``"rev"`` (default, measured faster) or ``"fwd"``.
        damping: solve with ``H + damping I`` (regularizes an ill-conditioned Hessian).

    Returns:
        The hypergradient, a pytree shaped like ``hparams``.

    Example:
        >>> inner = lambda w, lam: mse(w, Xt, yt) + torch.exp(lam) * (w ** 2).sum() / 2
        >>> outer = lambda w, lam: mse(w, Xv, yv)
        >>> g = hypergradient(inner, outer, w_star, lam, solve=partial(solve_cg, maxiter=20))

    References: Lorraine, Vicol, Duvenaud, "Optimizing Millions of Hyperparameters by
    Implicit Differentiation", 2020, arXiv:1911.02590 (Algorithm 2).
    """
    where = "hypergradient"
    _check_tensor_tree(params, "params", where)
    _check_tensor_tree(hparams, "hparams", where)
    solve = solve_cg if solve is None else solve
    if not callable(solve):
        raise TypeError(f"{where}: `solve` must be callable as solve(matvec, b), got {type(solve).__name__}.")
    g_params, g_hparams = torch.func.grad(outer_loss, argnums=(0, 1))(params, hparams)
    op = hvp_operator(inner_loss, params, hparams, mode=mode, damping=damping)
    v = solve(op, g_params)
    _check_solution(v, g_params, "solve")
    indirect = mixed_vjp(inner_loss, params, hparams, v)
    return _tree.sub(g_hparams, indirect)


# ------------------------------------------------------------------------- custom_root


class _Meta:
    """Non-tensor data of one custom_root call, carried through autograd.Function."""

    def __init__(self, optimality_fn, solve, symmetric, w_spec, h_spec, a_spec, a_leaves, a_tensor_idx):
        self.optimality_fn = optimality_fn
        self.solve = solve
        self.symmetric = symmetric
        self.w_spec = w_spec
        self.h_spec = h_spec
        self.a_spec = a_spec
        self.a_leaves = a_leaves
        self.a_tensor_idx = a_tensor_idx

    def unpack(self, tensors):
        nw, nh = self.w_spec.num_leaves, self.h_spec.num_leaves
        w = optree.tree_unflatten(self.w_spec, list(tensors[:nw]))
        h = optree.tree_unflatten(self.h_spec, list(tensors[nw : nw + nh]))
        a_leaves = list(self.a_leaves)
        for i, t in zip(self.a_tensor_idx, tensors[nw + nh :]):
            a_leaves[i] = t
        args, kwargs = optree.tree_unflatten(self.a_spec, a_leaves)
        return w, h, args, kwargs


def _solve_checked(solve, matvec, b, what):
    x = solve(matvec, b)
    _check_solution(x, b, what)
    return x


class _ImplicitRoot(torch.autograd.Function):
    """Identity on the root ``w*`` whose derivatives w.r.t. ``hparams`` follow the IFT."""

    generate_vmap_rule = True

    @staticmethod
    def forward(meta, *tensors):
        nw = meta.w_spec.num_leaves
        return tuple(t.clone() for t in tensors[:nw])

    @staticmethod
    def setup_context(ctx, inputs, output):
        meta, *tensors = inputs
        nw = meta.w_spec.num_leaves
        # Save the outputs (not the detached inputs): at outer differentiation levels they carry
        # the implicit dependence on hparams, which makes second derivatives correct.
        saved = (*output, *tensors[nw:])
        ctx.meta = meta
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.n_inputs = len(tensors)

    @staticmethod
    def backward(ctx, *cotangents):
        meta = ctx.meta
        w, h, args, kwargs = meta.unpack(ctx.saved_tensors)
        u = optree.tree_unflatten(meta.w_spec, list(cotangents))

        def f_w(w_):
            return meta.optimality_fn(w_, h, *args, **kwargs)

        def f_h(h_):
            return meta.optimality_fn(w, h_, *args, **kwargs)

        _, pull_w = torch.func.vjp(f_w, w)

        def matvec(v):  # J_w^T v
            return pull_w(v)[0]

        v = _solve_checked(meta.solve, matvec, u, "custom_root's solve")
        _, pull_h = torch.func.vjp(f_h, h)
        (g_h,) = pull_h(v)
        g_h = _tree.scale(-1.0, g_h)
        nw = meta.w_spec.num_leaves
        return (None, *([None] * nw), *_tree.leaves(g_h), *([None] * (ctx.n_inputs - nw - meta.h_spec.num_leaves)))

    @staticmethod
    def jvp(ctx, meta_tangent, *tangents):
        meta = ctx.meta
        w, h, args, kwargs = meta.unpack(ctx.saved_tensors)
        nw, nh = meta.w_spec.num_leaves, meta.h_spec.num_leaves
        h_tangent = [
            torch.zeros_like(x) if t is None else t for x, t in zip(_tree.leaves(h), tangents[nw : nw + nh])
        ]
        dh = optree.tree_unflatten(meta.h_spec, h_tangent)

        def f_w(w_):
            return meta.optimality_fn(w_, h, *args, **kwargs)

        _, rhs = torch.func.jvp(lambda h_: meta.optimality_fn(w, h_, *args, **kwargs), (h,), (dh,))
        if meta.symmetric:
            _, pull_w = torch.func.vjp(f_w, w)

            def matvec(v):
                return pull_w(v)[0]
        else:

            def matvec(v):
                return torch.func.jvp(f_w, (w,), (v,))[1]

        dw = _solve_checked(meta.solve, matvec, rhs, "custom_root's solve")
        return tuple(-x for x in _tree.leaves(dw))


def _detach(t: PyTree) -> PyTree:
    return _tree.map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, t)


def custom_root(
    optimality_fn: Callable[..., PyTree],
    *,
    solve: Solve | None = None,
    symmetric: bool = True,
    has_aux: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: differentiates an inner solver's output by the implicit function theorem.

    Like ``jaxopt.implicit_diff.custom_root`` (and ``torchopt.diff.implicit.custom_root``),
    but it composes with ``torch.func``: ``grad``, ``vjp``, ``jvp``/``jacfwd``, ``vmap`` and
    their nesting (second derivatives) work through the decorated solver.

    The decorated ``solver(init_params, hparams, *args, **kwargs)`` returns ``w*`` with
    ``optimality_fn(w*, hparams, *args, **kwargs) = 0`` (a pytree shaped like ``w*``; for a
    minimization, ``torch.func.grad(inner_loss)``). The solver itself is run on detached
    inputs and never differentiated (any solver works: funcopt optimizers, L-BFGS, closed
    forms). Its output is returned unchanged, with derivatives with respect to ``hparams``
    given by ``dw*/dlambda = -(dF/dw)^{-1} dF/dlambda``, computed with ``solve`` over
    products of ``dF/dw``. ``init_params`` and ``args`` are not differentiated (a derivative
    with respect to them is zero); put everything to differentiate into ``hparams``.

    Args:
        optimality_fn: ``F(params, hparams, *args, **kwargs)`` returning a pytree shaped like
            ``params`` that vanishes at the solution.
        solve: ``solve(matvec, b) -> x`` from :mod:`funcopt.linalg`; default
            :func:`~funcopt.linalg.solve_cg`, which needs ``dF/dw`` symmetric positive definite
            (true for the gradient of a loss at a strict minimum). Use ``solve_normal_cg`` for a
            general ``F``.
        symmetric: ``dF/dw`` is symmetric (``F`` is a gradient); forward mode then reuses the
            reverse-mode linearization. Set ``False`` for a general ``F``.
        has_aux: the solver returns ``(params, aux)``; ``aux`` is passed through, not
            differentiated.

    Returns:
        A decorator; the decorated function has the solver's signature.

    Example:
        >>> inner = lambda w, lam, X, y: ((X @ w - y) ** 2).mean() + lam.exp() * (w ** 2).sum()
        >>> @custom_root(torch.func.grad(inner))
        ... def ridge(w0, lam, X, y):
        ...     return run_optimizer(inner, w0, lam, X, y)   # any solver
        >>> torch.func.grad(lambda lam: val_loss(ridge(w0, lam, X, y)))(lam)

    References: Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS
    2022, arXiv:2105.15183.
    """
    if not callable(optimality_fn):
        raise TypeError(f"custom_root: `optimality_fn` must be callable, got {type(optimality_fn).__name__}.")
    solve = solve_cg if solve is None else solve
    if not callable(solve):
        raise TypeError(f"custom_root: `solve` must be callable as solve(matvec, b), got {type(solve).__name__}.")

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(solver)
        def wrapped(init_params, hparams, *args, **kwargs):
            where = f"custom_root({getattr(solver, '__name__', 'solver')})"
            _check_tensor_tree(hparams, "hparams", where)
            out = solver(_detach(init_params), _detach(hparams), *args, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise FuncoptError(f"{where}: has_aux=True, so the solver must return (params, aux).")
                params, aux = out
            else:
                params, aux = out, None
            _check_tensor_tree(params, "the solver's result", where)
            params = _detach(params)
            w_leaves, w_spec = optree.tree_flatten(params, none_is_leaf=False)
            h_leaves, h_spec = optree.tree_flatten(hparams, none_is_leaf=False)
            a_leaves, a_spec = optree.tree_flatten((args, kwargs), none_is_leaf=False)
            idx = [i for i, x in enumerate(a_leaves) if isinstance(x, torch.Tensor)]
            meta = _Meta(optimality_fn, solve, symmetric, w_spec, h_spec, a_spec, a_leaves, idx)
            outs = _ImplicitRoot.apply(meta, *w_leaves, *h_leaves, *[a_leaves[i] for i in idx])
            result = optree.tree_unflatten(w_spec, list(outs))
            return (result, aux) if has_aux else result

        return wrapped

    return decorator


# ------------------------------------------------------------------- unrolled reference


def minimize_inner(
    inner_loss: Callable[[PyTree, PyTree], torch.Tensor],
    init_params: PyTree,
    hparams: PyTree,
    optimizer: GradientTransformation,
    steps: int,
) -> PyTree:
    """Runs ``steps`` full-batch steps of a funcopt ``optimizer`` on ``inner_loss(w, hparams)``.

    The plain training loop (``torch.func.grad``, ``update``, ``apply_updates``); it is pure and
    differentiable, so ``torch.func.grad`` through it is the unrolled hypergradient, and it
    runs under ``vmap``. Use it as the solver of :func:`custom_root` or before
    :func:`hypergradient`.

    Args:
        inner_loss: ``L_T(params, hparams)``, a scalar.
        init_params: the start point, a pytree of tensors.
        hparams: held fixed during the run.
        optimizer: a funcopt ``GradientTransformation`` (e.g. ``funcopt.sgd(0.1)``).
        steps: number of steps (>= 0).

    Returns:
        The parameters after ``steps`` steps.
    """
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(
            f"minimize_inner: `optimizer` must be a GradientTransformation such as funcopt.sgd(0.1), "
            f"got {type(optimizer).__name__}."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise FuncoptError(f"minimize_inner: `steps` must be an int >= 0, got {steps!r}.")
    params = init_params
    state = optimizer.init(params)
    grad_fn = torch.func.grad(inner_loss)
    for _ in range(steps):
        grads = grad_fn(params, hparams)
        updates, state = optimizer.update(grads, state, params)
        params = apply_updates(params, updates)
    return params


def unrolled_hypergradient(
    inner_loss: Callable[[PyTree, PyTree], torch.Tensor],
    outer_loss: Callable[[PyTree, PyTree], torch.Tensor],
    init_params: PyTree,
    hparams: PyTree,
    optimizer: GradientTransformation,
    steps: int,
    *,
    return_params: bool = False,
) -> PyTree | tuple[PyTree, PyTree]:
    """Returns ``d outer_loss(w_K(hparams), hparams) / d hparams`` by differentiating through K steps.

    The reference the implicit result is compared with (Maclaurin et al. 2015; Domke 2012):
    ``w_K`` is the result of :func:`minimize_inner` from ``init_params``, and
    ``torch.func.grad`` differentiates through every step. Memory grows linearly with
    ``steps``. For a strongly convex inner problem and ``K`` large enough, it converges to the
    implicit hypergradient at ``w*``.

    Args:
        inner_loss: ``L_T(params, hparams)``.
        outer_loss: ``L_V(params, hparams)``.
        init_params: the inner start point (not differentiated).
        hparams: pytree of floating-point tensors.
        optimizer: a funcopt ``GradientTransformation`` for the inner steps.
        steps: number of unrolled steps.
        return_params: also return ``w_K`` (detached).

    Returns:
        The hypergradient shaped like ``hparams`` (and ``w_K`` when asked).

    References: Maclaurin, Duvenaud, Adams, "Gradient-based Hyperparameter Optimization
    through Reversible Learning", ICML 2015, arXiv:1502.03492.
    """
    _check_tensor_tree(hparams, "hparams", "unrolled_hypergradient")
    init_params = _detach(init_params)

    def outer_of_hparams(h):
        w = minimize_inner(inner_loss, init_params, h, optimizer, steps)
        return outer_loss(w, h), _detach(w)

    grads, w = torch.func.grad(outer_of_hparams, has_aux=True)(hparams)
    return (grads, w) if return_params else grads
