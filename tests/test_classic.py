"""funcopt.adadelta, rprop and asgd against torch.optim.Adadelta, Rprop and ASGD (the oracle).

Every option combination torch documents for the classes (foreach, capturable and
differentiable excepted) runs 60 steps on a small MLP with each side computing its own
gradients; params and per-parameter state must match torch's. bfloat16 params run on a fixed
gradient sequence (the MLP's gradients would amplify any rounding into another trajectory).
Also: ASGD's averaged params against the closed-form average of the iterates, the fast routes,
interop both ways, and the construction-time checks.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import funcopt
from funcopt import fast, interop
from funcopt.base import FuncoptError
from tests.helpers import assert_trees_close, assert_trees_equal, mlp_problem

STEPS = 60


def _adadelta_cases():
    out = {}
    for (lr, rho, eps), wd, maximize in itertools.product(
        [(1.0, 0.9, 1e-6), (0.5, 0.8, 1e-4)], [0.0, 0.05], [False, True]
    ):
        ours = dict(learning_rate=lr, rho=rho, eps=eps, weight_decay=wd, maximize=maximize)
        theirs = dict(lr=lr, rho=rho, eps=eps, weight_decay=wd, maximize=maximize)
        out[f"adadelta-lr{lr}-rho{rho}-wd{wd}-max{maximize}"] = ("adadelta", ours, theirs)
    out["adadelta-tensor-lr"] = (
        "adadelta",
        dict(learning_rate=torch.tensor(0.7, dtype=torch.float64)),
        dict(lr=torch.tensor(0.7, dtype=torch.float64)),
    )
    return out


def _rprop_cases():
    out = {}
    for (lr, etas, sizes), maximize in itertools.product(
        [(1e-2, (0.5, 1.2), (1e-6, 50.0)), (0.05, (0.3, 1.5), (1e-4, 0.5)), (0.02, (0.7, 1.1), (1e-3, 0.03))],
        [False, True],
    ):
        ours = dict(learning_rate=lr, etas=etas, step_sizes=sizes, maximize=maximize)
        theirs = dict(lr=lr, etas=etas, step_sizes=sizes, maximize=maximize)
        out[f"rprop-lr{lr}-etas{etas}-max{maximize}"] = ("rprop", ours, theirs)
    return out


def _asgd_cases():
    out = {}
    for (lr, lambd, alpha, t0), wd, maximize in itertools.product(
        [(1e-2, 1e-4, 0.75, 1e6), (0.05, 1e-3, 0.6, 5.0), (0.1, 0.0, 0.75, 0.0), (0.05, 0.02, 1.0, 20.0)],
        [0.0, 0.01],
        [False, True],
    ):
        ours = dict(learning_rate=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=wd, maximize=maximize)
        theirs = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=wd, maximize=maximize)
        out[f"asgd-lr{lr}-lambd{lambd}-t0{t0}-wd{wd}-max{maximize}"] = ("asgd", ours, theirs)
    return out


CASES = {**_adadelta_cases(), **_rprop_cases(), **_asgd_cases()}
TORCH = {"adadelta": torch.optim.Adadelta, "rprop": torch.optim.Rprop, "asgd": torch.optim.ASGD}
FACTORY = {"adadelta": funcopt.adadelta, "rprop": funcopt.rprop, "asgd": funcopt.asgd}
# funcopt state field -> torch state key, per optimizer (the chain entry is the last stateful one)
STATE_KEYS = {
    "adadelta": {"square_avg": "square_avg", "acc_delta": "acc_delta"},
    "rprop": {"prev": "prev", "step_size": "step_size"},
    "asgd": {"ax": "ax"},
}
STATE_TYPES = {
    "adadelta": funcopt.ScaleByAdadeltaState,
    "rprop": funcopt.ScaleByRpropState,
    "asgd": funcopt.ScaleByAsgdState,
}

# float64: torch's own arithmetic, operation by operation (bitwise in practice; 1e-9 leaves room
# for a libm difference). float32: the same operations, except that ASGD returns its update as
# p_new - p, which apply_updates adds back to p: where p_new and p differ by more than a factor
# 2 that round trip rounds, and 60 steps through the MLP's gradients amplify it to ~3e-5.
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _block_state(state, kind):
    found = [s for s in state if isinstance(s, STATE_TYPES[kind])]
    assert len(found) == 1
    return found[0]


def _run_mlp(case, dtype, steps=STEPS):
    kind, ours, theirs = CASES[case]
    torch.set_default_dtype(dtype)  # torch keeps its scalars (step, eta, mu) in the default dtype
    module, params, loss_fn, (X, Y) = mlp_problem(dtype)
    reference = copy.deepcopy(module)
    opt = TORCH[kind](reference.parameters(), foreach=False, **theirs)
    tx = FACTORY[kind](**ours)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(torch.func.grad(loss_fn)(params), state, params)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(X), Y).backward()
        opt.step()
    return kind, params, state, reference, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_optim_params_and_state(case, dtype):
    kind, params, state, reference, opt = _run_mlp(case, dtype)
    tol = TOLERANCES[dtype]
    block = _block_state(state, kind)
    assert int(block.count) == STEPS
    for key, p in reference.named_parameters():
        torch.testing.assert_close(params[key], p.detach(), **tol, msg=lambda m: f"{case} {key}: {m}")
        assert not torch.equal(p.detach(), mlp_problem(dtype)[1][key]), "the reference did not move"
        theirs = opt.state[p]
        assert float(theirs["step"]) == STEPS
        for field, torch_key in STATE_KEYS[kind].items():
            ours = getattr(block, field)[key]
            assert ours.dtype == theirs[torch_key].dtype
            torch.testing.assert_close(ours, theirs[torch_key], **tol, msg=lambda m: f"{case} {field}: {m}")
        if kind == "asgd":  # torch's per-parameter scalars, in torch's scalar dtype
            for field in ("eta", "mu"):
                assert getattr(block, field).dtype == theirs[field].dtype == dtype
                assert torch.equal(getattr(block, field), theirs[field]), field


# ---------------------------------------------------------------------------------------------
# bfloat16 params (torch keeps the state in the params' dtype)


BF16_CASES = [
    "adadelta-lr1.0-rho0.9-wd0.0-maxFalse",
    "adadelta-lr0.5-rho0.8-wd0.05-maxTrue",
    "rprop-lr0.01-etas(0.5, 1.2)-maxFalse",
    "rprop-lr0.05-etas(0.3, 1.5)-maxTrue",
    "asgd-lr0.05-lambd0.001-t05.0-wd0.01-maxFalse",
    "asgd-lr0.05-lambd0.02-t020.0-wd0.0-maxTrue",
]


def _bf16_problem():
    gen = torch.Generator().manual_seed(3)
    start = {"w": torch.randn(4, 3, generator=gen).bfloat16(), "b": torch.randn(5, generator=gen).bfloat16()}
    grads = [{k: torch.randn(v.shape, generator=gen).bfloat16() for k, v in start.items()} for _ in range(50)]
    return start, grads


def _bf16_torch(kind, theirs, foreach):
    start, grads = _bf16_problem()
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = TORCH[kind](list(params.values()), foreach=foreach, **theirs)
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("case", BF16_CASES)
def test_bfloat16_params_follow_torch(case):
    """50 steps of fixed bfloat16 gradients given to both; the state stays bfloat16 as torch's.

    The blocks round as torch's vectorized bfloat16 CPU kernels do (sums of products in float32,
    rounded once; Python-number factors applied in float32): Adadelta and Rprop agree to one
    bfloat16 ulp (bitwise on the machines tried). torch's own ASGD rounds ``p + alpha * g``
    differently in the vectorized body of a kernel and in its scalar tail (the product rounded
    to bfloat16 first or not), which depends on the tensor's size and the CPU's vector width, so
    ASGD is held to the distance between torch's own two implementations (for-loop and
    foreach) or 2 bfloat16 ulps at 1, whichever is larger.
    """
    kind, ours, theirs = CASES[case]
    start, grads = _bf16_problem()
    torch_params, opt = _bf16_torch(kind, theirs, foreach=False)
    tx = FACTORY[kind](**ours)
    params, state = dict(start), tx.init(start)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = funcopt.apply_updates(params, updates)
    block = _block_state(state, kind)
    pairs = [(params[k], p.detach()) for k, p in torch_params.items()]
    for field, torch_key in STATE_KEYS[kind].items():
        pairs += [(getattr(block, field)[k], opt.state[p][torch_key]) for k, p in torch_params.items()]
    for ours_t, theirs_t in pairs:
        assert ours_t.dtype == theirs_t.dtype == torch.bfloat16
    if kind != "asgd":
        for ours_t, theirs_t in pairs:
            torch.testing.assert_close(ours_t, theirs_t, rtol=8e-3, atol=1e-3)
        return
    foreach_params, foreach_opt = _bf16_torch(kind, theirs, foreach=True)
    own_spread = max((foreach_params[k].detach().float() - p.detach().float()).abs().max() for k, p in torch_params.items())
    bound = max(float(own_spread), 2.0**-6)
    for ours_t, theirs_t in pairs:
        assert (ours_t.float() - theirs_t.float()).abs().max() <= bound
    for p in torch_params.values():  # eta and mu: torch's float32 scalars, exactly
        for field in ("eta", "mu"):
            assert torch.equal(getattr(block, field), opt.state[p][field])


# ---------------------------------------------------------------------------------------------
# ASGD's averaged params


def test_asgd_average_is_the_mean_of_the_iterates_after_t0():
    """Closed form: with ``t0 = k`` the weight of step ``s`` is ``1 / max(1, s - 1 - k)``, so
    after ``T >= k + 2`` steps ``ax`` is the plain mean of the iterates ``p_{k+2} .. p_T``."""
    k = 4
    torch.set_default_dtype(torch.float64)  # torch's (and so funcopt's) mu in float64, not rounded to float32
    _, params, loss_fn, _ = mlp_problem(torch.float64)
    tx = funcopt.asgd(0.1, t0=float(k))
    state = tx.init(params)
    iterates = []
    for _ in range(20):
        updates, state = tx.update(torch.func.grad(loss_fn)(params), state, params)
        params = funcopt.apply_updates(params, updates)
        iterates.append(params)
    averaged = funcopt.asgd_averaged_params(state)
    expected = funcopt.tree.map(lambda *xs: torch.stack(xs).mean(0), *iterates[k + 1 :])
    assert_trees_close(averaged, expected, rtol=1e-12, atol=1e-14)
    assert state[-1].mu.dtype == torch.float64 and float(state[-1].mu) == 1 / (20 - k)
    assert funcopt.tree.norm(funcopt.tree.sub(averaged, params)) > 1e-3  # the average is not the last iterate


def test_asgd_averaged_params_equal_torchs_ax_and_are_found_through_wrappers():
    kind, params, state, reference, opt = _run_mlp("asgd-lr0.05-lambd0.001-t05.0-wd0.0-maxFalse", torch.float64)
    averaged = funcopt.asgd_averaged_params(state)
    assert funcopt.transforms.asgd_averaged_params is funcopt.asgd_averaged_params
    for key, p in reference.named_parameters():
        assert torch.equal(averaged[key], opt.state[p]["ax"])
        assert not torch.equal(averaged[key], params[key])  # averaging has started
    # before t0 the average is the latest iterate
    _, early_params, early_state, _, _ = _run_mlp("asgd-lr0.01-lambd0.0001-t01000000.0-wd0.0-maxFalse", torch.float64, 3)
    assert_trees_equal(funcopt.asgd_averaged_params(early_state), early_params)
    # inside inject_hyperparams and a chain
    tx = funcopt.chain(funcopt.clip(1.0), funcopt.inject_hyperparams(funcopt.asgd)(learning_rate=0.1, t0=0.0))
    p = {"w": torch.ones(3, dtype=torch.float64)}
    s = tx.init(p)
    for _ in range(3):
        u, s = tx.update({"w": torch.full((3,), 0.5, dtype=torch.float64)}, s, p)
        p = funcopt.apply_updates(p, u)
    assert funcopt.asgd_averaged_params(s)["w"].shape == (3,)
    with pytest.raises(FuncoptError, match="found 0 ScaleByAsgdState"):
        funcopt.asgd_averaged_params(funcopt.adam(1e-3).init(p))
    with pytest.raises(FuncoptError, match="found 2 ScaleByAsgdState"):
        funcopt.asgd_averaged_params((s, s))


# ---------------------------------------------------------------------------------------------
# Fast routes


def _nested(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 4, generator=g, dtype=dtype), "b": [torch.randn(5, generator=g, dtype=dtype)]}


@pytest.mark.parametrize(
    "tx",
    [
        funcopt.adadelta(0.5, weight_decay=0.01),
        funcopt.rprop(0.05, etas=(0.3, 1.5)),
        funcopt.asgd(0.05, t0=1.0, weight_decay=0.01),
    ],
    ids=["adadelta", "rprop", "asgd"],
)
def test_fast_routes_apply_and_donated_steps_equal_pure_steps(tx):
    """The declared kernels run (``explain``), in place too; a donated run equals a pure one,
    including ASGD's ``eta``/``mu`` (0-dim state fields the kernel replaces)."""
    params = _nested()
    state = tx.init(params)
    grads = funcopt.tree.map(torch.ones_like, params)
    route = fast.explain(tx, grads, state, params)
    assert (route.route, route.backend) == ("fast", "torch")
    route = fast.explain(tx, grads, state, params, step="apply_gradients", donate=True)
    assert route.route == "fast, in place"
    pure_p, pure_s = _nested(), tx.init(params)
    don_p, don_s = _nested(), tx.init(params)
    for i in range(5):
        g = funcopt.tree.map(lambda x: torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=x.dtype), params)
        with fast.fast_path_enabled(False):
            u, pure_s = tx.update(g, pure_s, pure_p)
        pure_p = funcopt.apply_updates(pure_p, u)
        don_p, don_s = funcopt.apply_gradients(tx, g, don_s, don_p, donate=True)
    assert_trees_close((don_p, don_s), (pure_p, pure_s), rtol=1e-13, atol=1e-15)


def test_rprop_fast_route_reads_tuple_hyperparameters_and_asgd_needs_params():
    params = _nested()
    grads = funcopt.tree.map(torch.ones_like, params)
    rprop = funcopt.rprop(0.05, etas=(torch.tensor(0.4), 1.3))  # a tensor inside the pair is read too
    assert fast.fast_path_applies(rprop, grads, rprop.init(params), params)
    asgd = funcopt.asgd(0.05)
    state = asgd.init(params)
    assert not fast.fast_path_applies(asgd, grads, state, None)  # the reference raises the error
    with pytest.raises(FuncoptError, match="needs the current parameters"):
        asgd.update(grads, state)


# ---------------------------------------------------------------------------------------------
# Interop (torch.optim state_dict <-> funcopt state)

INTEROP = {
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=0.5, rho=0.8, weight_decay=1e-3),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=0.02, etas=(0.4, 1.3), step_sizes=(1e-4, 1.0), maximize=False),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=0.05, lambd=1e-3, alpha=0.6, t0=2.0, weight_decay=1e-3),
}


def _model():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model, torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)


def _torch_steps(model, opt, X, Y, n):
    for _ in range(n):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()


def _funcopt_steps(tx, state, params, model, X, Y, n):
    for _ in range(n):
        loss = lambda p: torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (X,)), Y)
        updates, state = tx.update(torch.func.grad(loss)(params), state, params)
        params = funcopt.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", sorted(INTEROP))
def test_torch_to_funcopt_continues_the_trajectory(name):
    model, X, Y = _model()
    opt = INTEROP[name](model.parameters())
    _torch_steps(model, opt, X, Y, 6)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx, state = interop.from_torch(opt, params)
    _, state2 = interop.from_torch(opt.state_dict(), params)  # the kind is inferred from the group
    assert_trees_equal(state2, state)
    _torch_steps(model, opt, X, Y, 5)
    params, state = _funcopt_steps(tx, state, params, model, X, Y, 5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-10, atol=1e-12)
    if name == "asgd":
        for k, p in model.named_parameters():
            torch.testing.assert_close(funcopt.asgd_averaged_params(state)[k], opt.state[p]["ax"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(INTEROP))
def test_funcopt_to_torch_continues_the_trajectory(name):
    model, X, Y = _model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx, state = interop.from_torch(INTEROP[name](model.parameters()), params)  # unstarted
    params, state = _funcopt_steps(tx, state, params, model, X, Y, 6)
    funcopt.nn.load(model, params)
    opt = INTEROP[name](model.parameters())
    sd = interop.to_torch(state, params, opt)
    opt.load_state_dict(sd)
    _torch_steps(model, opt, X, Y, 5)
    params, state = _funcopt_steps(tx, state, params, model, X, Y, 5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-10, atol=1e-12)
        assert float(opt.state[p]["step"]) == 11


def test_asgd_interop_rejects_unequal_per_parameter_scalars():
    model, X, Y = _model()
    opt = INTEROP["asgd"](model.parameters())
    _torch_steps(model, opt, X, Y, 3)
    sd = opt.state_dict()
    sd["state"][0]["eta"] = sd["state"][0]["eta"] * 2
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(FuncoptError, match="different eta values"):
        interop.from_torch(sd, params)


# ---------------------------------------------------------------------------------------------
# Construction-time checks


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: funcopt.adadelta(rho=1.5), "rho must lie in"),
        (lambda: funcopt.adadelta(-1.0), "learning_rate must be >= 0"),
        (lambda: funcopt.rprop(lambda count: 0.1), "cannot be a schedule"),
        (lambda: funcopt.rprop(etas=(1.2, 0.5)), "eta_minus must lie in"),
        (lambda: funcopt.rprop(etas=(0.5, 1.0)), "eta_plus must lie in"),
        (lambda: funcopt.rprop(etas=0.5), "etas must be a pair"),
        (lambda: funcopt.rprop(step_sizes=(1.0, 0.1)), "must not exceed max_step_size"),
        (lambda: funcopt.asgd(lambd=-1.0), "lambd must lie in"),
        (lambda: funcopt.asgd(t0=float("nan")), "t0 must not be NaN"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(make, match):
    with pytest.raises(FuncoptError, match=match):
        make()
