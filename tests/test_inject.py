"""inject_hyperparams: bitwise parity with the plain optimizers, schedules, set/get, vmap sweeps."""

import pytest
import torch

import funcopt
from funcopt import schedules, tree
from tests import registry
from tests.helpers import assert_trees_close, assert_trees_equal, mlp_problem, nested_params, snapshot


def _train(tx, params, loss_fn, steps, name=None):
    """``steps`` updates on ``loss_fn``'s gradients (passing the loss where registry row ``name`` reads it)."""
    state = tx.init(params)
    for _ in range(steps):
        grads, value = torch.func.grad_and_value(loss_fn)(params)
        extras = registry.update_kwargs(name, value) if name is not None else {}
        updates, state = tx.update(grads, state, params, **extras)
        params = funcopt.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", registry.names(plain=True))  # the rows of funcopt.optimizers' factories
def test_injected_equals_plain_bitwise_float64(name):
    row = registry.row(name)
    _, params, loss_fn, _ = mlp_problem(torch.float64, n=8, hidden=4)
    expected, _ = _train(row.make(), params, loss_fn, 4, name)
    # masks given as functions of the params (lars' weight_decay_mask=...) are never schedules
    injected = funcopt.inject_hyperparams(row.factory)(**row.kwargs)
    got, state = _train(injected, params, loss_fn, 4, name)
    assert_trees_equal(got, expected, msg=name)
    assert isinstance(state, funcopt.InjectHyperparamsState)
    assert state.count.item() == 4
    for key, value in state.hyperparams.items():
        assert value.dtype == torch.float64 and value.shape == (), key


def test_float32_params_keep_their_dtype():
    _, params, loss_fn, _ = mlp_problem(torch.float32, n=16)
    got, _ = _train(funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2), params, loss_fn, 3)
    expected, _ = _train(funcopt.adam(1e-2), params, loss_fn, 3)
    assert_trees_close(got, expected, rtol=1e-6, atol=1e-7)
    assert all(x.dtype == torch.float32 for x in tree.leaves(got))


def test_hyperparams_hold_floats_and_defaults_not_static_args():
    tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1, momentum=0.9, nesterov=True)
    state = tx.init({"w": torch.zeros(2)})
    assert sorted(state.hyperparams) == ["dampening", "learning_rate", "momentum", "weight_decay"]
    assert state.hyperparams["momentum"].item() == 0.9
    assert funcopt.get_hyperparams(state)["learning_rate"].item() == 0.1
    tx = funcopt.inject_hyperparams(funcopt.adamw)(mask={"w": True})
    assert "mask" not in tx.init({"w": torch.zeros(2)}).hyperparams


def test_schedule_values_are_recorded_in_state():
    sched = schedules.exponential_decay(1.0, 1, 0.5)
    tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=sched)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = tx.init(params)
    assert state.hyperparams["learning_rate"].item() == 1.0
    grads = {"w": torch.ones(3, dtype=torch.float64)}
    for k in range(1, 5):
        updates, state = tx.update(grads, state, params)
        assert state.hyperparams["learning_rate"].item() == 0.5 ** (k - 1)
        assert updates["w"][0].item() == -(0.5 ** (k - 1))


def test_set_hyperparams_changes_the_next_step_and_is_pure():
    _, params, loss_fn, _ = mlp_problem(torch.float64, n=16)
    tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1, momentum=0.9)
    params, state = _train(tx, params, loss_fn, 2)
    before = snapshot(state)
    new_state = funcopt.set_hyperparams(state, learning_rate=0.01)
    assert_trees_equal(state, before)  # input untouched
    assert new_state.hyperparams["learning_rate"].dtype == torch.float64
    assert new_state.hyperparams["learning_rate"].item() == 0.01
    # reference: plain sgd with the momentum buffer carried over and the new lr
    grads = torch.func.grad(loss_fn)(params)
    got, _ = tx.update(grads, new_state, params)
    ref_tx = funcopt.sgd(0.01, momentum=0.9, weight_decay=torch.tensor(0.0))  # the injected chain has the L2 block
    expected, _ = ref_tx.update(grads, new_state.inner_state, params)
    assert_trees_equal(got, expected)


def test_set_hyperparams_reaches_inside_chains_and_wrappers():
    tx = funcopt.chain(
        funcopt.clip_by_global_norm(1.0), funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-3)
    )
    state = tx.init(nested_params())
    state = funcopt.set_hyperparams(state, learning_rate=5e-4, b1=0.8)
    assert funcopt.get_hyperparams(state)["learning_rate"].item() == 5e-4
    assert funcopt.get_hyperparams(state)["b1"].item() == 0.8


def test_vmapped_eight_learning_rates_equal_eight_runs():
    """A batched state.hyperparams['learning_rate'] trains 8 configurations at once."""
    _, params, loss_fn, _ = mlp_problem(torch.float64, n=8, hidden=4)
    lrs = torch.logspace(-3, -0.5, 8, dtype=torch.float64)
    tx = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-3, b1=0.9)
    steps = 3

    expected = []
    for lr in lrs:
        p = params
        state = funcopt.set_hyperparams(tx.init(p), learning_rate=lr)
        for _ in range(steps):
            updates, state = tx.update(torch.func.grad(loss_fn)(p), state, p)
            p = funcopt.apply_updates(p, updates)
        expected.append(p)

    def step(p, state):
        updates, state = tx.update(torch.func.grad(loss_fn)(p), state, p)
        return funcopt.apply_updates(p, updates), state

    state0 = tx.init(params)
    stacked_state = tree.stack([state0] * 8)
    stacked_state = funcopt.set_hyperparams(stacked_state, learning_rate=lrs)
    assert stacked_state.hyperparams["learning_rate"].shape == (8,)
    stacked = tree.stack([params] * 8)
    batched_step = torch.func.vmap(step)
    for _ in range(steps):
        stacked, stacked_state = batched_step(stacked, stacked_state)
    for j in range(8):
        assert_trees_close(tree.unstack(stacked)[j], expected[j], rtol=1e-12, atol=1e-14, msg=f"config {j}")
    # the configurations really differ
    assert not torch.allclose(expected[0]["0.weight"], expected[-1]["0.weight"])


def test_hyperparam_dtype_option():
    tx = funcopt.inject_hyperparams(funcopt.sgd, hyperparam_dtype=torch.float32)(learning_rate=0.1)
    state = tx.init({"w": torch.zeros(2)})
    assert state.hyperparams["learning_rate"].dtype == torch.float32


def test_errors_are_clear():
    with pytest.raises(funcopt.FuncoptError, match="inject_hyperparams\\(adam\\)"):
        funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-3, beta1=0.9)
    with pytest.raises(funcopt.FuncoptError, match="learning_rate must be >= 0"):
        funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=-1.0)
    state = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1).init({"w": torch.zeros(1)})
    with pytest.raises(funcopt.FuncoptError, match=r"Unknown hyperparameter\(s\) \['lr'\]"):
        funcopt.set_hyperparams(state, lr=0.1)
    plain = funcopt.sgd(0.1).init({"w": torch.zeros(1)})
    with pytest.raises(funcopt.FuncoptError, match="no inject_hyperparams state"):
        funcopt.set_hyperparams(plain, learning_rate=0.1)
    with pytest.raises(funcopt.FuncoptError, match="No inject_hyperparams state"):
        funcopt.get_hyperparams(plain)
    tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1)
    with pytest.raises(funcopt.FuncoptError, match="InjectHyperparamsState"):
        tx.update({"w": torch.zeros(1)}, plain)
