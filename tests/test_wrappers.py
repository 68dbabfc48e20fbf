"""masked / freeze / multi_transform / apply_if_finite / accumulate."""

import copy

import pytest
import torch

import funcopt
from funcopt import tree
from funcopt.transforms._conditional import AccumulateState, ApplyIfFiniteState, accumulate, apply_if_finite
from funcopt.transforms._masking import (
    MaskedState,
    MultiTransformState,
    freeze,
    masked,
    multi_transform,
    set_to_zero,
)
from tests.helpers import assert_trees_close, assert_trees_equal, mlp_problem, nested_params, snapshot


def _grads(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tree.map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params)


FULL_MASK = {"encoder": {"w": True, "b": False}, "heads": [True, (False, True)]}


# ---------------------------------------------------------------------------------------------
# masked / freeze


@pytest.mark.parametrize(
    "mask",
    [
        FULL_MASK,
        lambda p: FULL_MASK,
        lambda p: tree.map_with_path(lambda path, x: path in ("['encoder']['w']", "['heads'][0]", "['heads'][1][1]"), p),
    ],
    ids=["tree", "fn", "fn_by_path"],
)
def test_masked_applies_inner_to_selected_leaves_only(mask):
    params = nested_params()
    tx = masked(funcopt.adam(0.1), mask)
    state = tx.init(params)
    assert isinstance(state, MaskedState)
    adam_state = state.inner_state[0]
    # memory only for the selected leaves: unselected positions hold empty tensors
    assert adam_state.mu["encoder"]["b"].shape == (0,) and adam_state.mu["heads"][1][0].shape == (0,)
    assert adam_state.mu["encoder"]["w"].shape == (3, 4)
    grads = _grads(params)
    updates, state = tx.update(grads, state, params)
    ref, _ = funcopt.adam(0.1).update(grads, funcopt.adam(0.1).init(params), params)
    for path, sel in zip(tree.paths(FULL_MASK), tree.leaves(FULL_MASK)):
        got = dict(zip(tree.paths(updates), tree.leaves(updates)))[path]
        want = dict(zip(tree.paths(ref if sel else grads), tree.leaves(ref if sel else grads)))[path]
        assert torch.equal(got, want), path


def test_prefix_mask_equals_full_mask():
    params = nested_params()
    prefix = {"encoder": True, "heads": False}
    full = {"encoder": {"w": True, "b": True}, "heads": [False, (False, False)]}
    grads = _grads(params)
    a = masked(funcopt.sgd(0.1, momentum=0.9), prefix)
    b = masked(funcopt.sgd(0.1, momentum=0.9), full)
    ua, sa = a.update(grads, a.init(params), params)
    ub, sb = b.update(grads, b.init(params), params)
    assert_trees_equal(ua, ub)
    assert_trees_equal(sa, sb)
    assert torch.equal(ua["heads"][0], grads["heads"][0])  # untouched


@pytest.mark.parametrize(
    "mask,match",
    [
        ({"encoder": {"w": True}, "heads": False}, r"masked mask at \['encoder'\] does not match the params' keys: missing \['b'\]"),
        ({"encoder": {"w": 1, "b": True}, "heads": False}, r"masked mask at \['encoder'\]\['w'\] is 1 \(int\)"),
        ({"encoder": True, "heads": [True]}, r"masked mask at \['heads'\] is a list of length 1"),
        ({"encoder": True, "heads": [True, (False, [True])]}, r"at \['heads'\]\[1\]\[1\] is a list of length 1 but the params hold a tensor"),
        (torch.tensor(True), "the mask is a tensor"),
        ({"encoder": True, "heads": [torch.tensor(True), False]}, r"at \['heads'\]\[0\] is tensor\(True\)"),
    ],
)
def test_bad_masks_name_the_path(mask, match):
    with pytest.raises(funcopt.FuncoptError, match=match):
        masked(funcopt.sgd(0.1), mask).init(nested_params())


def test_freeze_keeps_frozen_leaves_fixed_and_trains_the_rest():
    _, params, loss_fn, _ = mlp_problem(torch.float64, n=16)
    frozen = {"0.weight": True, "0.bias": True, "2.weight": False, "2.bias": False}
    tx = funcopt.chain(funcopt.adamw(1e-2, weight_decay=0.1), freeze(frozen))
    ref_tx = funcopt.adamw(1e-2, weight_decay=0.1)
    p, s = params, tx.init(params)
    r, rs = params, ref_tx.init(params)
    for _ in range(5):
        u, s = tx.update(torch.func.grad(loss_fn)(p), s, p)
        p = funcopt.apply_updates(p, u)
        # reference: only the head is trained (the frozen body is a constant for it)
        ru, rs = ref_tx.update(torch.func.grad(loss_fn)(r), rs, r)
        ru = {k: (torch.zeros_like(v) if frozen[k] else v) for k, v in ru.items()}
        r = funcopt.apply_updates(r, ru)
    assert torch.equal(p["0.weight"], params["0.weight"]) and torch.equal(p["0.bias"], params["0.bias"])
    assert not torch.equal(p["2.weight"], params["2.weight"])
    assert_trees_equal(p, r)


def test_set_to_zero():
    params = nested_params()
    updates, state = set_to_zero().update(_grads(params), set_to_zero().init(params))
    assert all(torch.count_nonzero(x) == 0 for x in tree.leaves(updates))


# ---------------------------------------------------------------------------------------------
# multi_transform


def test_multi_transform_matches_torch_param_groups():
    module, params, loss_fn, (X, Y) = mlp_problem(torch.float64, n=16)
    labels = lambda p: {k: "body" if k.startswith("0.") else "head" for k in p}
    tx = multi_transform(
        {"body": funcopt.sgd(0.05, momentum=0.9, nesterov=True), "head": funcopt.adam(1e-2, b1=0.8, weight_decay=1e-3)},
        labels,
    )
    state = tx.init(params)
    assert isinstance(state, MultiTransformState) and sorted(state.inner_states) == ["body", "head"]

    torch_module = copy.deepcopy(module)
    named = dict(torch_module.named_parameters())
    body = [named["0.weight"], named["0.bias"]]
    head = [named["2.weight"], named["2.bias"]]
    # torch needs one optimizer class per group, so two optimizers stand for two param groups
    opt_body = torch.optim.SGD(body, lr=0.05, momentum=0.9, nesterov=True)
    opt_head = torch.optim.Adam(head, lr=1e-2, betas=(0.8, 0.999), weight_decay=1e-3)
    for _ in range(10):
        updates, state = tx.update(torch.func.grad(loss_fn)(params), state, params)
        params = funcopt.apply_updates(params, updates)
        opt_body.zero_grad()
        opt_head.zero_grad()
        torch.nn.functional.cross_entropy(torch_module(X), Y).backward()
        opt_body.step()
        opt_head.step()
    expected = {k: v.detach() for k, v in torch_module.named_parameters()}
    assert_trees_close(params, expected, rtol=1e-10, atol=1e-12)


def test_multi_transform_same_optimizer_class_matches_torch_param_groups():
    module, params, loss_fn, (X, Y) = mlp_problem(torch.float64, n=16)
    tx = multi_transform(
        {"fast": funcopt.adam(3e-2), "slow": funcopt.adam(1e-3)},
        {"0.weight": "slow", "0.bias": "slow", "2.weight": "fast", "2.bias": "fast"},
    )
    state = tx.init(params)
    torch_module = copy.deepcopy(module)
    named = dict(torch_module.named_parameters())
    opt = torch.optim.Adam(
        [
            {"params": [named["0.weight"], named["0.bias"]], "lr": 1e-3},
            {"params": [named["2.weight"], named["2.bias"]], "lr": 3e-2},
        ]
    )
    for _ in range(10):
        updates, state = tx.update(torch.func.grad(loss_fn)(params), state, params)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(torch_module(X), Y).backward()
        opt.step()
    expected = {k: v.detach() for k, v in torch_module.named_parameters()}
    assert_trees_close(params, expected, rtol=1e-10, atol=1e-12)


def test_multi_transform_nested_prefix_labels_and_frozen_group():
    params = nested_params()
    tx = multi_transform(
        {"train": funcopt.sgd(0.1), "frozen": set_to_zero()},
        {"encoder": "frozen", "heads": ["train", "train"]},
    )
    grads = _grads(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert torch.count_nonzero(updates["encoder"]["w"]) == 0
    torch.testing.assert_close(updates["heads"][1][0], -0.1 * grads["heads"][1][0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "labels,match",
    [
        ({"encoder": "a", "heads": ["a", ("a", "c")]}, r"\['heads'\]\[1\]\[1\] -> 'c'"),
        ({"encoder": "a"}, r"labels at <root> does not match the params' keys: missing \['heads'\]"),
        ({"encoder": {"w": "a", "b": None}, "heads": "a"}, r"labels at \['encoder'\]\['b'\] is None"),
        ({"encoder": ["a", "b"], "heads": "a"}, r"labels at \['encoder'\] is a list of length 2 but the params hold a dict"),
    ],
)
def test_bad_labels_name_the_path(labels, match):
    tx = multi_transform({"a": funcopt.sgd(0.1), "b": funcopt.sgd(0.2)}, labels)
    with pytest.raises(funcopt.FuncoptError, match=match):
        tx.init(nested_params())


def test_multi_transform_argument_errors():
    with pytest.raises(funcopt.FuncoptError, match="non-empty dict"):
        multi_transform({}, "a")
    with pytest.raises(TypeError, match=r"transforms\['a'\] is a function"):
        multi_transform({"a": funcopt.sgd}, "a")
    tx = multi_transform({"a": funcopt.sgd(0.1)}, "a")
    other = multi_transform({"b": funcopt.sgd(0.1)}, "b")
    params = nested_params()
    with pytest.raises(funcopt.FuncoptError, match="pass the state from its own init"):
        tx.update(_grads(params), other.init(params), params)
    with pytest.raises(funcopt.FuncoptError, match="MaskedState"):
        masked(funcopt.sgd(0.1), True).update(_grads(params), (), params)


# ---------------------------------------------------------------------------------------------
# apply_if_finite


def test_apply_if_finite_skips_then_gives_up():
    params = {"w": torch.ones(3, dtype=torch.float64)}
    good = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    bad = {"w": torch.tensor([1.0, float("nan"), 0.5], dtype=torch.float64)}
    inf = {"w": torch.tensor([float("inf"), 1.0, 0.5], dtype=torch.float64)}
    tx = apply_if_finite(funcopt.adam(0.1), max_consecutive_errors=2)
    state = tx.init(params)
    assert isinstance(state, ApplyIfFiniteState)
    u, state = tx.update(good, state, params)
    after_good = snapshot(state.inner_state)
    for i, g in enumerate([bad, inf]):
        u, state = tx.update(g, state, params)
        assert torch.count_nonzero(u["w"]) == 0
        assert_trees_equal(state.inner_state, after_good)
        assert state.notfinite_count.item() == i + 1 and not state.last_finite.item()
    # third consecutive failure exceeds the limit: the NaN update goes through
    u, state = tx.update(bad, state, params)
    assert torch.isnan(u["w"]).any() and state.total_notfinite.item() == 3
    assert state.inner_state[0].count.item() == 2
    # a finite step resets the consecutive counter but not the total
    u, state = tx.update(good, state, params)
    assert state.notfinite_count.item() == 0 and state.total_notfinite.item() == 3 and state.last_finite.item()


def test_apply_if_finite_equals_inner_on_finite_steps_and_runs_under_vmap():
    params = nested_params()
    tx = apply_if_finite(funcopt.sgd(0.1, momentum=0.9), 1)
    ref = funcopt.sgd(0.1, momentum=0.9)
    s, rs = tx.init(params), ref.init(params)
    for i in range(3):
        g = _grads(params, seed=i)
        u, s = tx.update(g, s, params)
        ru, rs = ref.update(g, rs, params)
        assert_trees_equal(u, ru)
    # vmap over a batch of gradients, one of which is non-finite
    gs = [_grads(params, seed=i) for i in range(3)]
    gs[1]["encoder"]["w"][0, 0] = float("nan")
    stacked_state = torch.func.vmap(tx.init)(tree.stack([params] * 3))
    out, new_state = torch.func.vmap(tx.update)(tree.stack(gs), stacked_state, tree.stack([params] * 3))
    assert new_state.last_finite.tolist() == [True, False, True]
    assert torch.count_nonzero(out["encoder"]["w"][1]) == 0
    assert torch.count_nonzero(out["encoder"]["w"][0]) > 0


def test_apply_if_finite_argument_errors():
    with pytest.raises(funcopt.FuncoptError, match="max_consecutive_errors must be an int >= 0"):
        apply_if_finite(funcopt.sgd(0.1), -1)
    with pytest.raises(TypeError, match="GradientTransformation"):
        apply_if_finite(funcopt.sgd, 3)


# ---------------------------------------------------------------------------------------------
# accumulate


@pytest.mark.parametrize(
    "make", [lambda: funcopt.sgd(0.1, momentum=0.9), lambda: funcopt.adam(1e-2)], ids=["sgd_momentum", "adam"]
)
def test_accumulate_k_microbatches_equals_one_big_batch(make):
    _, params, loss_fn, (X, Y) = mlp_problem(torch.float64, n=24)
    k = 4
    big = make()
    acc = accumulate(make(), every_k=k)
    p_big, s_big = params, big.init(params)
    p_acc, s_acc = params, acc.init(params)
    for _ in range(3):
        u, s_big = big.update(torch.func.grad(loss_fn)(p_big), s_big, p_big)
        p_big = funcopt.apply_updates(p_big, u)
        for i, (xb, yb) in enumerate(zip(X.chunk(k), Y.chunk(k))):
            g = torch.func.grad(lambda p: loss_fn(p, xb, yb))(p_acc)
            u, s_acc = acc.update(g, s_acc, p_acc)
            if i < k - 1:
                assert all(torch.count_nonzero(x) == 0 for x in tree.leaves(u)), "zeros between updates"
                assert s_acc.mini_step.item() == i + 1
            p_acc = funcopt.apply_updates(p_acc, u)
        assert s_acc.mini_step.item() == 0
    assert isinstance(s_acc, AccumulateState) and s_acc.gradient_step.item() == 3
    assert_trees_close(p_acc, p_big, rtol=1e-12, atol=1e-14)
    assert all(torch.count_nonzero(x) == 0 for x in tree.leaves(s_acc.acc_grads))


def test_accumulate_sum_mode_and_vmap():
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    tx = accumulate(funcopt.sgd(1.0), every_k=3, average=False)
    state = tx.init(params)
    for i in range(3):
        u, state = tx.update({"w": torch.full((2,), float(i + 1), dtype=torch.float64)}, state, params)
    assert u["w"].tolist() == [-6.0, -6.0]
    # under vmap, members at different micro-steps take different branches of the where
    tx = accumulate(funcopt.sgd(1.0), every_k=2)
    s0 = tx.init(params)
    s1 = tx.update({"w": torch.ones(2, dtype=torch.float64)}, s0, params)[1]
    stacked = tree.stack([s0, s1])
    out, new = torch.func.vmap(tx.update)(
        {"w": torch.full((2, 2), 3.0, dtype=torch.float64)}, stacked, tree.stack([params, params])
    )
    assert out["w"].tolist() == [[0.0, 0.0], [-2.0, -2.0]]
    assert new.mini_step.tolist() == [1, 0]


def test_accumulate_argument_errors():
    with pytest.raises(funcopt.FuncoptError, match="every_k must be an int >= 1"):
        accumulate(funcopt.sgd(0.1), 0)
    with pytest.raises(TypeError, match="GradientTransformation"):
        accumulate("adam", 2)
    with pytest.raises(funcopt.FuncoptError, match="AccumulateState"):
        accumulate(funcopt.sgd(0.1), 2).update({"w": torch.zeros(1)}, ())


# ---------------------------------------------------------------------------------------------
# under vmap and torch.compile


def _composite():
    groups = multi_transform(
        {"enc": funcopt.sgd(0.1, momentum=0.9), "heads": funcopt.adam(1e-2)}, {"encoder": "enc", "heads": "heads"}
    )
    return apply_if_finite(accumulate(funcopt.chain(groups, freeze({"encoder": {"w": False, "b": True}, "heads": False})), 2), 3)


def test_composite_wrappers_under_vmap_equal_a_loop():
    members = [nested_params(seed=s) for s in range(3)]
    grads = [[_grads(m, seed=10 * s + i) for i in range(4)] for s, m in enumerate(members)]
    tx = _composite()

    expected = []
    for m, gs in zip(members, grads):
        state = tx.init(m)
        for g in gs:
            u, state = tx.update(g, state, m)
            m = funcopt.apply_updates(m, u)
        expected.append(m)

    stacked = tree.stack(members)
    state = torch.func.vmap(tx.init)(stacked)
    step = torch.func.vmap(tx.update)
    for i in range(4):
        u, state = step(tree.stack([gs[i] for gs in grads]), state, stacked)
        stacked = funcopt.apply_updates(stacked, u)
    for j in range(3):
        assert_trees_close(tree.unstack(stacked)[j], expected[j], rtol=1e-12, atol=1e-14, msg=f"member {j}")


@pytest.mark.slow
def test_composite_wrappers_compile_fullgraph():
    params = nested_params()
    tx = _composite()
    compiled = torch.compile(tx.update, fullgraph=True)
    s_eager = s_comp = tx.init(params)
    for i in range(2):  # one accumulating call, one updating call
        g = _grads(params, seed=i)
        u_eager, s_eager = tx.update(g, s_eager, params)
        u_comp, s_comp = compiled(g, s_comp, params)
        assert_trees_close(u_comp, u_eager, rtol=1e-12, atol=1e-14)
    assert_trees_close(s_comp, s_eager, rtol=1e-12, atol=1e-14)


def test_masked_without_params_uses_the_updates_for_a_callable_mask():
    params = nested_params()
    tx = masked(funcopt.sgd(0.1), lambda t: tree.map(lambda x: x.dim() >= 2, t))
    grads = _grads(params)
    updates, _ = tx.update(grads, tx.init(params))
    torch.testing.assert_close(updates["encoder"]["w"], -0.1 * grads["encoder"]["w"], rtol=0, atol=0)
    assert torch.equal(updates["encoder"]["b"], grads["encoder"]["b"])


def test_set_hyperparams_reaches_groups_of_multi_transform():
    params = nested_params()
    inj = funcopt.inject_hyperparams(funcopt.sgd)
    tx = multi_transform({"a": inj(learning_rate=0.1), "b": inj(learning_rate=0.2)}, {"encoder": "a", "heads": "b"})
    state = funcopt.set_hyperparams(tx.init(params), learning_rate=0.05)
    grads = _grads(params)
    updates, state = tx.update(grads, state, params)
    for got, g in zip(tree.leaves(updates), tree.leaves(grads)):
        torch.testing.assert_close(got, -0.05 * g, rtol=1e-15, atol=0)
    lrs = [s.inner_state.hyperparams["learning_rate"].item() for s in state.inner_states.values()]
    assert lrs == [0.05, 0.05]
