"""Tests of funcopt.lbfgs: the two-loop recursion against dense BFGS, torch parity, state hygiene."""

from __future__ import annotations

import pytest
import torch

import funcopt
from funcopt import tree
from funcopt.solvers._lbfgs import ScaleByLbfgsState, lbfgs, scale_by_lbfgs
from funcopt.solvers._linesearch_common import (
    ScaleByBacktrackingLinesearchState,
    ScaleByZoomLinesearchState,
    value_and_grad_from_state,
)
from tests.helpers import assert_trees_close, assert_trees_equal, nested_params, snapshot


def _spd(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    return (q * torch.linspace(0.5, 5.0, n, dtype=dtype)) @ q.T


def _dense_lbfgs_direction(pairs, g):
    """H g with H built by the explicit BFGS inverse update from gamma * I (N&W eq. 6.17)."""
    n = g.shape[0]
    s_last, y_last = pairs[-1]
    h = torch.eye(n, dtype=g.dtype) * (s_last @ y_last) / (y_last @ y_last)
    eye = torch.eye(n, dtype=g.dtype)
    for s, y in pairs:
        rho = 1.0 / (y @ s)
        h = (eye - rho * torch.outer(s, y)) @ h @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
    return h @ g


@pytest.mark.parametrize("memory_size", [3, 10])
def test_two_loop_matches_dense_bfgs_on_last_m_pairs(memory_size):
    n, steps = 6, 8
    a = _spd(n)
    tx = scale_by_lbfgs(memory_size)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(steps)]
    state = tx.init({"x": xs[0]})
    for k, x in enumerate(xs):
        grad = a @ x
        d, state = tx.update({"x": grad}, state, {"x": x})
        pairs = [(xs[i + 1] - xs[i], a @ (xs[i + 1] - xs[i])) for i in range(k)][-memory_size:]
        if k == 0:
            expected = grad * min(1.0, 1.0 / float(grad.abs().sum()))
        else:
            expected = _dense_lbfgs_direction(pairs, grad)
        torch.testing.assert_close(d["x"], expected, rtol=1e-10, atol=1e-12)
        assert int(state.num_pairs) == min(k, memory_size)
    assert int(state.count) == steps
    assert int(state.head) == (steps - 1) % memory_size


def test_pair_with_negative_curvature_is_skipped():
    tx = scale_by_lbfgs(4)
    x0, x1 = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    state = tx.init(x0)
    _, state = tx.update(torch.tensor([1.0, 1.0], dtype=torch.float64), state, x0)
    before = snapshot(state)
    # y . s = (0 - 1) * 1 < 0: gradient decreased along the step, the pair violates curvature.
    _, state = tx.update(torch.tensor([0.0, 1.0], dtype=torch.float64), state, x1)
    assert int(state.num_pairs) == 0 and int(state.head) == 0
    assert torch.equal(state.diff_params_memory, before.diff_params_memory)
    assert torch.equal(state.weights_memory, before.weights_memory)
    # A positive-curvature pair is then accepted.
    _, state = tx.update(torch.tensor([2.0, 1.0], dtype=torch.float64), state, torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert int(state.num_pairs) == 1
    torch.testing.assert_close(state.weights_memory[0], torch.tensor(0.5, dtype=torch.float64))


def test_fixed_step_lbfgs_matches_torch_optim_lbfgs():
    """lbfgs(lr, linesearch=None) = torch.optim.LBFGS(lr, max_iter=1) step for step (float64)."""
    a = _spd(7, seed=3)
    b = torch.randn(7, dtype=torch.float64)

    def loss(x):
        return 0.5 * x @ (a @ x) - b @ x + 0.1 * torch.sum(x**4)

    x0 = torch.randn(7, dtype=torch.float64)
    xt = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([xt], lr=0.3, max_iter=1, history_size=4, tolerance_grad=0, tolerance_change=0)

    def closure():
        opt.zero_grad()
        v = loss(xt)
        v.backward()
        return v

    tx = lbfgs(0.3, memory_size=4, linesearch=None)
    params = {"x": x0.clone()}
    state = tx.init(params)
    for _ in range(12):
        opt.step(closure)
        grads = torch.func.grad(lambda p: loss(p["x"]))(params)
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
        torch.testing.assert_close(params["x"], xt.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nested_params_keep_structure_and_dtype(dtype):
    params = nested_params(dtype)
    target = tree.map(lambda x: torch.ones_like(x), params)

    def loss(p):
        return sum(torch.sum((i + 1.0) * (x - t) ** 2) for i, (x, t) in enumerate(zip(tree.leaves(p), tree.leaves(target))))

    tx = lbfgs()
    state = tx.init(params)
    vg = value_and_grad_from_state(loss)
    before = snapshot(params)
    p = params
    for _ in range(15):
        value, grad = vg(p, state)
        updates, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        p = funcopt.apply_updates(p, updates)
    assert_trees_equal(params, before)  # inputs untouched
    assert_trees_close(p, target, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-10)
    assert state[0].diff_params_memory.dtype == dtype
    assert state[2].value.dtype == dtype


def test_update_is_pure_and_runs_under_vmap():
    a = _spd(5)
    xs = torch.randn(3, 4, 5, dtype=torch.float64)  # 3 problems, 4 steps each
    tx = scale_by_lbfgs(2)

    def run(x_seq):
        state = tx.init(x_seq[0])
        out = []
        for k in range(x_seq.shape[0]):
            d, state = tx.update(a @ x_seq[k], state, x_seq[k])
            out.append(d)
        return torch.stack(out)

    batched = torch.func.vmap(run)(xs)
    looped = torch.stack([run(xs[i]) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)

    state = tx.init(xs[0, 0])
    _, state = tx.update(a @ xs[0, 0], state, xs[0, 0])
    frozen = snapshot(state)
    tx.update(a @ xs[0, 1], state, xs[0, 1])
    assert_trees_equal(state, frozen)


def test_lbfgs_chain_states_are_named_tuples_of_tensors():
    state = lbfgs().init({"w": torch.zeros(3)})
    assert isinstance(state[0], ScaleByLbfgsState)
    assert isinstance(state[2], ScaleByZoomLinesearchState)
    assert all(isinstance(x, torch.Tensor) for x in tree.leaves(state))
    assert isinstance(lbfgs(linesearch="backtracking").init({"w": torch.zeros(3)})[2], ScaleByBacktrackingLinesearchState)
    assert len(lbfgs(0.5, linesearch=None).init({"w": torch.zeros(3)})) == 2


def test_constructor_and_update_errors():
    with pytest.raises(funcopt.FuncoptError, match="memory_size"):
        scale_by_lbfgs(0)
    with pytest.raises(funcopt.FuncoptError, match="curvature_eps"):
        scale_by_lbfgs(curvature_eps=-1.0)
    with pytest.raises(funcopt.FuncoptError, match="linesearch must be"):
        lbfgs(linesearch="armijo")
    with pytest.raises(funcopt.FuncoptError, match="linesearch must be"):
        lbfgs(linesearch=3)
    with pytest.raises(funcopt.FuncoptError, match="needs a learning_rate"):
        lbfgs(linesearch=None)
    with pytest.raises(funcopt.FuncoptError, match="learning_rate"):
        lbfgs(-1.0)
    tx = scale_by_lbfgs()
    state = tx.init({"w": torch.zeros(3)})
    with pytest.raises(funcopt.FuncoptError, match="needs the current parameters"):
        tx.update({"w": torch.ones(3)}, state)
    with pytest.raises(funcopt.FuncoptError, match="built for 3 parameter elements"):
        tx.update({"w": torch.ones(4)}, state, {"w": torch.ones(4)})
    with pytest.raises(funcopt.FuncoptError, match="ScaleByLbfgsState"):
        tx.update({"w": torch.ones(3)}, (), {"w": torch.ones(3)})
