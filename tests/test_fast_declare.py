"""A new elementwise optimizer gets a fast route from one declaration, with no dispatcher change.

SGDW (heavy-ball momentum, then decoupled weight decay) is declared here, outside funcopt, from
existing blocks and a ten-line foreach kernel; the generic dispatcher must run it, match its
reference chain, donate in place, resume from a checkpoint and explain itself.
"""

from __future__ import annotations

import pytest
import torch

import funcopt
from funcopt import fast
from tests.helpers import assert_trees_close, assert_trees_equal, snapshot


def _sgdw_kernel(call: fast.KernelCall) -> list[torch.Tensor]:
    h, g, buf = call.h, call.g, call.bufs["momentum_buffer"]
    if call.in_place:
        if call.first:
            torch._foreach_copy_(buf, g)
        else:
            torch._foreach_mul_(buf, h["momentum"])
            torch._foreach_add_(buf, g)
        new = buf
    else:
        new = [x.clone() for x in g] if call.first else torch._foreach_add(torch._foreach_mul(buf, h["momentum"]), g)
        call.bufs["momentum_buffer"] = new
    direction = torch._foreach_add(new, call.p, alpha=h["weight_decay"])
    if call.in_place:
        torch._foreach_add_(call.p, direction, alpha=-call.lr)
        return call.p
    return torch._foreach_mul(direction, -call.lr)


@fast.declare(
    fast.FastRoute(
        _sgdw_kernel, hyperparams=("momentum", "weight_decay"), buffers=("momentum_buffer",), needs_first_step=True
    )
)
def sgdw(learning_rate, momentum=0.9, weight_decay=1e-2):
    """SGD with momentum and decoupled weight decay (Loshchilov & Hutter, 2019)."""
    return funcopt.chain(
        funcopt.trace(momentum), funcopt.add_decayed_weights(weight_decay), funcopt.scale_by_learning_rate(learning_rate)
    )


def _problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(5, 4, generator=gen, dtype=dtype), "b": torch.randn(4, generator=gen, dtype=dtype)}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in params.items()} for _ in range(6)]
    return params, grads


def _run(tx, params, grads, fast_on=True):
    state = tx.init(params)
    with fast.fast_path_enabled(fast_on):
        for g in grads:
            updates, state = tx.update(g, state, params)
            params = funcopt.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("schedule", [False, True])
def test_declared_route_runs_and_matches_its_reference_chain(schedule):
    lr = funcopt.schedules.cosine_decay(0.1, 10) if schedule else 0.1
    tx = sgdw(lr)
    params, grads = _problem()
    state = tx.init(params)
    route = fast.explain(tx, grads[0], state, params)
    assert (route.route, route.backend) == ("fast", "torch"), route
    assert fast.fast_path_applies(tx, grads[0], state, params)
    assert_trees_close(_run(tx, params, grads), _run(tx, params, grads, fast_on=False), rtol=1e-12, atol=1e-14)


def test_declared_route_is_pure_and_donates_in_place():
    tx = sgdw(0.1)
    params, grads = _problem()
    state = tx.init(params)
    before = snapshot((params, state, grads[0]))
    versions = [t._version for t in funcopt.tree.leaves((params, state))]
    tx.update(grads[0], state, params)
    assert_trees_equal((params, state, grads[0]), before)
    assert [t._version for t in funcopt.tree.leaves((params, state))] == versions
    pure_p, pure_s = params, state
    don_p = funcopt.tree.map(torch.clone, params)
    don_s = funcopt.tree.map(torch.clone, state)
    for g in grads:
        pure_p, pure_s = funcopt.apply_gradients(tx, g, pure_s, pure_p)
        out, don_s = funcopt.apply_gradients(tx, g, don_s, don_p, donate=True)
        assert out is don_p
    assert_trees_close((don_p, don_s), (pure_p, pure_s), rtol=1e-13, atol=1e-15)
    assert fast.explain(tx, grads[0], don_s, don_p, step="apply_gradients", donate=True).route.endswith(
        "remembered checks"
    )


def test_declared_route_resumes_bitwise_from_a_checkpoint(tmp_path):
    tx = sgdw(0.1)
    params, grads = _problem()
    straight = _run(tx, params, grads)
    p, s = _run(tx, params, grads[:3])
    funcopt.checkpoint.save(tmp_path / "c.safetensors", {"params": p, "opt_state": s})
    loaded = funcopt.checkpoint.load(tmp_path / "c.safetensors", like={"params": params, "opt_state": tx.init(params)})
    p, s = loaded["params"], loaded["opt_state"]
    for g in grads[3:]:
        updates, s = tx.update(g, s, p)
        p = funcopt.apply_updates(p, updates)
    assert_trees_equal((p, s), straight)


def test_a_declaration_naming_an_unknown_buffer_fails_clearly():
    @fast.declare(fast.FastRoute(_sgdw_kernel, hyperparams=("momentum",), buffers=("velocity",)))
    def broken(learning_rate, momentum=0.9):
        return funcopt.chain(funcopt.trace(momentum), funcopt.scale_by_learning_rate(learning_rate))

    params, grads = _problem()
    tx = broken(0.1)
    with pytest.raises(TypeError, match=r"TraceState.momentum_buffer is not among the declared buffers \('velocity',\)"):
        tx.update(grads[0], tx.init(params), params)


@pytest.mark.parametrize("flags", [dict(), dict(maximize=True), dict(dampening=0.3, maximize=True)])
def test_sgd_route_with_an_injected_momentum_of_zero(flags):
    # an injected momentum keeps the momentum block (and its buffer) even at 0.0, which torch's
    # _fused_sgd_ refuses: the pure route and the row kernels of a sweep (in place) must still
    # follow the reference chain, whose buffer is then the (damped) gradient
    from funcopt.fast import KernelCall, fast_path_of

    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(2, generator=g, dtype=torch.float64)}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()} for _ in range(3)]
    tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1, momentum=0.0, weight_decay=0.01, **flags)
    p_fast, s_fast, p_ref, s_ref = params, tx.init(params), params, tx.init(params)
    for gr in grads:
        u, s_fast = tx.update(gr, s_fast, p_fast)
        p_fast = funcopt.apply_updates(p_fast, u)
        with fast.fast_path_enabled(False):
            u, s_ref = tx.update(gr, s_ref, p_ref)
        p_ref = funcopt.apply_updates(p_ref, u)
    assert_trees_close(p_fast, p_ref, rtol=1e-12, atol=1e-15)
    assert_trees_close(s_fast, s_ref, rtol=1e-12, atol=1e-15)
    # the in-place kernel on buffers the caller owns (what a sweep's row kernels run)
    inner = funcopt.sgd(torch.tensor(0.1, dtype=torch.float64), momentum=torch.tensor(0.0, dtype=torch.float64),
                        weight_decay=torch.tensor(0.01, dtype=torch.float64), **flags)
    fp = fast_path_of(inner)
    h, lr = fp.python_inputs()
    p = [params["w"].clone(), params["b"].clone()]
    buf = [torch.zeros_like(x) for x in p]
    for t, gr in enumerate(grads):
        step = torch.tensor(t + 1)
        fp.route.kernel(KernelCall(h, lr, p, [gr["w"], gr["b"]], {"momentum_buffer": buf}, True, True, step, t == 0))
    assert_trees_close({"w": p[0], "b": p[1]}, p_ref, rtol=1e-12, atol=1e-15)
