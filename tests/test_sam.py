"""sam (optax.contrib.sam): both modes against each other, optax's opaque mode, a closed form.

The transparent mode's trajectory against optax itself is in the registry rows ``sam_sgd`` and
``sam_momentum_sync3_no_reset`` (tests/test_optax_parity.py), which also run every battery.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import funcopt
from funcopt import tree

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)


def quadratic(p):
    w = p["w"]
    return 0.5 * w @ A @ w + torch.sin(w).sum()


def test_one_sam_step_is_the_papers_closed_form():
    """w' = w - lr * grad(w + rho * g / ||g||), with g = grad(w)."""
    lr, rho = 0.1, 0.05
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    grad = torch.func.grad(quadratic)
    g = grad({"w": w})["w"]
    expected = w - lr * grad({"w": w + rho * g / g.norm()})["w"]
    for opaque in (False, True):
        tx = funcopt.sam(funcopt.sgd(lr), rho=rho, opaque_mode=opaque)
        params, state = {"w": w}, tx.init({"w": w})
        for _ in range(1 if opaque else 2):
            updates, state = tx.update(grad(params), state, params, grad_fn=lambda p, i: grad(p))
            params = funcopt.apply_updates(params, updates)
        torch.testing.assert_close(params["w"], expected, rtol=1e-14, atol=1e-15)


def test_transparent_and_opaque_modes_follow_one_trajectory():
    grad = torch.func.grad(quadratic)
    p0 = {"w": torch.tensor([1.5, 0.5], dtype=torch.float64)}
    transparent = funcopt.sam(funcopt.adam(0.05), funcopt.chain(funcopt.normalize(), funcopt.sgd(0.1, momentum=0.5)), 3)
    opaque = funcopt.sam(
        funcopt.adam(0.05), funcopt.chain(funcopt.normalize(), funcopt.sgd(0.1, momentum=0.5)), 3, opaque_mode=True
    )
    pt, st = p0, transparent.init(p0)
    po, so = p0, opaque.init(p0)
    for _ in range(10):
        for _ in range(3):
            updates, st = transparent.update(grad(pt), st, pt)
            pt = funcopt.apply_updates(pt, updates)
        updates, so = opaque.update(grad(po), so, po, grad_fn=lambda p, i: grad(p))
        po = funcopt.apply_updates(po, updates)
        torch.testing.assert_close(pt["w"], po["w"], rtol=1e-12, atol=1e-14)
    assert so.cache is None and int(st.steps_since_sync) == 0


def test_opaque_mode_matches_optax_opaque_mode():
    jax = pytest.importorskip("jax", reason="the optax oracle needs jax")
    optax = pytest.importorskip("optax", reason="the optax oracle needs optax")
    jax.config.update("jax_enable_x64", True)
    grad = torch.func.grad(quadratic)

    def to_torch(p):
        return {"w": torch.from_numpy(np.array(p["w"]))}

    def to_jax(p):
        return {"w": jax.numpy.asarray(p["w"].numpy())}

    calls = []

    def ograd_fn(p, i):
        calls.append(i)
        return to_jax(grad(to_torch(p)))

    ours = funcopt.sam(funcopt.sgd(0.1, momentum=0.9), rho=0.05, sync_period=3, opaque_mode=True)
    theirs = optax.contrib.sam(
        optax.sgd(0.1, momentum=0.9), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), sync_period=3, opaque_mode=True
    )
    p = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    op = to_jax(p)
    s, os_ = ours.init(p), theirs.init(op)
    for _ in range(15):
        u, s = ours.update(grad(p), s, p, grad_fn=lambda q, i: grad(q))
        p = funcopt.apply_updates(p, u)
        ou, os_ = theirs.update(to_jax(grad(to_torch(op))), os_, op, grad_fn=ograd_fn)
        op = optax.apply_updates(op, ou)
        torch.testing.assert_close(p["w"], to_torch(op)["w"], rtol=1e-12, atol=1e-14)
    assert calls[:2] == [0, 1]


def test_sync_period_one_is_the_plain_optimizer():
    grad = torch.func.grad(quadratic)
    p0 = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    tx, plain = funcopt.sam(funcopt.adam(0.1), sync_period=1), funcopt.adam(0.1)
    p, s, q, t = p0, tx.init(p0), p0, plain.init(p0)
    for _ in range(5):
        u, s = tx.update(grad(p), s, p)
        p = funcopt.apply_updates(p, u)
        v, t = plain.update(grad(q), t, q)
        q = funcopt.apply_updates(q, v)
    torch.testing.assert_close(p["w"], q["w"], rtol=1e-14, atol=1e-15)


def test_sam_lowers_the_loss_of_a_small_regression_under_vmap():
    """Three ensemble members trained with SAM under torch.func.vmap equal three separate runs."""
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)

    def loss(p):
        return ((x @ p["w"] - y) ** 2).mean()

    tx = funcopt.sam(funcopt.sgd(0.1), rho=0.05)
    members = [{"w": torch.full((3,), float(s), dtype=torch.float64)} for s in range(3)]

    def run(p, s):
        for _ in range(20):
            u, s = tx.update(torch.func.grad(loss)(p), s, p)
            p = funcopt.apply_updates(p, u)
        return p

    stacked = tree.stack(members)
    out = torch.func.vmap(lambda p: run(p, tx.init(p)))(stacked)
    for j, m in enumerate(members):
        expected = run(m, tx.init(m))
        torch.testing.assert_close(out["w"][j], expected["w"], rtol=1e-12, atol=1e-14)
        assert loss(expected) < 0.2 * loss(m)


def test_errors_say_what_to_pass():
    p = {"w": torch.zeros(2)}
    tx = funcopt.sam(funcopt.sgd(0.1), opaque_mode=True)
    with pytest.raises(funcopt.FuncoptError, match="needs `grad_fn`"):
        tx.update(p, tx.init(p), p)
    with pytest.raises(funcopt.FuncoptError, match="sync_period"):
        funcopt.sam(funcopt.sgd(0.1), sync_period=0)
    with pytest.raises(funcopt.FuncoptError, match="rho"):
        funcopt.sam(funcopt.sgd(0.1), rho=0.0)
    with pytest.raises(funcopt.FuncoptError, match="needs the current parameters"):
        funcopt.sam(funcopt.sgd(0.1)).update(p, funcopt.sam(funcopt.sgd(0.1)).init(p))
    with pytest.raises(TypeError, match="optimizer"):
        funcopt.sam(funcopt.sgd)
