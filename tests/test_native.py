"""The native backend: single-pass kernels of pure CPU steps (funcopt/fast/native).

Most trees in the other tests are below ``native.MIN_ELEMENTS``, so they run torch's kernels;
here the threshold is lowered to 0 and the native route is checked against torch's fused
kernels, torch.optim, the in-place fast path and the per-leaf reference path.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import funcopt
from funcopt import fast as fused
from funcopt import tree

from funcopt.fast._step import apply_gradients
from tests import registry
from tests.helpers import assert_trees_close, assert_trees_equal, snapshot

native = pytest.importorskip("funcopt.fast.native", reason="the optional native backend is not installed")
from funcopt.fast.native import _library  # noqa: E402

NAMES = registry.names(native=True)  # the rows whose fast route has a native kernel family
# Sizes that exercise the vector body, the scalar tail, one whole chunk and several chunks.
SIZES = {"w": (3, 7), "b": (1,), "v": (32768,), "u": (32768 * 2 + 13,)}

_EXPECTED_HERE = (
    sys.platform.startswith("linux")
    and platform.machine().lower() in ("x86_64", "amd64")
    and any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    and os.environ.get("FUNCOPT_NATIVE", "1") != "0"
)
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}")


@pytest.fixture
def calls(monkeypatch):
    """Lowers the size threshold to 0 and counts the native kernel calls by name."""
    monkeypatch.setattr(_library, "MIN_ELEMENTS", 0)
    counts = {"adam": 0, "sgd": 0, "add": 0}
    for name in counts:
        original = getattr(native, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(native, name, spy)
    return counts


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SIZES.items()}


def _grads(params, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return tree.map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params)


def _train(tx, params, steps, use_native, pure_step=False):
    state = tx.init(params)
    for i in range(steps):
        grads = _grads(params, i)
        with native.enabled(use_native):
            if pure_step:
                params, state = apply_gradients(tx, grads, state, params)
            else:
                updates, state = tx.update(grads, state, params)
                params = funcopt.apply_updates(params, updates)
    return params, state


def test_native_kernels_are_built_where_expected():
    """On Linux x86-64 with a C compiler (as in CI) the kernels must build and pass their self-test."""
    if not _EXPECTED_HERE:
        pytest.skip("not Linux on x86-64 with a C compiler")
    assert native.available(), native.unavailable_reason()
    assert native.unavailable_reason() is None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pure_step", [False, True], ids=["update", "pure_step"])
def test_native_route_equals_torch_kernels_and_reference_path(name, dtype, pure_step, calls):
    params = _params(dtype)
    got = _train(registry.make(name), params, 4, use_native=True, pure_step=pure_step)
    assert calls["adam"] + calls["sgd"] == 4, calls
    if not pure_step:
        assert calls["add"] == 4
    torch_kernels = _train(registry.make(name), params, 4, use_native=False, pure_step=pure_step)
    with fused.fast_path_enabled(False):
        reference = _train(registry.make(name), params, 4, use_native=False)
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    assert_trees_close(got, torch_kernels, rtol=tol, atol=tol)
    assert_trees_close(got, reference, rtol=tol, atol=tol)


@needs_native
@pytest.mark.parametrize("name", registry.names(native=True, torch=True))
def test_native_pure_step_follows_torch_optim_fused(name, calls):
    params = _params(torch.float64)
    got, _ = _train(registry.make(name), params, 20, use_native=True, pure_step=True)
    assert calls["adam"] + calls["sgd"] == 20
    torch_params = [torch.nn.Parameter(t.clone()) for t in params.values()]
    optimizer = registry.torch_optimizer(name, torch_params, fused=True)
    for i in range(20):
        for p, g in zip(torch_params, _grads(params, i).values()):
            p.grad = g.clone()
        optimizer.step()
    for (key, value), expected in zip(got.items(), torch_params):
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-14, msg=key)


@needs_native
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pure_step", [False, True], ids=["update", "pure_step"])
def test_native_route_never_writes_into_its_inputs(name, pure_step, calls):
    tx = registry.make(name)
    params = _params()
    state = _train(tx, params, 2, use_native=False)[1]  # a state with non-zero moments
    grads = _grads(params, 5)
    inputs = (params, state, grads)
    before = snapshot(inputs)
    versions = [t._version for t in tree.leaves(inputs)]
    if pure_step:
        out = apply_gradients(tx, grads, state, params)
    else:
        updates, new_state = tx.update(grads, state, params)
        out = (funcopt.apply_updates(params, updates), new_state)
    assert calls["adam"] + calls["sgd"] == 1
    assert_trees_equal(inputs, before)
    assert [t._version for t in tree.leaves(inputs)] == versions
    written = {t.data_ptr() for t in tree.leaves(out) if t.numel() > 1}
    assert not written & {t.data_ptr() for t in tree.leaves(inputs) if t.numel() > 1}, "an output aliases an input"


@needs_native
def test_mixed_dtypes_and_unaligned_views_and_one_thread(calls):
    """Float32 and float64 leaves run as two groups; leaves that are views at odd offsets (so
    unaligned) are read correctly; the result does not depend on the number of threads."""
    base = torch.randn(100_003, dtype=torch.float64)
    params = {
        "a": torch.randn(40_000),
        "view": base[3:70_003],  # contiguous, storage offset 3
        "b": torch.randn(7, dtype=torch.float64),
    }
    tx = funcopt.adam(1e-2, weight_decay=1e-2)
    got = _train(tx, params, 3, use_native=True)
    assert calls["adam"] == 6  # two dtype groups per step
    expected = _train(tx, params, 3, use_native=False)
    assert_trees_close(got, expected, rtol=2e-6, atol=1e-7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = _train(tx, params, 3, use_native=True)
    finally:
        torch.set_num_threads(threads)
    assert_trees_equal(one_thread, got)


@needs_native
def test_large_outputs_take_the_streaming_route_with_the_same_numbers(calls):
    """Outputs of 4 MiB and more use non-temporal stores, of 32 MiB and more huge-page
    hints as well: the same values."""
    params = {"w": torch.randn(1 << 23), "b": torch.randn(1000)}  # 32 MiB per output
    assert _library._streams(list(params.values()), 1)
    for make in (lambda: funcopt.adam(1e-3), lambda: funcopt.sgd(1e-2, momentum=0.9)):
        got = _train(make(), params, 2, use_native=True)
        expected = _train(make(), params, 2, use_native=False)
        assert_trees_close(got, expected, rtol=2e-6, atol=1e-6)  # float32, values of order 1


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_updates_native_add_is_bitwise_torchs(dtype, calls):
    p = {"x": torch.randn(50_001, dtype=dtype), "y": torch.randn(3, 5, dtype=dtype)}
    u = tree.map(lambda t: torch.randn_like(t) * 1e-3, p)
    got = funcopt.apply_updates(p, u)
    assert calls["add"] == 1
    assert_trees_equal(got, {k: p[k] + u[k] for k in p})
    single = funcopt.apply_updates({"x": p["x"]}, {"x": u["x"]})  # one leaf takes it too
    assert calls["add"] == 2
    assert torch.equal(single["x"], p["x"] + u["x"])


@needs_native
def test_apply_updates_keeps_torch_for_what_the_native_add_does_not_take(calls):
    p = {"a": torch.randn(10), "b": torch.randn(10, dtype=torch.float64)}
    funcopt.apply_updates(p, tree.map(torch.ones_like, p))  # mixed dtypes
    q = {"a": torch.randn(10, 4).t()}  # not contiguous
    funcopt.apply_updates(q, {"a": torch.ones(4, 10)})
    r = {"a": torch.randn(10, dtype=torch.float16)}
    funcopt.apply_updates(r, {"a": torch.ones(10, dtype=torch.float16)})
    stacked = {"a": torch.randn(3, 10)}
    torch.func.vmap(funcopt.apply_updates)(stacked, {"a": torch.ones(3, 10)})
    assert calls["add"] == 0


@needs_native
def test_no_native_kernels_under_functorch_transforms(calls):
    tx = funcopt.adam(1e-2)
    params = {"w": torch.randn(4, 3)}
    stacked = tree.stack([params, tree.map(lambda t: t + 1, params)])
    state = torch.func.vmap(tx.init)(stacked)
    torch.func.vmap(tx.update)(tree.map(torch.ones_like, stacked), state, stacked)

    def loss(p):
        updates, _ = tx.update(tree.map(torch.ones_like, p), tx.init(p), p)
        return funcopt.apply_updates(p, updates)["w"].sum()

    torch.func.grad(loss)(params)
    assert calls == {"adam": 0, "sgd": 0, "add": 0}


@needs_native
def test_switch_and_threshold_keep_the_torch_kernels(calls, monkeypatch):
    params = _params()
    tx = funcopt.adam(1e-2)
    with pytest.raises(RuntimeError):
        with native.enabled(False):
            assert not native.is_enabled()
            raise RuntimeError("restored on error")
    assert native.is_enabled()
    _train(tx, params, 1, use_native=False)
    assert calls["adam"] == 0
    monkeypatch.setattr(_library, "MIN_ELEMENTS", sum(t.numel() for t in params.values()) + 1)
    _train(tx, params, 1, use_native=True)
    assert calls["adam"] == 0


def test_a_failed_build_or_self_test_leaves_the_torch_kernels(monkeypatch):
    library = _library._Library()
    monkeypatch.setattr(_library, "_build", lambda: (object(), None))
    monkeypatch.setattr(_library, "_self_test", lambda lib: "self-test: the native Adam kernel disagrees")
    assert library.get() is None
    assert "disagrees" in library.reason

    def broken():
        raise OSError("cannot load")

    library = _library._Library()
    monkeypatch.setattr(_library, "_build", broken)
    assert library.get() is None
    assert "cannot load" in library.reason


_CHILD = """
import os, tempfile, torch, funcopt
from funcopt.fast import native
from funcopt.fast.native import _library
_library.MIN_ELEMENTS = 0
tx = funcopt.adam(1e-2)
p = {"w": torch.randn(100)}
u, s = tx.update(p, tx.init(p), p)
print("available", native.available())
print("reason", native.unavailable_reason())
print("left", os.listdir(tempfile.gettempdir()))
"""


def _child(tmp_path, **env):
    tmp = tmp_path / "tmp"
    tmp.mkdir(parents=True)
    full = dict(os.environ, TMPDIR=str(tmp), **env)
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, env=full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())


@pytest.mark.slow
def test_environment_switch_and_missing_compiler_fall_back(tmp_path):
    off = _child(tmp_path / "off", FUNCOPT_NATIVE="0")
    assert off["available"] == "False" and "FUNCOPT_NATIVE=0" in off["reason"]
    no_cc = _child(tmp_path / "nocc", CC="/nonexistent/cc")
    assert no_cc["available"] == "False" and "compiler" in no_cc["reason"]


@pytest.mark.slow
def test_building_leaves_nothing_on_disk(tmp_path):
    if not _EXPECTED_HERE:
        pytest.skip("not Linux on x86-64 with a C compiler")
    out = _child(tmp_path)
    assert out["available"] == "True", out["reason"]
    assert out["left"] == "[]"


@needs_native
@pytest.mark.parametrize("name", NAMES)
def test_native_run_resumes_bitwise_from_a_checkpoint(name, calls, tmp_path):
    tx = registry.make(name)
    params = _params()
    straight = _train(tx, params, 6, use_native=True)
    half_params, half_state = _train(tx, params, 3, use_native=True)
    funcopt.checkpoint.save(tmp_path / "ckpt.safetensors", {"params": half_params, "opt_state": half_state})
    restored = funcopt.checkpoint.load(tmp_path / "ckpt.safetensors")
    p, state = restored["params"], restored["opt_state"]
    for i in range(3, 6):
        updates, state = tx.update(_grads(params, i), state, p)
        p = funcopt.apply_updates(p, updates)
    assert_trees_equal((p, state), straight)
