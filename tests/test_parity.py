"""Parity with torch.optim: 50 steps on a small MLP give torch's parameters.

Lion and LAMB, which torch.optim does not have, are checked against plain-Python references
written from the papers' equations.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import funcopt
from tests import registry
from tests.helpers import mlp_problem

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _run_both(name, dtype, steps=50, foreach=None):
    torch.set_default_dtype(dtype)  # torch keeps step counters in the default dtype
    module, params, loss_fn, (X, Y) = mlp_problem(dtype)
    reference = copy.deepcopy(module)
    opt = registry.torch_optimizer(name, reference.parameters())
    if foreach is not None:
        for group in opt.param_groups:
            group["foreach"] = foreach
    tx = registry.make(name)
    state = tx.init(params)
    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(X), Y).backward()
        opt.step()
    return params, dict(reference.named_parameters())


@pytest.mark.parametrize("name", registry.names(torch=True))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_torch_optim_after_50_steps(name, dtype):
    ours, theirs = _run_both(name, dtype, foreach=False)
    moved = False
    for key, p in theirs.items():
        torch.testing.assert_close(ours[key], p.detach(), **TOLERANCES[dtype], msg=lambda m: f"{name} [{key!r}]: {m}")
        moved |= not torch.equal(p.detach(), mlp_problem(dtype)[1][key])
    assert moved, "the reference did not move: the comparison would be vacuous"


def test_matches_torch_with_a_schedule_as_learning_rate():
    """A schedule count -> lr gives the k-th update the value LambdaLR gives the k-th step."""
    torch.set_default_dtype(torch.float64)
    module, params, loss_fn, (X, Y) = mlp_problem(torch.float64)
    reference = copy.deepcopy(module)
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9**k)
    tx = funcopt.adam(lambda count: 1e-2 * 0.9**count)
    state = tx.init(params)
    for _ in range(20):
        updates, state = tx.update(torch.func.grad(loss_fn)(params), state, params)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(X), Y).backward()
        opt.step()
        sched.step()
    for key, p in reference.named_parameters():
        torch.testing.assert_close(params[key], p.detach(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Lion and LAMB against element-by-element Python references from the papers' equations.


def _python_lion(p, grads_seq, lr, b1, b2, wd):
    m = [0.0] * len(p)
    p = list(p)
    for g in grads_seq:
        for i in range(len(p)):
            c = b1 * m[i] + (1 - b1) * g[i]
            sign = (c > 0) - (c < 0)
            p[i] = p[i] - lr * (sign + wd * p[i])
            m[i] = b2 * m[i] + (1 - b2) * g[i]
    return p


def _python_lamb(p, grads_seq, lr, b1, b2, eps, wd):
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    p = list(p)
    for t, g in enumerate(grads_seq, start=1):
        r = []
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            r.append(m_hat / (math.sqrt(v_hat) + eps) + wd * p[i])
        p_norm = math.sqrt(sum(x * x for x in p))
        r_norm = math.sqrt(sum(x * x for x in r))
        ratio = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
        p = [p[i] - lr * ratio * r[i] for i in range(len(p))]
    return p


def _grad_sequence(n_steps, size, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g, dtype=torch.float64).tolist() for _ in range(n_steps)]


@pytest.mark.parametrize(
    "name, make_tx, reference",
    [
        ("lion", lambda: funcopt.lion(1e-2, b1=0.9, b2=0.99, weight_decay=0.1),
         lambda p, gs: _python_lion(p, gs, 1e-2, 0.9, 0.99, 0.1)),
        ("lamb", lambda: funcopt.lamb(1e-2, weight_decay=0.01),
         lambda p, gs: _python_lamb(p, gs, 1e-2, 0.9, 0.999, 1e-6, 0.01)),
    ],
)
def test_lion_and_lamb_match_paper_equations(name, make_tx, reference):
    """Two leaves (LAMB's trust ratio is per leaf), 10 steps of fixed gradients, float64."""
    sizes = {"a": 4, "b": 3}
    p0 = {k: torch.randn(n, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i, (k, n) in enumerate(sizes.items())}
    grads = {k: _grad_sequence(10, n, seed=10 + i) for i, (k, n) in enumerate(sizes.items())}
    tx = make_tx()
    params, state = p0, tx.init(p0)
    for t in range(10):
        g = {k: torch.tensor(grads[k][t], dtype=torch.float64) for k in sizes}
        updates, state = tx.update(g, state, params)
        params = funcopt.apply_updates(params, updates)
    for k in sizes:
        expected = torch.tensor(reference(p0[k].tolist(), grads[k]), dtype=torch.float64)
        torch.testing.assert_close(params[k], expected, rtol=1e-12, atol=1e-14)
        assert not torch.equal(params[k], p0[k])
