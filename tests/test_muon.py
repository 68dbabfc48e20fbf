"""funcopt.muon against torch.optim.Muon (torch 2.13), and the Muon + AdamW recipe against
torch.optim.Muon + torch.optim.AdamW stepped side by side.

torch's Newton-Schulz always runs in bfloat16, whatever the parameter dtype; funcopt runs the
same operations in the same order, so for equal inputs its orthogonalized direction is bitwise
torch's, and ``scale_by_muon_learning_rate`` takes the step in torch's arithmetic. Measured
(50 steps, 18 option sets, wide/tall/square matrices, loss-dependent gradients):

- float64: 3e-17 at most (asserted rtol 1e-9, atol 1e-12); float32: 6e-8 at most, half of
  the runs bitwise (asserted rtol 1e-6, atol 1e-7); bfloat16: bitwise. With gradients that do
  not depend on the params the momentum buffers are bitwise in every dtype, and the params
  too except for elements that crossed zero (``p + (new - p)`` rounds once there: no Sterbenz).
- with AdamW next to Muon (the recipe) in float32: AdamW's chain rounds differently from
  torch's ``addcdiv_`` by float32 ulps, and Muon's bfloat16 cast turns an ulp that crosses a
  bfloat16 rounding boundary into a ``2**-8`` relative change of one element of the step, which
  the next iterations spread (1.2e-3 here). Those runs are compared at an ``lr * 2**-8 *
  steps`` tolerance; in float64 the recipe matches at rtol 1e-9 (2e-15 measured).

torch 2.13 normalizes the momentum buffer in place for bfloat16 parameters without Nesterov
(``grad.bfloat16()`` is the buffer itself, then ``div_``; fixed by pytorch/pytorch#194664).
funcopt never writes its inputs; the bfloat16 comparisons use torch with that fix applied.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from unittest import mock

import pytest
import torch
from torch.optim import _muon as torch_muon

import funcopt
from funcopt import tree
from tests.helpers import assert_trees_close, assert_trees_equal, mlp_problem
from tests.muon_reference import MuonAndAdamW

SHAPES = {"wide": (3, 8), "tall": (8, 3), "square": (3, 3)}
STEPS = 50


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@contextlib.contextmanager
def _torch_without_aliasing():
    """torch.optim.Muon with pytorch/pytorch#194664: Newton-Schulz on a copy of its input."""
    original = torch_muon._zeropower_via_newtonschulz
    with mock.patch.object(torch_muon, "_zeropower_via_newtonschulz", lambda g, *a: original(g.clone(), *a)):
        yield


def _problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {k: (torch.randn(*s, generator=g) * 0.5).to(dtype) for k, s in SHAPES.items()}
    X = torch.randn(16, 3, generator=g).to(dtype)
    Y = torch.randn(16, 3, generator=g).to(dtype)

    def loss_fn(p):
        h = torch.tanh(torch.tanh(X @ p["wide"]) @ p["tall"])
        return ((h @ p["square"] - Y) ** 2).mean()

    return params, loss_fn


def _fixed_grads(dtype, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=g).to(dtype) for k, s in SHAPES.items()} for _ in range(steps)]


def _torch_kwargs(kw):
    names = {"learning_rate": "lr"}
    return {names.get(k, k): v for k, v in kw.items()}


def _run_both(kw, dtype, *, fixed=False, steps=STEPS, seed=0):
    """``steps`` of funcopt.muon(**kw) and torch.optim.Muon on the same problem; returns
    (funcopt params, funcopt state, torch params dict, torch optimizer)."""
    params, loss_fn = _problem(dtype, seed)
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Muon(list(torch_params.values()), **_torch_kwargs(kw))
    tx = funcopt.muon(**kw)
    state = tx.init(params)
    grads_seq = _fixed_grads(dtype, steps) if fixed else None
    with _torch_without_aliasing():
        for i in range(steps):
            grads = grads_seq[i] if fixed else torch.func.grad(loss_fn)(params)
            updates, state = tx.update(grads, state, params)
            params = funcopt.apply_updates(params, updates)
            opt.zero_grad()
            if fixed:
                for k, p in torch_params.items():
                    p.grad = grads_seq[i][k].clone()
            else:
                loss_fn(torch_params).backward()
            opt.step()
    return params, state, {k: p.detach() for k, p in torch_params.items()}, opt


def _torch_buffers(opt):
    return {k: opt.state[p]["momentum_buffer"] for k, p in zip(SHAPES, opt.param_groups[0]["params"])}


OPTIONS = [
    dict(nesterov=n, weight_decay=wd, adjust_lr_fn=fn)
    for n, wd, fn in itertools.product((True, False), (0.0, 0.1), (None, "original", "match_rms_adamw"))
] + [
    dict(ns_steps=1),
    dict(ns_steps=3, eps=1e-3),
    dict(ns_steps=8, momentum=0.5),
    dict(eps=1.0),  # larger than the direction's norm: the clamp is active
    dict(ns_coefficients=(2.0, -1.5, 0.5), momentum=0.0, nesterov=False),
    dict(momentum=0.9, nesterov=True, weight_decay=0.02, adjust_lr_fn="match_rms_adamw", ns_steps=4),
]
IDS = ["-".join(f"{k}={v}" for k, v in o.items()) for o in OPTIONS]


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_float64_matches_torch_over_50_steps(options):
    kw = dict(learning_rate=0.02, **options)
    ours, state, theirs, opt = _run_both(kw, torch.float64)
    assert_trees_close(ours, theirs, rtol=1e-9, atol=1e-12)
    assert_trees_close(state[0].momentum_buffer, _torch_buffers(opt), rtol=1e-9, atol=1e-12)
    start, _ = _problem(torch.float64)
    assert all((ours[k] - start[k]).abs().max() > 0.05 for k in SHAPES), "the params barely moved"


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_float32_matches_torch_over_50_steps(options):
    """Only Muon parameters: the steps are torch's arithmetic, so the trajectories stay within a
    float32 ulp or two (measured: 6e-8 at most, half the configurations bitwise; a bfloat16
    boundary crossing would show as ~1e-4)."""
    kw = dict(learning_rate=0.02, **options)
    ours, _, theirs, _ = _run_both(kw, torch.float32)
    assert_trees_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("options", [dict(), dict(nesterov=False, adjust_lr_fn="match_rms_adamw"), dict(weight_decay=0.0, adjust_lr_fn="original")], ids=["default", "plain-match_rms", "no_decay-original"])
def test_fixed_gradients_give_torch_bitwise_in_every_dtype(dtype, options):
    """With gradients that do not depend on the params, the momentum buffers (in the param
    dtype, as torch keeps them) are bitwise torch's; so are the params in bfloat16, and in
    float32/float64 up to the few elements that crossed zero (new value not within a factor 2
    of the old: ``p + (new - p)`` rounds once), a few ulps of the matrix's scale."""
    kw = dict(learning_rate=0.02, **options)
    ours, state, theirs, opt = _run_both(kw, dtype, fixed=True)
    assert_trees_equal(state[0].momentum_buffer, _torch_buffers(opt))
    if dtype == torch.bfloat16:
        assert_trees_equal(ours, theirs)
    for k in SHAPES:
        assert ours[k].dtype == dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=4 * eps * theirs[k].abs().max().item())


@pytest.mark.parametrize("nesterov", [True, False])
def test_bfloat16_params_follow_torch_over_50_steps(nesterov):
    """bfloat16 params and loss-dependent gradients, bfloat16 buffers as torch keeps them: the
    same bfloat16 operations in the same order, so the trajectory is torch's bitwise (an element
    that more than doubled or halved in a step could be one bfloat16 rounding off; none is)."""
    kw = dict(learning_rate=0.02, nesterov=nesterov)
    ours, state, theirs, opt = _run_both(kw, torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for b in tree.leaves(state[0].momentum_buffer))
    assert_trees_equal(ours, theirs)
    assert_trees_equal(state[0].momentum_buffer, _torch_buffers(opt))


def test_bfloat16_without_nesterov_leaves_the_buffer_a_moving_average():
    """torch 2.13 normalizes a bfloat16 momentum buffer in place without Nesterov
    (pytorch/pytorch#194664); funcopt's buffer is the moving average of the gradients."""
    g = {"w": torch.randn(5, 3).bfloat16()}
    params = {"w": torch.randn(5, 3).bfloat16()}
    tx = funcopt.muon(0.02, nesterov=False, momentum=0.9)
    _, state = tx.update(g, tx.init(params), params)
    assert torch.equal(state[0].momentum_buffer["w"], torch.zeros(5, 3).bfloat16().lerp(g["w"], 1 - 0.9))


def test_newton_schulz_is_torchs_bitwise():
    """One step from a zero buffer without momentum: the direction is torch's
    ``_zeropower_via_newtonschulz`` of the gradient, for tall, wide and square matrices."""
    tx = funcopt.scale_by_muon(momentum=0.0, nesterov=False)
    for shape in [(3, 8), (8, 3), (5, 5), (1, 7), (40, 9), (64, 64)]:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            g = {"w": torch.randn(*shape, dtype=dtype)}
            out, _ = tx.update(g, tx.init(g), g)
            expected = torch_muon._zeropower_via_newtonschulz(g["w"].clone(), (3.4445, -4.775, 2.0315), 5, 1e-7)
            assert torch.equal(out["w"], expected.to(dtype)), (shape, dtype)


# ---------------------------------------------------------------------------------------------
# The recipe: Muon for hidden matrices, AdamW for the rest


def _named_model(dtype, seed=0):
    """Embedding -> hidden Linear -> LayerNorm -> head, with names the default split reads."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(10, 6),
            "hidden": torch.nn.Linear(6, 8),
            "norm": torch.nn.LayerNorm(8),
            "hidden2": torch.nn.Linear(8, 8, bias=False),
            "head": torch.nn.Linear(8, 4),
        }
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model = model.to(dtype)
    tokens = torch.randint(0, 10, (24,), generator=g)
    labels = torch.randint(0, 4, (24,), generator=g)

    def forward(m, x):
        h = torch.tanh(m["hidden"](m["embed"](x)))
        return m["head"](torch.tanh(m["hidden2"](m["norm"](h))))

    return model, forward, tokens, labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_recipe_matches_torch_muon_and_adamw_side_by_side(dtype):
    torch.set_default_dtype(dtype)
    model, forward, x, y = _named_model(dtype)
    reference = copy.deepcopy(model)
    params, _ = funcopt.nn.extract(model)
    muon_names = ["hidden.weight", "hidden2.weight"]  # 2-D, neither "embed" nor "head"
    assert _muon_leaves(funcopt.muon_with_adamw(), params) == [f"[{k!r}]" for k in muon_names]
    named = dict(reference.named_parameters())
    torch_muon_opt = torch.optim.Muon([named[k] for k in muon_names], lr=0.02, weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
    torch_adamw = torch.optim.AdamW([p for k, p in named.items() if k not in muon_names], lr=1e-2, weight_decay=0.01)
    tx = funcopt.muon_with_adamw(
        learning_rate=0.02, weight_decay=0.05, adjust_lr_fn="match_rms_adamw", adamw_learning_rate=1e-2, adamw_weight_decay=0.01
    )
    state = tx.init(params)

    def loss_fn(p):
        return torch.nn.functional.cross_entropy(forward(_Bound(model, p), x), y)

    for _ in range(STEPS):
        updates, state = tx.update(torch.func.grad(loss_fn)(params), state, params)
        params = funcopt.apply_updates(params, updates)
        torch_muon_opt.zero_grad()
        torch_adamw.zero_grad()
        torch.nn.functional.cross_entropy(forward(reference, x), y).backward()
        torch_muon_opt.step()
        torch_adamw.step()
    theirs = {k: p.detach() for k, p in named.items()}
    if dtype == torch.float64:
        assert_trees_close(params, theirs, rtol=1e-9, atol=1e-12)
    else:  # see the module docstring: AdamW's ulps can cross a bfloat16 boundary of Muon's
        assert_trees_close(params, theirs, rtol=0, atol=0.02 * 2**-8 * STEPS)


def _muon_leaves(tx, params):
    """The paths of the leaves the recipe gives to Muon (its momentum buffer is not a placeholder)."""
    buffers = tx.init(params).inner_states["muon"].inner_state[0].momentum_buffer
    return [p for p, b in zip(tree.paths(params), tree.leaves(buffers)) if b.numel()]


class _Bound:
    """``model[name]`` called with the params pytree instead of the module's own tensors."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __getitem__(self, name):
        sub = {k.split(".", 1)[1]: v for k, v in self.params.items() if k.split(".", 1)[0] == name}
        return lambda *args: torch.func.functional_call(self.model[name], sub, args)


def test_recipe_on_the_registry_mlp_matches_torch_composite_in_float64():
    torch.set_default_dtype(torch.float64)
    module, params, loss_fn, (X, Y) = mlp_problem(torch.float64)
    reference = copy.deepcopy(module)
    opt = MuonAndAdamW(reference.parameters(), lr=0.02, adamw=dict(lr=1e-2, weight_decay=0.05))
    tx = funcopt.muon_with_adamw(learning_rate=0.02, adamw_learning_rate=1e-2, adamw_weight_decay=0.05)
    state = tx.init(params)
    for _ in range(STEPS):
        updates, state = tx.update(torch.func.grad(loss_fn)(params), state, params)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(X), Y).backward()
        opt.step()
    assert_trees_close(params, {k: p.detach() for k, p in reference.named_parameters()}, rtol=1e-9, atol=1e-12)


def test_default_split_and_a_custom_predicate():
    params = {
        "tok_embeddings": torch.zeros(10, 4), "layers": [{"attn": torch.zeros(4, 4), "bias": torch.zeros(4)}],
        "lm_head": torch.zeros(4, 10), "conv": torch.zeros(2, 2, 3, 3), "scale": torch.zeros(()),
    }
    split = funcopt.transforms.is_hidden_matrix
    assert tree.map_with_path(split, params) == {
        "tok_embeddings": False, "layers": [{"attn": True, "bias": False}], "lm_head": False, "conv": False, "scale": False,
    }

    assert _muon_leaves(funcopt.muon_with_adamw(), params) == ["['layers'][0]['attn']"]
    custom = funcopt.muon_with_adamw(is_muon_param=lambda path, p: p.ndim == 2 and "attn" not in path)
    assert _muon_leaves(custom, params) == ["['lm_head']", "['tok_embeddings']"]
    with pytest.raises(funcopt.FuncoptError, match=r"is_muon_param returned 'yes' for the leaf at \['tok_embeddings'\]"):
        funcopt.muon_with_adamw(is_muon_param=lambda path, p: "yes").init(params)


# ---------------------------------------------------------------------------------------------
# Errors, validation


def test_a_leaf_that_is_not_a_matrix_names_its_path_and_the_fix():
    params = {"layer": {"w": torch.zeros(3, 4), "b": torch.zeros(4)}}
    with pytest.raises(funcopt.FuncoptError, match=r"params leaf at \['layer'\]\['b'\] is a 1-D tensor.*adamw.*muon_with_adamw"):
        funcopt.muon(0.02).init(params)
    with pytest.raises(funcopt.FuncoptError, match=r"\['k'\] is a 4-D tensor of shape \(2, 2, 3, 3\)"):
        funcopt.muon(0.02).init({"k": torch.zeros(2, 2, 3, 3)})
    with pytest.raises(funcopt.FuncoptError, match=r"\['c'\] is a torch.complex64 tensor"):
        funcopt.muon(0.02).init({"c": torch.zeros(2, 2, dtype=torch.complex64)})
    good = {"w": torch.zeros(3, 4)}
    state = funcopt.muon(0.02).init(good)
    with pytest.raises(funcopt.FuncoptError, match=r"gradient at \['w'\] has shape \(12,\) but the parameter has \(3, 4\)"):
        funcopt.muon(0.02).update({"w": torch.zeros(12)}, state, good)  # the chain's check names it first


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learning_rate=-1.0), "learning_rate must be >= 0"),
        (dict(momentum=1.0), r"momentum must lie in \[0.0, 1.0\)"),
        (dict(weight_decay=-0.1), "weight_decay must lie in"),
        (dict(eps=-1e-7), "eps must lie in"),
        (dict(ns_steps=100), r"ns_steps must be an int in \[0, 100\)"),
        (dict(ns_steps=5.0), "ns_steps must be an int"),
        (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients must be three numbers"),
        (dict(adjust_lr_fn="rms"), "adjust_lr_fn must be one of"),
        (dict(nesterov=1), "nesterov must be True or False"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(kwargs, message):
    with pytest.raises(funcopt.FuncoptError, match=message):
        funcopt.muon(**kwargs)


def test_muon_has_no_fast_route():
    assert not hasattr(funcopt.muon, "fast_route") and "muon" not in funcopt.optimizers.FAST_PATH_OPTIMIZERS
    params = {"w": torch.randn(4, 3)}
    tx = funcopt.muon(0.02)
    assert not funcopt.fast.fast_path_applies(tx, params, tx.init(params), params)


# ---------------------------------------------------------------------------------------------
# inject_hyperparams, schedules, vmap, derivatives


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_injected_hyperparameters_give_the_plain_trajectory_bitwise(dtype):
    params, loss_fn = _problem(dtype)
    kw = dict(learning_rate=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    runs = []
    for tx in (funcopt.muon(**kw), funcopt.inject_hyperparams(funcopt.muon)(**kw)):
        p, state = params, tx.init(params)
        for _ in range(10):
            updates, state = tx.update(torch.func.grad(loss_fn)(p), state, p)
            p = funcopt.apply_updates(p, updates)
        runs.append(p)
    assert_trees_equal(runs[1], runs[0])
    assert sorted(state.hyperparams) == ["eps", "learning_rate", "momentum", "weight_decay"]


def test_a_schedule_matches_torch_with_lambda_lr():
    torch.set_default_dtype(torch.float64)  # the schedule's 0.9**count, as LambdaLR's Python float
    params, loss_fn = _problem(torch.float64)
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Muon(list(torch_params.values()), lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9**k)
    tx = funcopt.muon(lambda count: 0.02 * 0.9**count)
    state = tx.init(params)
    for _ in range(20):
        updates, state = tx.update(torch.func.grad(loss_fn)(params), state, params)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        loss_fn(torch_params).backward()
        opt.step()
        sched.step()
    assert_trees_close(params, {k: p.detach() for k, p in torch_params.items()}, rtol=1e-9, atol=1e-12)


def test_a_vmapped_learning_rate_sweep_equals_separate_runs_bitwise():
    params, loss_fn = _problem(torch.float32)
    lrs = torch.tensor([0.01, 0.02, 0.05], dtype=torch.float64)
    tx = funcopt.inject_hyperparams(funcopt.muon)(learning_rate=0.02, weight_decay=0.1)

    def run(lr):
        state = funcopt.set_hyperparams(tx.init(params), learning_rate=lr)
        p = params
        for _ in range(5):
            updates, state = tx.update(torch.func.grad(loss_fn)(p), state, p)
            p = funcopt.apply_updates(p, updates)
        return p

    swept = torch.func.vmap(run)(lrs)
    for i, lr in enumerate(lrs):
        assert_trees_equal(tree.map(lambda x: x[i], swept), run(lr))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's own forward-AD setup
def test_newton_schulz_derivatives_are_consistent_in_both_modes():
    """Reverse (vjp) and forward (jvp) derivatives of the update agree: <v, J t> == <J^T v, t>.
    The bfloat16 cast makes the step piecewise constant; these are the derivatives of the
    iteration's operations (straight through the cast), as autograd gives for torch's code."""
    params = {"w": torch.randn(6, 4, dtype=torch.float64)}
    tx = funcopt.muon(0.02, adjust_lr_fn="match_rms_adamw")  # ratio 0.2 * sqrt(6)
    state = tx.init(params)

    def step(g):
        return tx.update({"w": g}, state, params)[0]["w"]

    g, t, v = (torch.randn(6, 4, dtype=torch.float64) for _ in range(3))
    _, jt = torch.func.jvp(step, (g,), (t,))
    _, vjp = torch.func.vjp(step, g)
    (jtv,) = vjp(v)
    torch.testing.assert_close((v * jt).sum(), (jtv * t).sum(), rtol=2e-2, atol=1e-6)
    # The same derivative as autograd through torch's operations, up to the bfloat16 rounding of
    # both backward passes (which sum the contributions in different orders): same direction.
    plain = torch.func.grad(lambda g: (_plain_newton_schulz(g).double() * v).sum())(g)
    ours = jtv / (-0.02 * 0.2 * 6**0.5)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), plain.flatten(), dim=0) > 0.98


def _plain_newton_schulz(g, a=3.4445, b=-4.775, c=2.0315, steps=5, eps=1e-7):
    """torch's iteration with plain operations (torch's own divides in place, which autograd rejects)."""
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    x = x.mT if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's own forward-AD setup
def test_the_per_member_operations_have_exact_derivatives():
    """The vmap wrappers of the iteration (norm, matmul, addmm) against autograd's numbers."""
    from funcopt.transforms._orthogonal import _AddMM, _MatMul, _Norm

    a, b, c = (torch.randn(4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda x: _Norm.apply(x), (a,), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: _MatMul.apply(x, y), (a, b), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, z: _AddMM.apply(x, y, z, -4.775, 2.0315), (c, a, b), check_forward_ad=True, check_batched_grad=True)


# ---------------------------------------------------------------------------------------------
# Interop with torch.optim.Muon's state_dict


def _torch_loss_steps(opt, torch_params, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(torch_params).backward()
        opt.step()


@pytest.mark.parametrize("options", [dict(), dict(nesterov=False, adjust_lr_fn="match_rms_adamw", weight_decay=0.0)], ids=["default", "plain"])
def test_torch_muon_continues_in_funcopt_and_back(options):
    """torch 5 steps -> from_torch -> funcopt 5 steps -> to_torch -> torch 5 steps, against an
    uninterrupted torch run (float64: the same numbers to 1e-12)."""
    params, loss_fn = _problem(torch.float64)
    straight = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt_straight = torch.optim.Muon(list(straight.values()), lr=0.02, **options)
    _torch_loss_steps(opt_straight, straight, loss_fn, 10)
    after_10 = {k: v.detach().clone() for k, v in straight.items()}
    _torch_loss_steps(opt_straight, straight, loss_fn, 5)

    switching = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Muon(list(switching.values()), lr=0.02, **options)
    _torch_loss_steps(opt, switching, loss_fn, 5)
    p = {k: v.detach().clone() for k, v in switching.items()}
    tx, state = funcopt.interop.from_torch(opt.state_dict(), p)  # the kind read from the param group
    assert isinstance(state[0], funcopt.ScaleByMuonState)
    for _ in range(5):
        updates, state = tx.update(torch.func.grad(loss_fn)(p), state, p)
        p = funcopt.apply_updates(p, updates)
    assert_trees_close(p, after_10, rtol=1e-12, atol=1e-14)

    resumed = {k: torch.nn.Parameter(v.clone()) for k, v in p.items()}
    opt2 = torch.optim.Muon(list(resumed.values()), lr=0.02, **options)
    sd = funcopt.interop.to_torch(state, p, opt2)
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values()), "torch's Muon keeps no step"
    opt2.load_state_dict(sd)
    _torch_loss_steps(opt2, resumed, loss_fn, 5)
    theirs = {k: v.detach() for k, v in straight.items()}
    assert_trees_close({k: v.detach() for k, v in resumed.items()}, theirs, rtol=1e-12, atol=1e-14)


def test_interop_reads_muons_hyperparameters():
    params = {"w": torch.randn(4, 3, dtype=torch.float64)}
    p = torch.nn.Parameter(params["w"].clone())
    opt = torch.optim.Muon([p], lr=0.05, weight_decay=0.0, momentum=0.8, nesterov=False, ns_coefficients=(2.0, -1.5, 0.5), eps=1e-5, ns_steps=3, adjust_lr_fn="original")
    tx, state = funcopt.interop.from_torch(opt, params)
    assert "muon" in funcopt.interop.SUPPORTED
    expected = funcopt.muon(0.05, 0.0, 0.8, False, (2.0, -1.5, 0.5), 1e-5, 3, "original")
    g = {"w": torch.randn(4, 3, dtype=torch.float64)}
    assert_trees_equal(tx.update(g, state, params)[0], expected.update(g, expected.init(params), params)[0])
