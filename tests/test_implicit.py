"""Tests for funcopt.implicit: exact hypergradients, custom_root under torch.func, unrolled reference."""

from __future__ import annotations

import functools

import pytest
import torch

import funcopt
from funcopt import FuncoptError, tree
from funcopt import linalg as L
from funcopt.implicit import custom_root, hypergradient, minimize_inner, unrolled_hypergradient
from helpers import assert_trees_close

D = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: one thread avoids OpenMP spin-waiting on a shared CPU (10-70x)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rel(a, b):
    fa, fb = tree.ravel(a)[0], tree.ravel(b)[0]
    return float(torch.linalg.vector_norm(fa - fb) / torch.linalg.vector_norm(fb))


# ----------------------------------------------------------------------------- ridge


def _ridge(seed=0, n=40, d=6):
    """Ridge regression with one log-penalty per feature; everything has a closed form."""
    g = torch.Generator().manual_seed(seed)
    Xt, yt = torch.randn(n, d, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    Xv, yv = torch.randn(n, d, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)

    def inner(w, lam):
        return ((Xt @ w["w"] - yt) ** 2).mean() / 2 + 0.5 * torch.sum(torch.exp(lam["log_decay"]) * w["w"] ** 2)

    def outer(w, lam):
        return ((Xv @ w["w"] - yv) ** 2).mean() / 2

    def closed(lam):
        A = Xt.T @ Xt / n + torch.diag(torch.exp(lam["log_decay"]))
        return {"w": torch.linalg.solve(A, Xt.T @ yt / n)}

    lam = {"log_decay": torch.randn(d, generator=g, dtype=D) * 0.5 - 1.0}
    exact = torch.func.grad(lambda h: outer(closed(h), h))(lam)
    return inner, outer, closed, lam, exact


EXACT_SOLVERS = {
    "cg": L.solve_cg,
    "dense": L.solve_dense,
    "normal_cg": functools.partial(L.solve_normal_cg, symmetric=True),
}


@pytest.mark.parametrize("mode", L.HVP_MODES)
@pytest.mark.parametrize("name", list(EXACT_SOLVERS))
def test_ridge_hypergradient_matches_closed_form(name, mode):
    inner, outer, closed, lam, exact = _ridge()
    hg = hypergradient(inner, outer, closed(lam), lam, solve=EXACT_SOLVERS[name], mode=mode)
    assert _rel(hg, exact) < 1e-6


def test_ridge_neumann_converges_with_terms():
    inner, outer, closed, lam, exact = _ridge()
    errors = [
        _rel(hypergradient(inner, outer, closed(lam), lam, solve=functools.partial(L.solve_neumann, iters=k)), exact)
        for k in (2, 10, 50, 400)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


def test_outer_loss_depending_on_hparams_adds_direct_term():
    inner, outer, closed, lam, _ = _ridge()

    def outer2(w, h):
        return outer(w, h) + 0.1 * torch.sum(h["log_decay"] ** 2)

    exact = torch.func.grad(lambda h: outer2(closed(h), h))(lam)
    assert _rel(hypergradient(inner, outer2, closed(lam), lam), exact) < 1e-8


def test_hypergradient_under_vmap_over_hparams():
    inner, outer, closed, lam, _ = _ridge()
    lams = {"log_decay": torch.stack([lam["log_decay"] + s for s in (-0.5, 0.0, 0.7)])}
    ws = torch.func.vmap(closed)(lams)
    solve = functools.partial(L.solve_cg, maxiter=10)  # under vmap CG runs all maxiter iterations
    batched = torch.func.vmap(lambda w, h: hypergradient(inner, outer, w, h, solve=solve))(ws, lams)
    expected = torch.func.vmap(torch.func.grad(lambda h: outer(closed(h), h)))(lams)
    assert_trees_close(batched, expected, rtol=1e-7, atol=1e-12)


# ------------------------------------------------------------------------ small MLP


@functools.cache
def _mlp(act=torch.tanh, seed=0, hidden=6):
    """Bias-free 3-h-2 MLP with per-weight log weight decay; inner solved by Newton to 1e-12."""
    g = torch.Generator().manual_seed(seed)
    Xt, Xv = torch.randn(30, 3, generator=g, dtype=D), torch.randn(30, 3, generator=g, dtype=D)
    yt, yv = torch.randint(0, 2, (30,), generator=g), torch.randint(0, 2, (30,), generator=g)
    w0 = {"w1": torch.randn(3, hidden, generator=g, dtype=D) * 0.5, "w2": torch.randn(hidden, 2, generator=g, dtype=D) * 0.5}
    lam = tree.map(lambda w: torch.full_like(w, -3.0) + 0.3 * torch.randn(w.shape, generator=g, dtype=D), w0)

    def net(w, X):
        return act(X @ w["w1"]) @ w["w2"]

    def inner(w, h):
        ce = torch.nn.functional.cross_entropy(net(w, Xt), yt)
        return ce + 0.5 * tree.vdot(tree.map(torch.exp, h), tree.map(torch.square, w))

    def outer(w, h):
        return torch.nn.functional.cross_entropy(net(w, Xv), yv)

    w = minimize_inner(inner, w0, lam, funcopt.adam(0.05), 150)
    flat, unravel = tree.ravel(w)
    f = lambda v: inner(unravel(v), lam)
    for _ in range(30):  # Newton polish
        g_ = torch.func.grad(f)(flat)
        if g_.norm() < 1e-13:
            break
        flat = flat - torch.linalg.solve(torch.func.hessian(f)(flat), g_)
    w = unravel(flat)
    assert float(tree.norm(torch.func.grad(inner)(w, lam))) < 1e-10
    # independent exact hypergradient: dense Hessian and mixed Jacobian, no funcopt.linalg
    H = torch.func.hessian(f)(flat)
    lam_flat, lam_unravel = tree.ravel(lam)
    mixed = torch.func.jacrev(lambda lv: tree.ravel(torch.func.grad(inner)(w, lam_unravel(lv)))[0])(lam_flat)
    gw = tree.ravel(torch.func.grad(outer)(w, lam))[0]
    exact = lam_unravel(-mixed.T @ torch.linalg.solve(H, gw))
    return inner, outer, w, lam, exact


@pytest.mark.parametrize("act", [torch.tanh, torch.nn.functional.gelu], ids=["tanh", "gelu"])
@pytest.mark.parametrize("mode", L.HVP_MODES)
def test_mlp_hypergradient_cg_and_dense_match_exact(act, mode):
    inner, outer, w, lam, exact = _mlp(act)
    for solve in (L.solve_dense, functools.partial(L.solve_cg, maxiter=500, on_negative_curvature="raise")):
        assert _rel(hypergradient(inner, outer, w, lam, solve=solve, mode=mode), exact) < 1e-6


def test_mlp_cg_beats_neumann_per_product():
    inner, outer, w, lam, exact = _mlp()
    cg = _rel(hypergradient(inner, outer, w, lam, solve=functools.partial(L.solve_cg, maxiter=10)), exact)
    neu = _rel(hypergradient(inner, outer, w, lam, solve=functools.partial(L.solve_neumann, iters=11)), exact)
    assert cg < neu


# --------------------------------------------------------------------- unrolled reference


def _logreg(seed=0):
    """L2-regularized logistic regression: strongly convex, not quadratic."""
    g = torch.Generator().manual_seed(seed)
    Xt, Xv = torch.randn(50, 4, generator=g, dtype=D), torch.randn(50, 4, generator=g, dtype=D)
    yt, yv = (torch.rand(50, generator=g) < 0.5).to(D), (torch.rand(50, generator=g) < 0.5).to(D)
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def inner(w, lam):
        return bce(Xt @ w["w"], yt) + 0.5 * torch.exp(lam) * torch.sum(w["w"] ** 2)

    def outer(w, lam):
        return bce(Xv @ w["w"], yv)

    return inner, outer, {"w": torch.zeros(4, dtype=D)}, torch.tensor(-1.0, dtype=D)


def test_unrolled_matches_implicit_on_strongly_convex_problem():
    inner, outer, w0, lam = _logreg()
    unrolled, w_k = unrolled_hypergradient(inner, outer, w0, lam, funcopt.sgd(1.0, momentum=0.5), 300, return_params=True)
    assert float(tree.norm(torch.func.grad(inner)(w_k, lam))) < 1e-10
    implicit = hypergradient(inner, outer, w_k, lam)
    torch.testing.assert_close(unrolled, implicit, rtol=1e-6, atol=1e-12)
    short = unrolled_hypergradient(inner, outer, w0, lam, funcopt.sgd(1.0, momentum=0.5), 5)
    assert abs(float(short - implicit)) > 1e-3 * abs(float(implicit))  # too few steps differ


# ------------------------------------------------------------------------- custom_root


def _ridge_root(solver_kind="closed", steps=400):
    inner, outer, closed, lam, exact = _ridge()
    d = lam["log_decay"].numel()

    # d = 6 unknowns: CG is exact after 6 iterations; a small maxiter keeps vmap (no early exit) fast
    @custom_root(torch.func.grad(inner), solve=functools.partial(L.solve_cg, maxiter=10))
    def solver(w0, h):
        if solver_kind == "closed":
            return closed(h)
        return minimize_inner(inner, w0, h, funcopt.sgd(0.3, momentum=0.9), steps)

    def val(h):
        return outer(solver({"w": torch.zeros(d, dtype=D)}, h), h)

    return val, closed, outer, lam, exact


def test_custom_root_grad_and_autograd_backward():
    val, closed, outer, lam, exact = _ridge_root()
    assert _rel(torch.func.grad(val)(lam), exact) < 1e-10
    leaf = lam["log_decay"].clone().requires_grad_(True)
    val({"log_decay": leaf}).backward()
    assert _rel({"log_decay": leaf.grad}, exact) < 1e-10


def test_custom_root_forward_value_is_solver_output():
    inner, outer, closed, lam, _ = _ridge()
    calls = []

    @custom_root(torch.func.grad(inner))
    def solver(w0, h):
        calls.append(1)
        return {"w": closed(h)["w"] + 1e-3}  # deliberately not exact: returned unchanged

    out = solver({"w": torch.zeros(6, dtype=D)}, lam)
    torch.testing.assert_close(out["w"], closed(lam)["w"] + 1e-3, rtol=0, atol=0)
    assert calls == [1]


def test_custom_root_with_funcopt_optimizer_as_inner_solver():
    val, closed, outer, lam, exact = _ridge_root("sgd")
    assert _rel(torch.func.grad(val)(lam), exact) < 1e-6


def test_custom_root_vmap_over_batch_of_hparams():
    for kind, tol in (("closed", 1e-8), ("sgd", 2e-3)):
        val, closed, outer, lam, _ = _ridge_root(kind, steps=200)
        lams = {"log_decay": torch.stack([lam["log_decay"] + s for s in (-0.5, 0.0, 0.4, 1.0)])}
        batched = torch.func.vmap(torch.func.grad(val))(lams)
        expected = torch.func.vmap(torch.func.grad(lambda h: outer(closed(h), h)))(lams)
        assert _rel(batched, expected) < tol, kind


def test_custom_root_second_order_matches_closed_form():
    val, closed, outer, lam, _ = _ridge_root()
    x = lam["log_decay"]

    def as_tensor_fn(f):
        return lambda v: f({"log_decay": v})

    expected = torch.func.hessian(as_tensor_fn(lambda h: outer(closed(h), h)))(x)
    for name, second in {
        "jacrev(grad)": torch.func.jacrev(torch.func.grad(as_tensor_fn(val))),
        "jacfwd(grad)": torch.func.jacfwd(torch.func.grad(as_tensor_fn(val))),
        "hessian": torch.func.hessian(as_tensor_fn(val)),
    }.items():
        got = second(x)
        assert float((got - expected).norm() / expected.norm()) < 1e-8, name


def test_custom_root_jvp_matches_closed_form():
    inner, outer, closed, lam, _ = _ridge()

    @custom_root(torch.func.grad(inner), solve=L.solve_dense)
    def solver(w0, h):
        return closed(h)

    tangent = {"log_decay": torch.linspace(-1, 1, 6, dtype=D)}
    w0 = {"w": torch.zeros(6, dtype=D)}
    _, got = torch.func.jvp(lambda h: solver(w0, h), (lam,), (tangent,))
    _, expected = torch.func.jvp(closed, (lam,), (tangent,))
    assert _rel(got, expected) < 1e-10


def test_custom_root_nonsymmetric_optimality_with_normal_cg():
    # F(x, a) = M x - a with a non-symmetric M: root x = M^{-1} a, dx/da = M^{-1}
    M = torch.tensor([[2.0, 1.0], [-0.5, 1.5]], dtype=D)

    @custom_root(lambda x, a: {"x": M @ x["x"] - a}, solve=L.solve_normal_cg, symmetric=False)
    def solver(x0, a):
        return {"x": torch.linalg.solve(M, a)}

    a = torch.tensor([1.0, -2.0], dtype=D)
    c = torch.tensor([0.3, 0.7], dtype=D)
    got = torch.func.grad(lambda a_: solver(None, a_)["x"] @ c)(a)
    torch.testing.assert_close(got, torch.linalg.solve(M.T, c))
    J = torch.func.jacfwd(lambda a_: solver(None, a_)["x"])(a)
    torch.testing.assert_close(J, torch.linalg.inv(M))


def test_custom_root_has_aux_and_extra_args():
    inner_xy = lambda w, lam, X, y: ((X @ w - y) ** 2).mean() + torch.exp(lam) * (w ** 2).sum()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)

    def closed(lam, X, y):
        return torch.linalg.solve(X.T @ X / 20 + torch.exp(lam) * torch.eye(3, dtype=D), X.T @ y / 20)

    @custom_root(torch.func.grad(inner_xy), has_aux=True)
    def solver(w0, lam, X, y):
        return closed(lam, X, y), {"note": "closed form"}

    lam = torch.tensor(-0.7, dtype=D)
    (w, aux) = solver(None, lam, X, y)
    assert aux == {"note": "closed form"}
    got = torch.func.grad(lambda l_: solver(None, l_, X, y)[0].sum())(lam)
    expected = torch.func.grad(lambda l_: closed(l_, X, y).sum())(lam)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_clear_errors():
    inner, outer, closed, lam, _ = _ridge()
    w = closed(lam)
    with pytest.raises(TypeError, match=r"\['log_decay'\].*torch.tensor\(value\)"):
        hypergradient(inner, outer, w, {"log_decay": 0.5})
    with pytest.raises(FuncoptError, match="`hparams` has no tensor leaves"):
        hypergradient(inner, outer, w, {})
    with pytest.raises(TypeError, match="solve"):
        hypergradient(inner, outer, w, lam, solve="cg")
    with pytest.raises(FuncoptError, match=r"shape \(2,\) at \['w'\]"):
        hypergradient(inner, outer, w, lam, solve=lambda mv, b: {"w": b["w"][:2]})
    with pytest.raises(TypeError, match="optimality_fn"):
        custom_root(None)
    with pytest.raises(TypeError, match="solve"):
        custom_root(torch.func.grad(inner), solve=3)

    @custom_root(torch.func.grad(inner), has_aux=True)
    def no_aux(w0, h):
        return closed(h)

    with pytest.raises(FuncoptError, match=r"has_aux=True.*\(params, aux\)"):
        no_aux(w, lam)
    with pytest.raises(TypeError, match="GradientTransformation"):
        minimize_inner(inner, w, lam, torch.optim.SGD, 3)
    with pytest.raises(FuncoptError, match="steps"):
        minimize_inner(inner, w, lam, funcopt.sgd(0.1), -1)


def test_indefinite_inner_hessian_is_reported():
    # a saddle point of the inner loss: w = 0 for L_T = -w^2 + lam * w^4 is stationary
    inner = lambda w, lam: torch.sum(-w["w"] ** 2 + lam * w["w"] ** 4)
    outer = lambda w, lam: torch.sum((w["w"] - 1.0) ** 2)
    w = {"w": torch.zeros(3, dtype=D)}
    lam = torch.tensor(1.0, dtype=D)
    with pytest.raises(FuncoptError, match="negative curvature"):
        hypergradient(inner, outer, w, lam, solve=functools.partial(L.solve_cg, on_negative_curvature="raise"))
    with pytest.raises(FuncoptError, match="not positive definite"):
        hypergradient(inner, outer, w, lam, solve=L.solve_neumann)
