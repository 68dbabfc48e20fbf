"""torch.optim <-> funcopt state conversion: trajectories continue exactly across the switch."""

from __future__ import annotations

import copy

import pytest
import torch

import funcopt
from funcopt import interop
from funcopt.base import FuncoptError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny: one intra-op thread avoids OpenMP synchronisation overhead,
    which dominates (100x) when the CPU is shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


N_STEPS, M_STEPS = 4, 3

CASES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd_dampening_max": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3, maximize=True),
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    "rmsprop_centered_momentum": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-3),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.01, weight_decay=1e-3, initial_accumulator_value=0.1),
    "adagrad_no_decay": lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
}


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    X = torch.randn(24, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (24,), generator=g)
    return model, X, Y


def _torch_steps(model, opt, X, Y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()


def _grads(model, params, X, Y):
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, leaves, (X,)), Y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


def _funcopt_steps(tx, state, params, model, X, Y, steps):
    for _ in range(steps):
        updates, state = tx.update(_grads(model, params, X, Y), state, params)
        params = funcopt.apply_updates(params, updates)
    return params, state


# Float64 everywhere, so the trajectories agree to ~1e-15 except where torch rounds a scalar to
# float32: it keeps NAdam's mu_product as a float32 tensor (the default dtype).
_TOLERANCE = {"nadam": (1e-7, 1e-9)}


def _assert_params_close(params, model, name):
    rtol, atol = _TOLERANCE.get(name, (1e-10, 1e-12))
    for k, p in model.named_parameters():
        torch.testing.assert_close(params[k], p.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{name} {k}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_torch_training_continues_with_funcopt_on_the_same_trajectory(name):
    model, X, Y = _model()
    opt = CASES[name](model.parameters())
    _torch_steps(model, opt, X, Y, N_STEPS)
    params, _ = funcopt.nn.extract(model)
    tx, state = interop.from_torch(opt, params)
    # the conversion reads a state_dict as well, and never aliases torch's live tensors
    _, state2 = interop.from_torch(opt.state_dict(), params, kind=type(opt).__name__)
    funcopt.tree.map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), state, state2)
    _torch_steps(model, opt, X, Y, M_STEPS)
    params, state = _funcopt_steps(tx, state, params, model, X, Y, M_STEPS)
    _assert_params_close(params, model, name)


@pytest.mark.parametrize("name", list(CASES))
def test_funcopt_training_continues_with_torch_on_the_same_trajectory(name):
    model, X, Y = _model()
    params, _ = funcopt.nn.extract(model)
    tx, state = interop.from_torch(CASES[name](model.parameters()), params)  # an unstarted optimizer
    params, state = _funcopt_steps(tx, state, params, model, X, Y, N_STEPS)
    funcopt.nn.load(model, params)
    opt = CASES[name](model.parameters())
    opt.load_state_dict(interop.to_torch(state, params, opt))
    _torch_steps(model, opt, X, Y, M_STEPS)
    params, state = _funcopt_steps(tx, state, params, model, X, Y, M_STEPS)
    _assert_params_close(params, model, name)


def test_unstarted_round_trip_and_state_values():
    model, X, Y = _model()
    params, _ = funcopt.nn.extract(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    tx, state = interop.from_torch(opt, params)
    assert int(state[0].count) == 0 and state[0].nu_max is not None
    assert interop.to_torch(state, params, opt)["state"] == {}
    _torch_steps(model, opt, X, Y, 3)
    _, state = interop.from_torch(opt, params)
    assert int(state[0].count) == 3 and state[0].count.dtype == torch.int64
    torch.testing.assert_close(state[0].mu["0.weight"], opt.state[model[0].weight]["exp_avg"], rtol=0, atol=0)
    assert state[0].mu["0.weight"].data_ptr() != opt.state[model[0].weight]["exp_avg"].data_ptr()
    back = interop.to_torch(state, params, opt)["state"]
    assert set(back[0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"} and float(back[0]["step"]) == 3.0


def test_order_and_nested_params():
    model, X, Y = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _torch_steps(model, opt, X, Y, 2)
    flat, _ = funcopt.nn.extract(model)
    # a list in torch order, and a dict in another insertion order with an explicit order=
    as_list = list(flat.values())
    _, state = interop.from_torch(opt, as_list)
    torch.testing.assert_close(state[0].momentum_buffer[2], opt.state[model[2].weight]["momentum_buffer"])
    shuffled = {k: flat[k] for k in reversed(list(flat))}
    _, state = interop.from_torch(opt, shuffled, order=list(flat))
    torch.testing.assert_close(state[0].momentum_buffer["2.bias"], opt.state[model[2].bias]["momentum_buffer"])
    assert interop.param_paths(shuffled, order=list(flat))[0] == "['0.weight']"
    with pytest.raises(FuncoptError, match=r"order must list every params leaf exactly once; missing: \['2.bias'\]; unknown or repeated: -"):
        interop.param_paths(flat, order=["0.weight", "0.bias", "2.weight"])


def test_inject_hyperparams_and_schedule_tx_are_filled():
    model, X, Y = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _torch_steps(model, opt, X, Y, 4)
    params, _ = funcopt.nn.extract(model)
    tx = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2)
    tx, state = interop.from_torch(opt, params, tx=tx)
    adam_state = next(s for s in state.inner_state if isinstance(s, funcopt.ScaleByAdamState))
    assert int(state.count) == 4 and int(adam_state.count) == 4
    _torch_steps(model, opt, X, Y, 3)
    params, state = _funcopt_steps(tx, state, params, model, X, Y, 3)
    _assert_params_close(params, model, "inject")
    again = torch.optim.Adam(model.parameters(), lr=1e-2)
    sd = interop.to_torch(state, params, again)
    assert float(sd["state"][0]["step"]) == 7


def test_converted_state_checkpoints_and_resumes(tmp_path):
    model, X, Y = _model()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-2, momentum=0.9)
    _torch_steps(model, opt, X, Y, 3)
    params, _ = funcopt.nn.extract(model)
    tx, state = interop.from_torch(opt, params)
    funcopt.checkpoint.save(tmp_path / "c.safetensors", {"params": params, "opt_state": state})
    out = funcopt.checkpoint.load(tmp_path / "c.safetensors", like={"params": params, "opt_state": tx.init(params)})
    _torch_steps(model, opt, X, Y, 2)
    p, _ = _funcopt_steps(tx, out["opt_state"], out["params"], model, X, Y, 2)
    _assert_params_close(p, model, "rmsprop via checkpoint")


def test_errors_say_what_and_how():
    model, X, Y = _model()
    params, _ = funcopt.nn.extract(model)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(FuncoptError, match="has 4 parameters but params has 3 tensor leaves"):
        interop.from_torch(opt, dict(list(params.items())[:3]))
    class CustomOptimizer(torch.optim.SGD):  # a torch.optim class funcopt cannot know
        pass

    with pytest.raises(FuncoptError, match="not supported by funcopt.interop"):
        interop.from_torch(CustomOptimizer(model.parameters(), lr=0.1), params)
    with pytest.raises(FuncoptError, match="expected a torch.optim.Optimizer or its state_dict"):
        interop.from_torch({"state": {}}, params)
    with pytest.raises(FuncoptError, match="cannot tell which torch.optim optimizer"):
        interop.from_torch({"state": {}, "param_groups": [{"lr": 1.0, "params": [0, 1, 2, 3]}]}, params)
    groups = torch.optim.SGD([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.5}], lr=0.1)
    with pytest.raises(FuncoptError, match=r"param group 1 differs from group 0 in \['lr'\]"):
        interop.from_torch(groups, params)
    same = torch.optim.SGD([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}], lr=0.1)
    tx, _ = interop.from_torch(same, params)  # identical groups merge
    _torch_steps(model, opt, X, Y, 1)
    bad = {k: (v.t() if v.dim() == 2 else v) for k, v in params.items()}
    with pytest.raises(FuncoptError, match=r"'exp_avg' for \['0.weight'\] has shape \(6, 4\), the param \(4, 6\)"):
        interop.from_torch(opt, bad)
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the live per-param dicts
    sd["state"][1]["step"] = torch.tensor(9.0)
    with pytest.raises(FuncoptError, match="different step counts"):
        interop.from_torch(sd, params)
    del sd["state"][1]
    with pytest.raises(FuncoptError, match="torch has state for 3 of 4 parameters"):
        interop.from_torch(sd, params)
    with pytest.raises(FuncoptError, match="no torch.optim counterpart"):
        interop.from_torch(opt, params, tx=funcopt.lion())
    amsgrad = torch.optim.Adam(model.parameters(), amsgrad=True)
    _, plain = interop.from_torch(opt, params)
    with pytest.raises(FuncoptError, match="amsgrad=True but the funcopt state has no nu_max"):
        interop.to_torch(plain, params, amsgrad)


# ---------------------------------------------------------------------------------------------
# L-BFGS: torch's history lists <-> funcopt's ring buffers (trajectories coincide for
# LBFGS(max_iter=1, line_search_fn=None) and funcopt.lbfgs(linesearch=None)).


def _lbfgs_torch_steps(model, opt, X, Y, steps):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


def _lbfgs_torch(model, memory=3):
    return torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=1, history_size=memory, line_search_fn=None)


@pytest.mark.parametrize("steps_before", [1, 6])
def test_lbfgs_torch_to_funcopt_and_back_follow_the_same_trajectory(steps_before):
    # 6 steps with a history of 3 pairs wraps funcopt's ring buffer
    model, X, Y = _model()
    opt = _lbfgs_torch(model)
    _lbfgs_torch_steps(model, opt, X, Y, steps_before)
    params, _ = funcopt.nn.extract(model)
    tx, state = interop.from_torch(opt, params)
    assert int(state[0].count) == steps_before and int(state[0].num_pairs) == min(steps_before - 1, 3)
    _lbfgs_torch_steps(model, opt, X, Y, 3)
    params, state = _funcopt_steps(tx, state, params, model, X, Y, 3)
    _assert_params_close(params, model, "lbfgs torch->funcopt")
    # and back: funcopt's state continues in a new torch LBFGS
    opt2 = _lbfgs_torch(model)
    opt2.load_state_dict(interop.to_torch(state, params, opt2))
    _lbfgs_torch_steps(model, opt2, X, Y, 3)
    params, state = _funcopt_steps(tx, state, params, model, X, Y, 3)
    _assert_params_close(params, model, "lbfgs funcopt->torch")


def test_lbfgs_history_of_a_default_torch_run_carries_over():
    model, X, Y = _model()
    opt = torch.optim.LBFGS(model.parameters(), history_size=4, line_search_fn="strong_wolfe")
    _lbfgs_torch_steps(model, opt, X, Y, 1)  # 20 inner iterations
    params, _ = funcopt.nn.extract(model)
    tx, state = interop.from_torch(opt, params)
    lb = state[0]
    torch_state = opt.state[next(iter(model.parameters()))]
    assert int(lb.count) == torch_state["n_iter"] and int(lb.num_pairs) == len(torch_state["old_stps"]) == 4
    # funcopt ravels dict leaves in sorted key order; torch flattens in parameter order
    newest_s = torch_state["old_stps"][-1]
    sizes = [p.numel() for p in model.parameters()]
    parts = dict(zip([k for k, _ in model.named_parameters()], torch.split(newest_s, sizes)))
    expected = torch.cat([parts[k] for k in sorted(parts)])
    newest = (int(lb.head) - 1) % 4
    torch.testing.assert_close(lb.diff_params_memory[newest], expected, rtol=0, atol=0)
    back = interop.to_torch(state, params, opt)["state"][0]
    for a, b in zip(back["old_dirs"], torch_state["old_dirs"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(back["prev_flat_grad"], torch_state["prev_flat_grad"], rtol=0, atol=0)
    assert interop.to_torch(tx.init(params), params, opt)["state"] == {}
