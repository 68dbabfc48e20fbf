"""Blocks and wrappers optax users expect (catalog C of issue 20), against optax itself.

Deterministic blocks follow optax's trajectories on the float64 problem of
tests/test_optax_parity.py (50 steps, rtol 1e-9); noise blocks are checked for their
distribution (and their generator against JAX's Threefry), reproducibility, ``vmap`` and
bitwise checkpoint resume.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import funcopt
from funcopt import tree
from tests.helpers import assert_trees_equal

jax = pytest.importorskip("jax", reason="the optax oracle needs jax (pip install -e '.[test]')")
optax = pytest.importorskip("optax", reason="the optax oracle needs optax (pip install -e '.[test]')")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

from tests.test_optax_parity import _to_jax, _to_torch, initial_params, value_and_grad  # noqa: E402


def optax_trajectories(ours, theirs, steps=50, params=None, grad_fn=None, jax_params=None):
    """Runs funcopt's ``ours`` and optax's ``theirs`` for ``steps`` steps on the parity problem
    (gradients by torch from each side's own params); returns the two lists of params."""
    params = initial_params() if params is None else params
    grad_fn = grad_fn or (lambda p: value_and_grad(p)[1])
    oparams = _to_jax(params) if jax_params is None else jax_params
    state, ostate = ours.init(params), theirs.init(oparams)
    a, b = [], []
    for _ in range(steps):
        updates, state = ours.update(grad_fn(params), state, params)
        params = funcopt.apply_updates(params, updates)
        oupdates, ostate = theirs.update(_to_jax(grad_fn(_to_torch(oparams))), ostate, oparams)
        oparams = optax.apply_updates(oparams, oupdates)
        a.append(params)
        b.append(_to_torch(oparams))
    return a, b


def assert_same_trajectories(a, b, rtol=1e-9):
    assert max(float((a[-1][k] - initial_params()[k]).abs().max()) for k in a[-1]) > 1e-6, "nothing moved"
    for step, (x, y) in enumerate(zip(a, b)):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=rtol, atol=rtol * 1e-3, msg=lambda m, s=step, k=k: f"step {s} {k}: {m}")


def _resumes_bitwise(tx, params, grads_fn, tmp_path, steps=3):
    def run(p, s, start, n):
        for i in range(start, start + n):
            u, s = tx.update(grads_fn(p, i), s, p)
            p = funcopt.apply_updates(p, u)
        return p, s

    straight = run(params, tx.init(params), 0, 2 * steps)
    half = run(params, tx.init(params), 0, steps)
    path = tmp_path / "ckpt.safetensors"
    funcopt.checkpoint.save(path, {"params": half[0], "opt_state": half[1]})
    restored = funcopt.checkpoint.load(path, like={"params": params, "opt_state": tx.init(params)})
    assert_trees_equal(run(restored["params"], restored["opt_state"], steps, steps), straight)


# ---------------------------------------------------------------------------------------------
# add_noise and its generator


def test_generator_is_jax_threefry():
    from jax.extend.random import threefry_2x32

    from funcopt.transforms._random import threefry2x32

    rng = np.random.default_rng(0)
    key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
    x = rng.integers(0, 2**32, size=(2, 64), dtype=np.uint64).astype(np.uint32)
    expected = np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(x.reshape(-1)))).reshape(2, 64)
    t = [torch.tensor(v.astype(np.int64)) for v in (key[0], key[1], x[0], x[1])]
    y0, y1 = threefry2x32(*t)
    np.testing.assert_array_equal(y0.numpy(), expected[0].astype(np.int64))
    np.testing.assert_array_equal(y1.numpy(), expected[1].astype(np.int64))


def _noise_samples(tx, n=40_000, steps=3, dtype=torch.float64):
    params = {"x": torch.zeros(n, dtype=dtype)}
    state, draws = tx.init(params), []
    for _ in range(steps):
        updates, state = tx.update(params, state, params)
        draws.append(updates["x"])
    return draws


def test_add_noise_is_gaussian_with_optax_variance_schedule():
    eta, gamma = 0.3, 0.55
    draws = _noise_samples(funcopt.add_noise(eta, gamma, key=5))
    oparams = {"x": jnp.zeros(40_000)}
    otx = optax.add_noise(eta, gamma, key=5)
    ostate = otx.init(oparams)
    for t, z in enumerate(draws, start=1):
        std = math.sqrt(eta / t**gamma)
        oz, ostate = otx.update(oparams, ostate, oparams)
        ostd = float(np.std(np.asarray(oz["x"])))
        # the sample std of 4e4 normals is within 4 * std / sqrt(2n) = 1.4 % of std
        assert abs(float(z.std()) - std) < 0.015 * std and abs(ostd - std) < 0.015 * std
        assert abs(float(z.mean())) < 4 * std / math.sqrt(z.numel())
        # a Kolmogorov-Smirnov distance to the normal CDF
        sorted_z = torch.sort(z / std).values
        cdf = 0.5 * (1 + torch.erf(sorted_z / math.sqrt(2)))
        ks = float((cdf - torch.arange(1, z.numel() + 1, dtype=torch.float64) / z.numel()).abs().max())
        assert ks < 1.63 / math.sqrt(z.numel()) + 1e-4  # 1 % level
    # successive steps are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack(draws[:2]))[0, 1])) < 4 / math.sqrt(40_000)


def test_add_noise_is_reproducible_per_key_and_independent_per_leaf():
    params = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    tx = funcopt.add_noise(1.0, 0.0, key=1)
    u1, _ = tx.update(params, tx.init(params), params)
    u2, _ = tx.update(params, tx.init(params), params)
    assert_trees_equal(u1, u2)
    # the state's key decides, not the factory's
    same, _ = funcopt.add_noise(1.0, 0.0, key=2).update(params, tx.init(params), params)
    assert_trees_equal(same, u1)
    v, _ = funcopt.add_noise(1.0, 0.0, key=2).update(params, funcopt.add_noise(1.0, 0.0, key=2).init(params), params)
    assert abs(float(torch.corrcoef(torch.stack([u1["a"], v["a"]]))[0, 1])) < 0.15
    assert abs(float(torch.corrcoef(torch.stack([u1["a"], u1["b"]]))[0, 1])) < 0.15


def test_add_noise_under_vmap_equals_a_loop_and_seeds_can_differ():
    params = {"w": torch.zeros(4, 3, dtype=torch.float64)}
    tx = funcopt.add_noise(0.5, 0.55, key=0)
    stacked = tree.stack([params] * 3)
    state = torch.func.vmap(tx.init)(stacked)
    state = state._replace(rng_key=torch.tensor([0, 7, 9]))
    for _ in range(2):
        updates, state = torch.func.vmap(tx.update)(stacked, state, stacked)
    for j, seed in enumerate((0, 7, 9)):
        s = funcopt.AddNoiseState(torch.tensor(1), torch.tensor(seed))
        expected, _ = tx.update(params, s, params)
        torch.testing.assert_close(updates["w"][j], expected["w"], rtol=0, atol=0)
    assert not torch.equal(updates["w"][0], updates["w"][1])


def test_add_noise_resumes_bitwise(tmp_path):
    params = {"w": torch.randn(5, 4), "b": torch.randn(4, dtype=torch.float64)}
    tx = funcopt.chain(funcopt.add_noise(0.1, 0.55, key=3), funcopt.sgd(0.1))
    _resumes_bitwise(tx, params, lambda p, i: tree.map(lambda x: x * 0.5, p), tmp_path)


def test_add_noise_rejects_bad_arguments():
    with pytest.raises(funcopt.FuncoptError, match="eta"):
        funcopt.add_noise(-1.0, 0.5)
    with pytest.raises(funcopt.FuncoptError, match="key"):
        funcopt.add_noise(1.0, 0.5, key=1.5)
    with pytest.raises(funcopt.FuncoptError, match="add_noise"):
        funcopt.add_noise(1.0, 0.5).update({"x": torch.zeros(2)}, funcopt.EmptyState(), None)
