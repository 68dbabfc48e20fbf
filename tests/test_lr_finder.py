"""Tests for funcopt.lr_finder: the LR range test, its suggestion rules, plot and the vmapped sweep."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import numpy as np
import pytest
import torch

import funcopt
from funcopt import FuncoptError
from funcopt.lr_finder import SUGGESTION_METHODS, LRFinderResult, lr_find, lr_ladder, lr_sweep
from funcopt.transforms._masking import multi_transform
from tests.helpers import assert_trees_equal, mlp_problem, snapshot

F64 = torch.float64


def _problem(n=48, batch=8, seed=0):
    """A tiny tanh MLP in float64 with a list of (X, Y) mini-batches and loss_fn(params, batch)."""
    module, params, _, (X, Y) = mlp_problem(dtype=F64, seed=seed, n=n)

    def loss_fn(p, b):
        x, y = b
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(module, p, None, x), y)

    batches = [(X[i : i + batch], Y[i : i + batch]) for i in range(0, n, batch)]
    return module, params, loss_fn, batches


def _torch_reference(module, params, loss_fn, batches, lrs, make_opt):
    """Losses of a torch.optim loop whose lr is set to lrs[i] before step i (the range test)."""
    model = funcopt.nn.load(module, params)
    named = dict(model.named_parameters())
    opt = make_opt(list(named.values()))
    out = []
    for i, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = loss_fn(named, batches[i % len(batches)])
        out.append(loss.item())
        loss.backward()
        opt.step()
    return out


def _ema(raw, beta):
    """The definition: ema_i = beta ema_{i-1} + (1 - beta) x_i, ema_{-1} = 0, divided by 1 - beta^(i+1)."""
    ema, out = 0.0, []
    for i, x in enumerate(raw):
        ema = beta * ema + (1 - beta) * x
        out.append(ema / (1 - beta ** (i + 1)))
    return out


# ---------------------------------------------------------------------------------------------
# Ladder


@pytest.mark.parametrize("mode", ["exponential", "linear"])
def test_ladder_hits_both_endpoints_with_k_points(mode):
    lrs = lr_ladder(1e-7, 3.0, 37, mode)
    assert len(lrs) == 37 and lrs[0] == 1e-7 and lrs[-1] == 3.0
    ref = np.geomspace(1e-7, 3.0, 37) if mode == "exponential" else np.linspace(1e-7, 3.0, 37)
    np.testing.assert_allclose(lrs, ref, rtol=1e-12)
    steps = np.diff(np.log(lrs)) if mode == "exponential" else np.diff(lrs)
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)


def test_lr_find_records_the_ladder():
    _, params, loss_fn, batches = _problem()
    r = lr_find(loss_fn, params, funcopt.sgd, batches, min_lr=1e-4, max_lr=0.5, num_steps=12,
                diverge_threshold=None, progress=False)
    assert r.lrs == tuple(lr_ladder(1e-4, 0.5, 12)) and len(r.losses) == len(r.raw_losses) == 12
    assert not r.stopped_early and r.lrs[0] == 1e-4 and r.lrs[-1] == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_lr=0.0), "min_lr must be a finite number > 0"),
        (dict(min_lr=-1.0), "min_lr must be a finite number > 0"),
        (dict(min_lr=1.0, max_lr=0.1), "must be greater than min_lr"),
        (dict(max_lr=float("inf")), "max_lr must be a finite number"),
        (dict(num_steps=1), "integer >= 2"),
        (dict(mode="log"), "mode must be 'exponential' or 'linear'"),
        (dict(smoothing=1.0), r"smoothing must be a number in \[0, 1\)"),
        (dict(diverge_threshold=1.0), "diverge_threshold must be a number > 1 or None"),
        (dict(accumulate=0), "accumulate must be an integer >= 1"),
    ],
)
def test_lr_find_argument_errors(kwargs, match):
    _, params, loss_fn, batches = _problem()
    with pytest.raises(FuncoptError, match=match):
        lr_find(loss_fn, params, funcopt.sgd, batches, progress=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Purity: nothing outside the call changes


def test_params_and_state_bitwise_unchanged_and_no_file_created(tmp_path, monkeypatch):
    _, params, loss_fn, batches = _problem()
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(tmp)
    tx = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-3)
    state = tx.init(params)
    for _ in range(3):  # a state mid-training, with non-zero moments
        g = torch.func.grad(loss_fn)(params, batches[0])
        _, state = tx.update(g, state, params)
    before_p, before_s = snapshot(params), snapshot(state)
    r = lr_find(loss_fn, params, tx, batches, num_steps=30, opt_state=state, progress=True)
    s = lr_sweep(loss_fn, params, tx, batches, num_lrs=3, steps=4, opt_state=state, progress=True)
    assert len(r.lrs) > 10 and len(s.lrs) == 3
    assert_trees_equal(params, before_p, "params")
    assert_trees_equal(state, before_s, "opt_state")
    assert sorted(os.listdir(work)) == [] and sorted(os.listdir(tmp)) == []


def test_params_requiring_grad_are_read_only():
    module, _, loss_fn, batches = _problem()
    params = dict(module.named_parameters())  # live leaves with requires_grad=True
    before = snapshot(params)
    r = lr_find(loss_fn, params, funcopt.adam, batches, num_steps=15, progress=False)
    assert_trees_equal({k: v.detach() for k, v in params.items()}, before)
    assert all(p.grad is None for p in params.values()) and len(r.lrs) == 15


# ---------------------------------------------------------------------------------------------
# The curve against torch.optim with the lr set by hand each step


@pytest.mark.parametrize(
    "factory, make_opt",
    [
        (lambda learning_rate: funcopt.sgd(learning_rate, momentum=0.9),
         lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9)),
        (funcopt.adam, lambda ps: torch.optim.Adam(ps, lr=1.0)),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_curve_matches_torch_optim_with_lr_set_each_step(factory, make_opt):
    module, params, loss_fn, batches = _problem()
    r = lr_find(loss_fn, params, factory, batches, min_lr=1e-4, max_lr=0.3, num_steps=25,
                diverge_threshold=None, progress=False)
    ref = _torch_reference(module, params, loss_fn, batches, r.lrs, make_opt)
    np.testing.assert_allclose(r.raw_losses, ref, rtol=1e-11)


@pytest.mark.parametrize("beta", [0.98, 0.5, 0.0])
def test_smoothing_is_bias_corrected_ema(beta):
    _, params, loss_fn, batches = _problem()
    r = lr_find(loss_fn, params, funcopt.adam, batches, min_lr=1e-4, max_lr=0.1, num_steps=20,
                smoothing=beta, diverge_threshold=None, progress=False)
    assert r.losses[0] == r.raw_losses[0]  # exactly, not approximately
    np.testing.assert_allclose(r.losses, _ema(r.raw_losses, beta), rtol=1e-13)
    if beta == 0.0:
        assert r.losses == r.raw_losses


def test_accumulate_records_mean_and_matches_concatenated_batches():
    _, params, loss_fn, batches = _problem(n=64, batch=8)
    k = 2
    merged = [
        tuple(torch.cat([b[j] for b in batches[i : i + k]]) for j in range(2)) for i in range(0, len(batches), k)
    ]
    kw = dict(min_lr=1e-4, max_lr=0.5, num_steps=12, diverge_threshold=None, progress=False)
    acc = lr_find(loss_fn, params, funcopt.adam, batches, accumulate=k, **kw)
    big = lr_find(loss_fn, params, funcopt.adam, merged, **kw)
    first = (loss_fn(params, batches[0]) + loss_fn(params, batches[1])).item() / 2
    assert acc.raw_losses[0] == pytest.approx(first, rel=1e-14)
    assert len(acc.raw_losses) == len(big.raw_losses) == 12  # one point per step, not per micro-batch
    np.testing.assert_allclose(acc.raw_losses, big.raw_losses, rtol=1e-11)
    np.testing.assert_allclose(acc.losses, big.losses, rtol=1e-11)


# ---------------------------------------------------------------------------------------------
# Early stop


def _quadratic():
    params = {"w": torch.tensor([1.0, -2.0], dtype=F64)}
    return params, lambda p, b: (p["w"] ** 2).sum() * b


def test_stops_when_smoothed_loss_exceeds_threshold_times_best():
    params, loss_fn = _quadratic()  # SGD multiplies w by (1 - 2 lr): diverges for lr > 1
    r = lr_find(loss_fn, params, funcopt.sgd, [1.0], min_lr=1e-3, max_lr=100.0, num_steps=60, progress=False)
    assert r.stopped_early and len(r.lrs) < 60
    best = [min(r.losses[: i + 1]) for i in range(len(r.losses))]
    assert r.losses[-1] > 4 * best[-1]
    assert all(r.losses[i] <= 4 * best[i] for i in range(len(r.losses) - 1))
    assert r.lrs[-1] > 1.0
    never = lr_find(loss_fn, params, funcopt.sgd, [1.0], min_lr=1e-3, max_lr=0.5, num_steps=20,
                    diverge_threshold=None, progress=False)
    assert not never.stopped_early and len(never.lrs) == 20


def test_stops_on_nan_and_suggestion_ignores_it():
    params = {"w": torch.tensor([1.0], dtype=F64)}

    def loss_fn(p, b):
        w = p["w"].sum()
        return torch.where(w.abs() > 1e3, torch.full_like(w, float("nan")), w * w)

    r = lr_find(loss_fn, params, funcopt.sgd, [None], min_lr=1e-3, max_lr=1e3, num_steps=40,
                diverge_threshold=None, smoothing=0.0, progress=False)
    assert r.stopped_early and math.isnan(r.raw_losses[-1]) and math.isnan(r.losses[-1])
    assert all(math.isfinite(v) for v in r.raw_losses[:-1])
    lr = r.suggestion("minimum", skip_begin=0, skip_end=0)
    assert math.isfinite(lr)


def test_negative_losses_do_not_stop_at_once():
    params = {"w": torch.tensor([1.0], dtype=F64)}
    r = lr_find(lambda p, b: (p["w"] ** 2).sum() - 10.0, params, funcopt.sgd, [0], min_lr=1e-3,
                max_lr=0.4, num_steps=20, progress=False)
    assert not r.stopped_early and len(r.lrs) == 20


# ---------------------------------------------------------------------------------------------
# Suggestion rules on a fixed synthetic curve

# 20 points, log lr evenly spaced. With skip_begin=10, skip_end=1 the rules read points 10..18.
SYN_LRS = [10.0 ** (-6 + 0.3 * i) for i in range(20)]
SYN = [1.0] * 12 + [0.9, 0.7, 0.3, 0.2, 0.15, 0.14, 0.5, 2.0]


def test_suggestions_on_synthetic_curve_equal_hand_computed_values():
    r = LRFinderResult(SYN_LRS, SYN)
    # steepest: central differences y[i+1] - y[i-1] over points 11..17 are
    # 0.9-1=-0.1, 0.7-1=-0.3, 0.3-0.9=-0.6, 0.2-0.7=-0.5, 0.15-0.3=-0.15, 0.14-0.2=-0.06, 0.5-0.15=0.35;
    # the ends (10 and 18) are one-sided: 0 and +0.36. Most negative at point 13.
    assert r.suggestion() == r.suggestion("steepest") == SYN_LRS[13]
    # valley: the longest strictly decreasing run is points 11..17 (L = 6): 11 + 6//3 + 6//6 = 14.
    assert r.suggestion("valley") == SYN_LRS[14]
    # minimum: lowest loss 0.14 at point 17, divided by 10; best: that lr itself.
    assert r.suggestion("minimum") == SYN_LRS[17] / 10
    assert r.suggestion("best") == SYN_LRS[17]
    # without skips the flat start (1.0 is not < 1.0) does not extend the run: still 11..17
    assert r.suggestion("valley", skip_begin=0, skip_end=0) == SYN_LRS[14]
    # minimum of the whole curve never looks at the skipped last point
    assert r.suggestion("minimum", skip_begin=0, skip_end=0) == SYN_LRS[17] / 10


def test_nan_and_inf_in_the_middle_are_dropped_not_misaligned():
    y = list(SYN)
    y[15], y[16] = float("nan"), float("inf")
    r = LRFinderResult(SYN_LRS, y)
    keep = [i for i in range(10, 19) if math.isfinite(y[i])]
    x = np.log([SYN_LRS[i] for i in keep])
    slopes = np.gradient([y[i] for i in keep], x)  # independent reference for uneven spacing
    assert r.suggestion("steepest") == SYN_LRS[keep[int(np.argmin(slopes))]]
    assert r.suggestion("steepest") == SYN_LRS[14]  # the point before the gap, 0.7 -> 0.3 -> (gap) 0.14
    # valley: finite points 10..14, 17, 18 give the run 11, 12, 13, 14, 17 (L = 4): start 11 + 1 + 0 -> 12
    assert r.suggestion("valley") == SYN_LRS[12]
    assert r.suggestion("minimum") == SYN_LRS[17] / 10
    for method in ("steepest", "valley", "best"):  # each suggestion is an lr whose loss is finite
        assert math.isfinite(y[SYN_LRS.index(r.suggestion(method))])


def test_too_few_points_give_a_clear_error():
    r = LRFinderResult(SYN_LRS[:11], SYN[:11])
    with pytest.raises(FuncoptError, match=r"'steepest' suggestion needs at least 2 finite .* found 0"):
        r.suggestion()
    r = LRFinderResult(SYN_LRS[:13], SYN[:11] + [float("nan"), 1.0])
    with pytest.raises(FuncoptError, match="needs at least 2 finite loss value.*found 1.*skip_begin"):
        r.suggestion("valley")
    assert r.suggestion("minimum") == SYN_LRS[10] / 10  # one finite point is enough for minimum
    allnan = LRFinderResult(SYN_LRS, [float("nan")] * 20)
    with pytest.raises(FuncoptError, match="found 0"):
        allnan.suggestion("best")
    assert allnan.suggestions() == {m: None for m in SUGGESTION_METHODS}
    with pytest.raises(FuncoptError, match="Unknown suggestion method 'slide'"):
        r.suggestion("slide")
    with pytest.raises(FuncoptError, match="skip_begin must be an integer >= 0"):
        r.suggestion("minimum", skip_begin=-1)


def test_result_validation_and_dict_round_trip():
    with pytest.raises(FuncoptError, match="as many lrs as losses"):
        LRFinderResult([1e-3, 1e-2], [1.0])
    with pytest.raises(FuncoptError, match=r"strictly increasing; lrs\[1\]"):
        LRFinderResult([1e-3, 1e-3], [1.0, 0.5])
    with pytest.raises(FuncoptError, match="kind must be"):
        LRFinderResult([1e-3], [1.0], kind="other")
    y = list(SYN)
    y[15] = float("nan")
    r = LRFinderResult(SYN_LRS, y, raw_losses=[v + 0.1 for v in y], stopped_early=True)
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)  # valid strict JSON: NaN became null
    assert d["losses"][15] is None and d["suggestions"]["steepest"] == r.suggestion()
    back = LRFinderResult.from_dict(json.loads(text))
    assert back.lrs == r.lrs and back.stopped_early and math.isnan(back.losses[15])
    assert back.suggestions() == r.suggestions()
    assert "kind='lr_find', points=20" in repr(r) and "steepest=" in repr(r)


# ---------------------------------------------------------------------------------------------
# Optimizer forms: factories, inject_hyperparams transformations, param groups


def _manual_groups(params, loss_fn, batches, lrs, ratio):
    """Plain SGD by hand: group 'a' (the first linear layer) at lr, the rest at ratio * lr."""
    p = dict(params)
    out = []
    for i, lr in enumerate(lrs):
        loss, g = loss_fn(p, batches[i % len(batches)]).item(), torch.func.grad(loss_fn)(p, batches[i % len(batches)])
        out.append(loss)
        p = {k: v - (lr if k.startswith("0.") else ratio * lr) * g[k] for k, v in p.items()}
    return out


def _labels(params):
    return {k: "a" if k.startswith("0.") else "b" for k in params}


def test_multi_transform_factory_scales_all_groups_keeping_ratio():
    _, params, loss_fn, batches = _problem()

    def factory(learning_rate):
        return multi_transform({"a": funcopt.sgd(learning_rate), "b": funcopt.sgd(learning_rate * 0.1)}, _labels)

    r = lr_find(loss_fn, params, factory, batches, min_lr=1e-3, max_lr=3.0, num_steps=15,
                diverge_threshold=None, progress=False)
    np.testing.assert_allclose(r.raw_losses, _manual_groups(params, loss_fn, batches, r.lrs, 0.1), rtol=1e-12)


def test_injected_groups_keep_their_ratio_to_the_first():
    _, params, loss_fn, batches = _problem()
    inject = funcopt.inject_hyperparams(funcopt.sgd)
    tx = multi_transform({"a": inject(learning_rate=0.2), "b": inject(learning_rate=0.05)}, _labels)
    r = lr_find(loss_fn, params, tx, batches, min_lr=1e-3, max_lr=3.0, num_steps=15,
                diverge_threshold=None, progress=False)
    np.testing.assert_allclose(r.raw_losses, _manual_groups(params, loss_fn, batches, r.lrs, 0.25), rtol=1e-12)


def test_optimizer_errors():
    _, params, loss_fn, batches = _problem()
    kw = dict(num_steps=5, progress=False)
    with pytest.raises(FuncoptError, match="holds no injected 'learning_rate'.*inject_hyperparams"):
        lr_find(loss_fn, params, funcopt.adam(1e-3), batches, **kw)
    with pytest.raises(FuncoptError, match="has no learning_rate argument"):
        lr_find(loss_fn, params, lambda lr: funcopt.sgd(lr), batches, **kw)
    with pytest.raises(TypeError, match="optimizer must be an optimizer factory"):
        lr_find(loss_fn, params, 0.1, batches, **kw)
    with pytest.raises(FuncoptError, match="opt_state is accepted only"):
        lr_find(loss_fn, params, funcopt.adam, batches, opt_state=(), **kw)
    scheduled = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=lambda count: 0.1 / (1.0 + count))
    with pytest.raises(FuncoptError, match="learning_rate is a schedule"):
        lr_find(loss_fn, params, scheduled, batches, **kw)


# ---------------------------------------------------------------------------------------------
# loss_fn, params and data handling


def test_loss_and_params_errors_and_aux():
    _, params, loss_fn, batches = _problem()
    kw = dict(num_steps=5, progress=False, diverge_threshold=None)
    r = lr_find(lambda p, b: (loss_fn(p, b), {"note": 1}), params, funcopt.sgd, batches, **kw)
    np.testing.assert_allclose(r.raw_losses, lr_find(loss_fn, params, funcopt.sgd, batches, **kw).raw_losses)
    with pytest.raises(FuncoptError, match=r"0-dim loss, got shape \(8,\)"):
        lr_find(lambda p, b: torch.ones(8, dtype=F64) * p["0.bias"].sum(), params, funcopt.sgd, batches, **kw)
    with pytest.raises(TypeError, match="loss_fn must return a 0-dim tensor"):
        lr_find(lambda p, b: 1.0, params, funcopt.sgd, batches, **kw)
    bad = dict(params, step=torch.tensor(3))
    with pytest.raises(FuncoptError, match=r"params leaf \['step'\] has dtype torch.int64"):
        lr_find(loss_fn, bad, funcopt.sgd, batches, **kw)
    with pytest.raises(FuncoptError, match="data yielded no batches"):
        lr_find(loss_fn, params, funcopt.sgd, [], **kw)
    with pytest.raises(FuncoptError, match="data yielded no batches"):
        lr_find(loss_fn, params, funcopt.sgd, iter([]), **kw)
    with pytest.raises(TypeError, match="data must be an iterable"):
        lr_find(loss_fn, params, funcopt.sgd, 3, **kw)


def test_data_is_cycled_for_lists_and_one_shot_iterators():
    params = {"w": torch.tensor([1.0], dtype=F64)}
    seen = []

    def loss_fn(p, b):
        seen.append(b)
        return (p["w"] ** 2).sum() * (1.0 + 0.0 * b)

    kw = dict(num_steps=7, progress=False, diverge_threshold=None, max_lr=0.1)
    lr_find(loss_fn, params, funcopt.sgd, [0, 1, 2], **kw)
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    seen.clear()
    lr_find(loss_fn, params, funcopt.sgd, (i for i in range(3)), **kw)
    assert seen == [0, 1, 2, 0, 1, 2, 0]


def test_progress_works_without_tqdm(monkeypatch, capsys):
    _, params, loss_fn, batches = _problem()
    r = lr_find(loss_fn, params, funcopt.sgd, batches, num_steps=6, progress=True)
    assert "lr_find" in capsys.readouterr().err  # tqdm drew a bar on stderr
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    again = lr_find(loss_fn, params, funcopt.sgd, batches, num_steps=6, progress=True)
    assert capsys.readouterr().err == "" and again.raw_losses == r.raw_losses


def test_matplotlib_and_tqdm_are_imported_only_inside_functions():
    import ast
    import pathlib

    import funcopt.lr_finder as package

    files = sorted(pathlib.Path(package.__file__).parent.glob("*.py"))
    assert len(files) > 1  # the package and the modules it re-exports from
    for path in files:
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
        assert not any(str(n).split(".")[0] in ("matplotlib", "tqdm") for n in names), (path.name, names)


# ---------------------------------------------------------------------------------------------
# lr_sweep


def _separate_run(params, loss_fn, batches, tx, steps):
    state, p, losses = tx.init(params), params, []
    for i in range(steps):
        loss, g = torch.func.grad_and_value(loss_fn)(p, batches[i % len(batches)])[::-1]
        losses.append(loss.item())
        u, state = tx.update(g, state, p)
        p = funcopt.apply_updates(p, u)
    return losses, loss_fn(p, batches[0]).item()


@pytest.mark.parametrize("mode", ["exponential", "linear"])
def test_lr_sweep_under_vmap_equals_separate_runs(mode):
    _, params, loss_fn, batches = _problem()
    s = lr_sweep(loss_fn, params, lambda learning_rate: funcopt.sgd(learning_rate, momentum=0.9),
                 batches, min_lr=1e-3, max_lr=1.0, num_lrs=5, steps=8, mode=mode, progress=False)
    assert s.kind == "lr_sweep" and s.lrs == tuple(lr_ladder(1e-3, 1.0, 5, mode))
    assert s.losses == s.raw_losses and len(s.train_losses) == 5 and len(s.train_losses[0]) == 8
    for lr, final, curve in zip(s.lrs, s.losses, s.train_losses):
        ref_curve, ref_final = _separate_run(params, loss_fn, batches, funcopt.sgd(lr, momentum=0.9), 8)
        np.testing.assert_allclose(curve, ref_curve, rtol=1e-10)
        assert final == pytest.approx(ref_final, rel=1e-10)
    assert s.suggestion() == s.lrs[int(np.nanargmin(s.losses))]


def test_lr_sweep_adam_groups_and_diverging_lanes():
    _, params, loss_fn, batches = _problem()

    def factory(learning_rate):
        return multi_transform({"a": funcopt.adam(learning_rate), "b": funcopt.adam(learning_rate * 0.5)}, _labels)

    s = lr_sweep(loss_fn, params, factory, batches, min_lr=1e-3, max_lr=1.0, num_lrs=3, steps=5, progress=False)
    lr = s.lrs[1]
    tx = multi_transform({"a": funcopt.adam(lr), "b": funcopt.adam(lr * 0.5)}, _labels)
    ref_curve, ref_final = _separate_run(params, loss_fn, batches, tx, 5)
    np.testing.assert_allclose(s.train_losses[1], ref_curve, rtol=1e-10)
    assert s.losses[1] == pytest.approx(ref_final, rel=1e-10)

    q, qloss = _quadratic()  # SGD on w^2 blows up for lr > 1: those lanes end at inf/nan
    d = lr_sweep(qloss, q, funcopt.sgd, [1.0], min_lr=1e-2, max_lr=1e4, num_lrs=7, steps=100, progress=False)
    assert not all(math.isfinite(v) for v in d.losses[3:])  # lr 10..1e4 blow up
    assert d.losses[2] == pytest.approx(5.0)  # lr 1 flips the sign of w each step
    assert d.suggestion() == d.lrs[1] == pytest.approx(0.1)  # |1 - 2 lr| is smallest at lr 0.1
    assert d.to_dict()["suggestions"]["best"] == d.lrs[1]


def test_lr_sweep_float32_params_with_float64_injected_hyperparams():
    # inject_hyperparams keeps float64 hyperparameters; batched under vmap they would meet float32
    # moments in torch.lerp, which funcopt.transforms handles by casting the weight per leaf.
    module, params, _, (X, Y) = mlp_problem(dtype=torch.float32, n=32)
    params = {k: v.float() for k, v in params.items()}

    def loss_fn(p, b):
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(module, p, None, b[0]), b[1])

    tx = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-3)
    assert tx.init(params).hyperparams["b1"].dtype == F64
    s = lr_sweep(loss_fn, params, tx, [(X, Y)], min_lr=1e-3, max_lr=0.1, num_lrs=3, steps=5, progress=False)
    for lr, curve in zip(s.lrs, s.train_losses):
        np.testing.assert_allclose(curve, _separate_run(params, loss_fn, [(X, Y)], funcopt.adam(lr), 5)[0], rtol=1e-5)


def test_lr_sweep_accumulate_and_eval_batch():
    _, params, loss_fn, batches = _problem(n=64)
    merged = [tuple(torch.cat([b[j] for b in batches[i : i + 2]]) for j in range(2)) for i in range(0, 8, 2)]
    kw = dict(min_lr=1e-3, max_lr=0.5, num_lrs=3, steps=4, progress=False, eval_batch=merged[1])
    acc = lr_sweep(loss_fn, params, funcopt.adam, batches, accumulate=2, **kw)
    big = lr_sweep(loss_fn, params, funcopt.adam, merged, **kw)
    np.testing.assert_allclose(acc.losses, big.losses, rtol=1e-11)
    np.testing.assert_allclose(acc.train_losses, big.train_losses, rtol=1e-11)
    with pytest.raises(FuncoptError, match="steps must be an integer >= 1"):
        lr_sweep(loss_fn, params, funcopt.adam, batches, steps=0)


# ---------------------------------------------------------------------------------------------
# Plot


def test_plot_writes_the_file_and_marks_suggestions(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = LRFinderResult(SYN_LRS, SYN, raw_losses=[v * 1.05 for v in SYN])
    path = tmp_path / "curve.png"
    ax = r.plot(str(path), suggestions="all")
    assert path.stat().st_size > 1000 and os.listdir(tmp_path) == ["curve.png"]
    assert ax.get_xscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert {"smoothed loss", "raw loss"} <= set(labels)
    assert f"steepest: {SYN_LRS[13]:.2e}" in labels and f"valley: {SYN_LRS[14]:.2e}" in labels
    fig, own = plt.subplots()
    assert r.plot(ax=own) is own and len(own.get_legend_handles_labels()[1]) == 3  # smoothed, raw, steepest
    plt.close(fig)
    with pytest.raises(FuncoptError, match="Unknown suggestion method 'nope'"):
        r.plot(suggestions=["nope"])
    s = LRFinderResult(SYN_LRS[:5], [1.0, 0.5, float("nan"), 0.3, 9.0], kind="lr_sweep", skip_begin=0,
                       skip_end=0, default_method="best", train_losses=[[1.0, 0.9]] * 5)
    ax = s.plot()
    assert "best: " + f"{SYN_LRS[3]:.2e}" in ax.get_legend_handles_labels()[1]
    plt.close(ax.figure)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    _, params, loss_fn, batches = _problem()
    cuda = [tuple(t.cuda() for t in b) for b in batches]
    params_cuda = {k: v.cuda() for k, v in params.items()}
    kw = dict(min_lr=1e-4, max_lr=0.5, progress=False)
    r_cpu = lr_find(loss_fn, params, funcopt.adam, batches, num_steps=12, diverge_threshold=None, **kw)
    r_gpu = lr_find(loss_fn, params_cuda, funcopt.adam, cuda, num_steps=12, diverge_threshold=None, **kw)
    np.testing.assert_allclose(r_gpu.raw_losses, r_cpu.raw_losses, rtol=1e-9)
    s_cpu = lr_sweep(loss_fn, params, funcopt.adam, batches, num_lrs=3, steps=4, **kw)
    s_gpu = lr_sweep(loss_fn, params_cuda, funcopt.adam, cuda, num_lrs=3, steps=4, **kw)
    np.testing.assert_allclose(s_gpu.losses, s_cpu.losses, rtol=1e-9)
