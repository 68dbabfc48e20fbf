"""Schedules vs torch.optim.lr_scheduler, step by step, and the no-off-by-one trajectory checks."""

import math

import pytest
import torch
from torch.optim import lr_scheduler as L

import funcopt
from funcopt import schedules as S

N = 1200
BASE = 0.1


def torch_values(make, n, base=BASE, optimizer="sgd"):
    """The lr (and momentum/beta1) torch uses at each of n optimizer steps."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    if optimizer == "sgd":
        opt = torch.optim.SGD([p], lr=base, momentum=0.9)
    else:
        opt = torch.optim.Adam([p], lr=base)
    sched = make(opt)
    lrs, moms = [], []
    for _ in range(n):
        group = opt.param_groups[0]
        lrs.append(group["lr"])
        moms.append(group["momentum"] if "momentum" in group else group["betas"][0])
        opt.step()
        sched.step()
    return torch.tensor(lrs, dtype=torch.float64), torch.tensor(moms, dtype=torch.float64)


def our_values(schedule, n):
    return torch.stack([schedule(torch.tensor(i)) for i in range(n)])


CASES = {
    "LinearLR": (lambda o: L.LinearLR(o, 0.1, 0.8, 500), S.linear(0.1 * BASE, 0.8 * BASE, 500)),
    "PolynomialLR": (lambda o: L.PolynomialLR(o, 900, 2.0), S.polynomial(BASE, 0.0, 2.0, 900)),
    "ExponentialLR": (lambda o: L.ExponentialLR(o, 0.995), S.exponential_decay(BASE, 1, 0.995)),
    "StepLR": (lambda o: L.StepLR(o, 100, 0.7), S.exponential_decay(BASE, 100, 0.7, staircase=True)),
    "MultiStepLR": (
        lambda o: L.MultiStepLR(o, [100, 400, 401, 900], 0.5),
        S.piecewise_constant(BASE, {100: 0.5, 400: 0.5, 401: 0.5, 900: 0.5}),
    ),
    "ConstantLR": (lambda o: L.ConstantLR(o, 0.25, 300), S.piecewise_constant(0.25 * BASE, {300: 4.0})),
    "CosineAnnealingLR": (lambda o: L.CosineAnnealingLR(o, N - 1, 1e-3), S.cosine_decay(BASE, N - 1, 1e-3 / BASE)),
    "CosineAnnealingLR_eta0": (lambda o: L.CosineAnnealingLR(o, N - 1), S.cosine_decay(BASE, N - 1)),
    "CosineAnnealingWarmRestarts": (
        lambda o: L.CosineAnnealingWarmRestarts(o, 70, 1, 1e-4), S.sgdr(BASE, 70, 1, 1e-4)
    ),
    "CosineAnnealingWarmRestarts_mult2": (
        lambda o: L.CosineAnnealingWarmRestarts(o, 10, 2, 1e-4), S.sgdr(BASE, 10, 2, 1e-4)
    ),
    "CosineAnnealingWarmRestarts_mult3": (lambda o: L.CosineAnnealingWarmRestarts(o, 7, 3), S.cosine_restarts(BASE, 7, 3)),
    "SequentialLR_warmup_cosine": (
        lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.01, 1.0, 100), L.CosineAnnealingLR(o, N - 101, 1e-4)], [100]),
        S.warmup_cosine_decay(0.01 * BASE, BASE, 100, N - 1, 1e-4),
    ),
    "SequentialLR_warmup_exponential": (
        lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.01, 1.0, 100), L.ExponentialLR(o, 0.99)], [100]),
        S.warmup_exponential_decay(0.01 * BASE, BASE, 100, 1, 0.99),
    ),
    "SequentialLR_three": (
        lambda o: L.SequentialLR(
            o, [L.ConstantLR(o, 0.5, 50), L.ExponentialLR(o, 0.99), L.StepLR(o, 60, 0.5)], [200, 600]
        ),
        S.join(
            [
                S.piecewise_constant(0.5 * BASE, {50: 2.0}),
                S.exponential_decay(BASE, 1, 0.99),
                S.exponential_decay(BASE, 60, 0.5, staircase=True),
            ],
            [200, 600],
        ),
    ),
}
for _three in (False, True):
    for _anneal in ("cos", "linear"):
        CASES[f"OneCycleLR_{_anneal}{'_three_phase' if _three else ''}"] = (
            lambda o, a=_anneal, t=_three: L.OneCycleLR(o, BASE, total_steps=N, anneal_strategy=a, three_phase=t),
            S.one_cycle(N, BASE, anneal_strategy=_anneal, three_phase=_three),
        )
CASES["OneCycleLR_custom"] = (
    lambda o: L.OneCycleLR(o, 0.5, total_steps=N, pct_start=0.2345, div_factor=10.0, final_div_factor=100.0),
    S.one_cycle(N, 0.5, pct_start=0.2345, div_factor=10.0, final_div_factor=100.0),
)


@pytest.mark.parametrize("name", list(CASES))
def test_schedule_matches_torch_scheduler(name):
    make, schedule = CASES[name]
    expected, _ = torch_values(make, N)
    torch.testing.assert_close(our_values(schedule, N), expected, rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_cycle_momentum_matches_torch(anneal, three_phase, optimizer):
    _, expected = torch_values(
        lambda o: L.OneCycleLR(o, BASE, total_steps=N, anneal_strategy=anneal, three_phase=three_phase),
        N,
        optimizer=optimizer,
    )
    ours = our_values(S.one_cycle_momentum(N, anneal_strategy=anneal, three_phase=three_phase), N)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0.0)


def _quadratic(seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    h = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    x0 = torch.randn(d, generator=g, dtype=torch.float64)
    return h, b, x0


def _run_torch(h, b, x0, make_opt, make_sched, steps):
    x = torch.nn.Parameter(x0.clone())
    opt = make_opt([x])
    sched = make_sched(opt)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * x @ h @ x - b @ x).backward()
        opt.step()
        sched.step()
    return x.detach()


def _run_funcopt(h, b, x0, tx, steps):
    params = {"x": x0.clone()}
    state = tx.init(params)
    for _ in range(steps):
        grads = {"x": h @ params["x"] - b}
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
    return params["x"]


@pytest.mark.parametrize(
    "name,make_sched,schedule",
    [
        ("ExponentialLR", lambda o: L.ExponentialLR(o, 0.97), S.exponential_decay(0.05, 1, 0.97)),
        ("LinearLR", lambda o: L.LinearLR(o, 0.1, 1.0, 40), S.linear(0.005, 0.05, 40)),
        ("MultiStepLR", lambda o: L.MultiStepLR(o, [1, 2, 30], 0.5), S.piecewise_constant(0.05, {1: 0.5, 2: 0.5, 30: 0.5})),
    ],
)
def test_scheduled_sgd_takes_torch_trajectory(name, make_sched, schedule):
    """The k-th update uses the lr torch's scheduler gives the k-th optimizer.step() (no off-by-one)."""
    h, b, x0 = _quadratic()
    steps = 60
    expected = _run_torch(h, b, x0, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), make_sched, steps)
    ours = _run_funcopt(h, b, x0, funcopt.sgd(schedule, momentum=0.9), steps)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    # an off-by-one (schedule(k) instead of schedule(k-1)) would be visible:
    shifted = _run_funcopt(h, b, x0, funcopt.sgd(lambda c: schedule(c + 1), momentum=0.9), steps)
    assert not torch.allclose(shifted, expected, rtol=1e-8, atol=0)


def test_kth_update_uses_schedule_at_k_minus_1():
    schedule = S.exponential_decay(1.0, 1, 0.5)
    tx = funcopt.sgd(schedule)
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    grads = {"w": torch.ones(2, dtype=torch.float64)}
    state = tx.init(params)
    for k in range(1, 6):
        updates, state = tx.update(grads, state, params)
        assert updates["w"][0].item() == -(0.5 ** (k - 1))


@pytest.mark.parametrize("anneal,three_phase", [("cos", False), ("linear", True)])
def test_one_cycle_adam_beta1_trajectory_matches_torch(anneal, three_phase):
    """inject_hyperparams(adam)(lr=one_cycle, b1=one_cycle_momentum) == Adam + OneCycleLR(cycle_momentum)."""
    h, b, x0 = _quadratic(1)
    steps = 150
    make = lambda o: L.OneCycleLR(o, 0.05, total_steps=steps, anneal_strategy=anneal, three_phase=three_phase)
    expected = _run_torch(h, b, x0, lambda p: torch.optim.Adam(p, lr=0.05), make, steps)
    tx = funcopt.inject_hyperparams(funcopt.adam)(
        learning_rate=S.one_cycle(steps, 0.05, anneal_strategy=anneal, three_phase=three_phase),
        b1=S.one_cycle_momentum(steps, anneal_strategy=anneal, three_phase=three_phase),
    )
    ours = _run_funcopt(h, b, x0, tx, steps)
    torch.testing.assert_close(ours, expected, rtol=1e-11, atol=1e-13)


def test_one_cycle_sgd_momentum_trajectory_matches_torch():
    h, b, x0 = _quadratic(2)
    steps = 120
    make = lambda o: L.OneCycleLR(o, 0.05, total_steps=steps)
    expected = _run_torch(h, b, x0, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), make, steps)
    tx = funcopt.inject_hyperparams(funcopt.sgd)(
        learning_rate=S.one_cycle(steps, 0.05), momentum=S.one_cycle_momentum(steps)
    )
    ours = _run_funcopt(h, b, x0, tx, steps)
    torch.testing.assert_close(ours, expected, rtol=1e-11, atol=1e-13)


ALL = {name: schedule for name, (_, schedule) in CASES.items()}
ALL["constant"] = S.constant(0.3)
ALL["exponential_end_value"] = S.exponential_decay(1.0, 10, 0.5, transition_begin=5, end_value=0.1)
ALL["cosine_exponent"] = S.cosine_decay(1.0, 100, 0.1, exponent=2.0)


@pytest.mark.parametrize("name", list(ALL))
def test_schedules_under_vmap_equal_loop(name):
    schedule = ALL[name]
    counts = torch.arange(0, 1300, 7)
    batched = torch.func.vmap(schedule)(counts)
    loop = torch.stack([schedule(c) for c in counts])
    assert batched.dtype == torch.float64
    torch.testing.assert_close(batched, loop, rtol=1e-14, atol=1e-18)  # SIMD pow may differ by 1 ulp
    assert schedule(5).item() == schedule(torch.tensor(5)).item()  # Python ints accepted


@pytest.mark.slow
def test_schedule_compiles_fullgraph():
    schedule = S.join([S.linear(0.0, 1.0, 10), S.one_cycle(100, 1.0, three_phase=True)], [10])
    compiled = torch.compile(schedule, fullgraph=True, dynamic=False)
    for c in (0, 5, 10, 40, 99):
        count = torch.tensor(c)
        torch.testing.assert_close(compiled(count), schedule(count), rtol=1e-15, atol=0)


def test_values_and_limits():
    assert S.constant(0.3)(7).item() == 0.3
    lin = S.linear(1.0, 0.0, 10, transition_begin=5)
    assert [lin(c).item() for c in (0, 5, 10, 15, 100)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    exp = S.exponential_decay(1.0, 10, 0.5, transition_begin=5, end_value=0.1)
    assert exp(5).item() == 1.0 and exp(15).item() == 0.5 and exp(1000).item() == 0.1
    grow = S.exponential_decay(1.0, 1, 2.0, end_value=8.0)
    assert grow(10).item() == 8.0
    cos = S.cosine_decay(2.0, 100, alpha=0.1)
    assert cos(0).item() == 2.0 and math.isclose(cos(100).item(), 0.2) and math.isclose(cos(500).item(), 0.2)
    one = S.one_cycle(100, 1.0, div_factor=10.0, final_div_factor=100.0)
    assert math.isclose(one(0).item(), 0.1) and math.isclose(one(99).item(), 1e-3)
    assert math.isclose(one(10_000).item(), 1e-3)  # held at the minimum after total_steps
    restarts = S.sgdr(1.0, 3, 2, end_value=0.0, decay=0.5)
    # cycles start at 0, 3, 9, 21, 45 with peaks 1, 0.5, 0.25, ...
    assert [restarts(c).item() for c in (0, 3, 9, 21, 45)] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    poly = S.polynomial(1.0, 0.5, 1.0, 10)
    assert poly(5).item() == 0.75 and poly(50).item() == 0.5


def test_tensor_hyperparameters_are_accepted():
    peak = torch.tensor(0.5, dtype=torch.float64)
    s = S.warmup_cosine_decay(0.0, peak, 10, 100)
    assert s(10).item() == 0.5
    rates = torch.tensor([0.5, 0.9], dtype=torch.float64)
    out = torch.func.vmap(lambda r: S.exponential_decay(1.0, 1, r, end_value=0.3)(torch.tensor(3)))(rates)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.729], dtype=torch.float64))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: S.linear(1.0, 0.0, 0), "transition_steps must be >= 1"),
        (lambda: S.linear(1.0, 0.0, 10.5), "transition_steps must be a Python int"),
        (lambda: S.constant("0.1"), "value must be a number"),
        (lambda: S.constant(float("nan")), "must not be NaN"),
        (lambda: S.exponential_decay(1.0, 10, 0.0), "decay_rate must be > 0"),
        (lambda: S.cosine_decay(1.0, 0), "decay_steps must be >= 1"),
        (lambda: S.join([S.constant(1.0), S.constant(2.0)], []), "one boundary fewer"),
        (lambda: S.join([S.constant(1.0), 2.0], [3]), r"schedules\[1\]"),
        (lambda: S.join([S.constant(1.0)] * 3, [5, 2]), "non-decreasing"),
        (lambda: S.join([], []), "at least one schedule"),
        (lambda: S.piecewise_constant(1.0, {-1: 0.5}), "boundary must be >= 0"),
        (lambda: S.sgdr(1.0, 10, 1.5), "cycle_mult must be a Python int"),
        (lambda: S.one_cycle(100, 1.0, pct_start=1.5), "pct_start"),
        (lambda: S.one_cycle(100, 1.0, anneal_strategy="cosine"), "anneal_strategy"),
        (lambda: S.one_cycle_momentum(0), "total_steps must be >= 1"),
        (lambda: S.one_cycle(100, 1.0, div_factor=0.0), "div_factor must be > 0"),
        (lambda: S.warmup_cosine_decay(0.0, 1.0, 10, 10), "decay_steps must be >= 11"),
    ],
)
def test_invalid_arguments_raise(build, match):
    with pytest.raises(funcopt.FuncoptError, match=match):
        build()
