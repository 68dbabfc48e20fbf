"""Schedule-Free learning: the wrapper that replaces momentum and LR decay by interpolation and averaging.

Part of ``funcopt.transforms`` (import the blocks from there or from ``funcopt``). The numerics
follow ``optax.contrib.schedule_free`` (optax 0.2.8), which computes what Meta's
``schedulefree`` package computes (see ``docs/contrib.md`` for where the two differ).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    FuncoptError,
    GradientTransformation,
    PyTree,
    ScalarOrSchedule,
    check_state,
    require_params,
    stable_name,
)
from funcopt.transforms._common import (
    _check_range,
    _find_states,
    _scalar_state,
    _value_at,
    check_beta,
    check_learning_rate,
    check_non_negative,
    init_count,
)
from funcopt.transforms._moments import _bias_corrections, _ema_of_squares, _moment_block

__all__ = [
    "ScheduleFreeState",
    "ScaleByBiasCorrectedRmsState",
    "schedule_free",
    "schedule_free_eval_params",
    "scale_by_bias_corrected_rms",
]


@stable_name("funcopt.ScheduleFreeState")
class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free`.

    ``count``: 0-dim int64 number of updates; ``b1``: the interpolation weight of the last
    step (0-dim float64, read by :func:`schedule_free_eval_params`); ``weight_sum`` and
    ``max_lr``: 0-dim float64 running sum of averaging weights and largest learning rate so
    far; ``base_optimizer_state``: the wrapped optimizer's state; ``z``: the base optimizer's
    iterate, shaped like the params.
    """

    count: torch.Tensor
    b1: torch.Tensor
    weight_sum: torch.Tensor
    max_lr: torch.Tensor
    base_optimizer_state: Any
    z: PyTree


def schedule_free(
    base_optimizer: GradientTransformation,
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Makes ``base_optimizer`` schedule-free, like ``optax.contrib.schedule_free``.

    The params the training loop holds are the gradient points ``y``; the state keeps the base
    optimizer's iterate ``z`` (one params-sized buffer), and the averaged iterate ``x`` (the one
    to evaluate) is ``(y - (1 - b1) z) / b1`` (:func:`schedule_free_eval_params`). Each step

        z' = z + base_update(g(y)),   x' = (1 - c) x + c z',   y' = b1 x' + (1 - b1) z',

    with ``c = w / sum(w)`` and ``w = max_lr**weight_lr_power`` (``max_lr``: the largest
    learning rate so far). The base optimizer should have no momentum of its own.

    Args:
        base_optimizer: the transformation whose updates move ``z`` (its learning rate included).
        learning_rate: the base optimizer's learning rate (float, 0-dim tensor or schedule),
            read here for the averaging weights only. A schedule is evaluated at the 1-based
            step (optax's ``step_count``), while the base optimizer's own learning-rate block
            evaluates it at the 0-based count, as in optax.
        b1: interpolation between ``x`` and ``z``, in (0, 1] (0.9).
        weight_lr_power: exponent of the learning rate in the averaging weights (2.0).

    References: Defazio et al., "The Road Less Scheduled", 2024, arXiv 2405.15682.
    """
    if not isinstance(base_optimizer, GradientTransformation):
        raise FuncoptError(
            f"schedule_free: base_optimizer must be a GradientTransformation, got {type(base_optimizer).__name__}. "
            "Pass e.g. funcopt.sgd(1.0) (note the call)."
        )
    check_learning_rate(learning_rate)
    _check_range("b1", b1, 0.0, 1.0, low_open=True)
    check_non_negative("weight_lr_power", weight_lr_power)

    def init(params):
        count = init_count(params)
        return ScheduleFreeState(
            count=count,
            b1=_scalar_state(b1, count),
            weight_sum=_scalar_state(0.0, count),
            max_lr=_scalar_state(0.0, count),
            base_optimizer_state=base_optimizer.init(params),
            z=_tree.map(torch.clone, params),
        )

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScheduleFreeState, "schedule_free")
        require_params(params, "schedule_free")
        lr = _value_at(learning_rate, state.count + 1)
        max_lr = torch.maximum(state.max_lr, torch.as_tensor(lr, dtype=state.max_lr.dtype, device=state.max_lr.device))
        weight = max_lr**weight_lr_power
        weight_sum = state.weight_sum + weight
        nan = torch.isnan(weight) | torch.isnan(weight_sum)
        ck = torch.where(nan, torch.nan, torch.nan_to_num(weight / weight_sum, nan=0.0, posinf=torch.inf))
        base_updates, base_state = base_optimizer.update(updates, state.base_optimizer_state, params, **extra_args)
        z = _tree.map(lambda z0, u: (z0 + u).to(z0.dtype), state.z, base_updates, names=("z", "updates"))

        def step(y, z_old, z_new):
            x = (y - (1.0 - b1) * z_old) / b1
            x = (1.0 - ck) * x + ck * z_new
            return (b1 * x + (1.0 - b1) * z_new - y).to(y.dtype)

        new_updates = _tree.map(step, params, state.z, z, names=("params", "z", "z"))
        b1_now = torch.as_tensor(b1, dtype=state.b1.dtype, device=state.b1.device)
        return new_updates, ScheduleFreeState(state.count + 1, b1_now, weight_sum, max_lr, base_state, z)

    return GradientTransformation(init, update)


def schedule_free_eval_params(state: Any, params: PyTree) -> PyTree:
    """The params to evaluate a schedule-free model at, like ``optax.contrib.schedule_free_eval_params``.

    Training holds the gradient points ``y``; this returns the averaged iterate
    ``x = (y - (1 - b1) z) / b1`` (what ``schedulefree``'s ``optimizer.eval()`` puts into the
    model). ``state`` is the optimizer's state, or any pytree holding exactly one
    :class:`ScheduleFreeState` (e.g. inside ``inject_hyperparams`` or a chain). Pure: returns
    new tensors.
    """
    found = _find_states(state, ScheduleFreeState)
    if len(found) != 1:
        what = "no ScheduleFreeState" if not found else f"{len(found)} ScheduleFreeStates"
        raise FuncoptError(
            f"schedule_free_eval_params: the state holds {what}. Pass the state of a schedule-free "
            "optimizer (funcopt.schedule_free_adamw, schedule_free_sgd or schedule_free(...)); for a "
            "state holding several, pass the one that belongs to these params."
        )
    sf = found[0]
    b1 = sf.b1
    return _tree.map(
        lambda y, z: ((y - (1.0 - b1) * z) / b1).to(y.dtype), params, sf.z, names=("params", "state.z")
    )


@stable_name("funcopt.ScaleByBiasCorrectedRmsState")
class ScaleByBiasCorrectedRmsState(NamedTuple):
    """State of :func:`scale_by_bias_corrected_rms`: count and the mean square ``nu`` shaped like the params."""

    count: torch.Tensor
    nu: PyTree


def scale_by_bias_corrected_rms(decay: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam without its first moment: ``g / (sqrt(nu / (1 - decay**t)) + eps)``.

    ``nu = decay * nu + (1 - decay) * g**2``. This is the base of :func:`schedule_free_adamw`
    (``optax.scale_by_rms(decay, eps, eps_in_sqrt=False, bias_correction=True)``); unlike
    ``scale_by_adam(b1=0.0)`` it keeps no first-moment buffer.
    """
    check_beta("decay", decay)
    check_non_negative("eps", eps)

    def advance(updates, state):
        (bc,) = _bias_corrections(state.count, decay)
        nu = _ema_of_squares(state.nu, updates, decay, names=("nu", "updates"))
        out = _tree.map(lambda g, v: g / (torch.sqrt(v / bc.to(v.dtype)) + eps), updates, nu)
        return out, (nu,)

    return _moment_block("scale_by_bias_corrected_rms", ScaleByBiasCorrectedRmsState, 1, advance)
