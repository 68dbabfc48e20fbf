"""GradientTransformation, chain, identity, apply_updates and the small building blocks."""

import pytest
import torch

import funcopt
from funcopt import tree


def test_identity_and_chain_compose_in_order():
    params = {"w": torch.ones(3)}
    g = {"w": torch.tensor([1.0, -2.0, 3.0])}
    u, _ = funcopt.identity().update(g, funcopt.identity().init(params))
    assert u is g
    tx = funcopt.chain(funcopt.scale(2.0), funcopt.clip(3.0), funcopt.scale(-1.0))
    u, state = tx.update(g, tx.init(params), params)
    torch.testing.assert_close(u["w"], torch.tensor([-2.0, 3.0, -3.0]))
    assert isinstance(state, tuple) and len(state) == 3


def test_chain_passes_extra_args_to_every_member():
    seen = []

    def recorder():
        def init(params):
            return funcopt.EmptyState()

        def update(updates, state, params=None, **extra):
            seen.append(extra)
            return updates, state

        return funcopt.GradientTransformation(init, update)

    tx = funcopt.chain(recorder(), recorder())
    tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}), value=3)
    assert seen == [{"value": 3}, {"value": 3}]


def test_apply_updates_keeps_param_dtype():
    p = {"w": torch.ones(2, dtype=torch.float16)}
    out = funcopt.apply_updates(p, {"w": torch.ones(2, dtype=torch.float32) * 0.5})
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], torch.full((2,), 1.5, dtype=torch.float16))


def test_clip_by_global_norm_only_shrinks():
    g = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    tx = funcopt.clip_by_global_norm(1.0)
    u, _ = tx.update(g, tx.init(g))
    torch.testing.assert_close(tree.norm(u), torch.tensor(1.0))
    torch.testing.assert_close(u["a"] / u["b"], torch.tensor([0.75]))
    small, _ = funcopt.clip_by_global_norm(10.0).update(g, ())
    assert torch.equal(small["a"], g["a"])
    with pytest.raises(funcopt.FuncoptError, match="max_norm must lie in"):
        funcopt.clip_by_global_norm(0.0)


def test_trust_ratio_per_leaf_and_zero_norm_guard():
    params = {"a": torch.tensor([3.0, 4.0]), "z": torch.zeros(2)}
    updates = {"a": torch.tensor([0.0, 1.0]), "z": torch.tensor([1.0, 1.0])}
    u, _ = funcopt.scale_by_trust_ratio().update(updates, (), params)
    torch.testing.assert_close(u["a"], torch.tensor([0.0, 5.0]))  # ||p|| / ||u|| = 5
    torch.testing.assert_close(u["z"], updates["z"])  # ratio 1 where ||p|| = 0


def test_add_decayed_weights_with_mask_function():
    params = {"w": torch.ones(2), "bias": torch.ones(2)}
    tx = funcopt.add_decayed_weights(0.5, mask=lambda p: {k: k != "bias" for k in p})
    u, _ = tx.update(tree.zeros_like(params), tx.init(params), params)
    torch.testing.assert_close(u["w"], torch.full((2,), 0.5))
    torch.testing.assert_close(u["bias"], torch.zeros(2))


def test_scale_by_schedule_counts_from_zero():
    tx = funcopt.scale_by_schedule(lambda c: c * 10)
    g = {"w": torch.ones(1)}
    state = tx.init(g)
    got = []
    for _ in range(3):
        u, state = tx.update(g, state)
        got.append(float(u["w"]))
    assert got == [0.0, 10.0, 20.0]
    assert int(state.count) == 3


def test_learning_rate_block_flips_sign_and_accepts_tensors():
    g = {"w": torch.ones(1)}
    u, _ = funcopt.scale_by_learning_rate(torch.tensor(0.1)).update(g, ())
    torch.testing.assert_close(u["w"], torch.tensor([-0.1]))
    u, _ = funcopt.scale_by_learning_rate(0.1, flip_sign=False).update(g, ())
    torch.testing.assert_close(u["w"], torch.tensor([0.1]))


def test_scale_by_adam_eps_root_form():
    g = {"w": torch.tensor([0.5, -2.0], dtype=torch.float64)}
    tx = funcopt.scale_by_adam(eps=0.0, eps_root=1e-2)
    u, state = tx.update(g, tx.init(g))
    # first step: m_hat = g, v_hat = g^2 -> g / sqrt(g^2 + eps_root)
    torch.testing.assert_close(u["w"], g["w"] / torch.sqrt(g["w"] ** 2 + 1e-2))
    assert state.nu_max == ()


def test_extra_args_are_accepted_by_every_block():
    g = {"w": torch.ones(2)}
    for tx in [
        funcopt.scale_by_adam(), funcopt.scale_by_adamax(), funcopt.scale_by_nadam(), funcopt.scale_by_radam(),
        funcopt.scale_by_lion(), funcopt.scale_by_rms(), funcopt.scale_by_rss(), funcopt.trace(0.9),
        funcopt.clip(1.0), funcopt.clip_by_global_norm(1.0), funcopt.scale(2.0), funcopt.identity(),
    ]:
        u, _ = tx.update(g, tx.init(g), g, value=1.0, grad=g, value_fn=lambda p: 0.0)
        assert torch.isfinite(u["w"]).all()


def test_apply_updates_multi_tensor_path_equals_leafwise_and_is_pure():
    """Plain equal-dtype leaves go through one torch._foreach_add; mixed leaves leaf by leaf."""
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.nn.Parameter(torch.randn(3, 2, generator=gen), requires_grad=False),
              "b": torch.randn(2, generator=gen), "s": torch.randn((), generator=gen)}
    updates = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    before = {k: v.clone() for k, v in params.items()}
    out = funcopt.apply_updates(params, updates)
    for k in params:
        assert torch.equal(out[k], before[k] + updates[k]) and out[k] is not params[k]
        assert type(out[k]) is torch.Tensor and torch.equal(params[k], before[k])
    # float64 updates on float32 params: leaf by leaf, cast back to the params' dtype
    mixed = funcopt.apply_updates(params, {k: v.double() for k, v in updates.items()})
    assert all(mixed[k].dtype == torch.float32 for k in mixed)
    # params requiring grad keep the graph (leaf by leaf)
    leafy = {k: v.clone().requires_grad_() for k, v in before.items()}
    assert all(x.requires_grad for x in funcopt.apply_updates(leafy, updates).values())


def test_transforms_package_exports_the_helpers_for_writing_blocks_and_state_type_hints_resolve():
    """The validation helpers are public in funcopt.transforms, and every state type's
    annotations resolve (typing.get_type_hints) in the module that defines it."""
    import typing

    import funcopt.transforms as T

    helpers = ["first_device", "init_count", "is_python_zero", "injected_states"]
    helpers += ["check_learning_rate", "check_beta", "check_non_negative"]
    assert all(callable(getattr(T, name)) and name in T.__all__ for name in helpers)
    states = [getattr(T, n) for n in T.__all__ if isinstance(getattr(T, n), type) and hasattr(getattr(T, n), "_fields")]
    assert len(states) >= 8
    for cls in states:
        assert list(typing.get_type_hints(cls)) == list(cls._fields)


def test_apply_updates_never_broadcasts_and_names_the_leaf():
    params = {"enc": {"w": torch.zeros(1, 3)}, "b": torch.zeros(3)}
    updates = {"enc": {"w": torch.ones(4, 3)}, "b": torch.ones(3)}
    with pytest.raises(funcopt.FuncoptError, match=r"update at \['enc'\]\['w'\] has shape \(4, 3\) but the parameter has \(1, 3\)"):
        funcopt.apply_updates(params, updates)
    with pytest.raises(funcopt.FuncoptError, match=r"update at \['enc'\]\['w'\] has shape \(1, 3\)"):
        funcopt.apply_updates(updates, params)


def test_apply_updates_refuses_integer_and_bool_params():
    for dtype in (torch.int64, torch.bool):
        params = {"n": torch.zeros(6, dtype=dtype), "w": torch.zeros(2)}
        with pytest.raises(funcopt.FuncoptError, match=rf"parameter at \['n'\] has dtype {dtype}.*truncate"):
            funcopt.apply_updates(params, {"n": torch.full((6,), 0.4), "w": torch.ones(2)})


def test_apply_updates_on_a_module_points_to_nn_extract():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(funcopt.FuncoptError, match=r"funcopt.nn.extract\(model\)"):
        funcopt.apply_updates(model, {})


def test_apply_updates_still_adds_mixed_dtypes_and_complex_leaf_by_leaf():
    params = {"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.complex64)}
    out = funcopt.apply_updates(params, {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.complex64)})
    assert out["a"].dtype == torch.float32 and torch.equal(out["b"], torch.ones(2, dtype=torch.complex64))
