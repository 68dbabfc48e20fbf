"""update/apply_updates refuse mismatched inputs with a FuncoptError naming the user's path and
the fix, for every optimizer (the checks live in ``chain``, not in each optimizer)."""

from __future__ import annotations

import pytest
import torch

import funcopt
from funcopt.base import check_update_inputs

OPTIMIZERS = {
    "adam": lambda: funcopt.adam(1e-2),  # has a fast route
    "sgd_momentum": lambda: funcopt.sgd(0.1, momentum=0.9),
    "adamw_masked": lambda: funcopt.adamw(1e-2, mask=lambda p: {k: k == "w" for k in p}),  # reference path
    "adafactor": lambda: funcopt.adafactor(1e-2),  # factored state: other ranks than the params
    "lion_injected": lambda: funcopt.inject_hyperparams(funcopt.lion)(learning_rate=1e-3),
}


def _params(dtype=torch.float32):
    return {"w": torch.randn(4, 3, dtype=dtype), "b": torch.randn(3, dtype=dtype)}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matching_inputs_pass_and_give_the_unchecked_result(name):
    tx, params = OPTIMIZERS[name](), _params()
    state = tx.init(params)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    updates, _ = tx.update(grads, state, params)
    with funcopt.fast.fast_path_enabled(False):
        expected, _ = tx.update(grads, state, params)
    for k in params:
        torch.testing.assert_close(updates[k], expected[k])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradients_are_never_broadcast(name):
    tx, params = OPTIMIZERS[name](), _params()
    state = tx.init(params)
    grads = {"w": torch.ones(1, 3), "b": torch.ones(3)}
    with pytest.raises(funcopt.FuncoptError, match=r"gradient at \['w'\] has shape \(1, 3\) but the parameter has \(4, 3\)"):
        tx.update(grads, state, params)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_float64_gradients_for_float32_params_name_the_cast(name):
    tx, params = OPTIMIZERS[name](), _params()
    grads = {k: torch.ones_like(v, dtype=torch.float64) for k, v in params.items()}
    with pytest.raises(funcopt.FuncoptError, match=r"gradient at \['b'\] has dtype torch.float64 but the parameter has torch.float32.*cast"):
        tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_missing_gradient_key_is_named_from_the_users_trees(name):
    tx, params = OPTIMIZERS[name](), _params()
    state = tx.init(params)
    with pytest.raises(funcopt.FuncoptError, match=r"params and grads have different pytree structures.*\['b'\]"):
        tx.update({"w": torch.ones(4, 3)}, state, params)
    if name != "adafactor":  # adafactor needs params; the others also check without them
        with pytest.raises(funcopt.FuncoptError, match=r"grads.*\['b'\].*one entry per parameter"):
            tx.update({"w": torch.ones(4, 3)}, state)


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "adafactor", "lion_injected"])
def test_a_state_built_for_other_params_is_refused(name):
    tx = OPTIMIZERS[name]()
    state = tx.init({"w": torch.zeros(1, 3), "b": torch.zeros(3)})  # broadcastable against (4, 3)
    params = _params()
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    shapes = r"\(1, 1\), but init builds \(4, 1\)" if name == "adafactor" else r"\(1, 3\), but init builds \(4, 3\)"
    with pytest.raises(funcopt.FuncoptError, match=r"state's leaf .*\['w'\] has shape " + shapes):
        tx.update(grads, state, params)


def test_integer_gradients_and_params_are_refused():
    tx = funcopt.sgd(0.1)
    params = {"n": torch.arange(6), "w": torch.zeros(2)}
    with pytest.raises(funcopt.FuncoptError, match=r"parameter at \['n'\] has dtype torch.int64"):
        tx.update({"n": torch.ones(6), "w": torch.zeros(2)}, tx.init(params), params)
    with pytest.raises(funcopt.FuncoptError, match=r"gradient at \['n'\] has dtype torch.int64"):
        tx.update({"n": torch.arange(6), "w": torch.zeros(2)}, tx.init(params))


def test_apply_updates_never_broadcasts():
    with pytest.raises(funcopt.FuncoptError, match=r"update at \['w'\] has shape \(4, 3\) but the parameter has \(1, 3\)"):
        funcopt.apply_updates({"w": torch.zeros(1, 3)}, {"w": torch.ones(4, 3)})


def test_nested_chains_and_vmap_and_compile_free_paths_still_work():
    """Checks run once, at the outermost chain; under vmap the logical shapes are checked."""
    inner = funcopt.chain(funcopt.scale_by_adam(), funcopt.scale(-1e-2))
    tx = funcopt.chain(funcopt.clip_by_global_norm(1.0), inner)
    params = _params(torch.float64)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    updates, _ = tx.update(grads, tx.init(params), params)
    assert updates["w"].shape == (4, 3)
    stacked = {k: v.expand(2, *v.shape).clone() for k, v in params.items()}
    state = funcopt.tree.stack([tx.init(params), tx.init(params)])
    out, _ = torch.func.vmap(lambda g, s, p: tx.update(g, s, p))(stacked, state, stacked)
    assert out["w"].shape == (2, 4, 3)
    with pytest.raises(funcopt.FuncoptError, match="never broadcasts"):
        bad = dict(stacked, w=stacked["w"][:, :1])
        torch.func.vmap(lambda g, s, p: tx.update(g, s, p))(bad, state, stacked)


def test_the_check_reads_no_tensor_data():
    """Metadata only: meta tensors (no data at all) pass through the check."""
    tx = funcopt.adam(1e-2)
    params = {k: v.to("meta") for k, v in _params().items()}
    check_update_inputs(tx.init, params, tx.init(params), params)
    with pytest.raises(funcopt.FuncoptError, match="never broadcasts"):
        check_update_inputs(tx.init, dict(params, w=params["w"][:1]), tx.init(params), None)


def test_per_example_blocks_opt_out_and_the_check_runs_after_them():
    """chain(differentially_private_aggregate, adam) takes (batch, *shape) gradients: the check
    runs on the aggregated updates; against torch.optim.Adam fed the hand-clipped mean."""
    gen = torch.Generator().manual_seed(1)
    params = {k: v.double() for k, v in _params().items()}
    clip, lr = 0.5, 1e-2
    dp = funcopt.transforms.differentially_private_aggregate(clip, 0.0)
    tx = funcopt.chain(dp, funcopt.adam(lr))
    assert funcopt.base.takes_batched_updates(dp) and funcopt.base.takes_batched_updates(tx)
    assert not funcopt.base.takes_batched_updates(funcopt.adam(lr))
    nested = funcopt.chain(funcopt.chain(dp, funcopt.trace(0.9)), funcopt.scale(-lr))
    assert funcopt.base.takes_batched_updates(nested)
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(ref.values(), lr=lr)
    state, n_state = tx.init(params), nested.init(params)
    p = params
    for _ in range(4):
        per_example = {k: torch.randn(6, *v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
        norms = torch.sqrt(sum((g.reshape(6, -1) ** 2).sum(1) for g in per_example.values()))
        factor = torch.clamp(clip / norms, max=1.0)
        for k, r in ref.items():
            r.grad = (per_example[k] * factor.view(-1, *[1] * r.dim())).mean(0)
        opt.step()
        updates, state = tx.update(per_example, state, p)
        p = funcopt.apply_updates(p, updates)
        nested.update(per_example, n_state, p)
    for k in params:
        torch.testing.assert_close(p[k], ref[k].detach(), rtol=1e-12, atol=1e-14)
    # the aggregated updates are still checked against the params (here: an extra axis)
    bad = {k: torch.ones(6, 1, *v.shape, dtype=torch.float64) for k, v in params.items()}
    with pytest.raises(funcopt.FuncoptError, match=r"update at \['b'\] returned by the chain's first 1 member.*per-example"):
        tx.update(bad, tx.init(params), params)
    with pytest.raises(TypeError, match="GradientTransformation"):
        funcopt.base.batched_updates(funcopt.adam)


def test_a_returned_state_skips_the_full_check_but_changes_are_still_caught(monkeypatch):
    """Given back the state its last update returned, with gradients and params like the last
    ones, the chain compares only those; anything else runs the full check again."""
    import funcopt.base as base_module

    calls = []
    full = base_module.check_update_inputs
    monkeypatch.setattr(base_module, "check_update_inputs", lambda *a, **k: calls.append(1) or full(*a, **k))
    tx, params = funcopt.sgd(0.1, momentum=0.9), _params(torch.float64)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    with funcopt.fast.fast_path_enabled(False):  # the reference chain
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params)
        assert len(calls) == 1
        with pytest.raises(funcopt.FuncoptError, match=r"gradient at \['w'\] has shape \(1, 3\)"):
            tx.update(dict(grads, w=torch.ones(1, 3, dtype=torch.float64)), state, params)
        with pytest.raises(funcopt.FuncoptError, match="has dtype torch.float32 but the parameter has torch.float64"):
            tx.update({k: v.float() for k, v in grads.items()}, state, params)
        _, state = tx.update(grads, state, params)
        state[0].momentum_buffer["w"] = torch.zeros(1, 3, dtype=torch.float64)  # the returned dict changed in place
        with pytest.raises(funcopt.FuncoptError, match=r"state's leaf .*\['w'\] has shape \(1, 3\)"):
            tx.update(grads, state, params)
    # the memo's steps give the full check's numbers: 4 momentum steps against torch.optim.SGD
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.SGD(ref.values(), lr=0.1, momentum=0.9)
    p, s = params, tx.init(params)
    with funcopt.fast.fast_path_enabled(False):
        for i in range(4):
            g = {k: torch.full_like(v, float(i + 1)) for k, v in params.items()}
            for k, r in ref.items():
                r.grad = g[k].clone()
            opt.step()
            u, s = tx.update(g, s, p)
            p = funcopt.apply_updates(p, u)
    for k in params:
        torch.testing.assert_close(p[k], ref[k].detach(), rtol=1e-14, atol=0)


def test_the_state_shape_memo_is_per_optimizer():
    """Two L-BFGS with different memory sizes build different state shapes for the same params:
    the remembered shapes of one must not judge the other's state."""
    params = {"w": torch.zeros(3, 4, dtype=torch.float64)}
    grads = {"w": torch.ones(3, 4, dtype=torch.float64)}
    for memory_size in (10, 5, 10):
        tx = funcopt.scale_by_lbfgs(memory_size=memory_size)
        state = tx.init(params)
        funcopt.chain(tx).update(grads, funcopt.chain(tx).init(params), params)
        tx.update(grads, state, params)


def test_inject_hyperparams_fresh_inner_chains_do_not_rebuild_the_state_on_meta(monkeypatch):
    """inject_hyperparams builds its inner optimizer at every update: the expected state shapes
    are found once, not on meta tensors at every step, and a foreign state is still refused."""
    import funcopt.base as base_module

    built = []
    original = base_module._expected_state_shapes
    monkeypatch.setattr(base_module, "_expected_state_shapes", lambda *a: built.append(1) or original(*a))
    tx = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2)
    params = _params(torch.float64)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    state = tx.init(params)
    with funcopt.fast.fast_path_enabled(False):  # the reference chain (the fast route plans its own checks)
        for _ in range(4):
            _, state = tx.update(grads, state, params)
        assert len(built) <= 1  # once (or never, where an earlier test saw these shapes)
        foreign = tx.init({"w": torch.zeros(1, 3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)})
        with pytest.raises(funcopt.FuncoptError, match=r"state's leaf .*\['w'\] has shape \(1, 3\)"):
            tx.update(grads, foreign, params)
