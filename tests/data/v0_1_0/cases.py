"""The optimizer configurations and the problem shared by ``make_fixtures.py`` and
``tests/test_checkpoint_compat.py`` (both load this file by its path with importlib).

Defined once here so the fixtures and the test cannot drift apart. Uses only funcopt's public
API (``funcopt.X``, ``funcopt.schedules.X``), torch and optree.

Each case is trained for ``K`` steps from ``make_problem(dtype)``, saved as
``<case>.safetensors`` (``{"params", "opt_state", "step", "data"}``), then trained ``M`` more
steps; ``<case>.expected.safetensors`` holds ``{"params", "opt_state", "step"}`` after those
``M`` steps. Step ``t`` (0-based, global) uses mini-batch ``t % NUM_BATCHES`` of the stored data,
so the gradients are a pure function of the params, the stored data and ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import funcopt
from funcopt import schedules

HERE = Path(__file__).resolve().parent
K = 4  # steps before the checkpoint
M = 5  # steps after it (the expected file)
NUM_BATCHES = 4
SEED = 20240601

# CheckpointManager fixture (MANAGER_CASE below): one file per step 1..MANAGER_STEPS.
MANAGER_DIR = "manager"
MANAGER_INIT = "manager_init.safetensors"
MANAGER_STEPS = 3


@dataclass(frozen=True)
class Case:
    make_tx: Callable[[], funcopt.GradientTransformation]
    dtype: torch.dtype = torch.float64
    # "grad": update(grads, state, params); "value": also value=loss (reduce_on_plateau);
    # "lbfgs": full-batch loss, value/grad from value_and_grad_from_state, value_fn= for the line search
    mode: str = "grad"
    # global step indices whose gradients are made non-finite (apply_if_finite)
    nonfinite_steps: tuple[int, ...] = ()


CASES: dict[str, Case] = {
    "sgd": Case(lambda: funcopt.sgd(0.1)),
    "sgd_momentum_nesterov_wd": Case(
        lambda: funcopt.sgd(0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2)),
    "adam": Case(lambda: funcopt.adam(learning_rate=2e-2)),
    "adam_amsgrad_wd": Case(lambda: funcopt.adam(learning_rate=2e-2, weight_decay=1e-2, amsgrad=True)),
    "adamw": Case(lambda: funcopt.adamw(learning_rate=2e-2, weight_decay=5e-2)),
    "adamw_schedule": Case(lambda: funcopt.adamw(
        learning_rate=schedules.warmup_cosine_decay(0.0, 3e-2, warmup_steps=3, decay_steps=12),
        weight_decay=5e-2)),
    "adamax": Case(lambda: funcopt.adamax(learning_rate=2e-2)),
    "nadam": Case(lambda: funcopt.nadam(learning_rate=2e-2)),
    "radam": Case(lambda: funcopt.radam(learning_rate=2e-2)),
    "rmsprop_centered_momentum": Case(
        lambda: funcopt.rmsprop(learning_rate=1e-2, momentum=0.9, centered=True)),
    "adagrad_lr_decay": Case(lambda: funcopt.adagrad(learning_rate=5e-2, lr_decay=0.1)),
    "lion": Case(lambda: funcopt.lion(learning_rate=3e-3, weight_decay=1e-2)),
    "lamb": Case(lambda: funcopt.lamb(learning_rate=2e-2, weight_decay=1e-2)),
    "chain_clip_adam": Case(
        lambda: funcopt.chain(funcopt.clip_by_global_norm(1.0), funcopt.adam(learning_rate=2e-2))),
    "inject_adam": Case(lambda: funcopt.inject_hyperparams(funcopt.adam)(learning_rate=2e-2, b1=0.85)),
    "inject_sgd_schedule": Case(lambda: funcopt.inject_hyperparams(funcopt.sgd)(
        learning_rate=schedules.cosine_decay(0.1, decay_steps=10, alpha=0.1), momentum=0.9)),
    "masked_adam": Case(lambda: funcopt.masked(funcopt.adam(learning_rate=2e-2), {"w": True, "b": False})),
    "multi_transform": Case(lambda: funcopt.multi_transform(
        {"fast": funcopt.adam(learning_rate=2e-2), "slow": funcopt.sgd(0.05, momentum=0.9)},
        {"w": "fast", "b": "slow"})),
    "apply_if_finite_adam": Case(
        lambda: funcopt.apply_if_finite(funcopt.adam(learning_rate=2e-2), max_consecutive_errors=3),
        nonfinite_steps=(2, 5, 6)),
    "accumulate_adam": Case(lambda: funcopt.accumulate(funcopt.adam(learning_rate=2e-2), every_k=3)),
    "sgd_reduce_on_plateau": Case(
        lambda: funcopt.chain(funcopt.sgd(0.2, momentum=0.9),
                              funcopt.reduce_on_plateau(factor=0.5, patience=1, threshold=0.2, cooldown=1)),
        mode="value"),
    "lbfgs": Case(lambda: funcopt.lbfgs(), mode="lbfgs"),
    "adam_float32": Case(lambda: funcopt.adam(learning_rate=2e-2), dtype=torch.float32),
}


def make_problem(dtype: torch.dtype = torch.float64) -> tuple[dict, dict]:
    """Initial params ``{"w": (3, 4), "b": (4,)}`` and data ``{"x": (B, 6, 3), "y": (B, 6, 4)}``."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(NUM_BATCHES, 6, 3, generator=g, dtype=torch.float64)
    w_true = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ w_true) + 0.1 * torch.randn(NUM_BATCHES, 6, 4, generator=g, dtype=torch.float64)
    w = 0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(4, generator=g, dtype=torch.float64)
    params = {"w": w.to(dtype), "b": b.to(dtype)}
    data = {"x": x.to(dtype), "y": y.to(dtype)}
    return params, data


def loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A smooth non-quadratic least-squares loss with an L2 term (0-dim)."""
    pred = torch.tanh(x @ params["w"] + params["b"])
    return ((pred - y) ** 2).mean() + 0.01 * (params["w"] ** 2).sum()


def step(case: Case, tx: funcopt.GradientTransformation, params: dict, state, data: dict, t: int):
    """One training step at global step ``t``; returns ``(params, state)``."""
    if case.mode == "lbfgs":
        x = data["x"].reshape(-1, data["x"].shape[-1])
        y = data["y"].reshape(-1, data["y"].shape[-1])

        def value_fn(p):
            return loss(p, x, y)

        value, grads = funcopt.value_and_grad_from_state(value_fn)(params, state)
        updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=value_fn)
    else:
        i = t % NUM_BATCHES
        grads, value = torch.func.grad_and_value(loss)(params, data["x"][i], data["y"][i])
        if t in case.nonfinite_steps:
            grads = {k: g * math.inf for k, g in grads.items()}
        extra = {"value": value} if case.mode == "value" else {}
        updates, state = tx.update(grads, state, params, **extra)
    return funcopt.apply_updates(params, updates), state


def run(case: Case, tx, params: dict, state, data: dict, start: int, num_steps: int):
    """Steps ``start .. start + num_steps - 1``; returns ``(params, state)``."""
    for t in range(start, start + num_steps):
        params, state = step(case, tx, params, state, data, t)
    return params, state


# The CheckpointManager fixture: adam, checkpoints after steps 1, 2 and 3.
MANAGER_CASE = Case(lambda: funcopt.adam(learning_rate=2e-2))
