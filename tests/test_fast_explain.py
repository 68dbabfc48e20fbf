"""funcopt.fast.explain: which route a step takes, and each reason a faster one is not taken."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import funcopt
from funcopt import fast


def _problem(n=(3, 4), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(*n, generator=gen, dtype=dtype), "b": torch.randn(n[-1], generator=gen, dtype=dtype)}
    grads = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in params.items()}
    return params, grads


def _explain(tx, params, grads, **kwargs):
    return fast.explain(tx, grads, tx.init(params), params, **kwargs)


def test_fast_route_with_torch_kernels_below_the_native_threshold():
    params, grads = _problem()
    route = _explain(funcopt.adam(1e-3), params, grads)
    assert route.route == "fast" and route.backend == "torch"
    if "native" in [b.name for b in fast.backends()]:
        assert any("below MIN_ELEMENTS" in r for r in route.reasons), route.reasons
    assert str(route).startswith("fast (torch kernels)")


def test_native_backend_taken_for_a_large_cpu_step_and_explain_matches_what_runs(monkeypatch):
    native = pytest.importorskip("funcopt.fast.native")
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    params, grads = _problem((300, 300))
    tx = funcopt.adam(1e-3)
    route = _explain(tx, params, grads)
    assert (route.route, route.backend, route.reasons) == ("fast", "native", ())
    calls = []
    original = native.BACKEND.kernels["adam"]
    monkeypatch.setitem(native.BACKEND.kernels, "adam", lambda call: calls.append(1) or original(call))
    tx.update(grads, tx.init(params), params)
    assert calls, "explain said native, but the native kernel did not run"


def test_sgd_without_a_native_kernel_family_is_reported():
    params, grads = _problem()
    route = _explain(funcopt.lion(1e-3), params, grads)
    assert route.backend == "torch"
    if "native" in [b.name for b in fast.backends()]:
        assert "the native backend has no 'lion' kernel" in route.reasons


def test_no_declared_route():
    params, grads = _problem()
    tx = funcopt.chain(funcopt.clip_by_global_norm(1.0), funcopt.adam(1e-3))
    route = _explain(tx, params, grads)
    assert route.route == "reference" and route.backend is None
    assert "no declared fast route" in route.reasons[0]


def test_switched_off():
    params, grads = _problem()
    with fast.fast_path_enabled(False):
        route = _explain(funcopt.adam(1e-3), params, grads)
    assert route.route == "reference" and "switched off" in route.reasons[0]


def test_under_vmap():
    params, grads = _problem()
    tx = funcopt.sgd(0.1)
    seen = []

    def step(g):
        seen.append(fast.explain(tx, {"w": g}, tx.init({"w": g}), {"w": g}))
        return g

    torch.func.vmap(step)(torch.randn(2, 3))
    assert seen[0].route == "reference" and "torch.func transform" in seen[0].reasons[0]


def test_under_torch_compile(monkeypatch):
    params, grads = _problem()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    route = _explain(funcopt.adam(1e-3), params, grads)
    assert route.route == "reference" and "torch.compile" in route.reasons[0]


def test_mask_given():
    params, grads = _problem()
    route = _explain(funcopt.adamw(1e-3, mask={"w": True, "b": False}), params, grads)
    assert route.route == "reference" and route.reasons == ("mask= is given (the kernel updates every leaf)",)


def test_mu_dtype_given():
    params, grads = _problem()
    route = _explain(funcopt.adamw(1e-3, mu_dtype=torch.bfloat16), params, grads)
    assert route.route == "reference" and route.reasons == ("mu_dtype= is given (the kernel does not take it)",)


def test_tensor_hyperparameter_requiring_grad():
    params, grads = _problem()
    route = _explain(funcopt.adam(1e-3, b1=torch.tensor(0.9, requires_grad=True)), params, grads)
    assert route.route == "reference" and "hyperparameter b1" in route.reasons[0]
    route = _explain(funcopt.adam(torch.tensor(1e-3, requires_grad=True)), params, grads)
    assert "learning rate" in route.reasons[0]


def test_leaf_dtype_contiguity_and_grad():
    params, grads = _problem()
    bf = {k: v.to(torch.bfloat16) for k, v in params.items()}
    route = _explain(funcopt.adam(1e-3), bf, {k: v.to(torch.bfloat16) for k, v in grads.items()})
    assert route.route == "reference" and "dtype torch.bfloat16" in route.reasons[0]
    assert "grads['b']" in route.reasons[0]
    strided = dict(grads, w=torch.randn(4, 3).t())
    route = _explain(funcopt.adam(1e-3), params, strided)
    assert route.reasons == ("grads['w'] is not contiguous",)
    route = _explain(funcopt.adam(1e-3), params, dict(grads, b=grads["b"].clone().requires_grad_()))
    assert route.reasons == ("grads['b'] requires grad",)


def test_tensor_subclass_leaf():
    class Marked(torch.Tensor):
        pass

    params, grads = _problem()
    route = _explain(funcopt.sgd(0.1), params, dict(grads, w=grads["w"].as_subclass(Marked)))
    assert route.reasons == ("grads['w'] is a Marked, not a plain torch.Tensor",)


def test_state_of_another_optimizer():
    params, grads = _problem()
    tx = funcopt.adam(1e-3)
    route = fast.explain(tx, grads, funcopt.adam(1e-3, amsgrad=True).init(params), params)
    assert route.reasons == ("the state does not have the layout this optimizer's init builds",)


def test_native_not_built_here(monkeypatch):
    pytest.importorskip("funcopt.fast.native")
    from funcopt.fast.native import _library

    class NoLibrary:
        reason = "no C compiler found (set $CC or put cc/gcc/clang on PATH)"
        lib = None

        def get(self):
            return None

    monkeypatch.setattr(_library, "_LIBRARY", NoLibrary())
    monkeypatch.setattr(_library, "MIN_ELEMENTS", 0)
    params, grads = _problem()
    route = _explain(funcopt.adam(1e-3), params, grads)
    assert route.backend == "torch"
    assert route.reasons == ("native backend: not available here: no C compiler found (set $CC or put cc/gcc/clang on PATH)",)


def test_apply_gradients_routes_and_remembered_checks():
    params, grads = _problem()
    tx = funcopt.adam(1e-3)
    state = tx.init(params)
    assert fast.explain(tx, grads, state, params, step="apply_gradients").route == "fast"
    route = fast.explain(tx, grads, state, params, step="apply_gradients", donate=True)
    assert (route.route, route.backend) == ("fast, in place", "torch")
    params, state = fast.apply_gradients(tx, grads, state, params, donate=True)
    route = fast.explain(tx, grads, state, params, step="apply_gradients", donate=True)
    assert route == ("fast, in place, remembered checks", "torch", ())


def test_tied_weights_when_donating():
    w = torch.randn(3, 4)
    params = {"a": w, "b": w}
    grads = {"a": torch.randn(3, 4), "b": torch.randn(3, 4)}
    tx = funcopt.sgd(0.1)
    route = fast.explain(tx, grads, tx.init(params), params, step="apply_gradients", donate=True)
    assert route.route == "reference"
    assert route.reasons == ("params['b'] shares memory with params['a'] (tied weights?): an in-place step would write it twice",)


def test_bad_arguments():
    params, grads = _problem()
    with pytest.raises(ValueError, match="step must be one of"):
        _explain(funcopt.adam(1e-3), params, grads, step="apply")
    with pytest.raises(TypeError, match="GradientTransformation"):
        fast.explain(funcopt.adam, grads, None)


@pytest.mark.slow
def test_dtensor_leaf_in_a_one_rank_gloo_group():
    code = textwrap.dedent(
        """
        import torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, distribute_tensor
        import funcopt
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        p = {"w": distribute_tensor(torch.randn(4, 4), mesh, [Replicate()])}
        g = {"w": distribute_tensor(torch.randn(4, 4), mesh, [Replicate()])}
        tx = funcopt.adam(1e-3)
        print(funcopt.fast.explain(tx, g, tx.init(p), p).route)
        print(funcopt.fast.explain(tx, g, tx.init(p), p, step="apply_gradients").reasons[0])
        dist.destroy_process_group()
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # update runs the kernel on the local shards (tests/test_fsdp.py); apply_gradients does not
    assert "fast on local DTensor shards" in out.stdout
    assert "grads['w'] is a DTensor, not a plain torch.Tensor (a DTensor: the fast kernels run on plain local tensors only)" in out.stdout
