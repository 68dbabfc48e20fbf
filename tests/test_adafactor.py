"""Adafactor against torch.optim.Adafactor: every option, matrices + vectors + a 3-D tensor + a
scalar, float64/float32/bfloat16/float16, state layout, interop both ways, checkpoints, errors.

The oracle is torch.optim.Adafactor itself (its default single-tensor implementation).
"""

from __future__ import annotations

import copy
import platform

import pytest
import torch

import funcopt
from funcopt import interop
from tests.helpers import assert_trees_equal

# A matrix, a vector, a 3-D tensor (factored over its last two dims, the first a batch dim), a
# 0-dim scalar and a small-scale vector (its RMS is below eps2, so max(eps2, RMS(p)) takes eps2).
SHAPES = {"w": (6, 5), "b": (5,), "t": (3, 4, 2), "s": (), "tiny": (3,)}
SCALES = {"w": 1.0, "b": 1.0, "t": 1.0, "s": 1.0, "tiny": 1e-4}


def _params(dtype, seed=0, shapes=SHAPES, scales=SCALES):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g, dtype=torch.float64) * scales.get(k, 1.0)).to(dtype) for k, s in shapes.items()}


def _targets(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for k, p in params.items()}


def _loss(params, targets):
    """Separable and non-quadratic: each leaf's gradient depends on that leaf only."""
    return sum(((torch.sin(p) - t) ** 2).sum() + 0.1 * (p**4).sum() for p, t in zip(params.values(), targets.values()))


def _torch_kwargs(kw):
    out = dict(kw)
    if "learning_rate" in out:
        out["lr"] = out.pop("learning_rate")
    return out


def _run_both(kw, dtype, steps, params=None, sync=False):
    """``steps`` steps of funcopt.adafactor and torch.optim.Adafactor on the same problem.

    With ``sync`` the funcopt params are reset to torch's after every step (one-step checks).
    Returns (funcopt params, funcopt state, torch params, torch optimizer, per-step params).
    """
    params = _params(dtype) if params is None else params
    targets = _targets(params)
    sign = -1.0 if kw.get("maximize") else 1.0  # maximize -loss: the run still lowers the loss

    def objective(ps, ts):
        return sign * _loss(ps, ts)

    theirs = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Adafactor(list(theirs.values()), **_torch_kwargs(kw))
    tx = funcopt.adafactor(**kw)
    state = tx.init(params)
    history = []
    for _ in range(steps):
        grads = torch.func.grad(objective)(params, targets)
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        objective(theirs, targets).backward()
        opt.step()
        history.append((params, {k: v.detach().clone() for k, v in theirs.items()}))
        if sync:
            params = {k: v.detach().clone() for k, v in theirs.items()}
    return params, state, {k: v.detach() for k, v in theirs.items()}, opt, history


def _moments(state):
    return next(s for s in state if isinstance(s, funcopt.ScaleByAdafactorState))


OPTIONS = {
    "defaults": dict(),
    "eps1_given": dict(eps=(1e-3, 1e-3)),
    "eps2_large_d2": dict(eps=(None, 0.5), d=2.0),
    "beta2_decay_-0.5_lr_crosses": dict(learning_rate=0.2, beta2_decay=-0.5),  # min(lr, 1/sqrt(t)) switches at t=25
    "beta2_decay_0": dict(beta2_decay=0.0),
    "weight_decay": dict(weight_decay=0.1),
    "maximize": dict(maximize=True),
    "all": dict(learning_rate=0.05, beta2_decay=-0.6, eps=(1e-4, 1e-2), d=1.5, weight_decay=0.2, maximize=True),
}


@pytest.fixture(autouse=True)
def _default_dtype():
    old = torch.get_default_dtype()
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_torch_float64_over_60_steps(option):
    kw = OPTIONS[option]
    torch.set_default_dtype(torch.float64)  # torch keeps its step counts in the default dtype
    ours, state, theirs, opt, _ = _run_both(kw, torch.float64, 60)
    start = _params(torch.float64)
    for k, p in theirs.items():
        torch.testing.assert_close(ours[k], p, rtol=1e-9, atol=1e-15, msg=lambda m: f"{option} {k}: {m}")
        assert not torch.equal(p, start[k]), f"{k} did not move: the comparison would be vacuous"
    # the state: torch's row_var/col_var (factored leaves) or variance (the others), same shapes
    moments = _moments(state)
    assert int(moments.count) == 60
    for k, p in theirs.items():
        st = opt.state[dict(zip(theirs, opt.param_groups[0]["params"]))[k]]
        if p.ndim > 1:
            assert set(st) == {"step", "row_var", "col_var"}
            torch.testing.assert_close(moments.v_row[k], st["row_var"], rtol=1e-9, atol=0)
            torch.testing.assert_close(moments.v_col[k], st["col_var"], rtol=1e-9, atol=0)
            assert moments.v[k].shape == (0,)
        else:
            assert set(st) == {"step", "variance"}
            torch.testing.assert_close(moments.v[k], st["variance"], rtol=1e-9, atol=0)
            assert moments.v_row[k].shape == moments.v_col[k].shape == (0,)


def _assert_steps_close(history, start, dtype, ulps, exact=lambda key: False):
    """Each synced step's new params are torch's within ``ulps * eps * (|new| + |step|)`` (the
    rounding of the step and of the sum), or bitwise where ``exact(key)``."""
    eps = torch.finfo(dtype).eps
    before = start
    for ours_p, theirs_p in history:
        for k in theirs_p:
            if exact(k):
                assert torch.equal(ours_p[k], theirs_p[k]), k
                continue
            new, old = theirs_p[k].double(), before[k].double()
            bound = ulps * eps * ((new - old).abs() + new.abs())
            assert ((ours_p[k].double() - new).abs() <= bound).all(), f"{k}: {(ours_p[k].double() - new).abs().max()}"
        before = theirs_p


@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_torch_float32(option):
    """float32: funcopt adds ``rnd(coefficient * u)`` to the params where torch's kernel fuses
    the multiply-add (one rounding less). Each step from torch's params is within 4 ulps of
    the step and the result; free-running trajectories agree to 1e-4 except where the dynamics
    amplify rounding (a 0-dim leaf's Adafactor step is sign-like: near its minimum it
    oscillates and a last-bit difference changes the oscillation, in float32 as in any two
    float32 implementations), so the free run is checked on the stable configurations."""
    torch.set_default_dtype(torch.float32)
    start = _params(torch.float32)
    *_, history = _run_both(OPTIONS[option], torch.float32, 60, sync=True)
    _assert_steps_close(history, start, torch.float32, ulps=4)
    if option in ("defaults", "eps1_given", "eps2_large_d2", "weight_decay"):
        ours, _, theirs, _, _ = _run_both(OPTIONS[option], torch.float32, 60)
        for k, p in theirs.items():
            assert ours[k].dtype == torch.float32
            torch.testing.assert_close(ours[k], p, rtol=1e-4, atol=1e-6, msg=lambda m: f"{option} {k}: {m}")


# Leaves of 128 * k elements: torch's vectorized CPU kernels handle every element (AVX2/AVX512
# vectors hold 16/32 bfloat16 values); a shorter leaf ends in torch's scalar tail, whose
# ``add_(u, alpha)`` rounds the product to bfloat16 before adding (funcopt matches the
# vectorized path: the product in float32, exact, one rounding).
LOW_SHAPES = {"w": (16, 8), "t": (2, 4, 16), "b": (128,), "w_odd": (5, 3), "b_odd": (7,), "s": ()}
_VECTOR_WIDTHS_KNOWN = platform.machine().lower() in ("x86_64", "amd64")


def _vectorized(key):
    return _VECTOR_WIDTHS_KNOWN and "odd" not in key and key != "s"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("option", ["defaults", "all"])
def test_low_precision_keeps_torch_state_dtype_and_rounding(dtype, option):
    kw = OPTIONS[option]
    torch.set_default_dtype(torch.float32)
    params = _params(dtype, shapes=LOW_SHAPES)
    # one step at a time from torch's params: the moments (kept in the param dtype, as torch)
    # are bitwise torch's, and so are the new params where torch's vector kernels take the whole
    # leaf; in its scalar tail torch rounds the step before adding it, within eps * |step|
    _, state, theirs, opt, history = _run_both(kw, dtype, 20, params=params, sync=True)
    moments = _moments(state)
    for k, p in theirs.items():
        st = opt.state[dict(zip(theirs, opt.param_groups[0]["params"]))[k]]
        pairs = [(moments.v_row[k], st["row_var"]), (moments.v_col[k], st["col_var"])] if p.ndim > 1 else [(moments.v[k], st["variance"])]
        for ours_m, theirs_m in pairs:
            assert ours_m.dtype == dtype and torch.equal(ours_m, theirs_m), k
    _assert_steps_close(history, params, dtype, ulps=1, exact=_vectorized)
    ulp = torch.finfo(dtype).eps
    # a free-running 50-step trajectory: bitwise on the leaves torch's vector kernels handle whole
    ours, _, theirs, _, _ = _run_both(kw, dtype, 50, params=params)
    for k, p in theirs.items():
        assert ours[k].dtype == dtype
        if not _vectorized(k):
            scale = p.abs().max().item()
            torch.testing.assert_close(ours[k], p, rtol=0, atol=16 * ulp * scale, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(ours[k], p), f"{k}: {(ours[k].float() - p.float()).abs().max()}"


def test_factored_state_is_sublinear_and_vectors_keep_the_full_moment():
    params = {"w": torch.zeros(64, 32), "t": torch.zeros(3, 8, 5), "b": torch.zeros(7), "s": torch.zeros(())}
    state = _moments(funcopt.adafactor().init(params))
    assert state.count.dtype == torch.int64 and state.count.shape == ()
    assert state.v_row["w"].shape == (64, 1) and state.v_col["w"].shape == (1, 32)
    assert state.v_row["t"].shape == (3, 8, 1) and state.v_col["t"].shape == (3, 1, 5)
    assert state.v["b"].shape == (7,) and state.v["s"].shape == ()
    held = sum(x.numel() for x in funcopt.tree.leaves(state) if x.ndim or x.dtype != torch.int64)
    assert held == 64 + 32 + 3 * 8 + 3 * 5 + 7 + 1


def test_schedule_as_learning_rate_matches_lambda_lr():
    """lr drives both the cap of the relative step and the weight decay; a schedule count -> lr
    gives the k-th update the value LambdaLR gives the k-th step."""
    torch.set_default_dtype(torch.float64)
    params = _params(torch.float64)
    targets = _targets(params)
    theirs = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Adafactor(list(theirs.values()), lr=0.3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9**k)
    tx = funcopt.adafactor(lambda count: 0.3 * 0.9**count, weight_decay=0.1)
    state = tx.init(params)
    for _ in range(30):
        updates, state = tx.update(torch.func.grad(_loss)(params, targets), state, params)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        _loss(theirs, targets).backward()
        opt.step()
        sched.step()
    for k, p in theirs.items():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-9, atol=1e-15)


def test_vmapped_sweep_over_injected_hyperparameters_equals_separate_runs():
    """inject_hyperparams + vmap: 3 (learning_rate, beta2_decay, d) configurations at once."""
    params = _params(torch.float64)
    targets = _targets(params)
    configs = torch.tensor([[0.01, -0.8, 1.0], [0.3, -0.5, 2.0], [0.05, 0.0, 1.5]], dtype=torch.float64)
    tx = funcopt.inject_hyperparams(funcopt.adafactor)(weight_decay=0.1)
    expected = []
    for lr, b2d, d in configs.tolist():
        p, _ = _funcopt_steps(funcopt.adafactor(lr, b2d, d=d, weight_decay=0.1), None, params, targets, 5)
        expected.append(p)
    state = funcopt.tree.stack([tx.init(params)] * 3)
    state = funcopt.set_hyperparams(state, learning_rate=configs[:, 0], beta2_decay=configs[:, 1], d=configs[:, 2])
    stacked = funcopt.tree.stack([params] * 3)

    def step(p, s):
        updates, s = tx.update(torch.func.grad(_loss)(p, targets), s, p)
        return funcopt.apply_updates(p, updates), s

    for _ in range(5):
        stacked, state = torch.func.vmap(step)(stacked, state)
    for j in range(3):
        for k in params:
            torch.testing.assert_close(stacked[k][j], expected[j][k], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Interop: torch.optim.Adafactor state_dicts, both ways


def _module_params(seed=0):
    return {k: torch.nn.Parameter(v) for k, v in _params(torch.float64, seed).items()}


def _torch_steps(ps, opt, targets, n):
    for _ in range(n):
        opt.zero_grad()
        _loss(ps, targets).backward()
        opt.step()


def _funcopt_steps(tx, state, params, targets, n):
    state = tx.init(params) if state is None else state
    for _ in range(n):
        updates, state = tx.update(torch.func.grad(_loss)(params, targets), state, params)
        params = funcopt.apply_updates(params, updates)
    return params, state


def _detached(ps):
    return {k: v.detach().clone() for k, v in ps.items()}


INTEROP = {
    "defaults": dict(),
    "all": dict(lr=0.05, beta2_decay=-0.6, eps=(1e-4, 1e-2), d=1.5, weight_decay=0.2, maximize=True),
}


@pytest.mark.parametrize("case", list(INTEROP))
def test_torch_training_continues_with_funcopt(case):
    torch.set_default_dtype(torch.float64)
    ps = _module_params()
    targets = _targets(_detached(ps))
    opt = torch.optim.Adafactor(list(ps.values()), **INTEROP[case])
    _torch_steps(ps, opt, targets, 5)
    params = _detached(ps)
    tx, state = interop.from_torch(opt, params)
    _, from_dict = interop.from_torch(copy.deepcopy(opt.state_dict()), params)  # kind inferred from beta2_decay
    assert_trees_equal(from_dict, state)
    moments = _moments(state)
    assert int(moments.count) == 5 and moments.v["w"].shape == (0,) and moments.v_row["b"].shape == (0,)
    _torch_steps(ps, opt, targets, 4)
    params, _ = _funcopt_steps(tx, state, params, targets, 4)
    for k, p in ps.items():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("case", list(INTEROP))
def test_funcopt_training_continues_with_torch(case):
    torch.set_default_dtype(torch.float64)
    ps = _module_params()
    targets = _targets(_detached(ps))
    tx, state = interop.from_torch(torch.optim.Adafactor(list(ps.values()), **INTEROP[case]), _detached(ps))
    params, state = _funcopt_steps(tx, state, _detached(ps), targets, 5)
    with torch.no_grad():
        for k, p in ps.items():
            p.copy_(params[k])
    opt = torch.optim.Adafactor(list(ps.values()), **INTEROP[case])
    sd = interop.to_torch(state, params, opt)
    # only the moments torch keeps for each param: no placeholders
    for pid, k in enumerate(ps):
        assert set(sd["state"][pid]) == ({"step", "row_var", "col_var"} if ps[k].ndim > 1 else {"step", "variance"})
    opt.load_state_dict(sd)
    _torch_steps(ps, opt, targets, 4)
    params, _ = _funcopt_steps(tx, state, params, targets, 4)
    for k, p in ps.items():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-10, atol=1e-15)


def test_interop_rejects_a_mismatched_factor():
    ps = _module_params()
    opt = torch.optim.Adafactor(list(ps.values()))
    _torch_steps(ps, opt, _targets(_detached(ps)), 1)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["row_var"] = torch.zeros(5, 1, dtype=torch.float64)  # w is (6, 5): row_var (6, 1)
    with pytest.raises(funcopt.FuncoptError, match=r"'row_var' for \['w'\] has shape \(5, 1\).*funcopt keeps \(6, 1\)"):
        interop.from_torch(sd, _detached(ps), kind="adafactor")


# ---------------------------------------------------------------------------------------------
# Checkpoints, errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_checkpoint_resume_with_like_is_bitwise(tmp_path, dtype):
    params = _params(dtype)
    targets = _targets(params)
    tx = funcopt.adafactor(weight_decay=0.1)
    straight, _ = _funcopt_steps(tx, tx.init(params), params, targets, 6)
    half, state = _funcopt_steps(tx, tx.init(params), params, targets, 3)
    path = tmp_path / "ck.safetensors"
    funcopt.checkpoint.save(path, {"params": half, "opt_state": state})
    tx = funcopt.adafactor(weight_decay=0.1)
    restored = funcopt.checkpoint.load(path, like={"params": params, "opt_state": tx.init(params)})
    assert_trees_equal(restored, {"params": half, "opt_state": state})
    resumed, _ = _funcopt_steps(tx, restored["opt_state"], restored["params"], targets, 3)
    assert_trees_equal(resumed, straight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta2_decay=0.5), r"beta2_decay must lie in \[-inf, 0.0\]"),
        (dict(d=0.5), r"clipping_threshold must lie in \[1.0, inf\]"),
        (dict(eps=(-1.0, 1e-3)), r"eps\[0\] \(eps1\) must lie in"),
        (dict(eps=(None, -1.0)), r"eps\[1\] \(eps2\) must lie in"),
        (dict(eps=1e-3), r"eps must be a pair \(eps1, eps2\)"),
        (dict(weight_decay=-0.1), r"weight_decay must lie in"),
        (dict(learning_rate=-1.0), r"learning_rate must be >= 0"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(funcopt.FuncoptError, match=match):
        funcopt.adafactor(**kwargs)


def test_complex_params_and_missing_params_are_reported():
    tx = funcopt.adafactor()
    with pytest.raises(funcopt.FuncoptError, match=r"leaf at \['z'\] is complex.*view_as_real"):
        tx.init({"z": torch.zeros(2, 2, dtype=torch.complex64)})
    params = {"w": torch.ones(2, 3)}
    with pytest.raises(funcopt.FuncoptError, match="needs the current parameters"):
        tx.update({"w": torch.ones(2, 3)}, tx.init(params))
