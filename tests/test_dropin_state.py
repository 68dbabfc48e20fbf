"""A run trained with torch.optim continues under as_torch_optimizer: load_state_dict of each
torch.optim optimizer's state_dict (two param groups), then the same trajectory as torch's
own continuation, in float64; and back to torch.optim with torch_state_dict(). The adapter's
state_dict in torch's layout: opt.state, DCP's get_state_dict/set_state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import funcopt
from funcopt import as_torch_optimizer

DT = torch.float64
STEPS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one intra-op thread avoids OpenMP synchronisation, which dominates (and
    slows these tests many times over) when the CPU is shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

# torch class, its arguments (torch's names, also given to the funcopt factory), factory
CASES = {
    "Adam": (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2), funcopt.adam),
    "Adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True), funcopt.adam),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), funcopt.adamw),
    "SGD": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), funcopt.sgd),
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True), funcopt.rmsprop),
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.05, lr_decay=1e-3), funcopt.adagrad),
    "Adamax": (torch.optim.Adamax, dict(lr=1e-2), funcopt.adamax),
    "NAdam": (torch.optim.NAdam, dict(lr=1e-2), funcopt.nadam),
    "RAdam": (torch.optim.RAdam, dict(lr=1e-2), funcopt.radam),
    "Adadelta": (torch.optim.Adadelta, dict(lr=0.5), funcopt.adadelta),
    "Rprop": (torch.optim.Rprop, dict(lr=1e-2), funcopt.rprop),
    "ASGD": (torch.optim.ASGD, dict(lr=1e-2, t0=2.0), funcopt.asgd),
    "Adafactor": (torch.optim.Adafactor, dict(lr=1e-2), funcopt.adafactor),
    "Muon": (torch.optim.Muon, dict(lr=1e-2, momentum=0.9), funcopt.muon),
}


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(DT)


def groups_of(model, matrices_only):
    params = [p for p in model.parameters() if p.dim() == 2 or not matrices_only]
    return [{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}]


def run(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g, dtype=DT)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_run_continues_under_the_adapter(name):
    cls, kw, factory = CASES[name]
    only_matrices = name == "Muon"  # torch.optim.Muon takes 2-D parameters only
    model = make_model()
    if only_matrices:
        for p in model.parameters():
            p.requires_grad_(p.dim() == 2)
    torch_opt = cls(groups_of(model, only_matrices), **kw)
    run(model, torch_opt, STEPS, seed=1)

    theirs = copy.deepcopy(model)
    torch_cont = cls(groups_of(theirs, only_matrices), **kw)
    torch_cont.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    run(theirs, torch_cont, STEPS, seed=2)

    ours = copy.deepcopy(model)
    opt = as_torch_optimizer(factory, groups_of(ours, only_matrices), **kw)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert opt.param_groups[1]["lr"] == 3e-3
    run(ours, opt, STEPS, seed=2)
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{name} {n}: {m}")

    # the adapter's own state_dict round-trips
    again = as_torch_optimizer(factory, groups_of(copy.deepcopy(ours), only_matrices), **kw)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for a, b in zip(funcopt.tree.leaves(again.funcopt_state), funcopt.tree.leaves(opt.funcopt_state)):
        assert torch.equal(a, b)

    # and back to torch.optim: torch_state_dict() continues under torch as the adapter continues
    back_model = copy.deepcopy(ours)
    back = cls(groups_of(back_model, only_matrices), **kw)
    back.load_state_dict(opt.torch_state_dict())
    run(back_model, back, STEPS, seed=3)
    run(ours, opt, STEPS, seed=3)
    for (n, a), b in zip(ours.named_parameters(), back_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{name} back {n}: {m}")


def test_lbfgs_history_carries_over():
    """torch.optim.LBFGS(max_iter=1, no line search) and funcopt.lbfgs(linesearch=None) coincide."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 4, generator=g, dtype=DT)
    b = torch.randn(6, generator=g, dtype=DT)

    def run_lbfgs(w, opt, steps):
        def closure():
            opt.zero_grad()
            loss = ((A @ w - b) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(steps):
            opt.step(closure)

    w0 = torch.nn.Parameter(torch.zeros(4, dtype=DT))
    ref = torch.optim.LBFGS([w0], lr=0.05, max_iter=1, history_size=5)
    run_lbfgs(w0, ref, 3)
    w_t = torch.nn.Parameter(w0.detach().clone())
    cont = torch.optim.LBFGS([w_t], lr=0.05, max_iter=1, history_size=5)
    cont.load_state_dict(copy.deepcopy(ref.state_dict()))
    run_lbfgs(w_t, cont, 3)
    w_f = torch.nn.Parameter(w0.detach().clone())
    opt = as_torch_optimizer(funcopt.lbfgs(0.05, memory_size=5, linesearch=None), [w_f])
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    run_lbfgs(w_f, opt, 3)
    torch.testing.assert_close(w_f, w_t, rtol=1e-10, atol=1e-12)


def test_mismatched_torch_state_dicts_are_refused_with_the_fix():
    model = make_model()
    sgd = torch.optim.SGD(groups_of(model, False), lr=0.1, momentum=0.9)
    run(model, sgd, 1, seed=1)
    with pytest.raises(funcopt.FuncoptError, match=r"torch.optim's sgd.*as_torch_optimizer\(funcopt.sgd"):
        as_torch_optimizer(funcopt.adam, groups_of(model, False), lr=1e-3).load_state_dict(sgd.state_dict())
    with pytest.raises(funcopt.FuncoptError, match="2 param groups, this optimizer 1"):
        as_torch_optimizer(funcopt.sgd, model.parameters(), lr=0.1, momentum=0.9).load_state_dict(sgd.state_dict())
    adam = torch.optim.Adam(groups_of(model, False), lr=1e-3, amsgrad=True)
    run(model, adam, 1, seed=1)
    opt = as_torch_optimizer(funcopt.adam, groups_of(model, False), lr=1e-3)
    with pytest.raises(funcopt.FuncoptError, match="amsgrad.*fixed when the optimizer is built"):
        opt.load_state_dict(adam.state_dict())
    assert opt.param_groups[0]["amsgrad"] is False  # left as it was


def test_state_is_in_torch_layout_and_dcp_state_dicts_resume_bitwise():
    """opt.state[p] holds torch.optim.AdamW's names and values (the live buffers); DCP's
    get_state_dict (keyed by parameter names, what dcp.save writes) runs no fake step on a
    fresh adapter, and set_state_dict resumes bitwise."""
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    model, ref_model = make_model(), make_model()
    opt = as_torch_optimizer(funcopt.adamw, groups_of(model, False), **kw)
    ref = torch.optim.AdamW(groups_of(ref_model, False), **kw)
    first = next(model.parameters())
    assert opt.state[first]["step"] == 0 and len(opt.state) == 4
    run(model, opt, 2, seed=1)
    run(ref_model, ref, 2, seed=1)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert set(opt.state[p]) == set(ref.state[q]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-10, atol=1e-14)
    assert opt.state[first]["exp_avg"] is funcopt.tree.leaves(opt.funcopt_state[0][0].mu)[0]

    _, saved = get_state_dict(model, opt)
    saved = copy.deepcopy(saved)
    assert sorted(saved["state"]) == sorted(n for n, _ in model.named_parameters())
    resumed = copy.deepcopy(model)
    opt2 = as_torch_optimizer(funcopt.adamw, groups_of(resumed, False), **kw)
    get_state_dict(resumed, opt2)
    assert [int(s[0].count) for s in opt2.funcopt_state] == [0, 0]  # not stepped
    set_state_dict(resumed, opt2, model_state_dict={}, optim_state_dict=saved)
    run(model, opt, 2, seed=2)
    run(resumed, opt2, 2, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    # writing opt.state[p] replaces the named buffers in the funcopt state
    opt.state[first] = {"step": opt.state[first]["step"], "exp_avg": torch.zeros_like(first)}
    assert funcopt.tree.leaves(opt.funcopt_state[0][0].mu)[0].abs().sum() == 0
    with pytest.raises(funcopt.FuncoptError, match=r"'momentum_buffer'.*has \['exp_avg'"):
        opt.state[first] = {"momentum_buffer": torch.zeros_like(first)}


def test_torch_state_dict_of_a_hand_built_transformation_needs_the_torch_optimizer():
    model = make_model()
    opt = as_torch_optimizer(funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2), model.parameters())
    run(model, opt, STEPS, seed=1)
    with pytest.raises(funcopt.FuncoptError, match=r"pass it: opt.torch_state_dict\(torch.optim.AdamW"):
        opt.torch_state_dict()
    back_model = copy.deepcopy(model)
    back = torch.optim.Adam(back_model.parameters(), lr=0.5)
    back.load_state_dict(opt.torch_state_dict(back))
    assert back.param_groups[0]["lr"] == 1e-2  # the adapter's value, not the one torch was built with
    run(back_model, back, STEPS, seed=2)
    run(model, opt, STEPS, seed=2)
    for a, b in zip(model.parameters(), back_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    lion = as_torch_optimizer(funcopt.lion, model.parameters(), lr=1e-3)
    with pytest.raises(funcopt.FuncoptError, match="no counterpart of funcopt.lion"):
        lion.torch_state_dict()
