"""as_torch_optimizer as a drop-in for torch.optim in existing scripts: param groups, torch's
argument names, every LR scheduler, torch's skipping of None gradients, switches, and loading a
torch.optim state_dict to continue a run. Oracle: torch.optim on the same float64 run."""

from __future__ import annotations

import copy
import functools
import inspect
import math

import pytest
import torch

import funcopt
from funcopt import as_torch_optimizer

torch_nn = torch.nn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one intra-op thread avoids OpenMP synchronisation, which dominates (and
    slows these tests many times over) when the CPU is shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
DT = torch.float64


class TinyLM(torch_nn.Module):
    """A transformer-shaped model: embedding, layer norm, residual projection, MLP, head."""

    def __init__(self, vocab=11, d=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch_nn.Embedding(vocab, d)
        self.ln = torch_nn.LayerNorm(d)
        self.proj = torch_nn.Linear(d, d)
        self.mlp = torch_nn.Sequential(torch_nn.Linear(d, 16), torch_nn.GELU(), torch_nn.Linear(16, d))
        self.head = torch_nn.Linear(d, vocab)
        self.to(DT)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.proj(self.ln(x))
        x = x + self.mlp(x)
        return self.head(x)


def batches(steps, vocab=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 6), generator=g) for _ in range(steps)]


def decay_groups(model, wd=0.1):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "emb" in n]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup, total):
    return lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))


def train_script(model, make_opt, make_sched, steps=8, clip=1.0):
    """The training loop of a typical script; only ``make_opt`` changes in a migration."""
    opt = make_opt(decay_groups(model))
    sched = make_sched(opt)
    lrs = []
    for idx in batches(steps):
        logits = model(idx[:, :-1])
        loss = torch_nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch_nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return opt, lrs


def assert_same_params(a, b, tol=1e-10):
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m, n=n: f"{n}: {m}")


SCHEDS = {
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=8),
    "warmup-cosine": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(3, 8)),
}


@pytest.mark.parametrize("sched", sorted(SCHEDS))
def test_transformer_script_migrates_with_one_changed_line(sched):
    built = []

    @functools.wraps(funcopt.adamw)
    def adamw(*args, **kwargs):  # funcopt.adamw, counting the transformations built
        built.append(funcopt.adamw(*args, **kwargs))
        return built[-1]

    ours, theirs = TinyLM(), TinyLM()
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt, lrs = train_script(ours, lambda g: as_torch_optimizer(adamw, g, **kw), SCHEDS[sched])
    ref, ref_lrs = train_script(theirs, lambda g: torch.optim.AdamW(g, **kw), SCHEDS[sched])
    assert lrs == ref_lrs
    assert_same_params(ours, theirs)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    if sched == "onecycle":  # momentum cycling moved betas[0] in both
        assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"] != (0.9, 0.95)
    # The scheduler changed lr (and betas) at each of the 8 steps; no transformation was rebuilt
    # for that (the groups' values are written into it), and it keeps its in-place fast route.
    assert len(built) <= 5
    grads = [p.grad for p in opt.param_groups[1]["params"]]  # the group's params tree is a list
    route = funcopt.fast.explain(built[-1], grads, opt.funcopt_state[1], opt.params[1], step="apply_gradients",
                                 donate=True)
    assert route.route.startswith("fast, in place"), str(route)


def two_group_run(make_opt, make_sched, steps=6, plateau=False):
    model = TinyLM(seed=3)
    named = dict(model.named_parameters())
    groups = [
        {"params": [named["head.weight"], named["head.bias"]], "lr": 0.05},
        {"params": [p for n, p in named.items() if not n.startswith("head")]},
    ]
    opt = make_opt(groups)
    sched = make_sched(opt)
    lrs = []
    for idx in batches(steps, seed=5):
        opt.zero_grad()
        loss = torch_nn.functional.cross_entropy(model(idx).reshape(-1, 11), idx.reshape(-1))
        loss.backward()
        opt.step()
        sched.step(loss.item()) if plateau else sched.step()
        lrs.append([g["lr"] for g in opt.param_groups] + [g.get("momentum") for g in opt.param_groups])
    return model, lrs


S = torch.optim.lr_scheduler
SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[1, 4], gamma=0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=5),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.25, total_iters=4),
    "LambdaLR-per-group": lambda o: S.LambdaLR(o, [lambda s: 0.9**s, lambda s: 1.0 / (1 + s)]),
    "OneCycleLR-momentum": lambda o: S.OneCycleLR(o, max_lr=[0.1, 0.02], total_steps=7),
    "CyclicLR-momentum": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "SequentialLR": lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.5, total_iters=2), S.ExponentialLR(o, 0.7)], [2]),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10.0),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_drives_each_group_like_torch_sgd(name):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    plateau = name == "ReduceLROnPlateau"
    ours, lrs = two_group_run(lambda g: as_torch_optimizer(funcopt.sgd, g, **kw), SCHEDULERS[name], plateau=plateau)
    theirs, ref = two_group_run(lambda g: torch.optim.SGD(g, **kw), SCHEDULERS[name], plateau=plateau)
    assert lrs == ref
    assert len({tuple(x[:2]) for x in lrs}) > 1  # the schedule did move the learning rates
    assert_same_params(ours, theirs)


def test_scheduler_on_a_transformation_built_without_inject_hyperparams():
    """funcopt.adam(1e-2) is rebuilt from its factory, so a scheduler drives it."""
    ours, lrs = two_group_run(lambda g: as_torch_optimizer(funcopt.adam(1e-2), g), SCHEDULERS["StepLR"])
    theirs, ref = two_group_run(lambda g: torch.optim.Adam(g, lr=1e-2), SCHEDULERS["StepLR"])
    assert [x[:2] for x in lrs] == [x[:2] for x in ref]
    assert_same_params(ours, theirs)


def skip_run(make_opt, set_to_none=True, steps=5):
    """``a`` always gets a gradient, ``b`` never, ``c`` from step 3 on (its own group)."""
    torch.manual_seed(0)
    a, b, c = (torch_nn.Parameter(torch.randn(3, dtype=DT)) for _ in range(3))
    opt = make_opt([{"params": [a, b]}, {"params": [c], "lr": 0.05}])
    for step in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        loss = (a**2).sum() + (0.5 * (c**3).sum() if step >= 2 else 0.0)
        loss.backward()
        opt.step()
    return a, b, c, opt


def test_none_gradients_are_skipped_like_torch():
    kw = dict(lr=0.1, weight_decay=0.5)
    ours = skip_run(lambda g: as_torch_optimizer(funcopt.adamw, g, **kw))
    theirs = skip_run(lambda g: torch.optim.AdamW(g, **kw))
    for x, y in zip(ours[:3], theirs[:3]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    torch.manual_seed(0)
    torch.randn(3, dtype=DT)
    torch.testing.assert_close(ours[1].detach(), torch.randn(3, dtype=DT))  # b: no decay, unchanged
    assert ours[3].funcopt_state[0][0].count.item() == 5 and ours[3].funcopt_state[1][0].count.item() == 3


def test_zero_gradients_step_every_parameter_as_torch_does():
    """Zero gradients instead of None: moments decay and weight decay applies, in both."""

    def make_zero_run(make_opt):
        def wrapped(groups):
            opt = make_opt(groups)
            for g in groups:
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            return opt

        return skip_run(wrapped, set_to_none=False)

    kw = dict(lr=0.1, weight_decay=0.5)
    ours = make_zero_run(lambda g: as_torch_optimizer(funcopt.adamw, g, **kw))
    theirs = make_zero_run(lambda g: torch.optim.AdamW(g, **kw))
    for x, y in zip(ours[:3], theirs[:3]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert ours[3].funcopt_state[1][0].count.item() == 5


def test_add_param_group_later_like_torch():
    def run(make_opt):
        model = TinyLM(seed=4)
        body = [p for n, p in model.named_parameters() if not n.startswith("head")]
        opt = make_opt([{"params": body}])
        for step, idx in enumerate(batches(5, seed=2)):
            if step == 2:
                opt.add_param_group({"params": list(model.head.parameters()), "lr": 0.02, "betas": (0.8, 0.9)})
            opt.zero_grad()
            torch_nn.functional.cross_entropy(model(idx).reshape(-1, 11), idx.reshape(-1)).backward()
            opt.step()
        return model, opt

    ours, opt = run(lambda g: as_torch_optimizer(funcopt.adam, g, lr=1e-2))
    theirs, ref = run(lambda g: torch.optim.Adam(g, lr=1e-2))
    assert_same_params(ours, theirs)
    assert opt.param_groups[1]["betas"] == ref.param_groups[1]["betas"] == (0.8, 0.9)


def test_torch_names_switches_and_funcopt_names_are_accepted():
    model = TinyLM()
    opt = as_torch_optimizer(funcopt.adam, model.parameters(), lr=1e-3, betas=(0.8, 0.9), foreach=False,
                             fused=None, capturable=False, differentiable=False)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["foreach"], group["capturable"]) == (1e-3, (0.8, 0.9), False, False)
    opt2 = as_torch_optimizer(funcopt.adam, model.parameters(), learning_rate=1e-3, b1=0.8, b2=0.9)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(funcopt.FuncoptError, match="differentiable=True.*functional API"):
        as_torch_optimizer(funcopt.adam, model.parameters(), differentiable=True)
    with pytest.raises(funcopt.FuncoptError, match=r"momentum_x.*arguments are \(learning_rate"):
        as_torch_optimizer(funcopt.sgd, model.parameters(), lr=0.1, momentum_x=0.9)


def test_foreach_false_runs_the_reference_chain_with_the_same_numbers():
    """The default (fast, in place) route against torch is checked by the migrated script above."""
    ours, theirs = TinyLM(), TinyLM()
    kw = dict(lr=3e-3, betas=(0.9, 0.95))
    opt, _ = train_script(ours, lambda g: as_torch_optimizer(funcopt.adamw, g, foreach=False, **kw),
                          SCHEDS["onecycle"], steps=4)
    train_script(theirs, lambda g: torch.optim.AdamW(g, fused=True, **kw), SCHEDS["onecycle"], steps=4)
    assert_same_params(ours, theirs)
    assert opt.param_groups[0]["foreach"] is False


def test_factories_answer_torch_names_with_funcopt_names():
    with pytest.raises(TypeError, match=r"adam\(learning_rate=0.001\)") as e:
        funcopt.adam(lr=1e-3)
    assert isinstance(e.value, funcopt.FuncoptError)
    with pytest.raises(funcopt.FuncoptError, match=r"adamw\(b1=0.9, b2=0.95\)"):
        funcopt.adamw(1e-3, betas=(0.9, 0.95))
    with pytest.raises(TypeError, match="'fused' is a torch.optim implementation switch"):
        funcopt.sgd(0.1, fused=True)
    names = [n for n in funcopt.optimizers.__all__ if callable(getattr(funcopt.optimizers, n))]
    assert len(names) >= 15
    for name in names:
        factory = getattr(funcopt.optimizers, name)
        assert getattr(funcopt, name, factory) is factory
        assert factory.__name__ == name and factory.__doc__
        if "learning_rate" in inspect.signature(factory).parameters:
            with pytest.raises(funcopt.FuncoptError, match=f"{name}\\(learning_rate=0.5\\)"):
                factory(lr=0.5)
    assert funcopt.adam.fast_route.family == "adam"


def test_params_are_matched_by_identity_not_storage(monkeypatch):
    """No data_ptr()/untyped_storage() on params (FSDP2's DTensor has no storage)."""
    model = TinyLM()

    def refuse(*args, **kwargs):
        raise AssertionError("storage pointer read")

    opt = None
    monkeypatch.setattr(torch.Tensor, "data_ptr", refuse)
    monkeypatch.setattr(torch.Tensor, "untyped_storage", refuse)
    opt = as_torch_optimizer(funcopt.adamw, decay_groups(model), lr=1e-3, foreach=False)
    for idx in batches(2):
        opt.zero_grad()
        torch_nn.functional.cross_entropy(model(idx).reshape(-1, 11), idx.reshape(-1)).backward()
        opt.step()
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.funcopt_state[0][0].count.item() == 2


def test_state_dict_round_trip_with_groups_and_a_scheduler():
    def make(model):
        opt = as_torch_optimizer(funcopt.adamw, decay_groups(model), lr=3e-3)
        return opt, SCHEDS["onecycle"](opt)

    def steps(model, opt, sched, data):
        for idx in data:
            opt.zero_grad()
            torch_nn.functional.cross_entropy(model(idx).reshape(-1, 11), idx.reshape(-1)).backward()
            opt.step()
            sched.step()

    data = batches(6, seed=9)
    full = TinyLM()
    steps(full, *make(full), data)
    part = TinyLM()
    opt, sched = make(part)
    steps(part, opt, sched, data[:3])
    saved = copy.deepcopy({"opt": opt.state_dict(), "sched": sched.state_dict()})
    opt2, sched2 = make(part)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    steps(part, opt2, sched2, data[3:])
    assert_same_params(part, full, tol=0)


def test_funcopt_schedule_as_lr_counts_group_steps_and_refuses_a_torch_scheduler():
    w = torch_nn.Parameter(torch.ones(3, dtype=DT))
    opt = as_torch_optimizer(funcopt.sgd, [w], lr=funcopt.schedules.linear(0.1, 0.0, 4))
    assert opt.param_groups[0]["lr"] is None
    for _ in range(3):
        w.grad = torch.ones(3, dtype=DT)
        opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 1 - 0.1 - 0.075 - 0.05, dtype=DT))
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(funcopt.FuncoptError, match="funcopt schedule.*either the schedule or a torch"):
        opt.step()


def test_revived_zero_hyperparameter_that_changes_the_state_is_refused():
    w = torch_nn.Parameter(torch.ones(3, dtype=DT))
    opt = as_torch_optimizer(funcopt.sgd, [w], lr=0.1)  # momentum 0: no momentum buffer
    opt.param_groups[0]["momentum"] = 0.9
    w.grad = torch.ones(3, dtype=DT)
    with pytest.raises(funcopt.FuncoptError, match=r"set \['momentum'\].*built with 0.*cycle_momentum=False"):
        opt.step()
    opt.param_groups[0]["momentum"] = 0.0  # back to the built value: the group steps again
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.9, dtype=DT))
