"""make_step / apply_gradients: donated and pure steps agree; donated inputs are invalidated and caught."""

from __future__ import annotations

import pytest
import torch

import funcopt
from funcopt import tree
from funcopt.train_step import DonatedValueError, apply_gradients, is_donated, make_step
from tests.helpers import assert_trees_close, assert_trees_equal, mlp_problem, snapshot

OPTIMIZERS = {
    "adam": lambda: funcopt.adam(1e-2),
    "adamw_amsgrad": lambda: funcopt.adamw(1e-2, amsgrad=True),
    "sgd_momentum_l2": lambda: funcopt.sgd(0.1, momentum=0.9, weight_decay=1e-3),
    "sgd_plain": lambda: funcopt.sgd(0.1),
    "adagrad": lambda: funcopt.adagrad(0.1),
    "rmsprop_centered": lambda: funcopt.rmsprop(1e-2, centered=True, momentum=0.5),
    "lion": lambda: funcopt.lion(1e-3),
    # no fast path: the updates are added into the donated params in place
    "nadam": lambda: funcopt.nadam(1e-2),
    "chain_clip_adam": lambda: funcopt.chain(funcopt.clip_by_global_norm(1.0), funcopt.adam(1e-2)),
    "inject_adam": lambda: funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2),
}


def _clone(t):
    return tree.map(torch.clone, t)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_donated_step_equals_pure_step(name):
    _, params, loss_fn, (X, Y) = mlp_problem(torch.float64)
    tx = OPTIMIZERS[name]()
    pure, donated = make_step(loss_fn, tx, donate=False), make_step(loss_fn, tx, donate=True)
    pa, sa = _clone(params), tx.init(params)
    pb, sb = _clone(params), tx.init(params)
    first_loss = None
    for _ in range(4):
        pa, sa, la = pure(pa, sa, X, Y)
        pb, sb, lb = donated(pb, sb, X, Y)
        torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-14)
        first_loss = la if first_loss is None else first_loss
    assert_trees_close((pb, sb), (pa, sa), rtol=1e-12, atol=1e-14)
    assert la < first_loss


def test_donated_inputs_are_invalidated_and_reuse_is_caught():
    _, params, loss_fn, (X, Y) = mlp_problem()
    tx = funcopt.adam(1e-2)
    step = make_step(loss_fn, tx)
    state = tx.init(params)
    old_params, old_state = params, state
    params, state, _ = step(params, state, X, Y)
    for leaf in tree.leaves(old_params) + [old_state[0].count]:
        assert is_donated(leaf) and leaf.shape == (0,)
    # The moment buffers were updated in place and handed on: the old state aliases the new one.
    assert all(a is b for a, b in zip(tree.leaves(old_state[0].mu), tree.leaves(state[0].mu)))
    assert not any(is_donated(x) for x in tree.leaves((params, state)))
    with pytest.raises(DonatedValueError, match=r"params\['0.bias'\] was donated"):
        step(old_params, state, X, Y)
    with pytest.raises(DonatedValueError, match=r"opt_state\[0\].count was donated"):
        step(params, old_state, X, Y)
    with pytest.raises(DonatedValueError, match="donate=False"):
        apply_gradients(tx, params, state, old_params, donate=True)
    # The step keeps working with the values it returned.
    params, state, loss = step(params, state, X, Y)
    assert torch.isfinite(loss)


def test_donated_step_reuses_the_param_and_state_buffers():
    _, params, loss_fn, (X, Y) = mlp_problem()
    tx = funcopt.sgd(0.1, momentum=0.9)
    step = make_step(loss_fn, tx)
    state = tx.init(params)
    pointers = {x.data_ptr() for x in tree.leaves((params, state[0].momentum_buffer))}
    params, state, _ = step(params, state, X, Y)
    assert {x.data_ptr() for x in tree.leaves((params, state[0].momentum_buffer))} == pointers


def test_pure_step_never_writes_into_its_inputs():
    _, params, loss_fn, (X, Y) = mlp_problem()
    tx = funcopt.adam(1e-2)
    step = make_step(loss_fn, tx, donate=False)
    state = tx.init(params)
    params, state, _ = step(params, state, X, Y)
    before = snapshot((params, state))
    versions = [x._version for x in tree.leaves((params, state))]
    step(params, state, X, Y)
    assert_trees_equal((params, state), before)
    assert versions == [x._version for x in tree.leaves((params, state))]


def test_apply_gradients_only_reads_the_gradients():
    _, params, loss_fn, _ = mlp_problem()
    for tx in (funcopt.adam(1e-2, maximize=True, weight_decay=0.1), funcopt.rmsprop(weight_decay=0.1), funcopt.nadam()):
        grads = torch.func.grad(loss_fn)(params)
        before = snapshot(grads)
        p, s = apply_gradients(tx, grads, tx.init(params), _clone(params), donate=True)
        assert_trees_equal(grads, before)
        expected = funcopt.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
        assert_trees_close(p, expected, rtol=1e-6, atol=1e-7)


def test_no_donation_where_it_is_not_valid():
    _, params, loss_fn, (X, Y) = mlp_problem(torch.float64)
    tx = funcopt.adam(1e-2)
    # params requiring grad: the step is pure and leaves them intact
    leafy = tree.map(lambda p: p.clone().requires_grad_(), params)
    new, _ = apply_gradients(tx, tree.map(torch.ones_like, params), tx.init(params), leafy, donate=True)
    assert all(x.shape != (0,) and not is_donated(x) for x in tree.leaves(leafy))
    assert_trees_close(tree.map(torch.detach, new), funcopt.apply_updates(params, tree.map(lambda p: torch.full_like(p, -1e-2), params)), rtol=1e-7, atol=1e-9)
    # under vmap: a batch of models, each equal to its own unbatched step
    stacked = tree.stack([params, _clone(params)])
    states = torch.func.vmap(tx.init)(stacked)
    step = make_step(loss_fn, tx, donate=True)
    new_p, _, losses = torch.func.vmap(step)(stacked, states)
    single_p, _, single_loss = make_step(loss_fn, tx, donate=False)(params, tx.init(params))
    assert_trees_close(tree.unstack(new_p)[1], single_p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(losses[0], single_loss)
    assert not any(is_donated(x) for x in tree.leaves(stacked))


def test_tied_params_are_not_updated_twice():
    w = torch.randn(3, dtype=torch.float64)
    params = {"a": w, "b": w}
    grads = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    for tx in (funcopt.sgd(0.5), funcopt.nadam(0.5)):
        expected = funcopt.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
        got, _ = apply_gradients(tx, grads, tx.init(params), {"a": w.clone(), "b": w.clone()}, donate=True)
        assert_trees_close(got, expected)
        tied = w.clone()
        got, _ = apply_gradients(tx, grads, tx.init(params), {"a": tied, "b": tied}, donate=True)
        assert_trees_close(got, expected)


def test_module_parameters_follow_a_donated_step_with_extract_copy_false():
    module, _, _, (X, Y) = mlp_problem()
    params, _ = funcopt.nn.extract(module, copy=False)

    def loss_fn(p):
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(module, p, None, X), Y)

    tx = funcopt.sgd(0.5)
    step = make_step(loss_fn, tx)
    params, state, loss0 = step(params, tx.init(params))
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), params[name])
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(module(X), Y) < loss0


def test_has_aux_and_extra_value_argument():
    seen = {}

    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return tree.map(lambda g: -0.1 * g, updates), state

    tx = funcopt.GradientTransformation(lambda p: funcopt.EmptyState(), update)
    _, params, loss_fn, (X, Y) = mlp_problem()
    step = make_step(lambda p: (loss_fn(p), {"n": torch.tensor(3)}), tx, has_aux=True)
    p, s, loss, aux = step(params, tx.init(params))
    assert aux["n"] == 3 and torch.equal(seen["value"], loss)
    assert isinstance(s, funcopt.EmptyState) and p["0.weight"].shape == (8, 4)


def test_type_errors_name_the_argument():
    with pytest.raises(TypeError, match="GradientTransformation as tx"):
        make_step(lambda p: p, funcopt.adam)
    with pytest.raises(TypeError, match="callable loss_fn"):
        make_step(3, funcopt.adam())
    with pytest.raises(TypeError, match="GradientTransformation as tx"):
        apply_gradients(funcopt.sgd, {}, (), {})


def test_donated_steps_recheck_replaced_params_and_edited_state():
    """Later donated steps reuse the first step's checks only for the very buffers it returned."""
    _, params, loss_fn, _ = mlp_problem(torch.float64)
    tx = funcopt.adam(1e-2)
    grads = torch.func.grad(loss_fn)(params)

    def pure(p, s):
        u, s = tx.update(grads, s, p)
        return funcopt.apply_updates(p, u), s

    p, s = apply_gradients(tx, grads, tx.init(params), _clone(params), donate=True)
    p, s = apply_gradients(tx, grads, s, p, donate=True)  # same buffers: remembered checks
    # new params in new memory with the remembered state
    fresh = tree.map(lambda x: x.clone() * 0.5, p)
    expected = pure(_clone(fresh), tree.map(torch.clone, s))
    p, s = apply_gradients(tx, grads, s, fresh, donate=True)
    assert_trees_close((p, s), expected, rtol=1e-12, atol=1e-14)
    # a state whose moment dict was edited in place by the user
    s[0].mu["0.bias"] = s[0].mu["0.bias"].clone() + 1.0
    expected = pure(_clone(p), tree.map(torch.clone, s))
    p, s = apply_gradients(tx, grads, s, p, donate=True)
    assert_trees_close((p, s), expected, rtol=1e-12, atol=1e-14)
    # gradients of another dtype, or aliasing a written buffer, are not taken by the remembered plan
    fast = tx.update._funcopt_fast_path
    assert fast._replan(grads, s, p) is not None
    assert fast._replan(tree.map(lambda x: x.float(), grads), s, p) is None
    assert fast._replan(s[0].nu, s, p) is None


def test_step_gradients_equal_torch_func_including_aux_and_unused_params():
    _, params, loss_fn, (X, Y) = mlp_problem(torch.float64)
    params = dict(params, unused=torch.ones(2, dtype=torch.float64))
    tx = funcopt.sgd(0.1)

    def with_aux(p, x, y):
        loss = loss_fn({k: v for k, v in p.items() if k != "unused"}, x, y)
        return loss, {"twice": 2 * loss}

    grads, (loss, aux) = torch.func.grad_and_value(with_aux, has_aux=True)(params, X, Y)
    expected = funcopt.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    p, _, got_loss, got_aux = make_step(with_aux, tx, has_aux=True, donate=False)(params, tx.init(params), X, Y)
    assert_trees_close(p, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_loss, loss)
    torch.testing.assert_close(got_aux["twice"], aux["twice"])
    assert not got_loss.requires_grad and not got_aux["twice"].requires_grad
    assert torch.equal(p["unused"], params["unused"])
    # a loss that does not depend on the params gives zero gradients, as torch.func does
    p, _, _ = make_step(lambda p: torch.tensor(1.0), tx, donate=False)(params, tx.init(params))
    assert_trees_equal(p, params)
