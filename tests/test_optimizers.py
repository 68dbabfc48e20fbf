"""One battery of checks over every registry row (tests/registry.py): purity, state layout, vmap,
grad, dtypes, checkpoint resume, errors."""

from __future__ import annotations

import inspect

import pathlib

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

import funcopt
from funcopt import tree
from tests import registry
from tests.helpers import assert_trees_close, assert_trees_equal, mlp_problem, nested_params, snapshot

NAMES = registry.names()
# The loss the batteries that feed random gradients pass as ``value=`` to rows that take it
# (registry.update_kwargs; e.g. polyak_sgd's step size reads it).
VALUE = torch.tensor(1.0, dtype=torch.float64)


def _grads_like(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tree.map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params)


def _steps(tx, params, n, seed=1, state=None, extras=None):
    state = tx.init(params) if state is None else state
    for i in range(n):
        updates, state = tx.update(_grads_like(params, seed + i), state, params, **(extras or {}))
        params = funcopt.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", NAMES)
def test_decreases_a_loss(name):
    _, params, loss_fn, _ = mlp_problem(torch.float64)
    tx = registry.make(name)
    objective = registry.objective(name, loss_fn)  # -loss where the row maximizes
    state = tx.init(params)
    start = loss_fn(params)
    for _ in range(100):
        grads, value = torch.func.grad_and_value(objective)(params)
        updates, state = tx.update(grads, state, params, **registry.update_kwargs(name, value))
        params = funcopt.apply_updates(params, updates)
    assert loss_fn(params) < start * 0.9


@pytest.mark.parametrize("name", NAMES)
def test_update_never_mutates_its_inputs(name):
    params = nested_params()
    tx = registry.make(name)
    extras = registry.update_kwargs(name, VALUE)
    params, state = _steps(tx, params, 2, extras=extras)
    grads = _grads_like(params, seed=9)
    before = snapshot((grads, state, params))
    versions = [x._version for x in tree.leaves((grads, state, params))]
    tx.update(grads, state, params, **extras)
    assert_trees_equal((grads, state, params), before)
    assert versions == [x._version for x in tree.leaves((grads, state, params))], "an input was written in place"
    params_before = snapshot(params)
    funcopt.apply_updates(params, grads)
    assert_trees_equal(params, params_before)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_plain_containers_of_tensors(name):
    params = nested_params()
    tx = registry.make(name)
    _, state = _steps(tx, params, 1, extras=registry.update_kwargs(name, VALUE))

    def check(node, where="state"):
        if isinstance(node, torch.Tensor) or node is None:
            return
        assert isinstance(node, (tuple, list, dict)), f"{where} is a {type(node).__name__}"
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, child in items:
            check(child, f"{where}[{k!r}]")

    check(state)
    optree_leaves = optree.tree_leaves(state)
    torch_leaves = torch_pytree.tree_leaves(state)
    assert len(optree_leaves) == len(torch_leaves)
    assert all(isinstance(x, torch.Tensor) for x in torch_leaves)
    def counts_in(node):
        if isinstance(getattr(node, "count", None), torch.Tensor):
            return [node.count]
        if isinstance(node, dict):  # e.g. multi_transform's groups
            return [c for child in node.values() for c in counts_in(child)]
        return [c for child in node for c in counts_in(child)] if isinstance(node, tuple) else []

    counts = counts_in(state)
    # Only accumulators of squared gradients (Adagrad's, RMSprop's) need no step count.
    count_free = (funcopt.EmptyState, funcopt.ScaleByRssState, funcopt.ScaleByRmsState)
    # sam counts calls modulo sync_period only; its inner optimizers keep their own counts
    assert counts or all(isinstance(s, count_free) for s in state) or not registry.row(name).counts_every_call, (
        "stateful optimizers keep a step count"
    )
    for c in counts:
        assert c.shape == () and c.dtype == torch.int64
        assert int(c) == 1 or not registry.row(name).counts_every_call


@pytest.mark.parametrize("name", NAMES)
def test_accepts_and_ignores_extra_arguments(name):
    params = nested_params()
    tx = registry.make(name)
    state = tx.init(params)
    grads = _grads_like(params)
    plain, _ = tx.update(grads, state, params, **registry.update_kwargs(name, VALUE))
    extra, _ = tx.update(grads, state, params, value=VALUE, some_future_arg="x")
    assert_trees_equal(extra, plain)


@pytest.mark.parametrize("name", NAMES)
def test_keeps_param_dtypes(name):
    params = {"h": torch.randn(3, dtype=torch.float16), "f": torch.randn(2, 2), "d": torch.randn(2, dtype=torch.float64)}
    tx = registry.make(name)
    new_params, _ = _steps(tx, params, 2, extras=registry.update_kwargs(name, VALUE))
    for k in params:
        assert new_params[k].dtype == params[k].dtype
        assert torch.isfinite(new_params[k]).all()


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_an_ensemble_equals_a_loop(name):
    """K stacked models updated under torch.func.vmap equal K separate updates."""
    k = 3
    members = [nested_params(seed=s) for s in range(k)]
    grads = [[_grads_like(m, seed=10 * s + i) for i in range(3)] for s, m in enumerate(members)]
    tx = registry.make(name)
    extras = registry.update_kwargs(name, VALUE)

    def run_one(params, grad_seq):
        state = tx.init(params)
        for g in grad_seq:
            updates, state = tx.update(g, state, params, **extras)
            params = funcopt.apply_updates(params, updates)
        return params, state

    expected = [run_one(m, gs) for m, gs in zip(members, grads)]

    stacked = tree.stack(members)
    state = torch.func.vmap(tx.init)(stacked)
    step = torch.func.vmap(lambda g, s, p: tx.update(g, s, p, **extras))
    for i in range(3):
        updates, state = step(tree.stack([gs[i] for gs in grads]), state, stacked)
        stacked = funcopt.apply_updates(stacked, updates)
    for j, (params_j, state_j) in enumerate(expected):
        assert_trees_close(tree.unstack(stacked)[j], params_j, rtol=1e-12, atol=1e-12, msg=f"member {j}")
        got_state = tree.map(lambda x: x[j], state)
        assert_trees_close(got_state, state_j, rtol=1e-12, atol=1e-12, msg=f"state {j}")


@pytest.mark.parametrize("name", registry.names(differentiable=True))
def test_grad_through_three_unrolled_steps_matches_finite_differences(name):
    """d loss(params after 3 steps) / d initial params, checked along a random direction."""
    _, p0, loss_fn, _ = mlp_problem(torch.float64, n=16, hidden=4)
    tx = registry.make(name)

    def unrolled(params):
        state = tx.init(params)
        for _ in range(3):
            grads, value = torch.func.grad_and_value(loss_fn)(params)
            updates, state = tx.update(grads, state, params, **registry.update_kwargs(name, value))
            params = funcopt.apply_updates(params, updates)
        return loss_fn(params)

    g = torch.func.grad(unrolled)(p0)
    direction = _grads_like(p0, seed=123)
    h = 1e-6
    fd = (unrolled(tree.add_scaled(p0, h, direction)) - unrolled(tree.add_scaled(p0, -h, direction))) / (2 * h)
    analytic = tree.vdot(g, direction)
    torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-8)
    assert analytic.abs() > 1e-6


@pytest.mark.parametrize("name", registry.names(differentiable=False))
def test_sign_based_optimizers_are_differentiable_under_grad(name):
    """Lion's sign has zero derivative; the unrolled gradient still exists and is finite."""
    _, p0, loss_fn, _ = mlp_problem(torch.float64, n=16, hidden=4)
    tx = registry.make(name)

    def unrolled(params):
        state = tx.init(params)
        grads, value = torch.func.grad_and_value(loss_fn)(params)
        updates, state = tx.update(grads, state, params, **registry.update_kwargs(name, value))
        return loss_fn(funcopt.apply_updates(params, updates))

    g = torch.func.grad(unrolled)(p0)
    assert all(torch.isfinite(x).all() for x in tree.leaves(g))


@pytest.mark.parametrize("name", NAMES)
def test_resumes_bitwise_from_a_checkpoint(name, tmp_path):
    """3 steps, save params and state, load them into a template (like=) with a fresh optimizer,
    3 more steps: bitwise the uninterrupted 6-step run."""
    params = nested_params()
    extras = registry.update_kwargs(name, VALUE)
    straight = _steps(registry.make(name), params, 6, extras=extras)
    tx = registry.make(name)
    half_params, half_state = _steps(tx, params, 3, extras=extras)
    path = tmp_path / "ckpt.safetensors"
    funcopt.checkpoint.save(path, {"params": half_params, "opt_state": half_state})
    tx = registry.make(name)  # as in a new process
    restored = funcopt.checkpoint.load(path, like={"params": params, "opt_state": tx.init(params)})
    assert_trees_equal(restored, {"params": half_params, "opt_state": half_state})
    resumed = _steps(tx, restored["params"], 3, seed=1 + 3, state=restored["opt_state"], extras=extras)
    assert_trees_equal(resumed, straight)


def test_the_registry_covers_every_optimizer_and_route():
    """Every optimizer of funcopt.optimizers has a row; every declared fast route, native kernel
    family and torch.optim counterpart is exercised by some row."""
    rows = registry.ROWS.values()
    for factory in registry.optimizer_factories():
        if factory in registry.OWN_BATTERY:
            assert pathlib.Path(__file__).with_name(registry.OWN_BATTERY[factory].split()[0][len("tests/"):]).exists()
            continue
        mine = [r for r in rows if r.factory is factory]
        assert mine, f"funcopt.{factory.__name__} has no row in tests/registry.py"
        if hasattr(factory, "fast_route"):
            assert any(r.fast for r in mine), f"no registry row takes {factory.__name__}'s fast route"
    kernels = {family for b in funcopt.fast.backends() for family in b.kernels}
    assert kernels <= {r.family for r in rows}, "a backend kernel family has no registry row"
    for r in rows:
        if r.torch:
            assert issubclass(r.torch_class, torch.optim.Optimizer), r.name
    assert set(registry.names()) == set(registry.ROWS)


@pytest.mark.slow
def test_adam_and_sgd_updates_compile_fullgraph():
    params = {"w": torch.randn(8, 4), "b": torch.randn(4)}
    grads = _grads_like(params)
    for tx in (funcopt.adam(1e-3), funcopt.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)):
        torch._dynamo.reset()
        state = tx.init(params)
        compiled = torch.compile(tx.update, fullgraph=True)
        eager_u, eager_s = tx.update(grads, state, params)
        comp_u, comp_s = compiled(grads, state, params)
        assert_trees_close(comp_u, eager_u, rtol=1e-5, atol=1e-7)
        assert_trees_close(comp_s, eager_s, rtol=1e-5, atol=1e-7)
        # a second step through the compiled function (state from the first)
        u2, _ = compiled(grads, comp_s, params)
        e2, _ = tx.update(grads, eager_s, params)
        assert_trees_close(u2, e2, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Bad input


# Every factory with a learning rate (sam wraps an optimizer and has none of its own; polyak_sgd
# takes the cap of its step size, max_learning_rate), and the other arguments some require.
_LEARNING_RATE_NAMES = ("learning_rate", "max_learning_rate")
_WITH_LEARNING_RATE = [
    f for f in registry.optimizer_factories() if set(_LEARNING_RATE_NAMES) & set(inspect.signature(f).parameters)
]
_REQUIRED = {"l2_norm_clip": 1.0, "noise_multiplier": 0.0}


@pytest.mark.parametrize("factory", _WITH_LEARNING_RATE, ids=lambda f: f.__name__)
def test_negative_learning_rate_is_rejected(factory):
    parameters = inspect.signature(factory).parameters
    lr_name = next(n for n in _LEARNING_RATE_NAMES if n in parameters)
    required = {n: v for n, v in _REQUIRED.items() if n in parameters}
    with pytest.raises(funcopt.FuncoptError, match="learning_rate must be >= 0.*maximize=True"):
        factory(**{lr_name: -1e-3}, **required)


def test_every_factory_but_the_wrappers_takes_a_learning_rate():
    without = sorted(f.__name__ for f in registry.optimizer_factories() if f not in _WITH_LEARNING_RATE)
    assert without == ["sam"], f"factories without learning_rate: {without}"


@pytest.mark.parametrize("kwargs", [dict(b1=1.0), dict(b1=-0.1), dict(b2=1.5), dict(eps=-1.0)])
def test_bad_betas_are_rejected(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(funcopt.FuncoptError, match=rf"{name} must lie in"):
        funcopt.adam(1e-3, **kwargs)


def test_bad_momentum_options_are_rejected():
    with pytest.raises(funcopt.FuncoptError, match="dampening=0"):
        funcopt.sgd(0.1, momentum=0.9, dampening=0.5, nesterov=True)
    with pytest.raises(funcopt.FuncoptError, match="momentum"):
        funcopt.sgd(0.1, nesterov=True)
    with pytest.raises(funcopt.FuncoptError, match="rmsprop|decay must lie"):
        funcopt.rmsprop(alpha=1.0)


def test_structure_mismatch_names_the_path():
    params = {"enc": {"w": torch.ones(2), "b": torch.ones(2)}}
    updates = {"enc": {"w": torch.ones(2), "bias": torch.ones(2)}}
    with pytest.raises(ValueError, match=r"params and updates .*\['enc'\].*only in the first: \['b'\]"):
        funcopt.apply_updates(params, updates)
    tx = funcopt.adam()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['enc'\]"):
        tx.update(updates, state, params)


def test_update_without_params_when_needed_says_how_to_fix():
    params = {"w": torch.ones(3)}
    for tx in (funcopt.adamw(), funcopt.lamb(), funcopt.sgd(0.1, weight_decay=0.1)):
        state = tx.init(params)
        with pytest.raises(funcopt.FuncoptError, match=r"needs the current parameters.*tx.update\(grads, state, params\)"):
            tx.update(params, state)


def test_state_from_another_optimizer_is_rejected():
    params = {"w": torch.ones(3)}
    adam_state = funcopt.adam().init(params)
    with pytest.raises(funcopt.FuncoptError, match="scale_by_adamax expected its state to be a ScaleByAdamaxState"):
        funcopt.adamax().update(params, adam_state, params)
    with pytest.raises(funcopt.FuncoptError, match=r"chain of 1 transformation\(s\) got a state of type tuple with 2"):
        funcopt.sgd(0.1).update(params, adam_state, params)
    with pytest.raises(funcopt.FuncoptError, match="trace expected its state to be a TraceState, got ScaleByAdamState"):
        funcopt.sgd(0.1, momentum=0.9).update(params, adam_state, params)


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match="note the call"):
        funcopt.chain(funcopt.scale_by_adam)


def test_mask_errors_name_the_path():
    params = {"w": torch.ones(2), "b": torch.ones(2)}
    with pytest.raises(funcopt.FuncoptError, match=r"mask leaf at \['b'\] is 1"):
        funcopt.adamw(mask={"w": True, "b": 1}).init(params)
    with pytest.raises(ValueError, match="mask"):
        funcopt.adamw(mask={"w": True}).init(params)


def test_adam_with_decoupled_weight_decay_equals_adamw():
    """torch 2.13's Adam(decoupled_weight_decay=True) is AdamW: same state layout, same numbers."""
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    a = funcopt.adam(1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    w = funcopt.adamw(1e-2, weight_decay=0.1)
    sa, sw = a.init(params), w.init(params)
    assert optree.tree_structure(sa) == optree.tree_structure(sw)
    pa = pw = params
    for i in range(5):
        g = funcopt.tree.map(lambda p, i=i: torch.sin(p * (i + 1)), pa)
        ua, sa = a.update(g, sa, pa)
        uw, sw = w.update(g, sw, pw)
        pa, pw = funcopt.apply_updates(pa, ua), funcopt.apply_updates(pw, uw)
    assert_trees_equal((pa, sa), (pw, sw))
    with pytest.raises(funcopt.FuncoptError, match="decoupled_weight_decay must be True or False"):
        funcopt.adam(1e-3, decoupled_weight_decay=1)
