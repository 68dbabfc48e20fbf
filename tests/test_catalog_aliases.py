"""What the registry batteries cannot show for optax's aliases (catalog A): the statistics of
noisy_sgd's noise, polyak_sgd's ``value=`` contract and sps+ clipping, SM3's per-axis state
against a direct implementation of the paper, NovoGrad's per-leaf state, the fast routes'
``explain``. Trajectories against optax itself: tests/test_optax_parity.py (registry rows)."""

from __future__ import annotations

import pytest
import torch

import funcopt
from funcopt import tree

# ---------------------------------------------------------------------------------------------
# noisy_sgd: the noise is a pure function of (key, step); its distribution is optax's


def _noise(tx, params, steps):
    """The noise n_t of each step: with zero gradients and learning rate 1, updates = -n_t."""
    state = tx.init(params)
    zeros = tree.map(torch.zeros_like, params)
    out = []
    for _ in range(steps):
        updates, state = tx.update(zeros, state, params)
        out.append(torch.cat([-u.reshape(-1) for u in tree.leaves(updates)]))
    return out


def test_noisy_sgd_noise_has_the_annealed_variance_and_zero_mean():
    eta, gamma = 0.5, 0.55
    params = {"w": torch.zeros(200, 100, dtype=torch.float64), "b": torch.zeros(1000, dtype=torch.float64)}
    noise = _noise(funcopt.noisy_sgd(1.0, eta=eta, gamma=gamma, key=7), params, 3)
    n = noise[0].numel()
    for t, x in enumerate(noise, start=1):
        var = eta / t**gamma  # optax.add_noise: std = sqrt(eta / t**gamma)
        # sample mean ~ N(0, var / n); sample variance ~ var * (1 +- sqrt(2 / n)): 5 sigma bounds
        assert abs(float(x.mean())) < 5 * (var / n) ** 0.5, t
        assert abs(float(x.var()) / var - 1) < 5 * (2 / n) ** 0.5, t
        # roughly Gaussian: 68.3% within one standard deviation
        assert abs(float((x.abs() < var**0.5).double().mean()) - 0.6827) < 0.01, t
    # independent across steps and across the elements of one step
    assert abs(float(torch.corrcoef(torch.stack(noise[:2]))[0, 1])) < 5 / n**0.5
    assert abs(float(torch.corrcoef(torch.stack([noise[0][:-1], noise[0][1:]]))[0, 1])) < 5 / n**0.5


def test_noisy_sgd_noise_is_reproducible_from_the_key_and_differs_between_keys():
    params = {"w": torch.zeros(50, dtype=torch.float32)}
    a = _noise(funcopt.noisy_sgd(1.0, key=3), params, 2)
    b = _noise(funcopt.noisy_sgd(1.0, key=3), params, 2)
    c = _noise(funcopt.noisy_sgd(1.0, key=4), params, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[0], a[1])
    assert a[0].dtype == torch.float32


def test_noisy_sgd_ensemble_members_with_their_own_keys_under_vmap():
    """Stacking different seeds into the state's key gives each vmapped member its own noise,
    equal to that member's unbatched run."""
    params = {"w": torch.zeros(6, dtype=torch.float64)}
    tx = funcopt.noisy_sgd(1.0, eta=1.0)
    keys = [11, 12, 13]
    singles = [_noise(funcopt.noisy_sgd(1.0, eta=1.0, key=k), params, 2) for k in keys]
    stacked = tree.stack([params] * 3)
    state = torch.func.vmap(tx.init)(stacked)
    noise_state = state[0]._replace(rng_key=torch.tensor(keys, dtype=state[0].rng_key.dtype))
    state = (noise_state, *state[1:])
    zeros = tree.map(torch.zeros_like, stacked)
    for t in range(2):
        updates, state = torch.func.vmap(tx.update)(zeros, state, stacked)
        for j in range(3):
            torch.testing.assert_close(-updates["w"][j], singles[j][t], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# polyak_sgd: value= is required; the step size in closed form; sps+


def test_polyak_sgd_without_value_says_to_pass_the_loss():
    params = {"w": torch.ones(3)}
    tx = funcopt.polyak_sgd()
    with pytest.raises(funcopt.FuncoptError, match=r"scale_by_polyak needs the loss.*value=loss"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(funcopt.FuncoptError, match="variant must be one of"):
        funcopt.polyak_sgd(variant="sps++")


@pytest.mark.parametrize("variant", ["sps", "sps+"])
def test_polyak_step_in_closed_form(variant):
    g = {"a": torch.tensor([3.0, 4.0], dtype=torch.float64), "b": torch.tensor([[12.0]], dtype=torch.float64)}
    params = tree.map(torch.zeros_like, g)
    sq = 9.0 + 16.0 + 144.0  # ||g||**2 = 169
    cases = [(84.5 + 1.0, 1.0, 10.0, 0.5), (1e4, 0.0, 0.25, 0.25), (0.5, 1.0, 1.0, -0.5 / sq)]
    for value, f_min, max_lr, expected in cases:  # uncapped, capped, negative gap
        if variant == "sps+":
            expected = max(expected, 0.0)
        tx = funcopt.polyak_sgd(max_learning_rate=max_lr, f_min=f_min, variant=variant)
        updates, _ = tx.update(g, tx.init(params), params, value=torch.tensor(value, dtype=torch.float64))
        for k in g:
            torch.testing.assert_close(updates[k], -expected * g[k], rtol=1e-15, atol=0)
    # a zero gradient gives a zero step, not a division by zero
    tx = funcopt.polyak_sgd()
    zero = tree.map(torch.zeros_like, g)
    updates, _ = tx.update(zero, tx.init(params), params, value=torch.tensor(1.0))
    assert all(torch.equal(u, torch.zeros_like(u)) for u in tree.leaves(updates))


def test_polyak_sgd_reaches_the_minimum_of_a_quadratic_through_make_step():
    """make_step passes value=loss: Polyak's step 1/2 on 0.5 * ||x||**2 (f_min = 0) halves x."""
    params = {"x": torch.tensor([2.0, -4.0], dtype=torch.float64)}
    tx = funcopt.polyak_sgd(max_learning_rate=10.0)
    step = funcopt.make_step(lambda p: 0.5 * (p["x"] ** 2).sum(), tx, donate=False)
    state = tx.init(params)
    params, state, _ = step(params, state)
    torch.testing.assert_close(params["x"], torch.tensor([1.0, -2.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# SM3 on matrices and 3-D leaves, against the paper's definition written element by element


def _sm3_reference(grads: list[torch.Tensor], b1: float, eps: float) -> list[torch.Tensor]:
    """SM3-II (b2 = 1) on one 3-D leaf with explicit loops over its index covers."""
    shape = grads[0].shape
    rows = [torch.zeros(n, dtype=torch.float64) for n in shape]
    m = torch.zeros(shape, dtype=torch.float64)
    outs = []
    for g in grads:
        acc = torch.empty(shape, dtype=torch.float64)
        for i in range(shape[0]):
            for j in range(shape[1]):
                for k in range(shape[2]):
                    acc[i, j, k] = min(rows[0][i], rows[1][j], rows[2][k]) + g[i, j, k] ** 2
        rows = [acc.amax(dim=(1, 2)), acc.amax(dim=(0, 2)), acc.amax(dim=(0, 1))]
        m = b1 * m + (1 - b1) * g / torch.sqrt(acc + eps)
        outs.append(m.clone())
    return outs


def test_sm3_three_dim_leaf_matches_the_paper_and_keeps_one_vector_per_axis():
    gen = torch.Generator().manual_seed(0)
    shape = (4, 3, 5)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4)]
    tx = funcopt.scale_by_sm3(b1=0.9)
    params = {"k": torch.zeros(shape, dtype=torch.float64), "v": torch.zeros(7, dtype=torch.float64),
              "s": torch.zeros((), dtype=torch.float64)}
    state = tx.init(params)
    assert [tuple(v.shape) for v in state.mu["k"]] == [(4,), (3,), (5,)]  # 12 numbers, not 60
    assert [tuple(v.shape) for v in state.mu["v"]] == [(7,)] and [v.shape for v in state.mu["s"]] == [()]
    expected = _sm3_reference(grads, 0.9, 1e-8)
    for g, want in zip(grads, expected):
        full = {"k": g, "v": torch.ones(7, dtype=torch.float64), "s": torch.tensor(2.0, dtype=torch.float64)}
        out, state = tx.update(full, state, params)
        torch.testing.assert_close(out["k"], want, rtol=1e-13, atol=1e-15)
    # 1-D and 0-dim leaves keep the full Adagrad accumulator: 4 steps of g = 1 (resp. 2) sum to 4 (16)
    torch.testing.assert_close(state.mu["v"][0], torch.full((7,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(state.mu["s"][0], torch.tensor(16.0, dtype=torch.float64))


def test_sm3_rejects_complex_leaves_naming_the_path():
    with pytest.raises(funcopt.FuncoptError, match=r"\['z'\] is complex"):
        funcopt.sm3(0.1).init({"z": torch.zeros(2, dtype=torch.complex64)})


# ---------------------------------------------------------------------------------------------
# NovoGrad's per-leaf second moment; the fast routes


def test_novograd_keeps_one_second_moment_per_leaf():
    params = {"w": torch.ones(3, 2, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float64)}
    tx = funcopt.scale_by_novograd(b2=0.5)
    state = tx.init(params)
    g = {"w": torch.full((3, 2), 2.0), "b": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    out, state = tx.update(g, state, params)
    assert state.nu["w"].shape == () and state.nu["w"].dtype == torch.float32
    torch.testing.assert_close(state.nu["b"], torch.tensor(25.0, dtype=torch.float64))  # ||g||**2 at step 1
    torch.testing.assert_close(out["b"], g["b"] / (5.0 + 1e-8))
    _, state = tx.update(g, state, params)
    torch.testing.assert_close(state.nu["b"], torch.tensor(25.0, dtype=torch.float64))  # 0.5 * 25 + 0.5 * 25
    with pytest.raises(funcopt.FuncoptError, match="needs the current parameters"):
        funcopt.novograd(0.1, weight_decay=0.1).update(g, funcopt.novograd(0.1, weight_decay=0.1).init(params))


@pytest.mark.parametrize(
    "factory",
    [funcopt.adabelief, funcopt.adan, funcopt.amsgrad, funcopt.adamaxw, funcopt.nadamw, funcopt.yogi,
     funcopt.sign_sgd, funcopt.signum, funcopt.optimistic_gradient_descent, funcopt.optimistic_adam_v2],
    ids=lambda f: f.__name__,
)
def test_elementwise_aliases_take_their_fast_route(factory):
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    tx = factory(1e-2)
    route = funcopt.fast.explain(tx, params, tx.init(params), params)
    assert route.route == "fast" and route.backend == "torch", str(route)
    masked = factory(1e-2, mask={"w": True, "b": False}) if "mask" in factory.fast_route.unsupported else None
    if masked is not None:
        assert funcopt.fast.explain(masked, params, masked.init(params), params).route == "reference"
