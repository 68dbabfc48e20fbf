"""dpsgd / differentially_private_aggregate (optax.contrib): per-example gradients from
``torch.func.vmap(torch.func.grad)``, against optax with the noise off and statistically with it
on; the registry batteries' checks (purity, vmap, bitwise resume) for its batched input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import funcopt
from funcopt import tree
from tests.helpers import assert_trees_close, assert_trees_equal, snapshot

G = torch.Generator().manual_seed(0)
X = torch.randn(12, 4, generator=G, dtype=torch.float64)
Y = torch.randn(12, 2, generator=G, dtype=torch.float64)
P0 = {"w": torch.randn(4, 2, generator=G, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}


def loss_one(params, x, y):
    return ((torch.tanh(x @ params["w"] + params["b"]) - y) ** 2).sum()


per_example = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))


def _train(tx, params, steps, state=None):
    state = tx.init(params) if state is None else state
    for _ in range(steps):
        updates, state = tx.update(per_example(params, X, Y), state, params)
        params = funcopt.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("momentum,nesterov", [(None, False), (0.9, False), (0.9, True)])
def test_matches_optax_dpsgd_without_noise(momentum, nesterov):
    jax = pytest.importorskip("jax", reason="the optax oracle needs jax")
    optax = pytest.importorskip("optax", reason="the optax oracle needs optax")
    jax.config.update("jax_enable_x64", True)
    ours = funcopt.dpsgd(0.1, l2_norm_clip=0.5, noise_multiplier=0.0, seed=0, momentum=momentum, nesterov=nesterov)
    theirs = optax.contrib.dpsgd(0.1, l2_norm_clip=0.5, noise_multiplier=0.0, seed=0, momentum=momentum, nesterov=nesterov)
    p, op = P0, {k: jax.numpy.asarray(v.numpy()) for k, v in P0.items()}
    s, os_ = ours.init(p), theirs.init(op)
    clipped = 0
    for _ in range(20):
        g = per_example(p, X, Y)
        clipped += int(funcopt.per_example_global_norm_clip(g, 0.5)[1])
        u, s = ours.update(g, s, p)
        p = funcopt.apply_updates(p, u)
        og = per_example({k: torch.from_numpy(np.array(v)) for k, v in op.items()}, X, Y)
        ou, os_ = theirs.update({k: jax.numpy.asarray(v.numpy()) for k, v in og.items()}, os_, op)
        op = optax.apply_updates(op, ou)
        for k in p:
            torch.testing.assert_close(p[k], torch.from_numpy(np.array(op[k])), rtol=1e-10, atol=1e-13)
    assert clipped > 0, "no example was clipped: the comparison would not exercise clipping"


def test_noise_has_the_documented_law_and_matches_optax_statistically():
    jax = pytest.importorskip("jax", reason="the optax oracle needs jax")
    optax = pytest.importorskip("optax", reason="the optax oracle needs optax")
    jax.config.update("jax_enable_x64", True)
    clip, sigma, batch, n = 2.0, 1.5, 8, 20_000
    zeros = {"x": torch.zeros(batch, n, dtype=torch.float64)}  # zero gradients: only the noise remains
    tx = funcopt.differentially_private_aggregate(clip, sigma, key=3)
    otx = optax.contrib.differentially_private_aggregate(clip, sigma, key=3)
    state, ostate = tx.init({"x": torch.zeros(n)}), otx.init(None)
    std = clip * sigma / batch
    draws = []
    for _ in range(2):
        out, state = tx.update(zeros, state)
        oout, ostate = otx.update({"x": jax.numpy.zeros((batch, n))}, ostate)
        z, oz = out["x"], np.asarray(oout["x"])
        assert z.shape == (n,)
        # 4-sigma bounds for the sample std (relative error ~ 1/sqrt(2n)) and mean
        tol = 4 / math.sqrt(2 * n)
        assert abs(float(z.std()) / std - 1) < tol and abs(float(oz.std()) / std - 1) < tol
        assert abs(float(z.mean())) < 4 * std / math.sqrt(n)
        draws.append(z)
    assert abs(float(torch.corrcoef(torch.stack(draws))[0, 1])) < 4 / math.sqrt(n)
    assert int(state.count) == 2


def test_update_is_pure_vmaps_and_resumes_bitwise(tmp_path):
    tx = funcopt.dpsgd(0.05, l2_norm_clip=1.0, noise_multiplier=0.8, seed=4, momentum=0.5)
    params, state = _train(tx, P0, 2)
    grads = per_example(params, X, Y)
    before, versions = snapshot((grads, state, params)), [x._version for x in tree.leaves((grads, state, params))]
    tx.update(grads, state, params)
    assert_trees_equal((grads, state, params), before)
    assert versions == [x._version for x in tree.leaves((grads, state, params))]

    # 3 + 3 steps through a checkpoint equal 6 straight steps, noise included
    straight = _train(tx, P0, 6)
    half = _train(tx, P0, 3)
    path = tmp_path / "dp.safetensors"
    funcopt.checkpoint.save(path, {"params": half[0], "opt_state": half[1]})
    restored = funcopt.checkpoint.load(path, like={"params": P0, "opt_state": tx.init(P0)})
    assert_trees_equal(_train(tx, restored["params"], 3, restored["opt_state"]), straight)

    # an ensemble of three under vmap equals three runs (the members share the seed)
    members = [tree.map(lambda v, s=s: v + 0.1 * s, P0) for s in range(3)]
    stacked = tree.stack(members)
    out, _ = torch.func.vmap(lambda p: _train(tx, p, 2))(stacked)
    for j, m in enumerate(members):
        assert_trees_close(tree.map(lambda v, j=j: v[j], out), _train(tx, m, 2)[0], rtol=1e-12, atol=1e-14)


def test_grads_without_a_batch_axis_are_rejected_with_the_path():
    tx = funcopt.dpsgd(0.1, 1.0, 1.0)
    with pytest.raises(funcopt.FuncoptError, match=r"\['w'\].*per-example"):
        tx.update({"w": torch.zeros(4, 2), "b": torch.zeros(12, 2)}, tx.init(P0), P0)
    with pytest.raises(funcopt.FuncoptError, match="noise_multiplier"):
        funcopt.dpsgd(0.1, 1.0, -1.0)
