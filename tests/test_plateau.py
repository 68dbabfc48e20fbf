"""reduce_on_plateau vs torch.optim.lr_scheduler.ReduceLROnPlateau."""

import copy

import pytest
import torch

import funcopt
from funcopt import tree
from funcopt.transforms._plateau import ReduceOnPlateauState, reduce_on_plateau
from tests.helpers import assert_trees_close, mlp_problem

BASE = 0.1


def _losses():
    g = torch.Generator().manual_seed(0)
    noisy = (torch.linspace(2, 1, 300, dtype=torch.float64) + 0.05 * torch.randn(300, generator=g, dtype=torch.float64)).tolist()
    # a descent, a flat stretch, more descent, then a long plateau
    return noisy[:100] + [noisy[100]] * 60 + noisy[100:200] + [0.9] * 100


VARIANTS = {
    "defaults": {},
    "max": dict(mode="max"),
    "abs": dict(threshold_mode="abs", threshold=0.01),
    "cooldown": dict(cooldown=3, patience=2, factor=0.5),
    "max_abs_cooldown": dict(mode="max", threshold_mode="abs", threshold=1e-3, cooldown=2, patience=4),
    "min_scale": dict(patience=0, factor=0.5, min_scale=0.01),
    "big_threshold": dict(threshold=0.05, patience=3, factor=0.3),
}


def _torch_kwargs(kw):
    out = {k: v for k, v in kw.items() if k != "min_scale"}
    if "min_scale" in kw:
        out["min_lr"] = kw["min_scale"] * BASE
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_lr_sequence_matches_reduce_lr_on_plateau(name):
    kw = VARIANTS[name]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **_torch_kwargs(kw))
    tx = reduce_on_plateau(**kw, eps=1e-8 / BASE)
    params = {"p": torch.zeros(1)}
    state = tx.init(params)
    expected, ours = [], []
    for loss in _losses():
        sched.step(loss)
        expected.append(opt.param_groups[0]["lr"])
        _, state = tx.update(params, state, params, value=loss)
        ours.append(BASE * state.scale.item())
    assert len(set(expected)) > 2, "the loss sequence must trigger several reductions"
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(expected), rtol=1e-12, atol=0)
    # the counters mirror torch's attributes
    assert state.plateau_count.item() == sched.num_bad_epochs
    assert state.cooldown_count.item() == sched.cooldown_counter
    assert state.best_value.item() == sched.best


def test_chained_sgd_takes_torch_trajectory():
    module, params, loss_fn, (X, Y) = mlp_problem(torch.float64, n=16)
    tx = funcopt.chain(funcopt.sgd(0.5, momentum=0.9), reduce_on_plateau(factor=0.5, patience=1, threshold=0.1))
    torch_module = copy.deepcopy(module)
    opt = torch.optim.SGD(torch_module.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1, threshold=0.1)
    state = tx.init(params)
    lrs = []
    for _ in range(30):
        grads, loss = torch.func.grad_and_value(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value=loss)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        torch_loss = torch.nn.functional.cross_entropy(torch_module(X), Y)
        torch_loss.backward()
        opt.step()
        sched.step(torch_loss.item())
        lrs.append(opt.param_groups[0]["lr"])
        assert abs(0.5 * state[1].scale.item() - lrs[-1]) <= 1e-15
    assert len(set(lrs)) >= 2, "the run must reduce the lr at least once"
    expected = {k: v.detach() for k, v in torch_module.named_parameters()}
    assert_trees_close(params, expected, rtol=1e-10, atol=1e-12)


def test_accumulation_size_equals_torch_stepped_per_epoch_with_mean_loss():
    losses = _losses()[:240]
    epoch = 8
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    tx = reduce_on_plateau(patience=1, factor=0.5, accumulation_size=epoch, eps=1e-8 / BASE)
    params = {"p": torch.zeros(1)}
    state = tx.init(params)
    for i in range(0, len(losses), epoch):
        chunk = losses[i : i + epoch]
        for loss in chunk:
            _, state = tx.update(params, state, params, value=torch.tensor(loss, dtype=torch.float64))
        sched.step(sum(torch.tensor(chunk, dtype=torch.float64)) / epoch)
        assert abs(BASE * state.scale.item() - opt.param_groups[0]["lr"]) <= 1e-15 * BASE
    assert state.scale.item() < 1.0
    assert state.count.item() == len(losses) and state.accumulated_value.item() == 0.0


def test_updates_are_scaled_by_the_scale_before_the_value():
    tx = reduce_on_plateau(factor=0.5, patience=0)
    params = {"w": torch.ones(2, dtype=torch.float64)}
    state = tx.init(params)
    assert isinstance(state, ReduceOnPlateauState) and state.scale.item() == 1.0
    u, state = tx.update(params, state, value=1.0)  # first value is always better than inf
    u, state = tx.update(params, state, value=2.0)  # bad -> reduce after this step
    assert u["w"].tolist() == [1.0, 1.0] and state.scale.item() == 0.5
    u, state = tx.update(params, state, value=2.0)
    assert u["w"].tolist() == [0.5, 0.5]


def test_runs_under_vmap_with_batched_values():
    tx = reduce_on_plateau(factor=0.5, patience=0)
    params = {"w": torch.ones(2, dtype=torch.float64)}
    state = tree.stack([tx.init(params)] * 2)
    step = torch.func.vmap(lambda s, v: tx.update(params, s, value=v)[1])
    for values in ([1.0, 1.0], [0.5, 2.0], [0.4, 2.0]):
        state = step(state, torch.tensor(values, dtype=torch.float64))
    assert state.scale.tolist() == [1.0, 0.25]


def test_errors():
    tx = reduce_on_plateau()
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    with pytest.raises(funcopt.FuncoptError, match=r"needs the monitored loss: call `tx.update\(grads, state, params, value=loss\)`"):
        tx.update(params, state, params)
    with pytest.raises(funcopt.FuncoptError, match=r"value must be a scalar .* shape \(3,\)"):
        tx.update(params, state, params, value=torch.ones(3))
    with pytest.raises(funcopt.FuncoptError, match="ReduceOnPlateauState"):
        tx.update(params, (), params, value=1.0)
    for kwargs, match in [
        (dict(factor=1.0), r"factor must lie in \[0.0, 1.0\)"),
        (dict(patience=-1), "patience must be an int >= 0"),
        (dict(patience=2.5), "patience must be an int >= 0"),
        (dict(threshold_mode="relative"), "threshold_mode must be 'rel' or 'abs'"),
        (dict(mode="minimize"), "mode must be 'min' or 'max'"),
        (dict(min_scale=-0.1), "min_scale must lie in"),
        (dict(accumulation_size=0), "accumulation_size must be an int >= 1"),
    ]:
        with pytest.raises(funcopt.FuncoptError, match=match):
            reduce_on_plateau(**kwargs)
