"""Trajectories against optax itself: every registry row with an optax oracle, 50 float64 steps.

funcopt and optax (JAX on CPU, x64) start from the same params and follow the same gradients
(computed by torch from each side's own current params, so the objective is written once).
After every step the params must agree to the row's ``optax_rtol`` (1e-9 unless the row says
why not). ``max_relative_difference`` is also what the catalog table in the docs reports.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from tests import registry

jax = pytest.importorskip("jax", reason="the optax oracle needs jax (pip install -e '.[test]')")
optax = pytest.importorskip("optax", reason="the optax oracle needs optax (pip install -e '.[test]')")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

STEPS = 50
SHAPES = {"w": (5, 4), "b": (4,), "k": (3, 2, 2)}


def initial_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _targets() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


TARGETS = _targets()


def objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A smooth, non-quadratic loss with different curvature per leaf (minimum near TARGETS)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, (k, p) in enumerate(sorted(params.items())):
        d = p - TARGETS[k]
        total = total + (i + 1) * 0.5 * (d * d).sum() + 0.05 * (d**4).sum() + 0.1 * torch.cos(p).sum()
    return total


def value_and_grad(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = objective(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def optax_transformation(row: registry.Row):
    """``optax.<name>(**kwargs)`` for a dotted name such as ``contrib.prodigy`` (or the row's
    ``optax_factory(**kwargs)`` where optax's counterpart takes optax objects)."""
    if row.optax_factory is not None:
        return row.optax_factory(**row.optax_kwargs)
    *modules, name = row.optax_name.split(".")
    namespace = importlib.import_module(".".join(["optax", *modules]))
    return getattr(namespace, name)(**row.optax_kwargs)


def _to_jax(tree):
    return {k: jnp.asarray(v.numpy()) for k, v in tree.items()}


def _to_torch(tree):
    return {k: torch.from_numpy(np.array(v)) for k, v in tree.items()}


def trajectories(name: str, steps: int = STEPS):
    """The params after each step, funcopt's and optax's: two lists of dicts of float64 tensors."""
    row = registry.row(name)
    tx, otx = registry.make(name), optax_transformation(row)
    params = initial_params()
    oparams = _to_jax(params)
    state, ostate = tx.init(params), otx.init(oparams)
    ours, theirs = [], []
    for _ in range(steps):
        value, grads = value_and_grad(params)
        extras = {k: value for k in row.update_extras}
        updates, state = tx.update(grads, state, params, **extras)
        params = {k: params[k] + updates[k] for k in params}

        ovalue, ograds = value_and_grad(_to_torch(oparams))
        oextras = {k: jnp.asarray(ovalue.numpy()) for k in row.update_extras}
        oupdates, ostate = otx.update(_to_jax(ograds), ostate, oparams, **oextras)
        oparams = optax.apply_updates(oparams, oupdates)
        ours.append(params)
        theirs.append(_to_torch(oparams))
    return ours, theirs


def max_relative_difference(name: str, steps: int = STEPS) -> float:
    """The largest |ours - optax| / max(|optax|, 1e-3) over all elements and steps."""
    ours, theirs = trajectories(name, steps)
    worst = 0.0
    for a, b in zip(ours, theirs):
        for k in a:
            scale = b[k].abs().clamp_min(1e-3)
            worst = max(worst, float(((a[k] - b[k]).abs() / scale).max()))
    return worst


@pytest.mark.parametrize("name", registry.names(optax=True))
def test_trajectory_matches_optax(name):
    row = registry.row(name)
    ours, theirs = trajectories(name)
    moved = max(float((ours[-1][k] - initial_params()[k]).abs().max()) for k in SHAPES)
    assert moved > 1e-6, f"{name}: the params did not move in {STEPS} steps; the comparison proves nothing"
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            assert torch.isfinite(a[k]).all(), f"{name}: non-finite params at step {step}, leaf {k!r}"
            torch.testing.assert_close(
                a[k], b[k], rtol=row.optax_rtol, atol=row.optax_rtol * 1e-3,
                msg=lambda m, step=step, k=k: f"{name}: step {step}, leaf {k!r}: {m}",
            )


_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("params_dtype, mu_dtype", [
    ("float64", "bfloat16"), ("float32", "bfloat16"), ("float32", "float64"), ("bfloat16", "float32"),
])
@pytest.mark.parametrize("name", ["adam", "adamw", "amsgrad", "nadamw", "lion", "optimistic_adam_v2"])
def test_mu_dtype_follows_optax(name, params_dtype, mu_dtype):
    # the first moment stored in mu_dtype, narrower or wider than the params: optax's stored
    # values exactly, and its updates to the params' precision (the second moment, in the
    # params' dtype, is a torch lerp here and optax's own formula there)
    import jax.numpy as jnp

    factory = getattr(__import__("funcopt"), name)
    tx = factory(learning_rate=1e-2, mu_dtype=_DTYPES[mu_dtype])
    otx = getattr(optax, name)(learning_rate=1e-2, mu_dtype=mu_dtype)
    p, op = torch.zeros(64, dtype=_DTYPES[params_dtype]), jnp.zeros(64, dtype=params_dtype)
    state, ostate = tx.init(p), otx.init(op)
    g = torch.Generator().manual_seed(0)
    rtol = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 5e-2}[params_dtype]
    for _ in range(20):
        grad = torch.randn(64, generator=g, dtype=torch.float64).to(_DTYPES[params_dtype])
        u, state = tx.update(grad, state, p)
        ou, ostate = otx.update(jnp.asarray(grad.double().numpy()).astype(params_dtype), ostate, op)
        assert str(u.dtype).removeprefix("torch.") == str(ou.dtype)
        theirs = torch.from_numpy(np.asarray(ou.astype(jnp.float64)))
        torch.testing.assert_close(u.double(), theirs, rtol=rtol, atol=rtol * 1e-2)
        mu, omu = state[0].mu, ostate[0].mu
        assert mu.dtype == _DTYPES[mu_dtype] and str(omu.dtype) == mu_dtype
        assert torch.equal(mu.double(), torch.from_numpy(np.asarray(omu.astype(jnp.float64))))
