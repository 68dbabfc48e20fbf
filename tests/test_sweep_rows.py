"""The sweep's per-configuration row kernels (funcopt/sweep/_rows.py), over the registry.

Every registry row with a fast route is swept over two configurations (its own arguments, and
a second learning rate with every momentum and decay hyperparameter at 0.0, the case where an
injected tensor keeps a chain block that a Python 0.0 leaves out; a row whose learning rate is
a schedule sweeps another hyperparameter, and the row kernels must leave it to the generic step). The sweep with the row
kernels must equal the sweep with the fast routes switched off (the generic stacked step over
the reference chains) and, for each configuration, training it alone with the reference chain.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

import funcopt
from funcopt import sweep as S
from funcopt.sweep import _rows
from tests import registry
from tests.helpers import assert_trees_close


def _zeroable(factory, kwargs, name):
    """Whether ``factory`` accepts 0.0 for ``name`` (some hyperparameters must be positive)."""
    try:
        factory(**{**kwargs, name: 0.0})
    except (funcopt.FuncoptError, ValueError, TypeError):
        return False
    return True


def _sweep_case(name):
    """(factory, swept values, whether the row kernels take it) for a registry row."""
    row = registry.ROWS[name]
    signature = inspect.signature(row.factory).parameters
    lr = row.kwargs.get("learning_rate", signature["learning_rate"].default if "learning_rate" in signature else None)
    if not isinstance(lr, float):
        # a fixed schedule (or tensor) through functools.partial: sweep another hyperparameter; the
        # row kernels, which read the hyperparameters once, must leave a schedule to the generic step
        for h in row.factory.fast_route.hyperparams:
            value = row.kwargs.get(h, signature[h].default)
            if isinstance(value, float) and value != 0.0:
                fixed = {k: v for k, v in row.kwargs.items() if k != h}
                # a 0-dim tensor learning rate is read once like a number: the row kernels take it
                return functools.partial(row.factory, **fixed), {h: [value, value * 0.5]}, not callable(lr)
        return None
    swept = {"learning_rate": [lr, lr * 0.5]}
    for h in row.factory.fast_route.hyperparams:
        value = row.kwargs.get(h, signature[h].default)
        structural = "momentum" in h or "decay" in h or h == "dampening"  # 0 switches a block off
        if structural and isinstance(value, float) and value != 0.0 and _zeroable(row.factory, row.kwargs, h):
            swept[h] = [value, 0.0]
    fixed = {k: v for k, v in row.kwargs.items() if k not in swept}
    return (functools.partial(row.factory, **fixed) if fixed else row.factory), swept, name not in GENERIC_STEP


def _problem():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.5,
              "b": torch.randn(3, generator=g, dtype=torch.float64) * 0.1}
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    batches = [(x[i::2], y[i::2]) for i in range(2)]

    def loss_fn(p, batch):
        xb, yb = batch
        return ((torch.tanh(xb @ p["w"] + p["b"]) - yb) ** 2).mean()

    return params, batches, loss_fn


ROW_NAMES = [n for n in registry.names(fast=True)
             if registry.ROWS[n].route is None and not registry.ROWS[n].update_extras]
# Fast routes the row kernels do not take, and why (the generic stacked step runs them):
GENERIC_STEP = {
    "adagrad": "an injected lr_decay makes the learning rate a schedule of the count",
    "adagrad_lr_decay_l2_maximize": "an injected lr_decay makes the learning rate a schedule of the count",
    "asgd": "the route keeps 0-dim state fields (eta, mu)",
    "asgd_averaging_l2_maximize": "the route keeps 0-dim state fields (eta, mu)",
}


@pytest.mark.parametrize("name", ROW_NAMES)
def test_row_kernels_equal_the_reference_chain(name, monkeypatch):
    case = _sweep_case(name)
    if case is None:
        pytest.skip("a schedule and no other float hyperparameter to sweep")
    factory, swept, rows_expected = case
    params, batches, loss_fn = _problem()
    ran = []
    step = _rows.RowKernels.step
    monkeypatch.setattr(_rows.RowKernels, "step", lambda self, *a: (ran.append(1), step(self, *a))[1])
    steps = 4
    res = S.sweep(loss_fn, params, factory, swept, batches, steps=steps, progress=False)
    with funcopt.fast.fast_path_enabled(False):
        ref = S.sweep(loss_fn, params, factory, swept, batches, steps=steps, progress=False)
    assert res.step_mode == "stacked", res.step_note
    if rows_expected:
        assert len(ran) == steps, f"{name}: the row kernels did not run"
    else:
        assert not ran
    assert_trees_close(res.params, ref.params, rtol=1e-10, atol=1e-12, msg=f"{name} params")
    assert_trees_close(res.opt_state, ref.opt_state, rtol=1e-10, atol=1e-12, msg=f"{name} state")
    torch.testing.assert_close(res.loss, ref.loss, rtol=1e-10, atol=1e-12)
    # and each configuration alone, on the reference chain
    for i in range(2):
        tx = funcopt.inject_hyperparams(factory)(**{n: v[i] for n, v in swept.items()})
        p, state = params, tx.init(params)
        with funcopt.fast.fast_path_enabled(False):
            for t in range(steps):
                grads = torch.func.grad(loss_fn)(p, batches[t % 2])
                updates, state = tx.update(grads, state, p)
                p = funcopt.apply_updates(p, updates)
        p_i, s_i = res.select(i)
        assert_trees_close(p_i, p, rtol=1e-10, atol=1e-12, msg=f"{name} config {i}")
        assert_trees_close(s_i, state, rtol=1e-10, atol=1e-12, msg=f"{name} config {i} state")


def test_row_kernels_are_used_for_the_benchmark_case_and_stay_out_of_the_way_elsewhere(monkeypatch):
    params, batches, loss_fn = _problem()
    made = []
    of = _rows.RowKernels.of
    monkeypatch.setattr(_rows.RowKernels, "of", staticmethod(lambda *a: (lambda r: (made.append(r), r)[1])(of(*a))))
    S.sweep(loss_fn, params, funcopt.adamw, S.grid(learning_rate=[1e-3, 1e-2], weight_decay=[0.0, 0.1]),
            batches, steps=2, progress=False)
    assert made[-1] is not None
    # a prebuilt transformation (no factory to build each configuration's route from): the generic step
    S.sweep(loss_fn, params, funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-3),
            {"b1": [0.8, 0.9]}, batches, steps=2, progress=False)
    assert made[-1] is None


def test_metrics_that_view_the_params_keep_their_history():
    # eval_fn may return a view of the params; the row kernels update the params in place, so
    # the sweep must keep copies (each evaluation its own values)
    params, batches, loss_fn = _problem()
    hp = {"learning_rate": [0.05, 0.1]}
    res = S.sweep(loss_fn, params, funcopt.sgd, hp, batches, steps=4, eval_fn=lambda p: {"b0": p["b"][0]},
                  eval_every=1, progress=False)
    with funcopt.fast.fast_path_enabled(False):
        ref = S.sweep(loss_fn, params, funcopt.sgd, hp, batches, steps=4, eval_fn=lambda p: {"b0": p["b"][0]},
                      eval_every=1, progress=False)
    torch.testing.assert_close(res.evals["b0"], ref.evals["b0"], rtol=1e-12, atol=1e-14)
    assert len(set(res.evals["b0"][0].tolist())) == 4  # four different values, not the last one four times
