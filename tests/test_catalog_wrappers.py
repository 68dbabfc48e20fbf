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
from tests.helpers import assert_trees_close, assert_trees_equal

jax = pytest.importorskip("jax", reason="the optax oracle needs jax (pip install -e '.[test]')")
optax = pytest.importorskip("optax", reason="the optax oracle needs optax (pip install -e '.[test]')")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

from tests.test_optax_parity import _to_jax, _to_torch, initial_params, value_and_grad  # noqa: E402


def optax_trajectories(ours, theirs, steps=50, params=None, grad_fn=None):
    """Runs funcopt's ``ours`` and optax's ``theirs`` for ``steps`` steps on the parity problem;
    ``grad_fn(params, step)`` (default: the parity objective's gradient, by torch from each
    side's own params). Returns the two lists of params after each step."""
    params = initial_params() if params is None else params
    grad_fn = grad_fn or (lambda p, i: value_and_grad(p)[1])
    oparams = _to_jax(params)
    state, ostate = ours.init(params), theirs.init(oparams)
    oupdate = jax.jit(theirs.update)
    a, b = [], []
    for i in range(steps):
        updates, state = ours.update(grad_fn(params, i), state, params)
        params = funcopt.apply_updates(params, updates)
        oupdates, ostate = oupdate(_to_jax(grad_fn(_to_torch(oparams), i)), ostate, oparams)
        oparams = optax.apply_updates(oparams, oupdates)
        a.append(params)
        b.append(_to_torch(oparams))
    return a, b


def assert_same_trajectories(a, b, rtol=1e-9, start=None):
    start = initial_params() if start is None else start
    assert max(float((a[-1][k] - start[k]).abs().max()) for k in a[-1]) > 1e-6, "nothing moved"
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


# ---------------------------------------------------------------------------------------------
# Stateless rescalings, against optax's trajectories


def _sgd(lr=0.1):
    return funcopt.sgd(lr), optax.sgd(lr)


@pytest.mark.parametrize(
    "case",
    [
        "adaptive_grad_clip", "clip_by_block_rms", "normalize_by_update_norm", "centralize", "zero_nans",
        "keep_params_nonnegative",
    ],
)
def test_block_trajectory_matches_optax(case):
    ours_sgd, their_sgd = _sgd()
    params, grad_fn = None, None
    if case == "adaptive_grad_clip":  # axis=0 on every leaf (optax's own default differs by layout)
        ours = funcopt.chain(funcopt.adaptive_grad_clip(0.05, eps=1e-3, axis=0), ours_sgd)
        theirs = optax.chain(optax.adaptive_grad_clip(0.05, eps=1e-3, axis=0), their_sgd)
    elif case == "clip_by_block_rms":
        ours = funcopt.chain(funcopt.clip_by_block_rms(0.8), ours_sgd)
        theirs = optax.chain(optax.clip_by_block_rms(0.8), their_sgd)
    elif case == "normalize_by_update_norm":
        ours, theirs = funcopt.normalize_by_update_norm(-0.1), optax.normalize_by_update_norm(-0.1)
    elif case == "centralize":
        ours, theirs = funcopt.chain(funcopt.centralize(), ours_sgd), optax.chain(optax.centralize(), their_sgd)
    elif case == "zero_nans":  # every third step, a NaN in two leaves
        def grad_fn(p, i):
            g = value_and_grad(p)[1]
            if i % 3 == 1:
                g["w"] = g["w"].clone()
                g["w"][1, 2] = float("nan")
                g["k"] = torch.full_like(g["k"], float("nan"))
            return g

        ours, theirs = funcopt.chain(funcopt.zero_nans(), ours_sgd), optax.chain(optax.zero_nans(), their_sgd)
    else:
        params = tree.map(torch.abs, initial_params())
        ours = funcopt.chain(funcopt.sgd(0.3), funcopt.keep_params_nonnegative())
        theirs = optax.chain(optax.sgd(0.3), optax.keep_params_nonnegative())
    a, b = optax_trajectories(ours, theirs, steps=20, params=params, grad_fn=grad_fn)
    assert_same_trajectories(a, b, start=params)
    if case == "keep_params_nonnegative":
        assert all(bool((x >= 0).all()) for x in a[-1].values()) and any(bool((x == 0).any()) for x in a[-1].values())


def test_zero_nans_records_where_it_found_them():
    tx = funcopt.zero_nans()
    params = {"a": torch.zeros(3), "b": torch.zeros(2)}
    state = tx.init(params)
    assert not any(bool(x) for x in tree.leaves(state.found_nan))
    out, state = tx.update({"a": torch.tensor([1.0, float("nan"), float("inf")]), "b": torch.ones(2)}, state)
    assert torch.equal(out["a"], torch.tensor([1.0, 0.0, float("inf")]))
    assert bool(state.found_nan["a"]) and not bool(state.found_nan["b"])


def test_unitwise_norm_default_is_optax_default_on_transposed_layouts():
    from optax.transforms import _clipping as optax_clipping

    g = torch.Generator().manual_seed(0)
    linear = torch.randn(6, 3, generator=g, dtype=torch.float64)  # torch (out, in); JAX (in, out)
    conv = torch.randn(8, 3, 3, 3, generator=g, dtype=torch.float64)  # torch OIHW; JAX HWIO
    for x, to_jax in ((linear, (1, 0)), (conv, (2, 3, 1, 0))):
        ours = funcopt.unitwise_norm(x).permute(*to_jax)
        theirs = np.asarray(optax_clipping.unitwise_norm(jnp.asarray(x.permute(*to_jax).numpy())))
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-12)
    vec = torch.randn(1, 5, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(
        funcopt.unitwise_norm(vec).numpy(), np.asarray(optax_clipping.unitwise_norm(jnp.asarray(vec.numpy()))), rtol=1e-12
    )


def test_adaptive_grad_clip_bounds_each_output_unit():
    p = {"w": torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)}
    u = {"w": torch.tensor([[30.0, 40.0], [1.0, 0.0]], dtype=torch.float64)}
    out, _ = funcopt.adaptive_grad_clip(0.1, eps=1e-3).update(u, funcopt.EmptyState(), p)
    # row 0: ||p|| = 5 so the limit is 0.5 (norm 50 -> 0.5); row 1: ||p|| floored at eps -> 1e-4
    torch.testing.assert_close(out["w"][0], torch.tensor([0.3, 0.4], dtype=torch.float64))
    torch.testing.assert_close(out["w"][1], torch.tensor([1e-4, 0.0], dtype=torch.float64))
    with pytest.raises(funcopt.FuncoptError, match="needs the current parameters"):
        funcopt.adaptive_grad_clip(0.1).update(u, funcopt.EmptyState())


def test_normalize_matches_optax_contrib():
    grads = value_and_grad(initial_params())[1]
    ours, _ = funcopt.normalize().update(grads, funcopt.EmptyState())
    theirs, _ = optax.contrib.normalize().update(_to_jax(grads), optax.EmptyState())
    assert_trees_equal_close(ours, _to_torch(theirs))
    torch.testing.assert_close(tree.norm(ours), torch.tensor(1.0, dtype=torch.float64))


def assert_trees_equal_close(a, b, rtol=1e-12):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=0.0)


def test_per_example_global_norm_clip_matches_optax():
    g = torch.Generator().manual_seed(3)
    grads = {"w": torch.randn(7, 5, 4, generator=g, dtype=torch.float64), "b": torch.randn(7, 4, generator=g, dtype=torch.float64)}
    grads["w"][2] = 0.0
    grads["b"][2] = 0.0  # a zero gradient is not clipped
    for clip in (0.0, 1.0, 3.0, float("inf")):
        ours, n = funcopt.per_example_global_norm_clip(grads, clip)
        theirs, on = optax.per_example_global_norm_clip([_to_jax(grads)[k] for k in ("b", "w")], clip)
        for k, t in zip(("b", "w"), theirs):
            torch.testing.assert_close(ours[k], torch.from_numpy(np.array(t)), rtol=1e-12, atol=1e-15)
        assert int(n) == int(on)
    with pytest.raises(funcopt.FuncoptError, match=r"\['w'\] has shape \(7, 2\).*same batch size"):
        funcopt.per_example_global_norm_clip({"w": torch.zeros(7, 2), "b": torch.zeros(6)}, 1.0)


# ---------------------------------------------------------------------------------------------
# skip_updates_if with optax's predicates, against optax.MultiSteps(every_k_schedule=1)


def _sometimes_bad(p, i):
    g = value_and_grad(p)[1]
    if i % 5 == 2:
        g["b"] = g["b"].clone()
        g["b"][0] = float("inf") if i % 2 else float("nan")
    if i % 7 == 3:
        g = tree.map(lambda x: x * 100.0, g)
    return g


@pytest.mark.parametrize("predicate", ["skip_not_finite", "skip_large_updates"])
def test_skip_updates_if_matches_optax_multisteps(predicate):
    import functools

    if predicate == "skip_not_finite":
        fn, ofn = funcopt.skip_not_finite, optax.skip_not_finite
    else:
        fn = functools.partial(funcopt.skip_large_updates, max_squared_norm=5000.0)
        ofn = functools.partial(optax.skip_large_updates, max_squared_norm=5000.0)
    ours = funcopt.skip_updates_if(funcopt.adam(0.05), fn)
    theirs = optax.MultiSteps(optax.adam(0.05), 1, should_skip_update_fn=ofn, accumulator_dtype=jnp.float64)
    a, b = optax_trajectories(ours, theirs.gradient_transformation(), steps=30, grad_fn=_sometimes_bad)
    assert_same_trajectories(a, b)
    # the state counts the applied steps and keeps the predicate's report
    params = initial_params()
    state = ours.init(params)
    for i in range(30):
        updates, state = ours.update(_sometimes_bad(params, i), state, params)
        params = funcopt.apply_updates(params, updates)
    skipped = 6 if predicate == "skip_not_finite" else None
    if skipped is not None:
        assert int(state.gradient_step) == 30 - skipped
    assert set(state.skip_state) == {"should_skip", "num_not_finite" if skipped else "norm_squared"}


def test_skip_updates_if_rejects_a_bad_predicate():
    tx = funcopt.skip_updates_if(funcopt.sgd(0.1), lambda u, s, p: (True, {}))
    with pytest.raises(funcopt.FuncoptError, match="0-dim bool tensor"):
        tx.init({"x": torch.zeros(2)})
    with pytest.raises(funcopt.FuncoptError, match="should_skip_update_fn must be a function"):
        funcopt.skip_updates_if(funcopt.sgd(0.1), None)


# ---------------------------------------------------------------------------------------------
# lookahead


@pytest.mark.parametrize("reset_state", [False, True])
def test_lookahead_matches_optax_in_both_layouts(reset_state):
    ours = funcopt.lookahead(funcopt.adam(0.05), sync_period=4, slow_step_size=0.5, reset_state=reset_state)
    theirs = optax.lookahead(optax.adam(0.05), sync_period=4, slow_step_size=0.5, reset_state=reset_state)
    p0 = initial_params()
    plain, state = p0, ours.init(p0)
    pair = funcopt.LookaheadParams.init_synced(p0)
    pair_state = ours.init(pair)
    opair = optax.LookaheadParams.init_synced(_to_jax(p0))
    ostate = theirs.init(opair)
    oupdate = jax.jit(theirs.update)
    for _ in range(30):
        updates, state = ours.update(value_and_grad(plain)[1], state, plain)
        plain = funcopt.apply_updates(plain, updates)
        pupdates, pair_state = ours.update(value_and_grad(pair.fast)[1], pair_state, pair)
        pair = funcopt.apply_updates(pair, pupdates)
        oupdates, ostate = oupdate(_to_jax(value_and_grad(_to_torch(opair.fast))[1]), ostate, opair)
        opair = optax.apply_updates(opair, oupdates)
        for k in p0:
            for got in (plain[k], pair.fast[k]):
                torch.testing.assert_close(got, _to_torch(opair.fast)[k], rtol=1e-9, atol=1e-12)
            for got in (funcopt.lookahead_slow_params(state)[k], pair.slow[k]):
                torch.testing.assert_close(got, _to_torch(opair.slow)[k], rtol=1e-9, atol=1e-12)
    assert int(state.steps_since_sync) == 30 % 4
    assert not torch.equal(funcopt.lookahead_slow_params(state)["w"], p0["w"])


def test_lookahead_layout_mismatch_and_missing_state_are_explained():
    tx = funcopt.lookahead(funcopt.sgd(0.1), sync_period=2, slow_step_size=0.5)
    p = {"x": torch.ones(2)}
    with pytest.raises(funcopt.FuncoptError, match="same kind of params"):
        tx.update(p, tx.init(p), funcopt.LookaheadParams.init_synced(p))
    with pytest.raises(funcopt.FuncoptError, match="no lookahead state"):
        funcopt.lookahead_slow_params(funcopt.sgd(0.1).init(p))
    with pytest.raises(funcopt.FuncoptError, match="sync_period"):
        funcopt.lookahead(funcopt.sgd(0.1), sync_period=0, slow_step_size=0.5)


# ---------------------------------------------------------------------------------------------
# ema_params, against torch.optim.swa_utils.AveragedModel


def test_ema_params_equals_torch_averaged_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tx = funcopt.ema_params(funcopt.sgd(0.1), decay=0.9)
    state = tx.init(params)
    assert_trees_equal(funcopt.ema_params_of(state), params)

    def loss(p):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    for _ in range(10):
        opt.zero_grad()
        loss(dict(model.named_parameters())).backward()
        opt.step()
        averaged.update_parameters(model)
        updates, state = tx.update(torch.func.grad(loss)(params), state, params)
        params = funcopt.apply_updates(params, updates)
    expected = {k.removeprefix("module."): v.detach() for k, v in averaged.named_parameters()}
    # torch's SGD adds -lr * g in one fused op, funcopt in two: the trajectories agree to rounding
    assert_trees_close(funcopt.ema_params_of(state), expected, rtol=1e-12, atol=1e-14)
    assert not torch.equal(expected["0.weight"], params["0.weight"])
    with pytest.raises(funcopt.FuncoptError, match="no ema_params state"):
        funcopt.ema_params_of(funcopt.sgd(0.1).init(params))
