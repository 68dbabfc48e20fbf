"""as_torch_optimizer: parity with the functional API and torch.optim, schedulers, state_dict, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import funcopt
from funcopt.fast import fast_path_enabled
from funcopt.interop._optimizer import FuncoptOptimizer, as_torch_optimizer, state_from_plain, state_to_plain
from helpers import assert_trees_close, assert_trees_equal, mlp_problem, nested_params

STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one intra-op thread avoids OpenMP synchronisation, which dominates (and
    slows these tests many times over) when the CPU is shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def functional_run(tx, params, loss_fn, steps=STEPS, lbfgs_style=False):
    state = tx.init(params)
    for _ in range(steps):
        grads, value = torch.func.grad_and_value(loss_fn)(params)
        extra = dict(value=value, grad=grads, value_fn=loss_fn) if lbfgs_style else {}
        updates, state = tx.update(grads, state, params, **extra)
        params = funcopt.apply_updates(params, updates)
    return params, state


def torch_run(opt, module, X, Y, steps=STEPS, scheduler=None, closure=False):
    lrs = []
    for _ in range(steps):
        def loss_closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(X), Y)
            loss.backward()
            return loss

        if closure:
            opt.step(loss_closure)
        else:
            loss_closure()
            opt.step()
        if scheduler is not None:
            scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def params_of(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize(
    "make_funcopt, make_torch",
    [
        (lambda: funcopt.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
        (lambda: funcopt.adamw(1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
        (
            lambda: funcopt.sgd(0.1, momentum=0.9, nesterov=True),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        ),
    ],
    ids=["adam", "adamw", "sgd-nesterov"],
)
@pytest.mark.parametrize("fast", [True, False], ids=["fused", "reference"])
def test_parity_with_functional_and_torch_optim(make_funcopt, make_torch, fast):
    module, params, loss_fn, (X, Y) = mlp_problem()
    with fast_path_enabled(False):
        expected, expected_state = functional_run(make_funcopt(), params, loss_fn)
    ours, theirs = copy.deepcopy(module), copy.deepcopy(module)
    opt = as_torch_optimizer(make_funcopt(), ours)
    assert isinstance(opt, torch.optim.Optimizer)
    with fast_path_enabled(fast):
        torch_run(opt, ours, X, Y)
    torch_run(make_torch(theirs.parameters()), theirs, X, Y)
    assert_trees_close(params_of(ours), expected, rtol=1e-12, atol=1e-14)
    assert_trees_close(params_of(ours), params_of(theirs), rtol=1e-10, atol=1e-12)
    assert_trees_close(opt.funcopt_state, expected_state, rtol=1e-12, atol=1e-14)


def test_fused_fast_path_updates_params_and_state_in_place():
    module, _, _, (X, Y) = mlp_problem()
    opt = as_torch_optimizer(funcopt.adam(1e-2), module)
    mu_ptrs = [x.data_ptr() for x in funcopt.tree.leaves(opt.funcopt_state[0].mu)]
    param_ptrs = [p.data_ptr() for p in module.parameters()]
    torch_run(opt, module, X, Y, steps=2)
    assert [x.data_ptr() for x in funcopt.tree.leaves(opt.funcopt_state[0].mu)] == mu_ptrs
    assert [p.data_ptr() for p in module.parameters()] == param_ptrs
    assert opt.funcopt_state[0].count.item() == 2


def test_mask_replaces_torch_param_groups():
    """Weight decay on weights only: a funcopt mask vs torch.optim.AdamW with two param groups."""
    module, _, _, (X, Y) = mlp_problem()
    ours, theirs = copy.deepcopy(module), copy.deepcopy(module)
    decay = lambda params: {k: k.endswith("weight") for k in params}
    opt = as_torch_optimizer(funcopt.adamw(1e-2, weight_decay=0.5, mask=decay), ours)
    named = dict(theirs.named_parameters())
    groups = [
        {"params": [v for k, v in named.items() if k.endswith("weight")], "weight_decay": 0.5},
        {"params": [v for k, v in named.items() if not k.endswith("weight")], "weight_decay": 0.0},
    ]
    torch_run(opt, ours, X, Y)
    torch_run(torch.optim.AdamW(groups, lr=1e-2), theirs, X, Y)
    assert_trees_close(params_of(ours), params_of(theirs), rtol=1e-10, atol=1e-12)


def test_chain_with_schedule_matches_functional():
    module, params, loss_fn, (X, Y) = mlp_problem()

    def make():
        schedule = lambda count: 0.05 * 0.8**count
        return funcopt.chain(
            funcopt.clip_by_global_norm(0.5), funcopt.scale_by_adam(), funcopt.scale_by_learning_rate(schedule)
        )

    expected, _ = functional_run(make(), params, loss_fn)
    opt = as_torch_optimizer(make(), module)
    torch_run(opt, module, X, Y)
    assert_trees_close(params_of(module), expected, rtol=1e-12, atol=1e-14)
    assert opt.param_groups[0]["lr"] is None  # the schedule is inside the closures


def test_steplr_drives_injected_learning_rate_like_torch_sgd():
    module, _, _, (X, Y) = mlp_problem()
    ours, theirs = copy.deepcopy(module), copy.deepcopy(module)
    tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.2, momentum=0.9)
    opt = as_torch_optimizer(tx, ours)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    lrs = torch_run(opt, ours, X, Y, scheduler=sched)
    ref_lrs = torch_run(ref, theirs, X, Y, scheduler=ref_sched)
    assert lrs == ref_lrs == [0.2, 0.1, 0.1, 0.05, 0.05, 0.025]
    # The value used by the last step (0.05) is in the state; the scheduler's next one in the group.
    assert funcopt.get_hyperparams(opt.funcopt_state)["learning_rate"].item() == 0.05
    assert_trees_close(params_of(ours), params_of(theirs), rtol=1e-10, atol=1e-12)
    # Equal to the functional loop that sets the same learning rates between steps.
    _, params, loss_fn, _ = mlp_problem()
    state = tx.init(params)
    for lr in [0.2, 0.2, 0.1, 0.1, 0.05, 0.05]:
        state = funcopt.set_hyperparams(state, learning_rate=torch.tensor(lr, dtype=torch.float64))
        grads = torch.func.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
    assert_trees_close(params_of(ours), params, rtol=1e-12, atol=1e-14)


def test_factory_with_torch_style_arguments_is_injected():
    module, _, _, (X, Y) = mlp_problem()
    ours, theirs = copy.deepcopy(module), copy.deepcopy(module)
    opt = as_torch_optimizer(funcopt.adamw, ours, learning_rate=1e-2, weight_decay=0.1)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["weight_decay"] == 0.1
    torch_run(opt, ours, X, Y)
    torch_run(torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1), theirs, X, Y)
    assert_trees_close(params_of(ours), params_of(theirs), rtol=1e-10, atol=1e-12)
    with pytest.raises(funcopt.FuncoptError, match="pass the factory itself"):
        as_torch_optimizer(funcopt.adam(1e-3), module, learning_rate=1e-3)


def test_onecyclelr_cycles_lr_and_betas_like_torch_adam():
    module, _, _, (X, Y) = mlp_problem()
    ours, theirs = copy.deepcopy(module), copy.deepcopy(module)
    opt = as_torch_optimizer(funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2), ours)
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    kw = dict(max_lr=0.05, total_steps=STEPS + 1)
    lrs = torch_run(opt, ours, X, Y, scheduler=torch.optim.lr_scheduler.OneCycleLR(opt, **kw))
    ref_lrs = torch_run(ref, theirs, X, Y, scheduler=torch.optim.lr_scheduler.OneCycleLR(ref, **kw))
    torch.testing.assert_close(lrs, ref_lrs, rtol=1e-15, atol=0)
    b1 = funcopt.get_hyperparams(opt.funcopt_state)["b1"].item()
    assert b1 != 0.9 and opt.param_groups[0]["betas"][0] == ref.param_groups[0]["betas"][0]
    assert_trees_close(params_of(ours), params_of(theirs), rtol=1e-9, atol=1e-12)


def test_lbfgs_with_closure_matches_functional():
    lbfgs = funcopt.lbfgs
    module, params, loss_fn, (X, Y) = mlp_problem()
    expected, _ = functional_run(lbfgs(), params, loss_fn, lbfgs_style=True)
    opt = as_torch_optimizer(lbfgs(), module)
    torch_run(opt, module, X, Y, closure=True)
    assert_trees_close(params_of(module), expected, rtol=1e-10, atol=1e-12)
    loss = torch.nn.functional.cross_entropy(module(X), Y)
    assert loss.item() < 0.95  # it did optimize (starts at 1.86)


def test_line_search_without_closure_says_to_pass_one():
    lbfgs = funcopt.lbfgs
    module, _, _, (X, Y) = mlp_problem()
    opt = as_torch_optimizer(lbfgs(), module)
    torch.nn.functional.cross_entropy(module(X), Y).backward()
    with pytest.raises(funcopt.FuncoptError, match=r"opt.step\(closure\), as for torch.optim.LBFGS"):
        opt.step()


def test_step_returns_closure_loss_and_runs_closure_under_grad():
    module, _, _, (X, Y) = mlp_problem()
    opt = as_torch_optimizer(funcopt.sgd(0.1), module)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(X), Y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.item() == pytest.approx(1.8563544744685547, rel=1e-12)
    assert opt.step() is None


def test_state_dict_roundtrip_weights_only_and_resume():
    module, _, _, (X, Y) = mlp_problem()
    full = copy.deepcopy(module)
    opt_full = as_torch_optimizer(funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2), full)
    torch_run(opt_full, full, X, Y, steps=6)

    first = copy.deepcopy(module)
    opt = as_torch_optimizer(funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2), first)
    torch_run(opt, first, X, Y, steps=3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    resumed = copy.deepcopy(module)
    resumed.load_state_dict(loaded["model"])
    opt2 = as_torch_optimizer(funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2), resumed)
    opt2.load_state_dict(loaded["opt"])
    assert_trees_equal(opt2.funcopt_state, opt.funcopt_state)
    assert_trees_equal(copy.deepcopy(opt2).funcopt_state, opt.funcopt_state)  # deepcopy keeps the state
    assert "ScaleByAdamState" in {type(s).__name__ for s in opt2.funcopt_state.inner_state}
    torch_run(opt2, resumed, X, Y, steps=3)
    assert_trees_equal(params_of(resumed), params_of(full))


def test_resume_keeps_the_lr_a_scheduler_set_after_the_last_step():
    """Saved between scheduler.step() and the next opt.step(): the pending lr must survive."""
    module, _, _, (X, Y) = mlp_problem()

    def make(m):
        opt = as_torch_optimizer(funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.2, momentum=0.9), m)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    full = copy.deepcopy(module)
    opt, sched = make(full)
    full_lrs = torch_run(opt, full, X, Y, steps=6, scheduler=sched)

    part = copy.deepcopy(module)
    opt, sched = make(part)
    torch_run(opt, part, X, Y, steps=2, scheduler=sched)
    assert opt.param_groups[0]["lr"] == 0.1  # pending; the state still holds 0.2
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2, sched2 = make(part)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    lrs = torch_run(opt2, part, X, Y, steps=4, scheduler=sched2)
    assert lrs == full_lrs[2:]
    assert_trees_equal(params_of(part), params_of(full))


def test_state_dict_written_by_funcopt_0_2_0_still_loads():
    """0.2.0 kept the whole state under 'funcopt_state' (plain containers) with 'state' empty."""
    module, _, _, (X, Y) = mlp_problem()
    full, part = copy.deepcopy(module), copy.deepcopy(module)
    torch_run(as_torch_optimizer(funcopt.adam, full, lr=1e-2), full, X, Y, steps=4)
    opt = as_torch_optimizer(funcopt.adam, part, lr=1e-2)
    torch_run(opt, part, X, Y, steps=2)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    old = {"format": "funcopt.FuncoptOptimizer/1", "state": {}, "param_groups": [{**group, "params": [0, 1, 2, 3]}],
           "param_paths": ["['0.bias']", "['0.weight']", "['2.bias']", "['2.weight']"],
           "funcopt_state": state_to_plain(opt.funcopt_state)}
    opt2 = as_torch_optimizer(funcopt.adam, part, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(old))
    torch_run(opt2, part, X, Y, steps=2)
    assert_trees_equal(params_of(part), params_of(full))


def test_state_dict_hooks_run():
    module, _, _, _ = mlp_problem()
    opt = as_torch_optimizer(funcopt.adam(1e-3), module)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert seen == ["pre", "loaded"]


def test_state_dict_holds_only_plain_containers():
    module, _, _, _ = mlp_problem()
    sd = as_torch_optimizer(funcopt.adam(1e-3), module).state_dict()

    def check(node):
        assert type(node) in (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor), type(node)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else []
        for c in children:
            check(c)

    check(sd)


def test_plain_roundtrip_without_template_and_device_mapping_with_one():
    params = nested_params()
    state = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-3).init(params)
    assert_trees_equal(state_from_plain(state_to_plain(state)), state)
    meta_template = funcopt.adam(1e-3).init(funcopt.tree.map(lambda x: x.to("meta"), params))
    moved = state_from_plain(state_to_plain(funcopt.adam(1e-3).init(params)), like=meta_template)
    assert {x.device.type for x in funcopt.tree.leaves(moved)} == {"meta"}


def test_plain_errors_name_the_path():
    state = funcopt.adam(1e-3).init({"w": torch.zeros(3)})
    plain = state_to_plain(state)
    with pytest.raises(funcopt.FuncoptError, match=r"\[0\]\.mu\['w'\].*shape \(3,\).*shape \(4,\)"):
        state_from_plain(plain, like=funcopt.adam(1e-3).init({"w": torch.zeros(4)}))
    with pytest.raises(funcopt.FuncoptError, match=r"\[0\].*ScaleByAdamState.*TraceState"):
        state_from_plain(plain, like=funcopt.sgd(0.1, momentum=0.9).init({"w": torch.zeros(3)}))
    plain["values" if "values" in plain else "items"][0]["type"] = "not_imported_module:Thing"
    with pytest.raises(funcopt.FuncoptError, match="not_imported_module:Thing.*like="):
        state_from_plain(plain)
    with pytest.raises(TypeError, match=r"\['bad'\].*object"):
        state_to_plain({"bad": object()})


def test_state_does_not_alias_params_or_grads():
    """A transformation keeping params/grads by reference must not see them change in place."""

    def init(params):
        return {"prev": params}

    def update(updates, state, params=None, **extra):
        return funcopt.tree.scale(-0.1, updates), {"prev": params, "grad": updates}

    tx = funcopt.GradientTransformation(init, lambda u, s, p=None, **e: update(u, s, p))
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = as_torch_optimizer(tx, {"w": w})
    assert opt.funcopt_state["prev"]["w"].data_ptr() != w.data_ptr()
    w.grad = torch.full((3,), 2.0, dtype=torch.float64)
    opt.step()
    w.grad.zero_()  # zero_grad(set_to_none=False) writes in place
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.8, dtype=torch.float64))
    torch.testing.assert_close(opt.funcopt_state["prev"]["w"], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(opt.funcopt_state["grad"]["w"], torch.full((3,), 2.0, dtype=torch.float64))


def test_params_without_grad_are_skipped_like_torch():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = as_torch_optimizer(funcopt.adamw(0.5, weight_decay=0.1), [a, b])
    a.grad = torch.ones(2)
    opt.step()
    ref_a = torch.nn.Parameter(torch.ones(2))
    ref = torch.optim.AdamW([ref_a, torch.nn.Parameter(torch.ones(2))], lr=0.5, weight_decay=0.1)
    ref_a.grad = torch.ones(2)
    ref.step()
    torch.testing.assert_close(a.detach(), ref_a.detach())
    torch.testing.assert_close(b.detach(), torch.ones(2))  # no step, no decay
    assert funcopt.tree.leaves(opt.funcopt_state[0].mu)[1].abs().sum() == 0


def test_accepts_module_dict_list_and_generator():
    module, _, _, _ = mlp_problem()
    chain = funcopt.chain(funcopt.clip_by_global_norm(1.0), funcopt.adam(1e-3))
    for given in (module, dict(module.named_parameters()), list(module.parameters()), module.parameters()):
        opt = as_torch_optimizer(funcopt.adam(1e-3), given)
        assert len(opt.param_groups[0]["params"]) == 4
    for given in (module.parameters(), [{"params": module.parameters()}]):  # read once, also for a chain
        assert len(as_torch_optimizer(chain, given).param_groups[0]["params"]) == 4
    frozen = torch.nn.Linear(2, 2)
    frozen.bias.requires_grad_(False)
    assert list(as_torch_optimizer(funcopt.sgd(0.1), frozen).params) == ["weight"]


def test_bad_input_errors():
    module, _, _, (X, Y) = mlp_problem()
    with pytest.raises(TypeError, match="GradientTransformation"):
        as_torch_optimizer("adam", module)
    with pytest.raises(TypeError, match="not a torch.optim optimizer"):
        as_torch_optimizer(torch.optim.Adam, module)
    with pytest.raises(funcopt.FuncoptError, match=r"param_groups\[0\] sets \['lr'\].*inject_hyperparams"):
        as_torch_optimizer(funcopt.chain(funcopt.scale(-0.1)), [{"params": list(module.parameters()), "lr": 0.1}])
    with pytest.raises(TypeError, match="single tensor"):
        as_torch_optimizer(funcopt.adam(1e-3), torch.nn.Parameter(torch.ones(2)))
    with pytest.raises(funcopt.FuncoptError, match="empty parameter list"):
        as_torch_optimizer(funcopt.adam(1e-3), [])
    with pytest.raises(funcopt.FuncoptError, match=r"\['x'\] must be a leaf tensor with requires_grad"):
        as_torch_optimizer(funcopt.adam(1e-3), {"x": torch.ones(2)})
    opt = as_torch_optimizer(funcopt.adam(1e-3), module)
    with pytest.raises(funcopt.FuncoptError, match="state_dict of torch.optim's sgd.*funcopt.adam"):
        opt.load_state_dict(torch.optim.SGD(module.parameters()).state_dict())
    other = as_torch_optimizer(funcopt.adam(1e-3), torch.nn.Linear(4, 8, dtype=torch.float64))
    with pytest.raises(funcopt.FuncoptError, match="parameters differ from the saved ones"):
        opt.load_state_dict(other.state_dict())
    sgd_sd = as_torch_optimizer(funcopt.sgd(0.1, momentum=0.9), module).state_dict()
    with pytest.raises(funcopt.FuncoptError, match=r"at \[0\].*TraceState"):
        opt.load_state_dict(sgd_sd)


def test_setting_lr_without_inject_hyperparams_raises_instead_of_being_ignored():
    module, _, _, (X, Y) = mlp_problem()
    opt = as_torch_optimizer(funcopt.chain(funcopt.scale_by_adam(), funcopt.scale(-1e-3)), module)
    assert opt.param_groups[0]["lr"] is None
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(funcopt.FuncoptError, match=r"funcopt.as_torch_optimizer\(funcopt.adamw, model, lr=1e-3"):
        opt.step()


def test_writing_funcopt_state_updates_param_group():
    module, _, _, _ = mlp_problem()
    opt = as_torch_optimizer(funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1), module)
    opt.funcopt_state = funcopt.set_hyperparams(opt.funcopt_state, learning_rate=torch.tensor(0.25, dtype=torch.float64))
    assert opt.param_groups[0]["lr"] == 0.25
    assert isinstance(opt, FuncoptOptimizer)
    with pytest.raises(ValueError, match="different pytree structures"):
        opt.funcopt_state = funcopt.adam(1e-3).init(opt.params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_follows_module_to_cuda_and_loads_onto_cuda():
    module, _, _, (X, Y) = mlp_problem()
    opt = as_torch_optimizer(funcopt.adam(1e-2), module)
    torch_run(opt, module, X, Y, steps=2)
    sd = opt.state_dict()
    module.cuda()
    torch_run(opt, module, X.cuda(), Y.cuda(), steps=1)
    assert {x.device.type for x in funcopt.tree.leaves(opt.funcopt_state)} == {"cuda"}
    opt.load_state_dict(sd)
    assert {x.device.type for x in funcopt.tree.leaves(opt.funcopt_state)} == {"cuda"}
