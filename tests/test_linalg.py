"""Tests for funcopt.linalg: Hessian-vector products and the linear solvers over pytrees."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from funcopt import FuncoptError, tree
from funcopt import linalg as L
from helpers import assert_trees_close

D = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: one thread avoids OpenMP spin-waiting on a shared CPU (10-70x)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _problem(seed=0):
    """A smooth non-quadratic scalar function of a nested pytree, and its data."""
    g = torch.Generator().manual_seed(seed)
    params = {"layer": {"w": torch.randn(4, 3, generator=g, dtype=D), "b": torch.randn(3, generator=g, dtype=D)},
              "scale": [torch.randn((), generator=g, dtype=D)]}
    X = torch.randn(12, 4, generator=g, dtype=D)

    def f(p, X):
        h = torch.tanh(X @ p["layer"]["w"] + p["layer"]["b"])
        return (h.sum(1) * p["scale"][0]).pow(2).mean() + 0.5 * tree.sum_squares(p)

    return f, params, X


def _dense_hessian(f, params, *args):
    flat, unravel = tree.ravel(params)
    return torch.func.hessian(lambda v: f(unravel(v), *args))(flat), flat, unravel


def _spd_operator(n=7, seed=0, cond=50.0):
    """A random SPD matrix with eigenvalues in [1, cond], as a matvec over a pytree {'a', 'b'}."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    A = q @ torch.diag(eig) @ q.T
    like = {"a": torch.zeros(3, dtype=D), "b": torch.zeros(2, n - 3, dtype=D)[0:1].reshape(n - 3)}
    _, unravel = tree.ravel(like)

    def matvec(v):
        return unravel(A @ tree.ravel(v)[0])

    b = unravel(torch.randn(n, generator=g, dtype=D))
    return A, matvec, b, unravel


@pytest.mark.parametrize("mode", L.HVP_MODES)
def test_hvp_matches_dense_hessian(mode):
    f, params, X = _problem()
    H, _, unravel = _dense_hessian(f, params, X)
    v = unravel(torch.randn(H.shape[0], dtype=D))
    expected = unravel(H @ tree.ravel(v)[0])
    assert_trees_close(L.hvp(f, params, v, X, mode=mode), expected, rtol=1e-12, atol=1e-12)


def test_hvp_operator_reuses_linearization_and_counts():
    f, params, X = _problem()
    H, _, unravel = _dense_hessian(f, params, X)
    op = L.hvp_operator(f, params, X, damping=0.5)
    assert op.num_matvecs == 0 and op.mode == "rev"
    assert_trees_close(op.grad, torch.func.grad(f)(params, X), rtol=1e-12)
    for seed in range(3):
        v = unravel(torch.randn(H.shape[0], generator=torch.Generator().manual_seed(seed), dtype=D))
        expected = unravel((H + 0.5 * torch.eye(H.shape[0], dtype=D)) @ tree.ravel(v)[0])
        assert_trees_close(op(v), expected, rtol=1e-12, atol=1e-12)
    assert op.num_matvecs == 3
    assert "num_matvecs=3" in repr(op)


def test_hvp_under_vmap_over_vectors():
    f, params, X = _problem()
    H, _, unravel = _dense_hessian(f, params, X)
    V = torch.randn(5, H.shape[0], dtype=D)
    op = L.hvp_operator(f, params, X)
    out = torch.func.vmap(lambda v: tree.ravel(op(unravel(v)))[0])(V)
    torch.testing.assert_close(out, V @ H.T, rtol=1e-12, atol=1e-12)


def test_mixed_vjp_matches_jacobian():
    g = torch.Generator().manual_seed(1)
    w = {"w": torch.randn(5, generator=g, dtype=D)}
    lam = {"l": torch.randn(5, generator=g, dtype=D), "s": torch.tensor(0.3, dtype=D)}

    def f(w, h):
        return torch.sum(torch.exp(h["l"]) * w["w"] ** 2) * h["s"] + torch.sin(w["w"]).sum() * h["s"] ** 2

    v = {"w": torch.randn(5, generator=g, dtype=D)}
    out = L.mixed_vjp(f, w, lam, v)
    # reference: d/dh of <grad_w f, v> by autograd on plain tensors
    J = torch.func.jacrev(lambda h: torch.func.grad(f)(w, h)["w"])(lam)
    expected = tree.map(lambda j: torch.tensordot(v["w"], j, dims=1), J)
    assert_trees_close(out, expected, rtol=1e-12, atol=1e-14)


def test_power_iteration_largest_eigenvalue():
    A, matvec, b, unravel = _spd_operator(n=9, cond=80.0)
    lam, vec = L.power_iteration(matvec, b, iters=200)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(A)[-1], rtol=1e-6, atol=0)
    torch.testing.assert_close(tree.norm(vec), torch.tensor(1.0, dtype=D))


SOLVERS = {
    "cg": L.solve_cg,
    "normal_cg_sym": functools.partial(L.solve_normal_cg, symmetric=True),
    "normal_cg_vjp": L.solve_normal_cg,
    "dense": L.solve_dense,
    "neumann": functools.partial(L.solve_neumann, iters=2000),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solvers_match_linalg_solve(name):
    A, matvec, b, unravel = _spd_operator(cond=20.0)
    expected = unravel(torch.linalg.solve(A, tree.ravel(b)[0]))
    x, info = SOLVERS[name](matvec, b, return_info=True)
    assert_trees_close(x, expected, rtol=1e-8, atol=1e-10)
    assert bool(info.converged) and not bool(info.nonfinite) and not bool(info.negative_curvature)
    assert info.matvecs >= 1


def test_cg_is_exact_in_n_steps_and_reports():
    A, matvec, b, unravel = _spd_operator(n=7, cond=1e3)
    x, info = L.solve_cg(matvec, b, maxiter=50, return_info=True)
    assert int(info.iterations) <= 7 + 2
    assert float(info.residual_norm) <= 1e-10 * float(tree.norm(b)) * 10
    truncated, tinfo = L.solve_cg(matvec, b, maxiter=2, return_info=True)
    assert not bool(tinfo.converged) and tinfo.matvecs == 2


def test_cg_with_x0_converges_from_there():
    A, matvec, b, unravel = _spd_operator()
    exact = L.solve_dense(matvec, b)
    x, info = L.solve_cg(matvec, b, x0=exact, return_info=True)
    assert int(info.iterations) <= 1
    assert_trees_close(x, exact, rtol=1e-8)


def test_neumann_default_alpha_from_power_iteration_converges():
    A, matvec, b, unravel = _spd_operator(cond=10.0)
    expected = torch.linalg.solve(A, tree.ravel(b)[0])
    errs = []
    for iters in (5, 20, 80):
        x, info = L.solve_neumann(matvec, b, iters=iters, return_info=True)
        assert info.matvecs == iters - 1 + 8
        errs.append(float(torch.linalg.vector_norm(tree.ravel(x)[0] - expected) / expected.norm()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3


def test_neumann_diverges_with_large_alpha_raises():
    A, matvec, b, _ = _spd_operator(cond=40.0)
    lam_max = torch.linalg.eigvalsh(A)[-1].item()
    with pytest.raises(FuncoptError, match="diverges.*alpha"):
        L.solve_neumann(matvec, b, iters=5, alpha=2.5 / lam_max)
    L.solve_neumann(matvec, b, iters=5, alpha=1.9 / lam_max)  # still convergent: no error


def test_neumann_on_indefinite_matrix_raises_from_power_iteration():
    def matvec(v):
        return tree.scale(-2.0, v)

    with pytest.raises(FuncoptError, match="not positive definite"):
        L.solve_neumann(matvec, {"x": torch.ones(3, dtype=D)})


def test_cg_negative_curvature_warn_raise_ignore():
    diag = torch.tensor([3.0, -1.0, 2.0], dtype=D)

    def matvec(v):
        return {"x": diag * v["x"]}

    b = {"x": torch.tensor([1.0, 1.0, 1.0], dtype=D)}
    with pytest.warns(RuntimeWarning, match="negative curvature.*solve_normal_cg"):
        x, info = L.solve_cg(matvec, b, return_info=True)
    assert bool(info.negative_curvature) and not bool(info.converged)
    assert torch.isfinite(x["x"]).all()
    with pytest.raises(FuncoptError, match="negative curvature"):
        L.solve_cg(matvec, b, on_negative_curvature="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.solve_cg(matvec, b, on_negative_curvature="ignore")
    # the normal equations handle the indefinite matrix
    x = L.solve_normal_cg(matvec, b, symmetric=True)
    torch.testing.assert_close(x["x"], 1.0 / diag)


@pytest.mark.parametrize("name", ["cg", "neumann", "dense", "normal_cg_sym"])
def test_nonfinite_products_raise(name):
    def matvec(v):
        return {"x": v["x"] * torch.tensor([1.0, float("nan")], dtype=D)}

    solver = {**SOLVERS, "neumann": functools.partial(L.solve_neumann, alpha=0.5)}[name]
    with pytest.raises(FuncoptError, match="not finite"):
        solver(matvec, {"x": torch.ones(2, dtype=D)})


def test_solvers_run_under_vmap_with_masked_stopping():
    A, matvec, b, unravel = _spd_operator(cond=30.0)
    B = torch.randn(4, A.shape[0], dtype=D)
    B[0] = 0.0  # an already-converged member must not produce nan under masking
    expected = torch.linalg.solve(A, B.T).T
    for solver in (L.solve_cg, L.solve_dense, functools.partial(L.solve_normal_cg, symmetric=True)):
        out = torch.func.vmap(lambda v: tree.ravel(solver(matvec, unravel(v)))[0])(B)
        torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-10)
    out = torch.func.vmap(lambda v: tree.ravel(L.solve_neumann(matvec, unravel(v), iters=3000))[0])(B[1:])
    torch.testing.assert_close(out, expected[1:], rtol=1e-6, atol=1e-8)


def test_solvers_are_differentiable_wrt_rhs():
    A, matvec, b, unravel = _spd_operator(cond=5.0)
    c = torch.randn(A.shape[0], dtype=D)
    grad = torch.func.grad(lambda bv: tree.ravel(L.solve_dense(matvec, unravel(bv)))[0] @ c)(tree.ravel(b)[0])
    torch.testing.assert_close(grad, torch.linalg.solve(A.T, c))


def test_bad_options_and_inputs_raise():
    A, matvec, b, _ = _spd_operator()
    with pytest.raises(FuncoptError, match="maxiter"):
        L.solve_cg(matvec, b, maxiter=0)
    with pytest.raises(FuncoptError, match="rtol"):
        L.solve_cg(matvec, b, rtol=-1.0)
    with pytest.raises(FuncoptError, match="on_negative_curvature"):
        L.solve_cg(matvec, b, on_negative_curvature="maybe")
    with pytest.raises(FuncoptError, match="iters"):
        L.solve_neumann(matvec, b, iters=0)
    with pytest.raises(FuncoptError, match="alpha"):
        L.solve_neumann(matvec, b, alpha=-0.1)
    with pytest.raises(FuncoptError, match="max_size"):
        L.solve_dense(matvec, b, max_size=3)
    with pytest.raises(TypeError, match=r"\['a'\].*floating-point"):
        L.solve_cg(matvec, {"a": torch.ones(3, dtype=torch.int64), "b": b["b"]})
    with pytest.raises(FuncoptError, match="no tensor leaves"):
        L.solve_cg(matvec, {})
    with pytest.raises(FuncoptError, match=r"shape \(2,\) at \['a'\]"):
        L.solve_cg(lambda v: {"a": v["a"][:2], "b": v["b"]}, b)
    with pytest.raises(ValueError, match="different pytree structures"):
        L.solve_cg(lambda v: {"a": v["a"]}, b)
    with pytest.raises(FuncoptError, match="unknown HVP mode 'both'"):
        L.hvp_operator(lambda p: tree.sum_squares(p), b, mode="both")
    with pytest.raises(FuncoptError, match="damping"):
        L.hvp_operator(lambda p: tree.sum_squares(p), b, damping=-1.0)
    with pytest.raises(FuncoptError, match="singular"):
        L.solve_dense(lambda v: tree.scale(0.0, v), b)
    op = L.hvp_operator(lambda p: tree.sum_squares(p), b)
    with pytest.raises(ValueError, match="different pytree structures"):
        op({"a": b["a"]})


@pytest.mark.parametrize("name", ["cg", "neumann", "dense"])
def test_nonfinite_rhs_raises_with_path(name):
    b = {"ok": torch.ones(2, dtype=D), "bad": torch.tensor([1.0, float("inf")], dtype=D)}
    with pytest.raises(FuncoptError, match=r"right-hand side is not finite.*\['bad'\]"):
        SOLVERS[name](lambda v: v, b)


def test_solvers_under_vmap_over_the_operator_with_unbatched_rhs():
    A, matvec, b, unravel = _spd_operator(cond=10.0)
    scales = torch.tensor([1.0, 2.0, 4.0], dtype=D)
    expected = torch.linalg.solve(A, tree.ravel(b)[0])[None] / scales[:, None]
    for solver in (L.solve_cg, functools.partial(L.solve_neumann, iters=400), L.solve_dense):
        out = torch.func.vmap(lambda s: tree.ravel(solver(lambda v: tree.scale(s, matvec(v)), b))[0])(scales)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)
