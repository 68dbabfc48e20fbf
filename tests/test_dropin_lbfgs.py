"""as_torch_optimizer(funcopt.lbfgs, ...) with torch.optim.LBFGS's arguments: its max_iter loop.

The oracle is torch.optim.LBFGS itself, run side by side on the same closure (float64)."""

from __future__ import annotations

import pytest
import torch

import funcopt


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T / n + torch.eye(n, dtype=torch.float64)


A = _spd(7, seed=3)
B = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
X0 = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _loss(x):
    return 0.5 * x @ (A @ x) - B @ x + 0.1 * torch.sum(x**4)


def _run(make, steps):
    """(x after each step(closure), closure evaluations, the losses step() returned)."""
    x = X0.clone().requires_grad_(True)
    opt = make([x])
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        v = _loss(x)
        v.backward()
        return v

    xs, returned = [], []
    for _ in range(steps):
        returned.append(float(opt.step(closure).detach()))
        xs.append(x.detach().clone())
    return xs, calls[0], returned


@pytest.mark.parametrize("max_iter", [1, 4, 10])
def test_fixed_step_loop_follows_torch_lbfgs(max_iter):
    kw = dict(lr=0.3, max_iter=max_iter, history_size=4, tolerance_grad=0.0, tolerance_change=0.0)
    xt, nt, lt = _run(lambda p: torch.optim.LBFGS(p, **kw), 3)
    xf, nf, lf = _run(lambda p: funcopt.as_torch_optimizer(funcopt.lbfgs, p, **kw), 3)
    for a, b in zip(xf, xt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert nf == nt == 3 * max_iter
    assert lf == pytest.approx(lt, rel=1e-12)  # the loss of each step's first evaluation


def test_torch_defaults_stop_early_at_the_same_minimum():
    # torch's defaults (max_iter=20, tolerance_grad=1e-7, tolerance_change=1e-9, no line search)
    xt, nt, _ = _run(lambda p: torch.optim.LBFGS(p, lr=1), 5)
    xf, nf, _ = _run(lambda p: funcopt.as_torch_optimizer(funcopt.lbfgs, p, lr=1, max_iter=20), 5)
    assert float(_loss(xf[-1])) == pytest.approx(float(_loss(xt[-1])), rel=1e-10)
    assert nf < 5 * 20 and nt < 5 * 20  # the tolerances ended the loops before max_iter


def test_strong_wolfe_maps_to_the_zoom_line_search():
    xt, nt, _ = _run(lambda p: torch.optim.LBFGS(p, lr=1, max_iter=20, line_search_fn="strong_wolfe"), 3)
    xf, nf, _ = _run(lambda p: funcopt.as_torch_optimizer(funcopt.lbfgs, p, lr=1, max_iter=20,
                                                           line_search_fn="strong_wolfe"), 3)
    # both at the minimizer, to the tolerances' accuracy (their line searches differ, so do the paths)
    assert float(_loss(xf[-1])) == pytest.approx(float(_loss(xt[-1])), rel=1e-9)
    assert float(torch.func.grad(_loss)(xf[-1]).abs().max()) < 1e-4
    assert float(torch.func.grad(_loss)(X0).abs().max()) > 1.0  # it did move


def test_max_eval_bounds_the_closure_calls_of_a_step():
    _, n, _ = _run(lambda p: funcopt.as_torch_optimizer(funcopt.lbfgs, p, lr=0.3, max_iter=50, max_eval=7,
                                                       tolerance_grad=0.0, tolerance_change=0.0), 1)
    assert n == 7


def test_without_loop_arguments_one_iteration_per_step_as_before():
    _, n, _ = _run(lambda p: funcopt.as_torch_optimizer(funcopt.lbfgs(0.3, linesearch=None), p), 3)
    assert n == 3


def test_bad_loop_arguments_are_refused_with_the_fix():
    w = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(funcopt.FuncoptError, match="max_iter must be a positive int"):
        funcopt.as_torch_optimizer(funcopt.lbfgs, w, max_iter=0)
    with pytest.raises(funcopt.FuncoptError, match="line_search_fn must be None or 'strong_wolfe'"):
        funcopt.as_torch_optimizer(funcopt.lbfgs, w, line_search_fn="armijo")
    with pytest.raises(funcopt.FuncoptError, match="maps onto funcopt.lbfgs's linesearch="):
        funcopt.as_torch_optimizer(funcopt.lbfgs(), w, line_search_fn="strong_wolfe")
    with pytest.raises(funcopt.FuncoptError, match="torch.optim.LBFGS's arguments"):
        funcopt.as_torch_optimizer(funcopt.adam, w, lr=1e-3, max_iter=5)
    with pytest.raises(funcopt.FuncoptError, match="tolerance_grad must be a number >= 0"):
        funcopt.as_torch_optimizer(funcopt.lbfgs, w, tolerance_grad=-1.0)
    opt = funcopt.as_torch_optimizer(funcopt.lbfgs, [{"params": w}, {"params": [torch.zeros(1, requires_grad=True)]}],
                                     max_iter=3)
    with pytest.raises(funcopt.FuncoptError, match="one param group"):
        opt.step(lambda: torch.zeros(()))


def test_torch_history_default_and_loop_settings_in_the_param_group():
    # torch.optim.LBFGS keeps 100 curvature pairs by default (funcopt.lbfgs: 10); a long inner
    # loop on an ill-conditioned problem shows the difference
    g = torch.Generator().manual_seed(0)
    n = 60
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.logspace(0, 3, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)

    def run(make):
        x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        opt = make([x])
        calls = [0]

        def closure():
            calls[0] += 1
            opt.zero_grad()
            v = 0.5 * x @ (a @ x) - b @ x
            v.backward()
            return v

        opt.step(closure)
        return opt, x.detach().clone(), calls, closure

    kw = dict(lr=0.5, max_iter=40, tolerance_grad=0.0, tolerance_change=0.0)
    _, xt, _, _ = run(lambda p: torch.optim.LBFGS(p, **kw))
    opt, xf, calls, closure = run(lambda p: funcopt.as_torch_optimizer(funcopt.lbfgs, p, **kw))
    torch.testing.assert_close(xf, xt, rtol=1e-9, atol=1e-10)
    group = opt.param_groups[0]
    assert group["history_size"] == 100
    assert (group["max_iter"], group["max_eval"], group["tolerance_grad"], group["tolerance_change"]) == (40, 50, 0.0, 0.0)
    # like torch's, the loop reads its settings from the group at each step
    group["max_iter"] = 3.0  # torch takes a float here too
    calls_before = calls[0]
    opt.step(closure)
    assert calls[0] - calls_before == 3
