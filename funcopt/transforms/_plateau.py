"""``reduce_on_plateau``: scale updates down when a monitored loss stops improving.

The functional form of ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (and of
``optax.contrib.reduce_on_plateau``): a ``GradientTransformation`` that multiplies the updates by
a ``scale`` held in its state. The loss arrives through ``update(..., value=loss)``; every
counter of torch's rule (best value, bad epochs, cooldown) is a tensor in the state, and every
decision is a ``torch.where``, so the transformation runs under ``vmap`` and ``torch.compile``
and is saved with the rest of the optimizer state.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, check_state, stable_name
from funcopt.transforms._common import first_device

__all__ = ["ReduceOnPlateauState", "reduce_on_plateau"]


@stable_name("funcopt.ReduceOnPlateauState")
class ReduceOnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau` (all 0-dim tensors).

    ``scale``: the factor applied to updates (float64, 1 at init); ``best_value``: the best
    monitored value so far (``+inf``/``-inf`` at init for mode min/max); ``plateau_count``:
    torch's ``num_bad_epochs``; ``cooldown_count``: torch's ``cooldown_counter``; ``count``:
    the number of ``update`` calls (int64); ``accumulated_value``: running sum of ``value``
    over the current accumulation window (float64).
    """

    scale: torch.Tensor
    best_value: torch.Tensor
    plateau_count: torch.Tensor
    cooldown_count: torch.Tensor
    count: torch.Tensor
    accumulated_value: torch.Tensor


def _check_int(name: str, x: Any, minimum: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise FuncoptError(f"reduce_on_plateau: {name} must be an int >= {minimum}, got {x!r}.")


def _check_float(name: str, x: Any, low: float, high: float | None = None, *, high_open: bool = False) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
        raise FuncoptError(f"reduce_on_plateau: {name} must be a number, got {x!r}.")
    if x < low or (high is not None and (x >= high if high_open else x > high)):
        bracket = ")" if high_open else "]"
        raise FuncoptError(
            f"reduce_on_plateau: {name} must lie in [{low}, {'inf' if high is None else high}{bracket}, got {x!r}."
        )


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_scale: float = 0.0,
    *,
    mode: str = "min",
    eps: float = 1e-8,
    accumulation_size: int = 1,
) -> GradientTransformation:
    """Multiplies updates by a scale that drops by ``factor`` when the loss plateaus.

    The rule is ``torch.optim.lr_scheduler.ReduceLROnPlateau``'s, applied to a scale that starts
    at 1: a value is *better* when it is below ``best * (1 - threshold)`` (``mode="min"``,
    ``threshold_mode="rel"``), below ``best - threshold`` (``"abs"``), or above
    ``best * (1 + threshold)`` / ``best + threshold`` for ``mode="max"``. After more than
    ``patience`` consecutive non-better values the scale becomes ``max(scale * factor,
    min_scale)`` (only if that changes it by more than ``eps``), then ``cooldown`` values are
    ignored.

    Each ``update`` must get the monitored value: ``tx.update(grads, state, params,
    value=loss)``. The updates of that call are scaled by the scale in effect *before* ``value``
    is seen, like torch, where ``scheduler.step(loss)`` runs after ``optimizer.step()``: so
    ``chain(sgd(lr), reduce_on_plateau())`` takes exactly the steps of ``SGD(lr)`` with
    ``ReduceLROnPlateau`` stepped once per ``optimizer.step()``, and ``lr * state.scale`` is
    torch's learning rate after the matching ``scheduler.step``. With ``accumulation_size=n``
    the rule sees the mean of ``n`` consecutive values (e.g. one epoch of batch losses), as
    torch stepped once per epoch with the mean loss.

    Args:
        factor: multiplier applied on a plateau, in [0, 1).
        patience: number of non-better values tolerated (int >= 0).
        threshold: minimal improvement that counts, relative or absolute.
        threshold_mode: ``"rel"`` or ``"abs"``.
        cooldown: values ignored after a reduction (int >= 0).
        min_scale: lower bound of the scale (torch's ``min_lr`` divided by the base lr).
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
        eps: minimal change of the scale; smaller reductions are skipped (torch's ``eps``
            divided by the base lr gives the same behaviour).
        accumulation_size: number of ``update`` calls whose values are averaged per rule step.

    Returns:
        A ``GradientTransformation`` with state :class:`ReduceOnPlateauState`.

    Example:
        >>> tx = funcopt.chain(funcopt.adam(1e-3), funcopt.reduce_on_plateau(patience=5))
        >>> updates, state = tx.update(grads, state, params, value=loss)
    """
    _check_float("factor", factor, 0.0, 1.0, high_open=True)
    _check_int("patience", patience, 0)
    _check_float("threshold", threshold, 0.0)
    _check_int("cooldown", cooldown, 0)
    _check_float("min_scale", min_scale, 0.0)
    _check_float("eps", eps, 0.0)
    _check_int("accumulation_size", accumulation_size, 1)
    if threshold_mode not in ("rel", "abs"):
        raise FuncoptError(f"reduce_on_plateau: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}.")
    if mode not in ("min", "max"):
        raise FuncoptError(f"reduce_on_plateau: mode must be 'min' or 'max', got {mode!r}.")
    worst = math.inf if mode == "min" else -math.inf

    def is_better(a: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        if mode == "min" and threshold_mode == "rel":
            return a < best * (1.0 - threshold)
        if mode == "min":
            return a < best - threshold
        if threshold_mode == "rel":
            return a > best * (threshold + 1.0)
        return a > best + threshold

    def init(params):
        device = first_device(params)
        f64 = torch.float32 if device.type == "mps" else torch.float64
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return ReduceOnPlateauState(
            scale=torch.ones((), dtype=f64, device=device),
            best_value=torch.full((), worst, dtype=f64, device=device),
            plateau_count=zero,
            cooldown_count=zero.clone(),
            count=zero.clone(),
            accumulated_value=torch.zeros((), dtype=f64, device=device),
        )

    def update(updates, state, params=None, *, value: Any = None, **extra_args):
        check_state(state, ReduceOnPlateauState, "reduce_on_plateau")
        if value is None:
            raise FuncoptError(
                "reduce_on_plateau needs the monitored loss: call "
                "`tx.update(grads, state, params, value=loss)`."
            )
        if isinstance(value, torch.Tensor) and value.dim() != 0:
            raise FuncoptError(
                f"reduce_on_plateau: value must be a scalar (0-dim tensor or float), got a tensor "
                f"of shape {tuple(value.shape)}; pass the mean loss."
            )
        out = _tree.map(lambda u: u * state.scale, updates)

        if isinstance(value, torch.Tensor):
            v = value.detach().to(device=state.scale.device, dtype=state.scale.dtype)
        else:
            v = torch.tensor(float(value), dtype=state.scale.dtype, device=state.scale.device)
        acc = state.accumulated_value + v
        count = state.count + 1
        ready = torch.remainder(count, accumulation_size) == 0
        current = acc / accumulation_size

        better = is_better(current, state.best_value)
        best = torch.where(better, current, state.best_value)
        bad = torch.where(better, torch.zeros_like(state.plateau_count), state.plateau_count + 1)
        in_cooldown = state.cooldown_count > 0
        cool = torch.where(in_cooldown, state.cooldown_count - 1, state.cooldown_count)
        bad = torch.where(in_cooldown, torch.zeros_like(bad), bad)
        reduce = bad > patience
        new_scale = torch.clamp(state.scale * factor, min=min_scale)
        changes = (state.scale - new_scale) > eps
        scale = torch.where(reduce & changes, new_scale, state.scale)
        cool = torch.where(reduce, torch.full_like(cool, cooldown), cool)
        bad = torch.where(reduce, torch.zeros_like(bad), bad)

        new_state = ReduceOnPlateauState(
            scale=torch.where(ready, scale, state.scale),
            best_value=torch.where(ready, best, state.best_value),
            plateau_count=torch.where(ready, bad, state.plateau_count),
            cooldown_count=torch.where(ready, cool, state.cooldown_count),
            count=count,
            accumulated_value=torch.where(ready, torch.zeros_like(acc), acc),
        )
        return out, new_state

    return GradientTransformation(init, update)
