"""optax.contrib's optimizers (catalog B) beyond the registry batteries.

Schedule-free against Meta's ``schedulefree`` package (AdamW and SGD, their reference and closure
variants) in float64, with the evaluation params against the package's ``.eval()``; the float64
warmup and AdEMAMix schedules against optax; MoMo's ``value=``; bad input.
"""

from __future__ import annotations

import pytest
import torch

import funcopt
from funcopt import schedules, tree
from tests.helpers import assert_trees_close, assert_trees_equal

STEPS = 30
SHAPES = {"w": (5, 4), "b": (4,)}


def _params(seed=7):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


TARGETS = _params(11)


def loss_fn(params):
    """Smooth and non-quadratic, with a different curvature per leaf."""
    total = torch.zeros((), dtype=torch.float64)
    for i, k in enumerate(sorted(params)):
        d = params[k] - TARGETS[k]
        total = total + (i + 1) * 0.5 * (d * d).sum() + 0.05 * (d**4).sum() + 0.1 * torch.cos(params[k]).sum()
    return total


def _funcopt_run(tx, steps=STEPS, with_value=False):
    """(params after each step, eval params after each step or None, final state)."""
    params = _params()
    state = tx.init(params)
    ys, xs = [], []
    for _ in range(steps):
        grads, value = torch.func.grad_and_value(loss_fn)(params)
        updates, state = tx.update(grads, state, params, **({"value": value} if with_value else {}))
        params = funcopt.apply_updates(params, updates)
        ys.append(params)
        if isinstance(state, funcopt.ScheduleFreeState):
            xs.append(funcopt.schedule_free_eval_params(state, params))
    return ys, xs, state


# ---------------------------------------------------------------------------------------------
# Schedule-free against Meta's schedulefree package


def _package_run(opt_class, closure_variant, steps=STEPS, **kwargs):
    """The package's params after each step: ``(y, x)`` pairs (train-mode and eval-mode params).

    The main and reference optimizers hold ``y`` in train mode and ``x`` after ``.eval()``; the
    closure variants hold ``x`` and evaluate the gradient at ``y`` inside ``step(closure)``.
    """
    leaves = {k: v.clone().requires_grad_(True) for k, v in _params().items()}
    opt = opt_class(list(leaves.values()), **kwargs)
    if hasattr(opt, "train"):
        opt.train()
    out = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = loss_fn(leaves)
            loss.backward()
            return loss

        if closure_variant:
            opt.step(closure)
            out.append((None, {k: v.detach().clone() for k, v in leaves.items()}))
            continue
        closure()
        opt.step()
        y = {k: v.detach().clone() for k, v in leaves.items()}
        opt.eval()
        x = {k: v.detach().clone() for k, v in leaves.items()}
        opt.train()
        out.append((y, x))
    return out


def _compare_to_package(ys, xs, theirs, rtol=1e-10):
    for step, (y, x, (ty, tx_)) in enumerate(zip(ys, xs, theirs)):
        if ty is not None:
            assert_trees_close(y, ty, rtol=rtol, atol=rtol * 1e-2, msg=f"y at step {step}")
        assert_trees_close(x, tx_, rtol=rtol, atol=rtol * 1e-2, msg=f"x (eval params) at step {step}")
    moved = max(float((xs[-1][k] - _params()[k]).abs().max()) for k in SHAPES)
    assert moved > 1e-2, "the params barely moved; the comparison proves little"


ADAMW_VARIANTS = ["AdamWScheduleFree", "AdamWScheduleFreeReference", "AdamWScheduleFreeClosure"]
SGD_VARIANTS = ["SGDScheduleFree", "SGDScheduleFreeReference", "SGDScheduleFreeClosure"]


@pytest.mark.parametrize("variant", ADAMW_VARIANTS)
def test_schedule_free_adamw_matches_the_schedulefree_package(variant):
    sf = pytest.importorskip("schedulefree", reason="the schedule-free oracle (pip install -e '.[test]')")
    ys, xs, _ = _funcopt_run(funcopt.schedule_free_adamw(2e-2, b1=0.85, b2=0.99, eps=1e-8, weight_decay=0.05))
    theirs = _package_run(
        getattr(sf, variant), variant.endswith("Closure"), lr=2e-2, betas=(0.85, 0.99), eps=1e-8, weight_decay=0.05
    )
    _compare_to_package(ys, xs, theirs)


@pytest.mark.parametrize("variant", SGD_VARIANTS)
def test_schedule_free_sgd_matches_the_schedulefree_package(variant):
    sf = pytest.importorskip("schedulefree", reason="the schedule-free oracle (pip install -e '.[test]')")
    ys, xs, _ = _funcopt_run(funcopt.schedule_free_sgd(0.05, b1=0.9, weight_decay=0.01))
    theirs = _package_run(getattr(sf, variant), variant.endswith("Closure"), lr=0.05, momentum=0.9, weight_decay=0.01)
    _compare_to_package(ys, xs, theirs)


def test_schedulefree_warmup_is_the_wrapper_with_the_base_schedule_one_step_ahead():
    """schedulefree's warmup uses lr * (k + 1) / W at step k for both the z step and the averaging
    weights; optax's (and so funcopt's warmup_steps=) z step uses lr * k / W. The generic
    wrapper reproduces the package with the base learning rate read one step ahead."""
    sf = pytest.importorskip("schedulefree", reason="the schedule-free oracle (pip install -e '.[test]')")
    lr, warmup = 2e-2, 5
    ramp = schedules.linear(0.0, lr, warmup)
    base = funcopt.chain(
        funcopt.scale_by_bias_corrected_rms(0.999, 1e-8), funcopt.scale_by_learning_rate(lambda count: ramp(count + 1))
    )
    ys, xs, _ = _funcopt_run(funcopt.schedule_free(base, ramp, b1=0.9))
    theirs = _package_run(sf.AdamWScheduleFree, False, lr=lr, warmup_steps=warmup)
    _compare_to_package(ys, xs, theirs)
    # optax's semantics: the first z step has learning rate ramp(0) = 0, so the params stay (to
    # rounding: y is rebuilt from x and z), where the package's first step moves them
    optax_like, _, _ = _funcopt_run(funcopt.schedule_free_adamw(lr, warmup_steps=warmup), steps=1)
    assert_trees_close(optax_like[0], _params(), rtol=1e-14, atol=1e-15)
    assert max(float((theirs[0][0][k] - _params()[k]).abs().max()) for k in SHAPES) > 1e-4


def test_warmup_steps_is_a_linear_warmup_schedule_bitwise():
    a, _, sa = _funcopt_run(funcopt.schedule_free_adamw(2e-2, warmup_steps=5, weight_decay=0.01), steps=8)
    ramp = schedules.linear(0.0, 2e-2, 5)
    b, _, sb = _funcopt_run(funcopt.schedule_free_adamw(ramp, weight_decay=0.01), steps=8)
    assert_trees_equal((a[-1], sa), (b[-1], sb))


# ---------------------------------------------------------------------------------------------
# The evaluation params


def test_eval_params_find_the_state_inside_wrappers_and_are_pure():
    params = _params()
    tx = funcopt.inject_hyperparams(funcopt.schedule_free_sgd)(learning_rate=0.05, b1=0.8)
    state = tx.init(params)
    grads = torch.func.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    params = funcopt.apply_updates(params, updates)
    before = tree.map(torch.clone, (state, params))
    x = funcopt.schedule_free_eval_params((state, "other"), params)
    assert_trees_equal((state, params), before)
    z, b1 = state.inner_state.z, 0.8
    expected = tree.map(lambda y, zz: (y - (1 - b1) * zz) / b1, params, z)
    assert_trees_close(x, expected, rtol=1e-15, atol=0)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(tree.leaves(x), tree.leaves(params)))


def test_eval_params_without_a_schedule_free_state_say_what_to_pass():
    params = _params()
    with pytest.raises(funcopt.FuncoptError, match="holds no ScheduleFreeState.*schedule_free_adamw"):
        funcopt.schedule_free_eval_params(funcopt.adam().init(params), params)
    state = funcopt.schedule_free_sgd().init(params)
    with pytest.raises(funcopt.FuncoptError, match="2 ScheduleFreeStates"):
        funcopt.schedule_free_eval_params((state, state), params)


# ---------------------------------------------------------------------------------------------
# Schedules against optax (the registry rows use constant hyperparameters)


def _float64_ramp(peak, steps):
    """A linear warmup in float64 from a torch or a JAX count (optax's own schedules are float32)."""

    def schedule(count):
        c = count.to(torch.float64) if isinstance(count, torch.Tensor) else count.astype("float64")
        return peak * (c / steps).clip(max=1.0)

    return schedule


def _optax_run(otx, steps=STEPS):
    jax = pytest.importorskip("jax", reason="the optax oracle (pip install -e '.[test]')")
    import numpy as np
    import optax

    jax.config.update("jax_enable_x64", True)
    params = {k: jax.numpy.asarray(v.numpy()) for k, v in _params().items()}
    state, out = otx.init(params), []
    for _ in range(steps):
        grads = torch.func.grad(loss_fn)({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
        updates, state = otx.update({k: jax.numpy.asarray(v.numpy()) for k, v in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
        out.append({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    return out


@pytest.mark.parametrize("name", ["schedule_free_adamw", "schedule_free_sgd"])
def test_schedule_free_with_a_float64_warmup_matches_optax(name):
    optax = pytest.importorskip("optax", reason="the optax oracle (pip install -e '.[test]')")
    ramp = _float64_ramp(2e-2, 5)
    ours, _, _ = _funcopt_run(getattr(funcopt, name)(ramp, b1=0.8, weight_decay=0.01))
    theirs = _optax_run(getattr(optax.contrib, name)(ramp, b1=0.8, weight_decay=0.01))
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert_trees_close(a, b, rtol=1e-9, atol=1e-12, msg=f"step {step}")


def test_ademamix_with_alpha_and_b3_schedules_matches_optax_and_keeps_the_reference_path():
    optax = pytest.importorskip("optax", reason="the optax oracle (pip install -e '.[test]')")
    ramp = _float64_ramp(0.099, 20)
    alpha, b3 = _float64_ramp(5.0, 20), (lambda count: 0.9 + ramp(count))
    tx = funcopt.ademamix(1e-2, alpha=alpha, b3=b3)
    params = _params()
    route = funcopt.fast.explain(tx, params, tx.init(params), params)
    assert route.route == "reference" and "is not a Python number" in str(route), route
    ours, _, _ = _funcopt_run(tx)
    theirs = _optax_run(optax.contrib.ademamix(1e-2, alpha=alpha, b3=b3))
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert_trees_close(a, b, rtol=1e-9, atol=1e-12, msg=f"step {step}")


# ---------------------------------------------------------------------------------------------
# MoMo's value= and bad input


def test_momo_without_the_loss_says_to_pass_it():
    params = _params()
    tx = funcopt.momo()
    state = tx.init(params)
    grads, value = torch.func.grad_and_value(loss_fn)(params)
    with pytest.raises(funcopt.FuncoptError, match=r"needs the loss.*value=loss"):
        tx.update(grads, state, params)
    with pytest.raises(funcopt.FuncoptError, match=r"scalar loss.*shape \(2,\)"):
        tx.update(grads, state, params, value=torch.ones(2))
    a, _ = tx.update(grads, state, params, value=value)
    b, _ = tx.update(grads, state, params, value=float(value))
    assert_trees_equal(a, b)


def test_bad_arguments_name_the_argument():
    with pytest.raises(funcopt.FuncoptError, match="init_step must be a pair"):
        funcopt.dog(init_step=("bogus", 1.0))
    with pytest.raises(funcopt.FuncoptError, match="betas must be a tuple"):
        funcopt.prodigy(betas=0.9)
    with pytest.raises(funcopt.FuncoptError, match=r"b1 must lie in \(0.0, 1.0\]"):
        funcopt.schedule_free_sgd(b1=0.0)
    with pytest.raises(funcopt.FuncoptError, match="base_optimizer must be a GradientTransformation.*note the call"):
        funcopt.schedule_free(funcopt.sgd, 1.0)
    with pytest.raises(funcopt.FuncoptError, match="needs the current parameters"):
        funcopt.prodigy().update(_params(), funcopt.prodigy().init(_params()))


def test_adopt_with_a_custom_clip_takes_the_reference_path_with_the_same_numbers():
    params = _params()
    default, custom = funcopt.adopt(1e-2), funcopt.adopt(1e-2, clip_value_fn=lambda t: t**0.25)
    state = custom.init(params)
    assert funcopt.fast.fast_path_applies(default, params, state, params)
    assert not funcopt.fast.fast_path_applies(custom, params, state, params)
    a, _, sa = _funcopt_run(default, steps=5)
    b, _, sb = _funcopt_run(custom, steps=5)
    assert_trees_close((a[-1], sa), (b[-1], sb), rtol=1e-13, atol=1e-15)
