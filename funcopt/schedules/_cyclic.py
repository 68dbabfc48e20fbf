"""Cyclic schedules: cosine annealing with warm restarts (:func:`sgdr`) and the 1cycle policy
(:func:`one_cycle`, :func:`one_cycle_momentum`)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from funcopt.base import FuncoptError, Schedule
from funcopt.schedules._common import Value, _as_count, _check_int, _check_value, _full, _is_number

__all__ = ["sgdr", "cosine_restarts", "one_cycle", "one_cycle_momentum"]


def _interp_cos(start: Value, end: Value, pct: torch.Tensor) -> torch.Tensor:
    """Cosine from ``start`` (pct 0) to ``end`` (pct 1), written as torch's OneCycleLR does."""
    return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)


def _interp_linear(start: Value, end: Value, pct: torch.Tensor) -> torch.Tensor:
    return (end - start) * pct + start


def sgdr(
    init_value: Value,
    cycle_steps: int,
    cycle_mult: int = 1,
    end_value: Value = 0.0,
    decay: Value = 1.0,
) -> Schedule:
    """Cosine annealing with warm restarts (SGDR), like ``CosineAnnealingWarmRestarts``.

    Cycle ``i`` (0-based) lasts ``T_i = cycle_steps * cycle_mult ** i`` steps and anneals from
    ``init_value * decay ** i`` to ``end_value`` as ``end + (peak - end) * (1 + cos(pi * t /
    T_i)) / 2``, ``t`` counting from the cycle's start. ``sgdr(b, T_0, T_mult, eta_min)`` equals
    ``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`` (``decay=1``).

    Args:
        init_value: the peak value of the first cycle.
        cycle_steps: length of the first cycle (int >= 1).
        cycle_mult: growth factor of the cycle length (int >= 1).
        end_value: the value each cycle anneals to.
        decay: factor applied to the peak at each restart.

    References: Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts",
    2017, arXiv 1608.03983.
    """
    _check_value("init_value", init_value)
    _check_value("end_value", end_value)
    _check_value("decay", decay)
    _check_int("cycle_steps", cycle_steps, 1)
    _check_int("cycle_mult", cycle_mult, 1)

    def start_of(n: torch.Tensor) -> torch.Tensor:
        # first count of cycle n (exact integer arithmetic)
        return cycle_steps * (torch.pow(cycle_mult, n) - 1) // (cycle_mult - 1)

    def schedule(count):
        c_int = (count if isinstance(count, torch.Tensor) else torch.as_tensor(count)).to(torch.int64)
        c = _as_count(c_int)
        if cycle_mult == 1:
            n = torch.div(c_int, cycle_steps, rounding_mode="floor")
            t = c_int - n * cycle_steps
            length = _full(c, float(cycle_steps))
        else:
            guess = torch.floor(torch.log(c / cycle_steps * (cycle_mult - 1) + 1) / math.log(cycle_mult))
            n = guess.to(torch.int64)
            # correct a float rounding of the logarithm at cycle boundaries
            n = torch.where(start_of(n) > c_int, n - 1, n)
            n = torch.where(start_of(n + 1) <= c_int, n + 1, n)
            t = c_int - start_of(n)
            length = (cycle_steps * torch.pow(cycle_mult, n)).to(c.dtype)
        peak = init_value * torch.pow(_full(c, decay), n.to(c.dtype))
        return end_value + (peak - end_value) * (1 + torch.cos(math.pi * t.to(c.dtype) / length)) / 2

    return schedule


cosine_restarts = sgdr
"""Alias of :func:`sgdr`."""


def _one_cycle_phases(total_steps: int, pct_start: float, three_phase: bool) -> list[float]:
    if three_phase:
        return [float(pct_start * total_steps) - 1, float(2 * pct_start * total_steps) - 2, total_steps - 1]
    return [float(pct_start * total_steps) - 1, total_steps - 1]


def _piecewise_anneal(
    ends: list[float], values: list[tuple[Value, Value]], anneal: Callable[..., torch.Tensor]
) -> Schedule:
    """Phase i runs from ``ends[i-1]`` (0 for the first) to ``ends[i]``, annealing ``values[i]``.

    Mirrors torch's OneCycleLR.get_lr: the first phase with ``count <= end`` is used (the last
    phase otherwise); the fraction within the phase is clipped to [0, 1].
    """

    def schedule(count):
        c = _as_count(count)
        value = None
        start = 0.0
        for i in reversed(range(len(ends))):
            start = ends[i - 1] if i > 0 else 0.0
            span = ends[i] - start
            pct = torch.clamp((c - start) / span, 0.0, 1.0) if span > 0 else _full(c, 1.0)
            v = anneal(values[i][0], values[i][1], pct)
            value = v if value is None else torch.where(c <= ends[i], v, value)
        return value

    return schedule


def _check_one_cycle(total_steps: int, pct_start: float, anneal_strategy: str) -> Callable[..., torch.Tensor]:
    _check_int("total_steps", total_steps, 1)
    if not _is_number(pct_start) or not 0.0 <= pct_start <= 1.0:
        raise FuncoptError(f"pct_start must be a number in [0, 1], got {pct_start!r}.")
    if anneal_strategy not in ("cos", "linear"):
        raise FuncoptError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}.")
    return _interp_cos if anneal_strategy == "cos" else _interp_linear


def one_cycle(
    total_steps: int,
    max_value: Value,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: Value = 25.0,
    final_div_factor: Value = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """The 1cycle learning-rate policy, exactly as ``torch.optim.lr_scheduler.OneCycleLR``.

    Warms up from ``max_value / div_factor`` to ``max_value`` over the first ``pct_start``
    of ``total_steps``, then anneals to ``max_value / div_factor / final_div_factor``. With
    ``three_phase=True`` it first comes back down to the initial value (symmetric to the
    warmup) and only then anneals to the minimum (the paper's version). After ``total_steps``
    the value stays at the minimum (torch raises instead). Pair it with
    :func:`one_cycle_momentum` for the momentum (or Adam's ``b1``) cycle::

        lr = one_cycle(1000, 1e-2)
        b1 = one_cycle_momentum(1000)
        tx = funcopt.inject_hyperparams(funcopt.adam)(learning_rate=lr, b1=b1)

    Args:
        total_steps: the number of steps in the cycle (int >= 1).
        max_value: the peak learning rate.
        pct_start: fraction of the steps spent warming up.
        anneal_strategy: ``"cos"`` or ``"linear"``.
        div_factor: initial value is ``max_value / div_factor``.
        final_div_factor: final value is ``initial / final_div_factor``.
        three_phase: use the three-phase variant.

    References: Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks Using
    Large Learning Rates", 2017, arXiv 1708.07120.
    """
    anneal = _check_one_cycle(total_steps, pct_start, anneal_strategy)
    for name, v in (("max_value", max_value), ("div_factor", div_factor), ("final_div_factor", final_div_factor)):
        _check_value(name, v)
        if name != "max_value" and _is_number(v) and v <= 0:
            raise FuncoptError(f"{name} must be > 0, got {v!r}.")
    initial = max_value / div_factor
    minimum = initial / final_div_factor
    if three_phase:
        values = [(initial, max_value), (max_value, initial), (initial, minimum)]
    else:
        values = [(initial, max_value), (max_value, minimum)]
    return _piecewise_anneal(_one_cycle_phases(total_steps, pct_start, three_phase), values, anneal)


def one_cycle_momentum(
    total_steps: int,
    base_momentum: Value = 0.85,
    max_momentum: Value = 0.95,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
) -> Schedule:
    """The momentum cycle of ``OneCycleLR(cycle_momentum=True)``, inverse to :func:`one_cycle`.

    Goes from ``max_momentum`` down to ``base_momentum`` while the learning rate warms up and
    back while it anneals (three-phase: back during phase 2, constant in phase 3). Use it for
    SGD's ``momentum`` or Adam's ``b1`` through :func:`funcopt.inject_hyperparams` (torch
    cycles ``betas[0]`` for Adam-like optimizers). Use the same ``total_steps``, ``pct_start``,
    ``anneal_strategy`` and ``three_phase`` as the learning-rate schedule.

    References: Smith, "A disciplined approach to neural network hyper-parameters: Part 1",
    2018, arXiv 1803.09820.
    """
    anneal = _check_one_cycle(total_steps, pct_start, anneal_strategy)
    _check_value("base_momentum", base_momentum)
    _check_value("max_momentum", max_momentum)
    if three_phase:
        values = [(max_momentum, base_momentum), (base_momentum, max_momentum), (max_momentum, max_momentum)]
    else:
        values = [(max_momentum, base_momentum), (base_momentum, max_momentum)]
    return _piecewise_anneal(_one_cycle_phases(total_steps, pct_start, three_phase), values, anneal)
