"""Tests of funcopt.minimize: optimum and evaluation counts vs torch.optim.LBFGS, resume, errors."""

from __future__ import annotations

import functools

import pytest
import torch

import funcopt
from funcopt import checkpoint, tree
from funcopt.solvers._lbfgs import lbfgs
from funcopt.solvers._minimize import MinimizeResult, minimize
from tests.helpers import assert_trees_close, assert_trees_equal, nested_params

F64 = torch.float64


def rosen(p):
    x = p["x"]
    return torch.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


@functools.cache
def _logistic_problem(lam=1e-2):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=F64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=F64)

    def loss(p):
        z = x @ p["w"] + p["b"]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.5 * lam * (p["w"] @ p["w"])

    # Independent reference optimum: Newton's method with the exact Hessian.
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
    reg = torch.diag(torch.cat([torch.full((30,), lam, dtype=F64), torch.zeros(1, dtype=F64)]))
    w = torch.zeros(31, dtype=F64)
    for _ in range(30):
        prob = torch.sigmoid(xb @ w)
        grad = xb.T @ (prob - y) / len(y) + reg @ w
        hess = (xb.T * (prob * (1 - prob))) @ xb / len(y) + reg
        w = w - torch.linalg.solve(hess, grad)
    start = {"w": torch.zeros(30, dtype=F64), "b": torch.zeros((), dtype=F64)}
    return loss, start, {"w": w[:30], "b": w[30]}


class _Converged(Exception):
    pass


def _torch_lbfgs_evals(loss, start, tol):
    """Evaluations torch.optim.LBFGS(strong_wolfe) needs until a point with |grad|_2 <= tol."""
    names = sorted(start)
    leaves = [start[k].clone().requires_grad_(True) for k in names]
    opt = torch.optim.LBFGS(
        leaves, lr=1, max_iter=2000, max_eval=20000, tolerance_grad=0.0, tolerance_change=0.0,
        history_size=10, line_search_fn="strong_wolfe",
    )
    count = [0]

    def closure():
        opt.zero_grad()
        v = loss(dict(zip(names, leaves)))
        v.backward()
        count[0] += 1
        if float(torch.sqrt(sum(torch.sum(p.grad**2) for p in leaves))) <= tol:
            raise _Converged
        return v

    with pytest.raises(_Converged):
        opt.step(closure)
    return count[0]


@pytest.mark.parametrize("problem", ["rosenbrock-2", "logistic"])
def test_reaches_optimum_with_no_more_evaluations_than_torch_lbfgs(problem):
    tol = 1e-8
    if problem == "rosenbrock-2":
        loss, start, optimum = rosen, {"x": torch.tensor([-1.2, 1.0], dtype=F64)}, {"x": torch.ones(2, dtype=F64)}
    else:
        loss, start, optimum = _logistic_problem()
    res = minimize(loss, start, lbfgs(), max_steps=500, tol=tol)
    assert isinstance(res, MinimizeResult)
    assert res.converged and res.grad_norm <= tol, res.message
    assert_trees_close(res.params, optimum, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.value, loss(optimum), rtol=1e-12, atol=1e-12)
    torch_evals = _torch_lbfgs_evals(loss, start, tol)
    assert res.num_evals <= torch_evals, (res.num_evals, torch_evals)
    # Every evaluation is counted: the line searches' own counters add up to the driver's.
    ls_state = res.state[2]
    assert int(ls_state.num_evals) + 1 == res.num_evals
    assert res.num_steps == int(ls_state.count)


def test_quadratic_closed_form_and_backtracking():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=F64))
    a = (q * torch.logspace(0, 3, 20, dtype=F64)) @ q.T
    expected = torch.randn(20, generator=g, dtype=F64)

    def loss(p):  # written around its minimizer so that f is resolvable down to |grad| ~ 1e-12
        r = p["x"] - expected
        return 0.5 * r @ (a @ r)

    for ls in ("zoom", "backtracking"):
        res = minimize(loss, {"x": torch.zeros(20, dtype=F64)}, lbfgs(linesearch=ls), max_steps=500, tol=1e-9)
        assert res.converged, (ls, res.message)
        torch.testing.assert_close(res.params["x"], expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nested_dict_params_of_several_shapes(dtype):
    params = nested_params(dtype)
    target = tree.map(lambda x: torch.full_like(x, 0.5), params)

    def loss(p):
        total = 0.0
        for i, (x, t) in enumerate(zip(tree.leaves(p), tree.leaves(target))):
            total = total + (i + 1.0) * torch.sum((x - t) ** 2) + 0.1 * torch.sum((x - t) ** 4)
        return total

    tol = 1e-4 if dtype == torch.float32 else 1e-10
    res = minimize(loss, params, max_steps=200, tol=tol)
    assert res.converged, res.message
    assert tree.structure(res.params) == tree.structure(params)
    assert all(x.dtype == dtype for x in tree.leaves(res.params))
    assert_trees_close(res.params, target, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-9)


def test_resume_from_checkpoint_gives_bitwise_the_same_path(tmp_path):
    loss, start, _ = _logistic_problem()
    tx = lbfgs(memory_size=5)
    full = minimize(loss, start, tx, max_steps=20, tol=0.0)
    first = minimize(loss, start, tx, max_steps=8, tol=0.0)
    path = tmp_path / "mid.safetensors"
    checkpoint.save(path, {"params": first.params, "opt_state": first.state})
    template = {"params": start, "opt_state": tx.init(start)}
    restored = checkpoint.load(path, like=template)
    untyped = checkpoint.load(path)  # NamedTuple states are rebuilt by class name too
    assert_trees_equal(untyped["opt_state"], first.state)
    second = minimize(loss, restored["params"], tx, max_steps=12, tol=0.0, state=restored["opt_state"])
    assert_trees_equal(second.params, full.params)
    assert_trees_equal(second.state, full.state)
    assert first.num_steps + second.num_steps == full.num_steps == 20
    assert first.num_evals + second.num_evals == full.num_evals


def test_stops_and_reports_when_budgets_run_out():
    start = {"x": torch.tensor([-1.2, 1.0], dtype=F64)}
    res = minimize(rosen, start, max_steps=5, tol=1e-12)
    assert not res.converged and res.num_steps == 5 and "max_steps" in res.message
    res = minimize(rosen, start, max_evals=4, tol=1e-12)
    assert not res.converged and res.num_evals >= 4 and "max_evals" in res.message
    res = minimize(rosen, start, max_steps=0)
    assert res.num_steps == 0 and res.num_evals == 1
    seen = []
    res = minimize(rosen, start, callback=lambda k, p, v, s: seen.append(float(v)) or k == 3)
    assert res.num_steps == 3 and "callback" in res.message and seen[-1] == float(res.value)
    assert seen == sorted(seen, reverse=True)


def test_no_decrease_stops_instead_of_looping():
    """With tol=0 the run ends when rounding hides any further decrease of loss and slope."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=F64))
    a = (q * torch.logspace(0, 3, 20, dtype=F64)) @ q.T
    b = torch.randn(20, generator=g, dtype=F64)

    def loss(p):  # f* != 0 and cancellation in x'Ax - b'x: f is resolved only to ~1e-13
        return 0.5 * p["x"] @ (a @ p["x"]) - b @ p["x"]

    res = minimize(loss, {"x": torch.zeros(20, dtype=F64)}, max_steps=10_000, tol=0.0)
    assert not res.converged and "no decrease" in res.message
    assert res.num_steps < 1000 and res.grad_norm < 1e-10
    torch.testing.assert_close(res.params["x"], torch.linalg.solve(a, b), rtol=0, atol=1e-5)


def test_approximate_wolfe_reaches_tolerances_below_the_loss_rounding():
    """0.5 x'Ax - b'x resolves f only to ~1e-13: the exact test stalls, the default does not."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=F64))
    a = (q * torch.logspace(0, 3, 20, dtype=F64)) @ q.T
    b = torch.randn(20, generator=g, dtype=F64)

    def loss(p):
        return 0.5 * p["x"] @ (a @ p["x"]) - b @ p["x"]

    start = {"x": torch.zeros(20, dtype=F64)}
    exact = lbfgs(linesearch=funcopt.scale_by_zoom_linesearch(approx_dec_rtol=0.0))
    stalled = minimize(loss, start, exact, max_steps=2000, tol=1e-8)
    assert not stalled.converged and "no decrease" in stalled.message and stalled.grad_norm > 1e-8
    res = minimize(loss, start, lbfgs(), max_steps=2000, tol=1e-8)
    assert res.converged, res.message
    torch.testing.assert_close(res.params["x"], torch.linalg.solve(a, b), rtol=0, atol=1e-8)


def test_any_transformation_works_as_the_method():
    def loss(p):
        return torch.sum((p["x"] - 3.0) ** 2)

    res = minimize(loss, {"x": torch.zeros(3)}, funcopt.sgd(0.25), max_steps=50, tol=1e-5)
    assert res.converged and res.num_evals == res.num_steps + 1
    torch.testing.assert_close(res.params["x"], torch.full((3,), 3.0), rtol=0, atol=1e-5)


def test_errors_are_clear():
    start = {"x": torch.tensor([1.0, 2.0])}
    with pytest.raises(funcopt.FuncoptError, match="objective is nan"):
        minimize(lambda p: torch.sum(torch.log(-p["x"])), start)
    with pytest.raises(funcopt.FuncoptError, match=r"not finite at leaf \['x'\]"):
        minimize(lambda p: torch.sum(torch.sqrt(p["x"] - 1.0)), start)
    with pytest.raises(funcopt.FuncoptError, match="0-dim tensor"):
        minimize(lambda p: p["x"] ** 2, start)
    with pytest.raises(TypeError, match="GradientTransformation"):
        minimize(rosen, start, tx=torch.optim.LBFGS)
    with pytest.raises(TypeError, match="callable"):
        minimize(3, start)
    with pytest.raises(funcopt.FuncoptError, match="max_steps"):
        minimize(rosen, start, max_steps=-1)
    with pytest.raises(funcopt.FuncoptError, match="tol"):
        minimize(rosen, start, tol=-1.0)
    with pytest.raises(funcopt.FuncoptError, match="at least one tensor"):
        minimize(rosen, {})


def test_mixed_dtypes_and_injected_learning_rate():
    params = {"a": torch.zeros(3, dtype=torch.float32), "b": torch.zeros(2, 2, dtype=F64)}

    def loss(p):
        return torch.sum((p["a"].double() - 1.0) ** 2) + torch.sum((p["b"] + 2.0) ** 2)

    res = minimize(loss, params, tol=1e-6)
    assert res.converged and res.params["a"].dtype == torch.float32 and res.params["b"].dtype == F64
    torch.testing.assert_close(res.params["b"], torch.full((2, 2), -2.0, dtype=F64), rtol=0, atol=1e-7)
    tx = funcopt.inject_hyperparams(lbfgs)(learning_rate=0.5)
    res = minimize(loss, params, tx, max_steps=200, tol=1e-6)
    assert res.converged and float(funcopt.get_hyperparams(res.state)["learning_rate"]) == 0.5
    torch.testing.assert_close(res.params["a"], torch.ones(3), rtol=0, atol=1e-6)
