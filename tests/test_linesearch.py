"""Tests of funcopt.linesearch: Wolfe/Armijo conditions on accepted steps, fallbacks, errors."""

from __future__ import annotations

import math

import pytest
import torch

import funcopt
from funcopt import tree
from funcopt.solvers._backtracking import scale_by_backtracking_linesearch
from funcopt.solvers._lbfgs import scale_by_lbfgs
from funcopt.solvers._linesearch_common import (
    LINESEARCH_STATUS,
    ScaleByZoomLinesearchState,
    value_and_grad_from_state,
)
from funcopt.solvers._zoom import scale_by_zoom_linesearch
from tests.helpers import assert_trees_close, assert_trees_equal, snapshot


def rosen(p):
    x = p["x"]
    return torch.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def _value_and_grad(fn, p):
    g, v = torch.func.grad_and_value(fn)(p)
    return v, g


def _wolfe(fn, p, d, a, c1, c2):
    """Independent check: evaluates f and its slope at p and p + a d."""
    f0, g0 = _value_and_grad(fn, p)
    f1, g1 = _value_and_grad(fn, tree.add_scaled(p, a, d))
    slope0 = float(tree.vdot(g0, d))
    armijo = float(f1) <= float(f0) + c1 * a * slope0
    curvature = abs(float(tree.vdot(g1, d))) <= c2 * abs(slope0)
    return armijo, curvature


@pytest.mark.parametrize("direction", ["lbfgs", "steepest", "tiny"])
def test_every_accepted_zoom_step_satisfies_strong_wolfe(direction):
    """Along L-BFGS directions, raw steepest descent (zoom phase) and a tiny one (extrapolation)."""
    c1, c2 = 1e-4, 0.9
    ls = scale_by_zoom_linesearch(c1=c1, c2=c2)
    pre = scale_by_lbfgs()
    p = {"x": torch.tensor([-1.2, 1.0, -1.2, 1.0], dtype=torch.float64)}
    ls_state, pre_state = ls.init(p), pre.init(p)
    steps_checked = 0
    for _ in range(25):
        value, grad = _value_and_grad(rosen, p)
        if direction == "lbfgs":
            d, pre_state = pre.update(grad, pre_state, p)
            d = tree.scale(-1.0, d)
        else:
            d = tree.scale(-1e-7 if direction == "tiny" else -1.0, grad)
        updates, ls_state = ls.update(d, ls_state, p, value=value, grad=grad, value_fn=rosen)
        a = float(ls_state.step_size)
        assert int(ls_state.status) == 0, LINESEARCH_STATUS[int(ls_state.status)]
        assert_trees_close(updates, tree.scale(a, d), rtol=1e-15)
        armijo, curvature = _wolfe(rosen, p, d, a, c1, c2)
        assert armijo and curvature, f"step {a} violates strong Wolfe"
        p = funcopt.apply_updates(p, updates)
        # The state holds the value and gradient at the new point (reused by the next step).
        v_new, g_new = _value_and_grad(rosen, p)
        torch.testing.assert_close(ls_state.value, v_new, rtol=1e-14, atol=0)
        assert_trees_close(ls_state.grad, g_new, rtol=1e-12)
        if direction == "tiny" and steps_checked == 0:
            assert a > 10.0  # the bracketing phase extrapolated
        steps_checked += 1
    assert steps_checked == 25
    assert int(ls_state.num_evals) >= 25


def test_backtracking_satisfies_armijo_and_shrinks_steps():
    c1 = 1e-4
    ls = scale_by_backtracking_linesearch(c1=c1, decrease_factor=0.5)
    p = {"x": torch.tensor([-1.2, 1.0], dtype=torch.float64)}
    state = ls.init(p)
    values = []
    for _ in range(20):
        value, grad = _value_and_grad(rosen, p)
        d = tree.scale(-1.0, grad)
        updates, state = ls.update(d, state, p, value=value, grad=grad, value_fn=rosen)
        a = float(state.step_size)
        armijo, _ = _wolfe(rosen, p, d, a, c1, 0.9)
        assert armijo and int(state.status) == 0
        assert math.log2(a) == int(math.log2(a))  # a power of the decrease factor
        p = funcopt.apply_updates(p, updates)
        values.append(float(value))
    assert all(b < a for a, b in zip(values, values[1:]))


def _quad(p):
    return torch.sum(p["x"] ** 2)


@pytest.mark.parametrize("make", [scale_by_zoom_linesearch, scale_by_backtracking_linesearch])
def test_no_decrease_falls_back_to_zero_step_within_budget(make):
    """At the minimum of a convex loss (it increases along every direction) with a wrong gradient."""
    ls = make(**({"max_linesearch_steps": 7} if make is scale_by_zoom_linesearch else {"max_backtracking_steps": 7}))
    p = {"x": torch.zeros(3, dtype=torch.float64)}
    state = ls.init(p)
    fake_grad = {"x": torch.ones(3, dtype=torch.float64)}
    updates, new = ls.update(
        tree.scale(-1.0, fake_grad), state, p, value=torch.tensor(0.0, dtype=torch.float64), grad=fake_grad, value_fn=_quad
    )
    assert int(new.status) == 3
    assert_trees_equal(updates, {"x": torch.zeros(3, dtype=torch.float64)})
    assert int(new.num_evals) <= 7
    assert float(new.step_size) == 0.0


@pytest.mark.parametrize("make", [scale_by_zoom_linesearch, scale_by_backtracking_linesearch])
def test_non_descent_direction_is_replaced_by_negative_gradient(make):
    ls = make()
    p = {"x": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    value, grad = _value_and_grad(_quad, p)
    updates, state = ls.update(grad, ls.init(p), p, value=value, grad=grad, value_fn=_quad)  # ascent direction
    assert int(state.status) == 1
    assert float(state.value) < float(value)
    assert float(tree.vdot(updates, grad)) < 0


def test_budget_exhausted_takes_best_sufficient_decrease_point():
    ls = scale_by_zoom_linesearch(max_linesearch_steps=1, c2=0.1)
    p = {"x": torch.tensor([3.0], dtype=torch.float64)}
    value, grad = _value_and_grad(_quad, p)
    d = tree.scale(-0.01, grad)  # a short step: decrease, but the curvature test fails
    updates, state = ls.update(d, ls.init(p), p, value=value, grad=grad, value_fn=_quad)
    assert int(state.status) == 2 and int(state.num_evals) == 1
    assert float(state.value) < float(value)
    assert_trees_close(updates, d, rtol=1e-15)


def test_non_finite_trial_points_shrink_the_step():
    def barrier(p):  # finite only for x < 1
        return torch.sum(-torch.log(1.0 - p["x"]) + p["x"] ** 2)

    for ls in (scale_by_zoom_linesearch(), scale_by_backtracking_linesearch()):
        p = {"x": torch.tensor([-0.5], dtype=torch.float64)}
        value, grad = _value_and_grad(barrier, p)
        d = {"x": torch.tensor([10.0], dtype=torch.float64)}  # descent, but a = 1 leaves the domain
        assert float(tree.vdot(grad, d)) < 0
        updates, state = ls.update(d, ls.init(p), p, value=value, grad=grad, value_fn=barrier)
        new_x = float(p["x"] + updates["x"])
        assert new_x < 1.0 and math.isfinite(float(state.value))
        assert float(state.value) < float(value)
        assert int(state.status) in (0, 2)


def test_value_and_grad_are_evaluated_when_not_given_and_counted():
    ls = scale_by_zoom_linesearch()
    p = {"x": torch.tensor([2.0], dtype=torch.float64)}
    calls = []

    def counted(q):
        calls.append(1)
        return _quad(q)

    _, grad = _value_and_grad(_quad, p)
    _, state = ls.update(tree.scale(-0.5, grad), ls.init(p), p, value_fn=counted)
    assert int(state.num_evals) == len(calls) == 2  # start point + one accepted trial (exact step)
    assert float(state.value) == 0.0


def test_value_and_grad_fn_alternative_and_zero_gradient():
    ls = scale_by_zoom_linesearch()
    p = {"x": torch.tensor([2.0], dtype=torch.float64)}

    def vg(q):
        return _quad(q), {"x": 2 * q["x"]}

    updates, state = ls.update({"x": torch.tensor([-1.0], dtype=torch.float64)}, ls.init(p), p, value_and_grad_fn=vg)
    # a = 1 gives x = 1: f drops from 4 to 1 and |slope| 2 <= 0.9 * 4, so it is accepted at once.
    assert float(p["x"] + updates["x"]) == 1.0 and float(state.value) == 1.0
    assert int(state.num_evals) == 2
    zero = {"x": torch.zeros(1, dtype=torch.float64)}
    updates, state = ls.update(zero, ls.init(zero), zero, value_and_grad_fn=vg)
    assert float(state.step_size) == 0.0 and int(state.status) == 0


def test_value_and_grad_from_state_reuses_the_stored_pair():
    calls = []

    def counted(q):
        calls.append(1)
        return _quad(q)

    vg = value_and_grad_from_state(counted)
    ls = scale_by_zoom_linesearch()
    p = {"x": torch.tensor([2.0], dtype=torch.float64)}
    state = (ls.init(p),)
    value, grad = vg(p, state)
    assert len(calls) == 1
    updates, ls_state = ls.update(tree.scale(-0.25, grad), state[0], p, value=value, grad=grad, value_fn=counted)
    p = funcopt.apply_updates(p, updates)
    n = len(calls)
    value2, grad2 = vg(p, (ls_state,))
    assert len(calls) == n  # no new evaluation
    assert value2 is ls_state.value and grad2 is ls_state.grad


def test_errors_are_clear():
    ls = scale_by_zoom_linesearch()
    p = {"x": torch.tensor([1.0, 2.0])}
    state = ls.init(p)
    grad = {"x": torch.tensor([2.0, 4.0])}
    with pytest.raises(funcopt.FuncoptError, match="value_fn"):
        ls.update(grad, state, p, value=torch.tensor(5.0), grad=grad)
    with pytest.raises(funcopt.FuncoptError, match="needs the current parameters"):
        ls.update(grad, state, value_fn=_quad)
    with pytest.raises(funcopt.FuncoptError, match="objective at the current params is nan"):
        ls.update(grad, state, p, value=torch.tensor(float("nan")), grad=grad, value_fn=_quad)
    bad = {"x": torch.tensor([1.0, float("inf")])}
    with pytest.raises(funcopt.FuncoptError, match=r"non-finite entries at leaf \['x'\]"):
        ls.update(grad, state, p, value=torch.tensor(5.0), grad=bad, value_fn=_quad)
    with pytest.raises(funcopt.FuncoptError, match="0-dim tensor"):
        ls.update(grad, state, p, value_fn=lambda q: q["x"] ** 2)
    with pytest.raises(funcopt.FuncoptError, match=r"\(value, grad\) pair"):
        ls.update(grad, state, p, value_and_grad_fn=lambda q: _quad(q))
    with pytest.raises(funcopt.FuncoptError, match="ScaleByZoomLinesearchState"):
        ls.update(grad, scale_by_backtracking_linesearch().init(p), p, value_fn=_quad)
    with pytest.raises(funcopt.FuncoptError, match="value_fn must be callable"):
        ls.update(grad, state, p, value_fn=3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: scale_by_zoom_linesearch(max_linesearch_steps=0), "max_linesearch_steps"),
        (lambda: scale_by_zoom_linesearch(c1=0.0), "c1"),
        (lambda: scale_by_zoom_linesearch(c1=0.5, c2=0.4), "c2"),
        (lambda: scale_by_zoom_linesearch(initial_guess_strategy="two"), "initial_guess_strategy"),
        (lambda: scale_by_zoom_linesearch(max_step_size=0.0), "max_step_size"),
        (lambda: scale_by_zoom_linesearch(approx_dec_rtol=-1.0), "approx_dec_rtol"),
        (lambda: scale_by_backtracking_linesearch(decrease_factor=1.0), "decrease_factor"),
        (lambda: scale_by_backtracking_linesearch(max_backtracking_steps=2.5), "max_backtracking_steps"),
        (lambda: scale_by_backtracking_linesearch(initial_step_size=-1.0), "initial_step_size"),
    ],
)
def test_constructor_validation(call, match):
    with pytest.raises(funcopt.FuncoptError, match=match):
        call()


def test_keep_strategy_starts_from_previous_step_and_state_is_pure():
    ls = scale_by_zoom_linesearch(c2=0.1, initial_guess_strategy="keep")
    p = {"x": torch.tensor([3.0, -1.0], dtype=torch.float64)}
    state = ls.init(p)
    assert isinstance(state, ScaleByZoomLinesearchState) and math.isinf(float(state.value))
    value, grad = _value_and_grad(_quad, p)
    frozen = snapshot(state)
    _, new = ls.update(tree.scale(-0.25, grad), state, p, value=value, grad=grad, value_fn=_quad)
    assert_trees_equal(state, frozen)
    assert float(new.step_size) == pytest.approx(2.0)  # exact minimizer along -0.25 g
    q = {"x": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    v2, g2 = _value_and_grad(_quad, q)
    _, newer = ls.update(tree.scale(-0.25, g2), new, q, value=v2, grad=g2, value_fn=_quad)
    assert int(newer.num_evals) - int(new.num_evals) == 1  # the kept step 2.0 is accepted at once
