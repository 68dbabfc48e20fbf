"""make_step / apply_gradients: donated and pure steps agree; donated inputs are invalidated and caught."""

from __future__ import annotations

import pytest
import torch

import funcopt
from funcopt import tree
from funcopt.fast._step import DonatedValueError, apply_gradients, is_donated, make_step
from tests import registry
from tests.helpers import assert_trees_close, assert_trees_equal, mlp_problem, snapshot


def _clone(t):
    return tree.map(torch.clone, t)


@pytest.mark.parametrize("name", registry.names())
def test_donated_step_equals_pure_step(name):
    """Rows with a fast route run its kernels in place; the others add the updates into the
    donated params in place."""
    _, params, loss_fn, (X, Y) = mlp_problem(torch.float64)
    loss_fn = registry.objective(name, loss_fn)  # -loss where the row maximizes (so the loss falls)
    sign = -1 if registry.row(name).maximize else 1  # and the steps return -loss
    tx = registry.make(name)
    pure, donated = make_step(loss_fn, tx, donate=False), make_step(loss_fn, tx, donate=True)
    pa, sa = _clone(params), tx.init(params)
    pb, sb = _clone(params), tx.init(params)
    first_loss = None
    for _ in range(4):
        pa, sa, la = pure(pa, sa, X, Y)
        pb, sb, lb = donated(pb, sb, X, Y)
        torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-14)
        first_loss = la if first_loss is None else first_loss
    assert_trees_close((pb, sb), (pa, sa), rtol=1e-12, atol=1e-14)
    assert sign * la < sign * first_loss


def test_donated_params_are_updated_in_place_and_an_old_state_is_caught():
    _, params, loss_fn, (X, Y) = mlp_problem()
    tx = funcopt.adam(1e-2)
    step = make_step(loss_fn, tx)
    state = tx.init(params)
    old_params, old_state = params, state
    expected = make_step(loss_fn, tx, donate=False)(_clone(params), tx.init(params), X, Y)[0]
    params, state, _ = step(params, state, X, Y)
    # The params are the tensors passed in, holding the new values (as optimizer.step()).
    assert all(a is b for a, b in zip(tree.leaves(old_params), tree.leaves(params)))
    assert_trees_close(params, expected, rtol=1e-6, atol=1e-7)
    # The old state's step count was replaced, emptied and marked; its buffers were handed on.
    assert is_donated(old_state[0].count) and old_state[0].count.shape == (0,)
    assert all(a is b for a, b in zip(tree.leaves(old_state[0].mu), tree.leaves(state[0].mu)))
    assert not any(is_donated(x) for x in tree.leaves((params, state)))
    with pytest.raises(DonatedValueError, match=r"opt_state\[0\].count was donated"):
        step(params, old_state, X, Y)
    with pytest.raises(DonatedValueError, match="donate=False"):
        apply_gradients(tx, tree.map(torch.ones_like, params), old_state, params, donate=True)
    # The step keeps working with the values it returned, on the remembered (hot) path too.
    for _ in range(2):
        params, state, loss = step(params, state, X, Y)
    assert torch.isfinite(loss) and int(state[0].count) == 3


def test_donated_step_reuses_the_param_and_state_buffers():
    _, params, loss_fn, (X, Y) = mlp_problem()
    tx = funcopt.sgd(0.1, momentum=0.9)
    step = make_step(loss_fn, tx)
    state = tx.init(params)
    pointers = {x.data_ptr() for x in tree.leaves((params, state[0].momentum_buffer))}
    params, state, _ = step(params, state, X, Y)
    assert {x.data_ptr() for x in tree.leaves((params, state[0].momentum_buffer))} == pointers


def test_pure_step_never_writes_into_its_inputs():
    _, params, loss_fn, (X, Y) = mlp_problem()
    tx = funcopt.adam(1e-2)
    step = make_step(loss_fn, tx, donate=False)
    state = tx.init(params)
    params, state, _ = step(params, state, X, Y)
    before = snapshot((params, state))
    versions = [x._version for x in tree.leaves((params, state))]
    step(params, state, X, Y)
    assert_trees_equal((params, state), before)
    assert versions == [x._version for x in tree.leaves((params, state))]


def test_apply_gradients_only_reads_the_gradients():
    _, params, loss_fn, _ = mlp_problem()
    for tx in (funcopt.adam(1e-2, maximize=True, weight_decay=0.1), funcopt.rmsprop(weight_decay=0.1), funcopt.nadam()):
        grads = torch.func.grad(loss_fn)(params)
        before = snapshot(grads)
        p, s = apply_gradients(tx, grads, tx.init(params), _clone(params), donate=True)
        assert_trees_equal(grads, before)
        expected = funcopt.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
        assert_trees_close(p, expected, rtol=1e-6, atol=1e-7)


def test_no_donation_where_it_is_not_valid():
    _, params, loss_fn, (X, Y) = mlp_problem(torch.float64)
    tx = funcopt.adam(1e-2)
    # params requiring grad: the step is pure and leaves them intact
    leafy = tree.map(lambda p: p.clone().requires_grad_(), params)
    new, _ = apply_gradients(tx, tree.map(torch.ones_like, params), tx.init(params), leafy, donate=True)
    assert all(x.shape != (0,) and not is_donated(x) for x in tree.leaves(leafy))
    assert_trees_close(tree.map(torch.detach, new), funcopt.apply_updates(params, tree.map(lambda p: torch.full_like(p, -1e-2), params)), rtol=1e-7, atol=1e-9)
    # under vmap: a batch of models, each equal to its own unbatched step
    stacked = tree.stack([params, _clone(params)])
    states = torch.func.vmap(tx.init)(stacked)
    step = make_step(loss_fn, tx, donate=True)
    new_p, _, losses = torch.func.vmap(step)(stacked, states)
    single_p, _, single_loss = make_step(loss_fn, tx, donate=False)(params, tx.init(params))
    assert_trees_close(tree.unstack(new_p)[1], single_p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(losses[0], single_loss)
    assert not any(is_donated(x) for x in tree.leaves(stacked))


def test_tied_params_are_not_updated_twice():
    w = torch.randn(3, dtype=torch.float64)
    params = {"a": w, "b": w}
    grads = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    for tx in (funcopt.sgd(0.5), funcopt.nadam(0.5)):
        expected = funcopt.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
        got, _ = apply_gradients(tx, grads, tx.init(params), {"a": w.clone(), "b": w.clone()}, donate=True)
        assert_trees_close(got, expected)
        tied = w.clone()
        got, _ = apply_gradients(tx, grads, tx.init(params), {"a": tied, "b": tied}, donate=True)
        assert_trees_close(got, expected)


def test_module_parameters_follow_a_donated_step_with_extract_copy_false():
    module, _, _, (X, Y) = mlp_problem()
    params, _ = funcopt.nn.extract(module, copy=False)

    def loss_fn(p):
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(module, p, None, X), Y)

    tx = funcopt.sgd(0.5)
    step = make_step(loss_fn, tx)
    params, state, loss0 = step(params, tx.init(params))
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), params[name])
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(module(X), Y) < loss0


def test_has_aux_and_extra_value_argument():
    seen = {}

    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return tree.map(lambda g: -0.1 * g, updates), state

    tx = funcopt.GradientTransformation(lambda p: funcopt.EmptyState(), update)
    _, params, loss_fn, (X, Y) = mlp_problem()
    step = make_step(lambda p: (loss_fn(p), {"n": torch.tensor(3)}), tx, has_aux=True)
    p, s, loss, aux = step(params, tx.init(params))
    assert aux["n"] == 3 and torch.equal(seen["value"], loss)
    assert isinstance(s, funcopt.EmptyState) and p["0.weight"].shape == (8, 4)


def test_type_errors_name_the_argument():
    with pytest.raises(TypeError, match="GradientTransformation as tx"):
        make_step(lambda p: p, funcopt.adam)
    with pytest.raises(TypeError, match="callable loss_fn"):
        make_step(3, funcopt.adam())
    with pytest.raises(TypeError, match="GradientTransformation as tx"):
        apply_gradients(funcopt.sgd, {}, (), {})


def test_donated_steps_recheck_replaced_params_and_edited_state():
    """Later donated steps reuse the first step's checks only for the very buffers it returned."""
    _, params, loss_fn, _ = mlp_problem(torch.float64)
    tx = funcopt.adam(1e-2)
    grads = torch.func.grad(loss_fn)(params)

    def pure(p, s):
        u, s = tx.update(grads, s, p)
        return funcopt.apply_updates(p, u), s

    p, s = apply_gradients(tx, grads, tx.init(params), _clone(params), donate=True)
    p, s = apply_gradients(tx, grads, s, p, donate=True)  # same buffers: remembered checks
    # new params in new memory with the remembered state
    fresh = tree.map(lambda x: x.clone() * 0.5, p)
    expected = pure(_clone(fresh), tree.map(torch.clone, s))
    p, s = apply_gradients(tx, grads, s, fresh, donate=True)
    assert_trees_close((p, s), expected, rtol=1e-12, atol=1e-14)
    # a state whose moment dict was edited in place by the user
    s[0].mu["0.bias"] = s[0].mu["0.bias"].clone() + 1.0
    expected = pure(_clone(p), tree.map(torch.clone, s))
    p, s = apply_gradients(tx, grads, s, p, donate=True)
    assert_trees_close((p, s), expected, rtol=1e-12, atol=1e-14)
    # gradients of another dtype, or aliasing a written buffer, are not taken by the remembered plan
    fast = tx.update._funcopt_fast_path
    assert fast.memo.replan(grads, s, p) is not None
    assert fast.memo.replan(tree.map(lambda x: x.float(), grads), s, p) is None
    assert fast.memo.replan(s[0].nu, s, p) is None


def _hot_problem(tx):
    _, params, loss_fn, _ = mlp_problem(torch.float64)
    grads = torch.func.grad(loss_fn)(params)
    p, s = apply_gradients(tx, grads, tx.init(params), _clone(params), donate=True)
    return p, s, grads


@pytest.mark.parametrize(
    "edit",
    ["resize", "data_swap", "requires_grad", "noncontiguous_grad", "grad_of_other_shape", "grad_requires_grad",
     "grad_aliases_moment", "tuple_grads"],
)
def test_remembered_checks_catch_changes_between_donated_steps(edit):
    """Each change between two donated steps makes the hot path plan from scratch (or fall back)
    and gives the pure step's numbers, never a write through stale checks."""
    tx = funcopt.adam(1e-2)
    p, s, grads = _hot_problem(tx)
    key = "0.weight"
    if edit == "resize":
        p[key].resize_(2)  # same memory, fewer elements: the kernel would write past them
    elif edit == "data_swap":
        p[key].data = p[key].clone() + 1
    elif edit == "requires_grad":
        p[key].requires_grad_()
    elif edit == "noncontiguous_grad":
        grads = dict(grads, **{key: grads[key].t().contiguous().t()})
    elif edit == "grad_of_other_shape":
        grads = dict(grads, **{key: grads[key].reshape(4, 8)})
    elif edit == "grad_requires_grad":
        grads = dict(grads, **{key: grads[key].clone().requires_grad_()})
    elif edit == "grad_aliases_moment":
        grads = dict(grads, **{key: s[0].mu[key]})
    fast = tx.update._funcopt_fast_path
    assert fast.memo is not None and fast.memo.state is s
    if edit == "tuple_grads":
        assert fast.memo.replan(tuple(grads.values()), s, p) is None
        return
    assert fast.memo.replan(grads, s, p) is None
    if edit == "resize":  # the reference update runs; its input checks name the leaf
        with pytest.raises(funcopt.FuncoptError, match=r"gradient at \['0.weight'\] has shape \(8, 4\) but the parameter has \(2,\)"):
            apply_gradients(tx, grads, s, p, donate=True)
        return
    if edit == "grad_of_other_shape":
        with pytest.raises(funcopt.FuncoptError, match=r"gradient at \['0.weight'\] has shape \(4, 8\) but the parameter has \(8, 4\)"):
            apply_gradients(tx, grads, s, p, donate=True)
        return
    before = (tree.map(lambda x: x.detach().clone(), p), tree.map(torch.clone, s))
    u, expected_state = tx.update(tree.map(lambda g: g.detach(), grads), *before[1:], before[0])
    expected = funcopt.apply_updates(before[0], u)
    got_p, got_s = apply_gradients(tx, grads, s, p, donate=True)
    assert_trees_close(tree.map(torch.detach, got_p), expected, rtol=1e-12, atol=1e-14)
    assert_trees_close(got_s, expected_state, rtol=1e-12, atol=1e-14)


def test_hot_path_takes_a_new_dict_with_the_same_tensors_and_nested_trees():
    """The remembered plan reads a flat dict by key and other trees by flattening."""
    w = torch.randn(3, 2, dtype=torch.float64)
    b = torch.randn(2, dtype=torch.float64)
    for make in (lambda w, b: {"w": w, "b": b}, lambda w, b: {"layer": {"w": w, "b": b}}, lambda w, b: (w, b)):
        params = make(w.clone(), b.clone())
        tx = funcopt.sgd(0.1, momentum=0.9)
        ref_p, ref_s = _clone(params), tx.init(params)
        state = tx.init(params)
        for k in range(3):
            grads = make(torch.full_like(w, 0.5 + k), torch.full_like(b, -1.0 - k))
            u, ref_s = tx.update(grads, ref_s, ref_p)
            ref_p = funcopt.apply_updates(ref_p, u)
            params, state = apply_gradients(tx, grads, state, params, donate=True)
            if k >= 1:
                assert tx.update._funcopt_fast_path.memo.state is state
        assert_trees_close(params, ref_p, rtol=1e-13, atol=1e-15)
        assert_trees_close(state, ref_s, rtol=1e-13, atol=1e-15)
    # A dict with the keys in another insertion order is read in optree's (sorted) order.
    params = {"b": b.clone(), "w": w.clone()}
    tx = funcopt.sgd(0.1)
    state = tx.init(params)
    params, state = apply_gradients(tx, {"w": torch.ones_like(w), "b": torch.ones_like(b)}, state, params, donate=True)
    params, state = apply_gradients(tx, {"b": torch.ones_like(b), "w": torch.ones_like(w)}, state, params, donate=True)
    torch.testing.assert_close(params["w"], w - 0.2)
    torch.testing.assert_close(params["b"], b - 0.2)


def test_generic_donated_path_never_writes_params_the_new_state_holds():
    """A transformation whose state keeps the params tensors must not see them change."""

    def init(params):
        return {"last": tree.map(torch.clone, params)}

    def update(updates, state, params=None):
        return tree.map(lambda g: -0.1 * g, updates), {"last": params}

    tx = funcopt.GradientTransformation(init, update)
    params = {"w": torch.ones(3, dtype=torch.float64)}
    new_p, new_s = apply_gradients(tx, {"w": torch.ones(3, dtype=torch.float64)}, tx.init(params), params, donate=True)
    torch.testing.assert_close(new_s["last"]["w"], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(new_p["w"], torch.full((3,), 0.9, dtype=torch.float64))


def test_step_gradients_equal_torch_func_including_aux_and_unused_params():
    _, params, loss_fn, (X, Y) = mlp_problem(torch.float64)
    params = dict(params, unused=torch.ones(2, dtype=torch.float64))
    tx = funcopt.sgd(0.1)

    def with_aux(p, x, y):
        loss = loss_fn({k: v for k, v in p.items() if k != "unused"}, x, y)
        return loss, {"twice": 2 * loss}

    grads, (loss, aux) = torch.func.grad_and_value(with_aux, has_aux=True)(params, X, Y)
    expected = funcopt.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    p, _, got_loss, got_aux = make_step(with_aux, tx, has_aux=True, donate=False)(params, tx.init(params), X, Y)
    assert_trees_close(p, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_loss, loss)
    torch.testing.assert_close(got_aux["twice"], aux["twice"])
    assert not got_loss.requires_grad and not got_aux["twice"].requires_grad
    assert torch.equal(p["unused"], params["unused"])
    # a loss that does not depend on the params gives zero gradients, as torch.func does
    p, _, _ = make_step(lambda p: torch.tensor(1.0), tx, donate=False)(params, tx.init(params))
    assert_trees_equal(p, params)


@pytest.mark.parametrize("name", registry.names(fast=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pure_apply_gradients_runs_the_kernels_on_copies(name, dtype):
    """apply_gradients(donate=False) with a fast path: the kernels write fresh copies of the
    params and state; the result equals update + apply_updates (fast and reference paths),
    the inputs keep their values and version counters, and nothing in the result aliases them."""
    _, params, loss_fn, _ = mlp_problem(dtype)
    tx = registry.make(name)
    state = tx.init(params)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    fast = tx.update._funcopt_fast_path
    for _ in range(3):
        grads, value = torch.func.grad_and_value(loss_fn)(params)
        extras = registry.update_kwargs(name, value)  # value= for rows that read the loss
        assert fast.pure_step(grads, state, params) is not None  # the kernels' path applies
        before = snapshot((params, state, grads))
        versions = [x._version for x in tree.leaves((params, state, grads))]
        new_p, new_s = apply_gradients(tx, grads, state, params, **extras)
        assert_trees_equal((params, state, grads), before)
        assert versions == [x._version for x in tree.leaves((params, state, grads))]
        inputs = {x.data_ptr() for x in tree.leaves((params, state, grads)) if x.numel()}
        assert not inputs & {x.data_ptr() for x in tree.leaves((new_p, new_s)) if x.numel()}
        u, s_fast = tx.update(grads, state, params, **extras)
        assert_trees_close((new_p, new_s), (funcopt.apply_updates(params, u), s_fast), **tol)
        with funcopt.fused.fast_path_enabled(False):
            u, s_ref = tx.update(grads, state, params, **extras)
        assert_trees_close((new_p, new_s), (funcopt.apply_updates(params, u), s_ref), **tol)
        assert tree.structure(new_s) == tree.structure(s_ref)
        params, state = new_p, new_s


def test_grad_and_value_equals_torch_func_inside_and_outside_transforms():
    """funcopt.grad_and_value runs autograd where it can and torch.func elsewhere: the same
    gradients and values as torch.func.grad_and_value in every case."""
    _, params, loss_fn, (X, Y) = mlp_problem(torch.float64)

    def with_aux(p, x, y):
        loss = loss_fn(p, x, y)
        return loss, {"twice": 2 * loss}

    cases = [
        (funcopt.grad_and_value(loss_fn), torch.func.grad_and_value(loss_fn), params),
        (funcopt.grad_and_value(with_aux, has_aux=True), torch.func.grad_and_value(with_aux, has_aux=True), params),
        # params requiring grad: the torch.func route
        (funcopt.grad_and_value(loss_fn), torch.func.grad_and_value(loss_fn), tree.map(lambda t: t.clone().requires_grad_(), params)),
    ]
    for i, (ours, theirs, p) in enumerate(cases):
        got, expected = ours(p, X, Y), theirs(p, X, Y)
        assert_trees_close(got, expected, rtol=1e-13, atol=1e-15)
        assert [t.requires_grad for t in tree.leaves(got)] == [t.requires_grad for t in tree.leaves(expected)]
        assert i == 2 or not any(t.requires_grad for t in tree.leaves(got))
    # under vmap (an ensemble of two): torch.func's own route
    stacked = tree.map(lambda t: torch.stack([t, 1.5 * t]), params)
    got = torch.func.vmap(funcopt.grad_and_value(loss_fn), in_dims=(0, None, None))(stacked, X, Y)
    expected = torch.func.vmap(torch.func.grad_and_value(loss_fn), in_dims=(0, None, None))(stacked, X, Y)
    assert_trees_close(got, expected, rtol=1e-13, atol=1e-15)
    # finite differences on one coordinate (an independent oracle)
    grads, value = funcopt.grad_and_value(loss_fn)(params, X, Y)
    k = next(iter(params))
    bumped = dict(params, **{k: params[k].clone()})
    bumped[k].view(-1)[0] += 1e-6
    fd = (loss_fn(bumped, X, Y) - value) / 1e-6
    assert abs(float(fd) - float(grads[k].view(-1)[0])) < 1e-5
    with pytest.raises(TypeError, match="callable"):
        funcopt.grad_and_value(3)
