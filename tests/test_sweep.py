"""Tests for funcopt.sweep and funcopt.stacked: each configuration of a batched sweep must equal
training it alone (same seed, same batches), in both step modes."""

from __future__ import annotations

import math

import pytest
import torch

import funcopt
from funcopt.sweep import _engine
from funcopt.sweep import _stacked as stacked
from funcopt.sweep import _sweep as _sweep_impl
from funcopt import sweep as S
from funcopt import tree
from tests.helpers import assert_trees_close

D_IN, HIDDEN, D_OUT, N = 4, 6, 3, 24


def _problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, D_OUT)).to(dtype)
    X = torch.randn(N, D_IN, generator=g, dtype=dtype)
    Y = torch.randint(0, D_OUT, (N,), generator=g)

    def init(seed):
        gi = torch.Generator().manual_seed(seed)
        return {k: torch.randn(v.shape, generator=gi, dtype=dtype) * 0.5 for k, v in module.named_parameters()}

    def loss_fn(p, batch):
        xb, yb = batch
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(module, p, None, xb), yb)

    # Four minibatches, cycled: every configuration sees the same sequence.
    batches = [(X[i::4], Y[i::4]) for i in range(4)]

    def accuracy(p):
        return {"acc": (funcopt.nn.apply(module, p, None, X).argmax(-1) == Y).to(dtype).mean(),
                "full_loss": loss_fn(p, (X, Y))}

    return module, init, loss_fn, batches, accuracy


def _train_alone(loss_fn, params, tx, batches, steps):
    """The reference: an ordinary single-configuration loop."""
    state = tx.init(params)
    losses = []
    for step in range(steps):
        loss, grads = torch.func.grad_and_value(loss_fn)(params, batches[step % len(batches)])[::-1]
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
        losses.append(float(loss))
    return params, state, losses


def _cosine(peak, total):
    def schedule(count):
        frac = torch.clamp(count.to(torch.float64) / total, max=1.0)
        return peak * 0.5 * (1 + torch.cos(math.pi * frac))

    return schedule


def sgd_cosine(peak_lr: float = 0.1, momentum: float = 0.9):
    """A factory whose swept argument is a schedule parameter."""
    return funcopt.sgd(_cosine(peak_lr, 10), momentum=momentum)


CASES = {
    "adam": (funcopt.adam, S.grid(learning_rate=[0.01, 0.05], weight_decay=[0.0, 0.1])),
    "sgd_momentum": (funcopt.sgd, S.grid(learning_rate=[0.05, 0.2], momentum=[0.0, 0.9])),
    "sgd_cosine_schedule": (sgd_cosine, S.grid(peak_lr=[0.05, 0.3], momentum=[0.5, 0.9])),
    "adam_fixed_schedule": (
        funcopt.inject_hyperparams(funcopt.adam)(learning_rate=_cosine(0.05, 10)),
        {"b1": [0.8, 0.9, 0.95], "eps": [1e-8, 1e-3, 1e-6]},
    ),
}


def _alone_tx(optimizer, values):
    if isinstance(optimizer, funcopt.GradientTransformation):
        return optimizer, values
    return funcopt.inject_hyperparams(optimizer)(**values), {}


@pytest.mark.parametrize("step_mode", ["stacked", "vmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_configuration_equals_training_it_alone(case, step_mode):
    optimizer, hp = CASES[case]
    _, init, loss_fn, batches, _ = _problem()
    steps = 5
    res = S.sweep(loss_fn, init(0), optimizer, hp, batches, steps=steps, step_mode=step_mode, progress=False)
    assert res.step_mode == step_mode
    k = len(next(iter(hp.values())))
    assert res.loss.shape == (k, steps)
    for i in range(k):
        values = {n: v[i] for n, v in hp.items()}
        tx, to_set = _alone_tx(optimizer, values)
        state0 = funcopt.set_hyperparams(tx.init(init(0)), **to_set) if to_set else tx.init(init(0))
        params, state, losses = init(0), state0, []
        for step in range(steps):
            grads, loss = torch.func.grad_and_value(loss_fn)(params, batches[step % 4])
            updates, state = tx.update(grads, state, params)
            params = funcopt.apply_updates(params, updates)
            losses.append(float(loss))
        p_i, s_i = res.select(i)
        assert_trees_close(p_i, params, rtol=1e-10, atol=1e-12, msg=f"{case} config {i}")
        assert_trees_close(s_i, state, rtol=1e-10, atol=1e-12, msg=f"{case} config {i} state")
        torch.testing.assert_close(res.loss[i], torch.tensor(losses, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_configurations_differ_so_the_equivalence_test_is_not_vacuous():
    _, init, loss_fn, batches, _ = _problem()
    res = S.sweep(loss_fn, init(0), funcopt.adam, {"learning_rate": [0.01, 0.1]}, batches, steps=3, progress=False)
    assert not torch.allclose(res.loss[0], res.loss[1])


@pytest.mark.parametrize("factory", [funcopt.adam, funcopt.adamw, funcopt.nadam, funcopt.rmsprop, funcopt.adamax, funcopt.lion, funcopt.radam, funcopt.adagrad])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stacked_step_equals_vmapped_step(factory, dtype):
    params = {"w": torch.randn(3, 4, dtype=dtype), "b": torch.randn(4, dtype=dtype), "s": torch.randn((), dtype=dtype)}
    tx = funcopt.inject_hyperparams(factory)(learning_rate=0.01)
    p = S.stack_params(params, 3)
    st = S.stack_states(tx, p, {"learning_rate": [1e-3, 1e-2, 1e-1]})
    ok, reason = stacked.check_stacked_update(tx, p, st)
    assert ok, reason


def test_non_elementwise_optimizers_are_detected_and_fall_back_to_vmap():
    params = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    for tx in [funcopt.inject_hyperparams(funcopt.lamb)(learning_rate=0.01),
               funcopt.inject_hyperparams(lambda learning_rate=0.1: funcopt.chain(
                   funcopt.clip_by_global_norm(1.0), funcopt.sgd(learning_rate)))()]:
        p = S.stack_params(params, 3)
        st = S.stack_states(tx, p, {"learning_rate": [1e-3, 1e-2, 1e-1]})
        ok, reason = stacked.check_stacked_update(tx, p, st)
        assert not ok and "differs" in reason


def test_checks_across_all_configurations_are_detected_by_a_nan_probe():
    """apply_if_finite tests "all gradients finite": over the stack that would couple configs."""
    params = {"w": torch.randn(3, 4, dtype=torch.float64)}
    tx = funcopt.inject_hyperparams(
        lambda learning_rate=0.1: funcopt.apply_if_finite(funcopt.sgd(learning_rate), 3))()
    p = S.stack_params(params, 3)
    st = S.stack_states(tx, p, {"learning_rate": [1e-3, 1e-2, 1e-1]})
    ok, reason = stacked.check_stacked_update(tx, p, st)
    assert not ok and "step 2" in reason


def test_stacked_step_with_counts_that_differ_per_configuration():
    params = {"w": torch.randn(3, 4, dtype=torch.float32), "b": torch.randn(4, dtype=torch.float32)}
    tx = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=0.01)
    states = []
    for i, lr in enumerate([1e-3, 1e-2, 1e-1]):
        s = funcopt.set_hyperparams(tx.init(params), learning_rate=lr)
        for _ in range(i):  # configuration i has taken i steps
            _, s = tx.update(tree.map(torch.ones_like, params), s, params)
        states.append(s)
    st, p = tree.stack(states), S.stack_params(params, 3)
    grads = tree.map(torch.randn_like, p)
    u_s, s_s = stacked.stacked_update(tx, grads, st, p)
    u_v, s_v = stacked.vmapped_update(tx, grads, st, p)
    assert_trees_close(u_s, u_v, rtol=1e-5, atol=1e-7)
    assert_trees_close(s_s, s_v, rtol=1e-5, atol=1e-7)
    assert s_s.count.tolist() == [1, 2, 3]
    assert funcopt.get_hyperparams(s_s)["learning_rate"].tolist() == [1e-3, 1e-2, 1e-1]


def test_lamb_sweep_uses_vmap_and_matches_training_alone():
    _, init, loss_fn, batches, _ = _problem()
    hp = {"learning_rate": [0.01, 0.05]}
    res = S.sweep(loss_fn, init(0), funcopt.lamb, hp, batches, steps=4, progress=False)
    assert res.step_mode == "vmap" and "differs" in res.step_note
    tx = funcopt.inject_hyperparams(funcopt.lamb)(learning_rate=0.05)
    params, _, _ = _train_alone(loss_fn, init(0), tx, batches, 4)
    assert_trees_close(res.select(1)[0], params, rtol=1e-10, atol=1e-12)


def test_seeds_initialize_each_configuration_through_the_user_function():
    _, init, loss_fn, batches, _ = _problem()
    res = S.sweep(loss_fn, init, funcopt.sgd, {"learning_rate": [0.1, 0.1, 0.1]}, batches, steps=3,
                  seeds=[3, 4, 5], progress=False)
    tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1)
    for i, seed in enumerate([3, 4, 5]):
        params, _, _ = _train_alone(loss_fn, init(seed), tx, batches, 3)
        assert_trees_close(res.select(i)[0], params, rtol=1e-10, atol=1e-12)
    assert res.best().seed in (3, 4, 5) and res.to_rows()[0]["seed"] in (3, 4, 5)
    # seeds-only sweep: no swept hyperparameters, any optimizer
    only = S.sweep(loss_fn, init, funcopt.sgd(0.1), None, batches, steps=2, seeds=[0, 1], progress=False)
    assert only.k == 2 and not torch.allclose(only.loss[0], only.loss[1])


def test_eval_fn_every_n_steps_under_vmap_and_best_by_max():
    _, init, loss_fn, batches, accuracy = _problem()
    hp = {"learning_rate": [0.001, 0.05, 0.3]}
    res = S.sweep(loss_fn, init(0), funcopt.adam, hp, batches, steps=10, eval_fn=accuracy, eval_every=4,
                  mode="max", progress=False)
    assert res.eval_steps == [4, 8, 10]
    assert res.metric == "acc" and set(res.evals) == {"acc", "full_loss"}
    assert res.evals["acc"].shape == (3, 3)
    for i in range(3):
        expected = accuracy(res.select(i)[0])
        assert float(res.evals["acc"][i, -1]) == pytest.approx(float(expected["acc"]))
        assert float(res.evals["full_loss"][i, -1]) == pytest.approx(float(expected["full_loss"]), rel=1e-10)
    best = res.best()
    assert best.value == float(res.evals["acc"][:, -1].max())
    assert best.hparams == {"learning_rate": hp["learning_rate"][best.index]}
    by_loss = res.best("full_loss")  # mode applies to every metric: max here
    assert by_loss.value == float(res.evals["full_loss"][:, -1].max())


def test_chunk_size_gives_the_same_result_as_one_batch():
    _, init, loss_fn, batches, accuracy = _problem()
    hp = S.grid(learning_rate=[0.01, 0.1], weight_decay=[0.0, 0.01, 0.1])
    full = S.sweep(loss_fn, init(0), funcopt.adamw, hp, batches, steps=5, eval_fn=accuracy, progress=False)
    chunked = S.sweep(loss_fn, init(0), funcopt.adamw, hp, batches, steps=5, eval_fn=accuracy,
                      chunk_size=4, progress=False)
    assert_trees_close(chunked.params, full.params, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.evals["acc"], full.evals["acc"])


def test_run_configs_on_subsets_concatenates_to_the_full_sweep():
    """The per-rank unit of a distributed sweep: disjoint subsets, results per configuration."""
    _, init, loss_fn, batches, _ = _problem()
    hp = {"learning_rate": [0.01, 0.02, 0.05, 0.1]}
    full = S.sweep(loss_fn, init(0), funcopt.adam, hp, batches, steps=4, progress=False)
    plan = _sweep_impl._make_plan(loss_fn, init(0), funcopt.adam, hp, batches, eval_fn=None, eval_every=None,
                        chunk_size=None, seeds=None, step_mode="auto", randomness="error", replay=True,
                        metric=None, mode="min")
    parts = [_engine._run_configs(plan, idx, 0, 4) for idx in ([2, 0], [3, 1])]
    for part in parts:
        for j, i in enumerate(part.indices):
            assert_trees_close(tree.map(lambda x: x[j], part.params), full.select(i)[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(part.losses[j], full.loss[i])


def test_successive_halving_keeps_the_best_fraction_and_continues_batched():
    _, init, loss_fn, batches, accuracy = _problem()
    hp = {"learning_rate": [1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3, 0.5, 1.0]}
    res = S.successive_halving(loss_fn, init(0), funcopt.sgd, hp, batches, steps=9, rungs=3, keep=0.5,
                               eval_fn=accuracy, metric="full_loss", progress=False)
    assert sorted(res.steps_trained) == [3] * 4 + [6] * 2 + [9] * 2
    assert len(res.kept) == 2 and all(res.steps_trained[i] == 9 for i in res.kept)
    # Rung 1 kept the 4 with the lowest full-batch loss after 3 steps.
    plain = S.sweep(loss_fn, init(0), funcopt.sgd, hp, batches, steps=9, eval_fn=accuracy, eval_every=3,
                    metric="full_loss", progress=False)
    after3 = plain.evals["full_loss"][:, 0]
    survivors1 = {i for i in range(8) if res.steps_trained[i] >= 6}
    assert survivors1 == set(torch.argsort(after3)[:4].tolist())
    # Survivors continue exactly as they would have in a full sweep.
    for i in res.kept:
        assert_trees_close(res.select(i)[0], plain.select(i)[0], rtol=1e-10, atol=1e-12)
    dropped = [i for i in range(8) if res.steps_trained[i] == 3]
    assert torch.isnan(res.loss[dropped, 3:]).all() and not torch.isnan(res.loss[dropped, :3]).any()
    assert res.best().index in res.kept
    with pytest.raises(funcopt.FuncoptError, match="was dropped after 3 steps"):
        res.select(dropped[0])


def test_halving_without_eval_ranks_by_training_loss_and_supports_chunks():
    _, init, loss_fn, batches, _ = _problem()
    hp = {"learning_rate": [1e-3, 0.01, 0.1, 0.5, 1.0]}
    res = S.successive_halving(loss_fn, init(0), funcopt.adam, hp, batches, steps=4, rungs=2, keep=0.4,
                               chunk_size=2, progress=False)
    assert len(res.kept) == 2
    last = res.loss[:, 1]
    assert set(res.kept) == set(torch.argsort(last)[:2].tolist())


def test_nn_module_best_params_load_back_into_the_module():
    module, _, loss_fn, batches, accuracy = _problem()
    params, _ = funcopt.nn.extract(module)
    res = S.sweep(loss_fn, params, funcopt.adam, {"learning_rate": [0.001, 0.1]}, batches, steps=20,
                  eval_fn=accuracy, metric="full_loss", progress=False)
    best = res.best()
    assert best.index == 1
    funcopt.nn.load(module, best.params)
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        full = float(torch.nn.functional.cross_entropy(module(X), Y))
    assert full == pytest.approx(best.value, rel=1e-10)
    # The returned state continues training with the returned optimizer.
    grads = torch.func.grad(loss_fn)(best.params, batches[0])
    updates, _ = res.optimizer.update(grads, best.opt_state, best.params)
    assert float(funcopt.get_hyperparams(best.opt_state)["learning_rate"]) == 0.1
    assert tree.structure(updates) == tree.structure(best.params)


def test_float32_sweep_keeps_dtypes_and_exact_hyperparameters():
    _, init, loss_fn, batches, _ = _problem(dtype=torch.float32)
    res = S.sweep(loss_fn, init(0), funcopt.adam, {"learning_rate": [0.01, 0.1], "b1": [0.9, 0.8]}, batches,
                  steps=5, progress=False)
    assert res.step_mode == "stacked"
    assert all(x.dtype == torch.float32 for x in tree.leaves(res.params))
    hp = funcopt.get_hyperparams(res.select(1)[1])
    assert float(hp["b1"]) == 0.8 and hp["b1"].dtype == torch.float64
    tx = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=0.1, b1=0.8)
    params, _, _ = _train_alone(loss_fn, init(0), tx, batches, 5)
    assert_trees_close(res.select(1)[0], params, rtol=1e-4, atol=1e-6)


def test_data_forms():
    _, init, loss_fn, batches, _ = _problem()
    hp = {"learning_rate": [0.01, 0.1]}
    ref = S.sweep(loss_fn, init(0), funcopt.sgd, hp, batches, steps=6, progress=False)
    by_fn = S.sweep(loss_fn, init(0), funcopt.sgd, hp, lambda step: batches[step % 4], steps=6, progress=False)
    by_iter = S.sweep(loss_fn, init(0), funcopt.sgd, hp, iter(batches), steps=3, progress=False)
    torch.testing.assert_close(by_fn.loss, ref.loss)
    torch.testing.assert_close(by_iter.loss, ref.loss[:, :3])
    fixed = S.sweep(loss_fn, init(0), funcopt.sgd, hp, batches[0], steps=2, progress=False)
    assert fixed.loss.shape == (2, 2)


def test_grid_and_random_search():
    g = S.grid(a=[1, 2], b=[10.0, 20.0, 30.0])
    assert g == {"a": [1.0, 1.0, 1.0, 2.0, 2.0, 2.0], "b": [10.0, 20.0, 30.0] * 2}
    r = S.random_search(200, seed=1, lr=S.log_uniform(1e-4, 1e-1), b1=S.uniform(0.8, 0.99), m=S.choice([0.0, 0.9]))
    assert r == S.random_search(200, seed=1, lr=S.log_uniform(1e-4, 1e-1), b1=S.uniform(0.8, 0.99), m=S.choice([0.0, 0.9]))
    lr = torch.tensor(r["lr"])
    assert lr.min() >= 1e-4 and lr.max() < 1e-1
    # log-uniform: about a third of the samples per decade
    assert 40 < int(((lr >= 1e-3) & (lr < 1e-2)).sum()) < 95
    assert all(0.8 <= b < 0.99 for b in r["b1"]) and set(r["m"]) == {0.0, 0.9}


def test_table_rows_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    _, init, loss_fn, batches, accuracy = _problem()
    hp = S.grid(learning_rate=[0.001, 0.01, 0.1], weight_decay=[0.0, 0.01, 0.1])
    res = S.sweep(loss_fn, init(0), funcopt.adamw, hp, batches, steps=4, eval_fn=accuracy,
                  metric="full_loss", progress=False)
    rows = res.to_rows()
    assert [r["full_loss"] for r in rows] == sorted(r["full_loss"] for r in rows)
    assert set(rows[0]) == {"config", "learning_rate", "weight_decay", "steps", "loss", "acc", "full_loss"}
    text = str(res)
    assert "ranked by full_loss (min)" in text and text.count("\n") == 2 + 9
    fig = res.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    # log-spaced learning rates: log axis; log-spaced decays including 0: symlog axis
    assert [ax.get_xscale() for ax in fig.axes[:2]] == ["log", "symlog"]
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == ["learning_rate", "weight_decay"]


def test_bad_input_errors():
    _, init, loss_fn, batches, accuracy = _problem()
    p0 = init(0)
    run = lambda opt, hp, **kw: S.sweep(loss_fn, kw.pop("params", p0), opt, hp, batches, steps=kw.pop("steps", 1), progress=False, **kw)  # noqa: E731
    with pytest.raises(funcopt.FuncoptError, match=r"different lengths \{'learning_rate': 2, 'momentum': 3\}.*grid"):
        run(funcopt.sgd, {"learning_rate": [0.1, 0.2], "momentum": [0.0, 0.5, 0.9]})
    with pytest.raises(funcopt.FuncoptError, match=r"Unknown hyperparameter\(s\) \['lr'\].*valid names: \['learning_rate'"):
        run(funcopt.sgd, {"lr": [0.1]})
    with pytest.raises(funcopt.FuncoptError, match=r"Unknown hyperparameter\(s\) \['momentum'\]; this optimizer's state has \['b1', 'b2', 'eps'"):
        run(funcopt.inject_hyperparams(funcopt.adam)(), {"momentum": [0.1]})
    with pytest.raises(funcopt.FuncoptError, match=r"Unknown hyperparameter\(s\) \['amsgrad'\]"):
        run(funcopt.adam, {"amsgrad": [0.0, 1.0]})
    with pytest.raises(funcopt.FuncoptError, match="keeps no hyperparameters in its state.*funcopt.inject_hyperparams"):
        run(funcopt.adam(0.1), {"learning_rate": [0.1, 0.2]})
    with pytest.raises(funcopt.FuncoptError, match="missing a required argument: 'learning_rate'.*functools.partial"):
        run(funcopt.sgd, {"momentum": [0.0, 0.9]})
    with pytest.raises(TypeError, match="optimizer must be a factory"):
        run("adam", {"learning_rate": [0.1]})
    with pytest.raises(funcopt.FuncoptError, match="non-numeric value 'x'"):
        run(funcopt.sgd, {"learning_rate": ["x"]})
    with pytest.raises(funcopt.FuncoptError, match="Nothing to sweep"):
        run(funcopt.sgd(0.1), {})
    with pytest.raises(funcopt.FuncoptError, match="pass seeds"):
        run(funcopt.sgd, {"learning_rate": [0.1]}, params=init)
    with pytest.raises(funcopt.FuncoptError, match="seeds has 3 entries but hparams define 1"):
        run(funcopt.sgd, {"learning_rate": [0.1]}, params=init, seeds=[1, 2, 3])
    with pytest.raises(funcopt.FuncoptError, match=r"metric 'acc' is not recorded; choose one of \['loss'\]"):
        run(funcopt.sgd, {"learning_rate": [0.1]}, metric="acc")
    with pytest.raises(funcopt.FuncoptError, match="mode must be 'min' or 'max'"):
        run(funcopt.sgd, {"learning_rate": [0.1]}, mode="best")
    with pytest.raises(funcopt.FuncoptError, match="steps must be a positive int"):
        run(funcopt.sgd, {"learning_rate": [0.1]}, steps=0)
    with pytest.raises(funcopt.FuncoptError, match="step_mode must be"):
        run(funcopt.sgd, {"learning_rate": [0.1]}, step_mode="fast")
    with pytest.raises(funcopt.FuncoptError, match="one-shot iterator"):
        S.sweep(loss_fn, p0, funcopt.sgd, {"learning_rate": [0.1, 0.2]}, iter(batches), steps=1, chunk_size=1, progress=False)
    with pytest.raises(funcopt.FuncoptError, match="keep must be a fraction"):
        S.successive_halving(loss_fn, p0, funcopt.sgd, {"learning_rate": [0.1]}, batches, steps=4, keep=1.0)
    with pytest.raises(funcopt.FuncoptError, match="log_uniform needs 0 < low < high"):
        S.log_uniform(0.0, 1.0)
    with pytest.raises(funcopt.FuncoptError, match="must be uniform"):
        S.random_search(3, lr=[0.1, 0.2])
    p = S.stack_params(p0, 2)
    with pytest.raises(funcopt.FuncoptError, match=r"state leaf at .* has no leading configuration axis"):
        stacked.stacked_update(funcopt.sgd(0.1), p, funcopt.sgd(0.1, momentum=0.9).init(p0), p)


def test_fixed_arguments_through_functools_partial():
    import functools

    _, init, loss_fn, batches, _ = _problem()
    res = S.sweep(loss_fn, init(0), functools.partial(funcopt.sgd, learning_rate=0.1),
                  {"momentum": [0.0, 0.9]}, batches, steps=3, progress=False)
    tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1, momentum=0.9)
    params, _, _ = _train_alone(loss_fn, init(0), tx, batches, 3)
    assert_trees_close(res.select(1)[0], params, rtol=1e-10, atol=1e-12)


def test_sweep_does_not_modify_inputs():
    _, init, loss_fn, batches, _ = _problem()
    p0 = init(0)
    before = tree.map(torch.clone, p0)
    S.sweep(loss_fn, p0, funcopt.adam, {"learning_rate": [0.1, 0.2]}, batches, steps=2, progress=False)
    assert_trees_close(p0, before, rtol=0, atol=0)


def test_scalar_eval_progress_bar_and_dropout_randomness(capfd):
    _, init, loss_fn, batches, accuracy = _problem()
    res = S.sweep(loss_fn, init(0), funcopt.sgd, {"learning_rate": [0.01, 0.1]}, batches, steps=2,
                  eval_fn=lambda p: accuracy(p)["full_loss"], progress=True)
    assert res.metric == "eval" and res.evals["eval"].shape == (2, 1)
    assert "sweep" in capfd.readouterr().err  # tqdm writes to stderr

    def dropout_loss(p, batch):
        x, y = batch
        h = torch.nn.functional.dropout(torch.tanh(x @ p["0.weight"].T + p["0.bias"]), 0.5, training=True)
        return torch.nn.functional.cross_entropy(h @ p["2.weight"].T + p["2.bias"], y)

    with pytest.raises(RuntimeError, match="randomness"):
        S.sweep(dropout_loss, init(0), funcopt.sgd, {"learning_rate": [0.01, 0.1]}, batches, steps=1, progress=False)
    res = S.sweep(dropout_loss, init(0), funcopt.sgd, {"learning_rate": [0.1, 0.1]}, batches, steps=1,
                  randomness="different", progress=False)
    assert not torch.equal(res.loss[0], res.loss[1])  # independent dropout masks per configuration


def test_conv_net_sweep_in_one_buffer_equals_separate_runs_float64():
    """The one-(K, N)-buffer layout and the autograd backward on a conv net (digits-like 8x8
    images): each configuration equals its own run to 1e-10 in float64."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(3 * 64, 4)).double()
    params, _ = funcopt.nn.extract(net)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g))
               for _ in range(3)]

    def loss_fn(p, batch):
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(net, p, None, batch[0]), batch[1])

    hp = S.grid(learning_rate=[1e-2, 1e-1], weight_decay=[0.0, 0.1])
    plan = _sweep_impl._make_plan(loss_fn, params, funcopt.adamw, hp, batches, eval_fn=None, eval_every=None,
                                  chunk_size=None, seeds=None, step_mode="auto", randomness="error", replay=False,
                                  metric=None, mode="min")
    assert plan.step_mode == "stacked" and plan.columns  # the fast layout is the one under test
    res = S.sweep(loss_fn, params, funcopt.adamw, hp, batches, steps=3, progress=False)
    for i in range(4):
        tx = funcopt.adamw(hp["learning_rate"][i], weight_decay=hp["weight_decay"][i])
        alone, _, losses = _train_alone(loss_fn, params, tx, batches, 3)
        assert_trees_close(res.select(i)[0], alone, rtol=1e-10, atol=1e-12, msg=f"config {i}")
        torch.testing.assert_close(res.loss[i], torch.tensor(losses, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_masked_optimizers_keep_the_per_leaf_layout():
    """An optimizer that treats leaves differently fails the layout probe and keeps per-leaf steps."""
    _, init, loss_fn, batches, _ = _problem()
    mask = lambda p: {k: k.endswith("weight") for k in p}  # noqa: E731
    opt = lambda learning_rate=0.1: funcopt.adamw(learning_rate, weight_decay=0.5, mask=mask)  # noqa: E731
    plan = _sweep_impl._make_plan(loss_fn, init(0), opt, {"learning_rate": [0.01, 0.1]}, batches, eval_fn=None,
                                  eval_every=None, chunk_size=None, seeds=None, step_mode="stacked",
                                  randomness="error", replay=False, metric=None, mode="min")
    assert not plan.columns
    res = S.sweep(loss_fn, init(0), opt, {"learning_rate": [0.01, 0.1]}, batches, steps=3, progress=False)
    alone, _, _ = _train_alone(loss_fn, init(0), funcopt.inject_hyperparams(opt)(learning_rate=0.1), batches, 3)
    assert_trees_close(res.select(1)[0], alone, rtol=1e-10, atol=1e-12)
