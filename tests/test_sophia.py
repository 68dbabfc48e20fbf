"""sophia (optax.contrib.sophia): the Hutchinson estimator against explicit Hessian diagonals,
Sophia-H against optax's own Sophia-H, Sophia-G's estimator, the refresh interval.

The registry rows ``sophia_squared_grads`` and ``sophia_interval3_decay`` run Sophia with a
deterministic estimator against optax (tests/test_optax_parity.py) and through every battery.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import funcopt
from funcopt import tree

G = torch.Generator().manual_seed(0)
M = torch.randn(5, 5, generator=G, dtype=torch.float64)
H = M @ M.T + torch.eye(5, dtype=torch.float64)  # a dense SPD Hessian


def coupled(p):
    """Non-separable: 0.5 w^T H w + sum(sin(w)) + a quartic in v coupled to w."""
    w, v = p["w"], p["v"]
    return 0.5 * w @ H @ w + torch.sin(w).sum() + (v**4).sum() * (1 + w[0] ** 2)


def _explicit_diag(f, p):
    flat = torch.cat([p["v"].reshape(-1), p["w"]])  # optree order: "v", "w"

    def f_flat(x):
        return f({"v": x[: p["v"].numel()].reshape(p["v"].shape), "w": x[p["v"].numel():]})

    d = torch.diagonal(torch.autograd.functional.hessian(f_flat, flat))
    return {"v": d[: p["v"].numel()].reshape(p["v"].shape), "w": d[p["v"].numel():]}


P = {"w": torch.randn(5, generator=G, dtype=torch.float64), "v": torch.randn(2, 3, generator=G, dtype=torch.float64)}


def test_each_hutchinson_draw_is_z_times_hz_and_the_mean_is_the_diagonal():
    est = funcopt.hutchinson_estimator_diag_hessian(random_seed=7)
    state = est.init(P)
    n = 4000
    # n draws at once: vmap over the draw counter (the state's count), params and obj_fn fixed
    counts = torch.arange(n)

    def draw(count):
        out, _ = est.update(P, funcopt.HutchinsonState(state.key, count), P, obj_fn=coupled)
        return out

    draws = torch.func.vmap(draw)(counts)
    # one draw against z * (H z) with H explicit
    single, new_state = est.update(P, state, P, obj_fn=coupled)
    assert int(new_state.count) == 1
    from funcopt.transforms._random import STREAM_HUTCHINSON, rademacher_like

    z = rademacher_like(P, state.key, state.count, STREAM_HUTCHINSON)
    hz = funcopt.linalg.hvp(coupled, P, z)
    for k in P:
        torch.testing.assert_close(single[k], z[k] * hz[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(draws[k][0], single[k], rtol=1e-12, atol=1e-12)
    diag = _explicit_diag(coupled, P)
    # the estimator's variance per coordinate is sum_{j != i} H_ij^2; the mean of n draws is
    # within 5 standard errors of the diagonal
    for k in P:
        mean, spread = draws[k].mean(0), draws[k].std(0)
        assert ((mean - diag[k]).abs() <= 5 * spread / n**0.5 + 1e-9).all(), k


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    def separable(p):
        return sum((torch.cos(x) + x**4).sum() for x in p.values())

    est = funcopt.hutchinson_estimator_diag_hessian(random_seed=1)
    out, _ = est.update(P, est.init(P), P, obj_fn=separable)
    diag = _explicit_diag(separable, P)
    for k in P:
        torch.testing.assert_close(out[k], diag[k], rtol=1e-12, atol=1e-12)


def test_sophia_h_matches_optax_sophia_h_on_a_separable_objective():
    """With a diagonal Hessian every Hutchinson draw is exact, so funcopt's and JAX's different
    random signs give the same estimates: the trajectories must agree."""
    jax = pytest.importorskip("jax", reason="the optax oracle needs jax")
    optax = pytest.importorskip("optax", reason="the optax oracle needs optax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    target = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) for k, v in P.items()}

    def f_torch(p):
        return sum(0.5 * ((p[k] - target[k]) ** 2).sum() + 0.05 * ((p[k] - target[k]) ** 4).sum() for k in p)

    jtarget = {k: jnp.asarray(v.numpy()) for k, v in target.items()}

    def f_jax(p):
        return sum(0.5 * ((p[k] - jtarget[k]) ** 2).sum() + 0.05 * ((p[k] - jtarget[k]) ** 4).sum() for k in p)

    kwargs = dict(learning_rate=0.05, update_interval=2, gamma=0.05, weight_decay=0.01)
    ours, theirs = funcopt.sophia(**kwargs), optax.contrib.sophia(**kwargs)
    p, op = P, {k: jnp.asarray(v.numpy()) for k, v in P.items()}
    s, os_ = ours.init(p), theirs.init(op)
    oupdate = jax.jit(theirs.update, static_argnames=("obj_fn",))
    for _ in range(20):
        u, s = ours.update(torch.func.grad(f_torch)(p), s, p, obj_fn=f_torch)
        p = funcopt.apply_updates(p, u)
        ou, os_ = oupdate(jax.grad(f_jax)(op), os_, op, obj_fn=f_jax)
        op = optax.apply_updates(op, ou)
        for k in p:
            torch.testing.assert_close(p[k], torch.from_numpy(np.array(op[k])), rtol=1e-9, atol=1e-12)
    assert float(f_torch(p)) < 0.5 * float(f_torch(P))


def test_hessian_refreshes_every_update_interval_steps_also_under_vmap():
    calls = []

    def counting(updates, state, params=None, **extra):
        calls.append(1)
        return tree.map(lambda g: g * g + 1.0, updates), state

    est = funcopt.GradientTransformation(lambda p: funcopt.EmptyState(), counting)
    tx = funcopt.scale_by_sophia(update_interval=3, hessian_diagonal_fn=est)
    params = {"x": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    state = tx.init(params)
    nus = []
    for i in range(7):
        _, state = tx.update({"x": params["x"] * (i + 1)}, state, params)
        nus.append(state.nu["x"].clone())
    assert len(calls) == 3  # steps 0, 3, 6
    assert torch.equal(nus[1], nus[0]) and torch.equal(nus[2], nus[0]) and not torch.equal(nus[3], nus[2])
    # under vmap the estimator runs every step but only refresh steps count
    stacked = tree.stack([params, params])
    vstate = torch.func.vmap(tx.init)(stacked)
    for i in range(7):
        _, vstate = torch.func.vmap(lambda g, s, p: tx.update(g, s, p))({"x": stacked["x"] * (i + 1)}, vstate, stacked)
    torch.testing.assert_close(vstate.nu["x"][1], state.nu["x"], rtol=1e-15, atol=0)


def test_gnb_estimator_is_batch_size_times_squared_sampled_grads():
    est = funcopt.gnb_estimator_diag_hessian(batch_size=32)
    g = {"x": torch.tensor([0.5, -2.0])}
    out, _ = est.update(g, est.init(g), g, sampled_grads={"x": torch.tensor([0.1, 0.3])})
    torch.testing.assert_close(out["x"], torch.tensor([0.32, 2.88]))
    with pytest.raises(funcopt.FuncoptError, match="sampled_grads"):
        est.update(g, est.init(g), g)


def test_missing_obj_fn_and_bad_arguments_are_explained():
    tx = funcopt.sophia(1e-3)
    p = {"x": torch.ones(2)}
    with pytest.raises(funcopt.FuncoptError, match="needs `obj_fn`"):
        tx.update(p, tx.init(p), p)
    with pytest.raises(funcopt.FuncoptError, match="update_interval"):
        funcopt.sophia(1e-3, update_interval=0)
    with pytest.raises(funcopt.FuncoptError, match="b1"):
        funcopt.sophia(1e-3, b1=1.5)
