"""The fast routes (funcopt.fast): same numbers and state as the reference chain, used only where valid."""

from __future__ import annotations

import subprocess
import sys

import optree
import pytest
import torch

import funcopt
from funcopt import fast as fused
from funcopt import tree
from funcopt.fast._route import FastPath
from tests import registry
from tests.helpers import assert_trees_close, assert_trees_equal, mlp_problem, nested_params, snapshot

NAMES = registry.names(fast=True)  # the rows whose optimizer takes a declared fast route
VALUE = torch.tensor(1.0, dtype=torch.float64)  # the loss given to rows that read value=


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return tree.map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params)


def _run(tx, params, steps, fast, start=0, state=None, extras=None):
    """``extras``: registry.update_kwargs(name, VALUE) for rows whose update reads the loss."""
    state = tx.init(params) if state is None else state
    for i in range(start, start + steps):
        grads = _grads(params, i)
        with fused.fast_path_enabled(fast):
            assert fused.fast_path_applies(tx, grads, state, params) == fast
            updates, state = tx.update(grads, state, params, **(extras or {}))
        params = funcopt.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_reference_path(name, dtype):
    params = nested_params(dtype)
    kw = registry.update_kwargs(name, VALUE)
    fast = _run(registry.make(name), params, 4, fast=True, extras=kw)
    ref = _run(registry.make(name), params, 4, fast=False, extras=kw)
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    assert_trees_close(fast, ref, rtol=tol, atol=tol)
    # Same pytree types and structure: checkpoints and vmap do not depend on the path.
    assert optree.tree_structure(fast[1]) == optree.tree_structure(ref[1])
    assert [type(s) for s in fast[1]] == [type(s) for s in ref[1]]


@pytest.mark.parametrize("name", NAMES)
def test_switching_paths_mid_run(name):
    params = nested_params()
    tx = registry.make(name)
    kw = registry.update_kwargs(name, VALUE)
    p, s = _run(tx, params, 2, fast=True, extras=kw)
    p, s = _run(tx, p, 2, fast=False, start=2, state=s, extras=kw)
    p, s = _run(tx, p, 1, fast=True, start=4, state=s, extras=kw)
    expected = _run(tx, params, 5, fast=False, extras=kw)
    assert_trees_close((p, s), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_fast_update_never_writes_into_its_inputs(name):
    params = nested_params()
    tx = registry.make(name)
    kw = registry.update_kwargs(name, VALUE)
    params, state = _run(tx, params, 2, fast=True, extras=kw)
    grads = _grads(params, 9)
    before = snapshot((grads, state, params))
    versions = [x._version for x in tree.leaves((grads, state, params))]
    assert fused.fast_path_applies(tx, grads, state, params)
    updates, new_state = tx.update(grads, state, params, **kw)
    assert_trees_equal((grads, state, params), before)
    assert versions == [x._version for x in tree.leaves((grads, state, params))]
    # The outputs share no memory with the inputs.
    inputs = {x.data_ptr() for x in tree.leaves((grads, state, params)) if x.numel()}
    assert not inputs & {x.data_ptr() for x in tree.leaves((updates, new_state)) if x.numel()}


@pytest.mark.parametrize("name", NAMES)
def test_mixed_float32_and_float64_leaves_run_fast_per_dtype(name):
    params = {"a": torch.randn(5, dtype=torch.float32), "b": torch.randn(3, 2, dtype=torch.float64)}
    kw = registry.update_kwargs(name, VALUE)
    fast = _run(registry.make(name), params, 3, fast=True, extras=kw)
    ref = _run(registry.make(name), params, 3, fast=False, extras=kw)
    assert_trees_close(fast, ref, rtol=2e-6, atol=1e-7)
    assert fast[0]["a"].dtype == torch.float32 and fast[0]["b"].dtype == torch.float64


def test_inject_hyperparams_takes_the_fast_path_and_is_bitwise_equal(monkeypatch):
    calls = []  # pure steps run by the fast path (either route: torch kernels or native)
    original = FastPath._remember_pure

    def remember(self, *args, **kwargs):
        calls.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FastPath, "_remember_pure", remember)
    params = nested_params()
    plain = funcopt.adam(1e-2, weight_decay=1e-3)
    injected = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2, weight_decay=1e-3)
    p1, s1 = params, plain.init(params)
    p2, s2 = params, injected.init(params)
    for i in range(3):
        g = _grads(params, i)
        u1, s1 = plain.update(g, s1, p1)
        u2, s2 = injected.update(g, s2, p2)
        p1, p2 = funcopt.apply_updates(p1, u1), funcopt.apply_updates(p2, u2)
    assert calls == [True] * 6
    assert_trees_equal(p2, p1)
    assert_trees_equal(s2.inner_state, s1)


def _unsupported_cases():
    x = torch.randn(4, 3, dtype=torch.float64)
    return {
        "requires_grad": ({"w": x.clone().requires_grad_()}, None),
        "non_contiguous": ({"w": x.t().contiguous().t()}, None),
        "float16": ({"w": x.to(torch.float16)}, None),
        "empty_tree": ({}, None),
    }


@pytest.mark.parametrize("case", sorted(_unsupported_cases()))
def test_reference_path_where_the_fast_path_does_not_apply(case):
    params, _ = _unsupported_cases()[case]
    tx = funcopt.adam(1e-2, weight_decay=0.1)
    state = tx.init(params)
    grads = tree.map(lambda p: torch.ones_like(p).detach(), params)
    assert not fused.fast_path_applies(tx, grads, state, params)
    updates, _ = tx.update(grads, state, params)
    with fused.fast_path_enabled(False):
        expected, _ = tx.update(grads, state, params)
    assert_trees_equal(tree.map(torch.detach, updates), tree.map(torch.detach, expected))


@pytest.mark.parametrize("name", registry.names(fast=False))
def test_rows_without_a_fast_route_keep_the_reference_path(name):
    """The registry's ``fast`` selection is what the dispatcher does: the other rows (no
    declaration, a mask, a chain or a wrapper around one) never take the fast route."""
    params = nested_params()
    tx = registry.make(name)
    assert not fused.fast_path_applies(tx, _grads(params, 0), tx.init(params), params)


def test_masks_and_tensor_hyperparameters_requiring_grad_use_the_reference_path():
    params = nested_params()
    grads = _grads(params, 0)
    masked = funcopt.adamw(1e-2, mask=tree.map(lambda _: True, params))
    assert not fused.fast_path_applies(masked, grads, masked.init(params), params)
    lr = torch.tensor(1e-2, dtype=torch.float64, requires_grad=True)
    tx = funcopt.sgd(lr)
    assert not fused.fast_path_applies(tx, grads, tx.init(params), params)
    other = funcopt.chain(funcopt.clip(1.0), funcopt.adam(1e-2))
    assert not fused.fast_path_applies(other, grads, other.init(params), params)
    # A state of the wrong layout falls through to the reference path and its clear error.
    adam = funcopt.adam(1e-2)
    assert not fused.fast_path_applies(adam, grads, funcopt.sgd(0.1, momentum=0.9).init(params), params)
    with pytest.raises(ValueError, match="expected its state"):
        adam.update(grads, funcopt.lion(weight_decay=0.0).init(params), params)


def test_vmap_runs_the_reference_path_and_matches_a_fast_loop():
    members = [nested_params(seed=s) for s in range(3)]
    tx = funcopt.adam(1e-2, amsgrad=True)
    expected = []
    for j, m in enumerate(members):
        p, s = m, tx.init(m)
        for i in range(2):
            u, s = tx.update(_grads(m, 10 * j + i), s, p)
            p = funcopt.apply_updates(p, u)
        expected.append(p)
    stacked = tree.stack(members)
    state = torch.func.vmap(tx.init)(stacked)
    for i in range(2):
        g = tree.stack([_grads(m, 10 * j + i) for j, m in enumerate(members)])
        u, state = torch.func.vmap(tx.update)(g, state, stacked)
        stacked = funcopt.apply_updates(stacked, u)
    for j in range(3):
        assert_trees_close(tree.unstack(stacked)[j], expected[j], rtol=1e-12, atol=1e-12)


def test_grad_through_an_update_uses_the_reference_path():
    _, p0, loss_fn, _ = mlp_problem(torch.float64, n=16, hidden=4)
    tx = funcopt.adam(1e-2)

    def unrolled(params):
        state = tx.init(params)
        updates, state = tx.update(torch.func.grad(loss_fn)(params), state, params)
        return loss_fn(funcopt.apply_updates(params, updates))

    g = torch.func.grad(unrolled)(p0)
    d = _grads(p0, 5)
    h = 1e-6
    fd = (unrolled(tree.add_scaled(p0, h, d)) - unrolled(tree.add_scaled(p0, -h, d))) / (2 * h)
    torch.testing.assert_close(tree.vdot(g, d), fd, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_fast_path_optimizers_compile_fullgraph():
    params = {"w": torch.randn(8, 4), "b": torch.randn(4)}
    grads = _grads(params, 1)
    for tx in (funcopt.adamw(1e-3, amsgrad=True),):  # adam and sgd: tests/test_optimizers.py
        torch._dynamo.reset()
        state = tx.init(params)
        compiled = torch.compile(tx.update, fullgraph=True)
        got = compiled(grads, state, params)
        assert_trees_close(got, tx.update(grads, state, params), rtol=1e-5, atol=1e-7)


def test_fast_path_enabled_restores_on_error():
    assert fused.is_fast_path_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with fused.fast_path_enabled(False):
            assert not fused.is_fast_path_enabled()
            raise RuntimeError("boom")
    assert fused.is_fast_path_enabled()


def test_declare_rejects_a_bad_declaration_and_keeps_the_signature():
    with pytest.raises(TypeError, match="expects a FastRoute"):
        fused.declare("nadam")
    route = funcopt.adam.fast_route
    with pytest.raises(TypeError, match="has no argument 'b1'"):
        fused.declare(route)(lambda learning_rate: funcopt.sgd(learning_rate))
    import inspect

    assert "learning_rate" in inspect.signature(funcopt.adam).parameters
    assert funcopt.adam.__name__ == "adam" and "Kingma" in funcopt.adam.__doc__


def test_configure_cpu_allocator_in_a_subprocess():
    code = "import funcopt.fast as f, torch; r = f.configure_cpu_allocator(); torch.zeros(1 << 20).add_(1); print(r)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("True", "False")
    if sys.platform.startswith("linux"):
        assert out.stdout.strip() == "True"


def test_first_large_pure_cpu_step_tunes_the_allocator_once_unless_switched_off():
    code = (
        "import warnings, torch, funcopt\n"
        "p = {'w': torch.zeros(1 << 23)}\n"  # 32 MB: the threshold
        "g = {'w': torch.ones(1 << 23)}\n"
        "tx = funcopt.adam(1e-3)\n"
        "s = tx.init(p)\n"
        "funcopt.fast.auto_cpu_allocator(False)\n"
        "with warnings.catch_warnings(record=True) as off:\n"
        "    warnings.simplefilter('always')\n"
        "    tx.update(g, s, p)\n"
        "funcopt.fast.auto_cpu_allocator(True)\n"
        "with warnings.catch_warnings(record=True) as on:\n"
        "    warnings.simplefilter('always')\n"
        "    small = {'w': torch.zeros(1000)}\n"
        "    tx.update({'w': torch.ones(1000)}, tx.init(small), small)\n"
        "    n_small = len(on)\n"
        "    u, _ = tx.update(g, s, p)\n"
        "    tx.update(g, s, p)\n"
        "print(len(off), n_small, len(on), 'configure_cpu_allocator' in str(on[0].message), float(u['w'][0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n_off, n_small, n_on, named, first = out.stdout.split()
    assert (n_off, n_small, n_on, named) == ("0", "0", "1", "True")
    assert float(first) == pytest.approx(-1e-3)  # Adam's first step: -lr * sign(g)


def test_sparse_or_mismatched_gradients_are_not_taken_by_the_fast_path():
    params = {"w": torch.randn(4, 3)}
    tx = funcopt.sgd(0.1, momentum=0.9)
    state = tx.init(params)
    assert not fused.fast_path_applies(tx, {"w": torch.randn(4, 3).to_sparse()}, state, params)
    assert not fused.fast_path_applies(tx, {"w": torch.randn(3, 4)}, state, params)
    assert not fused.fast_path_applies(tx, {"w": torch.randn(4, 3, dtype=torch.float64)}, state, params)
    assert fused.fast_path_applies(tx, {"w": torch.randn(4, 3)}, state, params)


def test_pure_steps_given_their_own_state_back_skip_planning_and_still_check(monkeypatch):
    """The everyday loop hands each pure step's state to the next: the fast route then checks
    only the gradients and params (PureMemo). The numbers equal the reference chain's, and any
    change to what the memo relied on plans afresh (or takes the reference path)."""
    planned = []
    original = FastPath.plan
    monkeypatch.setattr(FastPath, "plan", lambda self, *a, **k: planned.append(1) or original(self, *a, **k))
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64), "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    runs = {}
    for mode in ("update", "pure_step", "reference"):
        tx = funcopt.adamw(1e-2, weight_decay=0.1)
        p, s = params, tx.init(params)
        for i in range(4):
            g = _grads(params, i)
            with fused.fast_path_enabled(mode != "reference"):
                if mode == "pure_step":
                    p, s = funcopt.apply_gradients(tx, g, s, p)
                else:
                    u, s = tx.update(g, s, p)
                    p = funcopt.apply_updates(p, u)
        runs[mode] = (p, s)
        if mode != "reference":
            assert len(planned) == 1, mode  # steps 2-4 reused the first step's checks
            planned.clear()
    assert_trees_close(runs["update"], runs["reference"], rtol=1e-13, atol=1e-15)
    assert_trees_close(runs["pure_step"], runs["reference"], rtol=1e-13, atol=1e-15)

    tx = funcopt.adamw(1e-2, weight_decay=0.1)
    _, s = tx.update(_grads(params, 0), tx.init(params), params)
    g = _grads(params, 1)
    expected, _ = funcopt.adamw(1e-2, weight_decay=0.1).update(g, s, params)
    s[0].mu["w"] = s[0].mu["w"].t().contiguous().t()  # the returned dict changed: not contiguous
    u, _ = tx.update(g, s, params)
    assert_trees_close(u, expected, rtol=1e-13, atol=1e-15)
    planned.clear()
    _, s = tx.update(g, tx.init(params), params)
    with pytest.raises(funcopt.FuncoptError, match=r"gradient at \['w'\] has shape \(1, 3\)"):
        tx.update(dict(g, w=torch.ones(1, 3, dtype=torch.float64)), s, params)
    with pytest.raises(funcopt.FuncoptError, match="dtype torch.float32 but the parameter has torch.float64"):
        tx.update({k: v.float() for k, v in g.items()}, s, params)
    u, _ = tx.update({k: v.clone().requires_grad_() for k, v in g.items()}, s, params)  # reference path
    assert all(x.requires_grad for x in u.values())


def test_a_medium_pure_cpu_step_sets_glibcs_own_dynamic_thresholds_silently():
    code = (
        "import warnings, torch, funcopt\n"
        "from funcopt.fast._control import AUTO_ALLOCATOR\n"
        "tx = funcopt.adam(1e-3)\n"
        "small = {'w': torch.zeros(1000)}\n"
        "tx.update({'w': torch.ones(1000)}, tx.init(small), small)\n"
        "before = AUTO_ALLOCATOR.applied\n"
        "p = {'w': torch.zeros(256, 256)}\n"  # 256 KB: above glibc's initial 128 KB mmap threshold
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    u, _ = tx.update({'w': torch.ones(256, 256)}, tx.init(p), p)\n"
        "print(before, AUTO_ALLOCATOR.applied, len(w), float(u['w'][0, 0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, n_warnings, first = out.stdout.split()
    assert (before, n_warnings) == ("None", "0")
    if sys.platform.startswith("linux"):
        assert after == "medium"
    assert float(first) == pytest.approx(-1e-3)
    env = dict(__import__("os").environ, MALLOC_TRIM_THRESHOLD_="1000000")  # the user's own setting wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == "None"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bias_corrections_as_device_tensors_match_the_float_path(monkeypatch, dtype):
    """On CUDA the optax-family kernels compute their bias corrections as 0-dim tensors (no
    device read per step); forced here on the CPU, they give the float path's numbers."""
    from funcopt.optimizers import _optax_adam

    factories = {
        "adabelief_nesterov": lambda: funcopt.adabelief(1e-2, nesterov=True),
        "amsgrad": lambda: funcopt.amsgrad(1e-2),
        "adamaxw": lambda: funcopt.adamaxw(1e-2, weight_decay=0.1),
        "nadamw": lambda: funcopt.nadamw(1e-2),
        "yogi": lambda: funcopt.yogi(1e-2),
        "adan": lambda: funcopt.adan(1e-2, weight_decay=0.05),
        "optimistic_adam_v2": lambda: funcopt.optimistic_adam_v2(1e-2),
        "optimistic_adam_v2_plain": lambda: funcopt.optimistic_adam_v2(1e-2, nesterov=False),
    }
    params = nested_params(dtype)
    for make in factories.values():
        floats = _run(make(), params, 4, fast=True)
        with monkeypatch.context() as m:
            m.setattr(_optax_adam, "SCALAR_STEP_DEVICES", set())
            tensors = _run(make(), params, 4, fast=True)
            reference = _run(make(), params, 4, fast=False)
        tol = 2e-6 if dtype == torch.float32 else 1e-14
        assert_trees_close(tensors, floats, rtol=tol, atol=tol)
        assert_trees_close(tensors, reference, rtol=10 * tol, atol=10 * tol)
