"""Basic schedules: constant, linear, polynomial, exponential and cosine decays, step functions,
:func:`join` and the warmup schedules built with it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from funcopt.base import FuncoptError, Schedule
from funcopt.schedules._common import Value, _as_count, _check_int, _check_value, _full, _is_number, _value_like

__all__ = [
    "constant",
    "linear",
    "polynomial",
    "exponential_decay",
    "cosine_decay",
    "warmup_cosine_decay",
    "warmup_exponential_decay",
    "piecewise_constant",
    "join",
]


def constant(value: Value) -> Schedule:
    """Returns ``value`` at every step (``optax.constant_schedule``)."""
    _check_value("value", value)

    def schedule(count):
        return _full(_as_count(count), value)

    return schedule


def linear(init_value: Value, end_value: Value, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Interpolates linearly from ``init_value`` to ``end_value`` (``optax.linear_schedule``).

    The value is ``init_value`` until ``transition_begin``, moves linearly over
    ``transition_steps`` steps and stays at ``end_value`` afterwards. ``linear(b * s, b * e, n)``
    is ``torch.optim.lr_scheduler.LinearLR(start_factor=s, end_factor=e, total_iters=n)``.

    Args:
        init_value: value at counts <= ``transition_begin``.
        end_value: value at counts >= ``transition_begin + transition_steps``.
        transition_steps: length of the ramp (int >= 1).
        transition_begin: count at which the ramp starts (int >= 0).
    """
    _check_value("init_value", init_value)
    _check_value("end_value", end_value)
    _check_int("transition_steps", transition_steps, 1)
    _check_int("transition_begin", transition_begin, 0)

    def schedule(count):
        c = _as_count(count)
        frac = torch.clamp((c - transition_begin) / transition_steps, 0.0, 1.0)
        return init_value + (end_value - init_value) * frac

    return schedule


def polynomial(
    init_value: Value, end_value: Value, power: Value, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Polynomial decay ``(init - end) * (1 - t / T) ** power + end`` (``optax.polynomial_schedule``).

    ``t`` counts from ``transition_begin`` and is clipped to ``[0, T]`` with
    ``T = transition_steps``. ``polynomial(b, 0.0, p, n)`` is ``PolynomialLR(total_iters=n,
    power=p)``.
    """
    _check_value("init_value", init_value)
    _check_value("end_value", end_value)
    _check_value("power", power)
    _check_int("transition_steps", transition_steps, 1)
    _check_int("transition_begin", transition_begin, 0)

    def schedule(count):
        c = _as_count(count)
        frac = torch.clamp((c - transition_begin) / transition_steps, 0.0, 1.0)
        return (init_value - end_value) * (1.0 - frac) ** power + end_value

    return schedule


def exponential_decay(
    init_value: Value,
    transition_steps: int,
    decay_rate: Value,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: Value | None = None,
) -> Schedule:
    """``init_value * decay_rate ** (t / transition_steps)`` (``optax.exponential_decay``).

    ``t = max(count - transition_begin, 0)``; with ``staircase=True`` the exponent is floored
    (the value drops every ``transition_steps`` steps). ``end_value`` bounds the value (a floor
    when decaying, a ceiling when ``decay_rate > 1``). ``exponential_decay(b, 1, g)`` is
    ``ExponentialLR(gamma=g)``; ``exponential_decay(b, n, g, staircase=True)`` is
    ``StepLR(step_size=n, gamma=g)``.

    Args:
        init_value: value at count 0.
        transition_steps: steps per factor ``decay_rate`` (int >= 1).
        decay_rate: the factor per ``transition_steps`` (> 0).
        transition_begin: steps to hold ``init_value`` before decaying (int >= 0).
        staircase: decay in discrete jumps.
        end_value: optional bound on the value.
    """
    _check_value("init_value", init_value)
    _check_value("decay_rate", decay_rate)
    _check_int("transition_steps", transition_steps, 1)
    _check_int("transition_begin", transition_begin, 0)
    if _is_number(decay_rate) and decay_rate <= 0:
        raise FuncoptError(f"decay_rate must be > 0, got {decay_rate!r}.")
    if end_value is not None:
        _check_value("end_value", end_value)

    def schedule(count):
        c = _as_count(count)
        p = torch.clamp(c - transition_begin, min=0.0) / transition_steps
        if staircase:
            p = torch.floor(p)
        value = init_value * torch.pow(_full(c, decay_rate), p)
        if end_value is None:
            return value
        if _is_number(decay_rate):
            bound = torch.maximum if decay_rate < 1 else torch.minimum
            return bound(value, _full(c, end_value))
        floor = torch.maximum(value, _full(c, end_value))
        ceil = torch.minimum(value, _full(c, end_value))
        return torch.where(decay_rate < 1, floor, ceil)

    return schedule


def _cosine(init_value: Value, end_value: Value, decay_steps: int, exponent: Value) -> Schedule:
    def schedule(count):
        c = _as_count(count)
        frac = torch.clamp(c / decay_steps, max=1.0)
        cos = 0.5 * (1.0 + torch.cos(math.pi * frac))
        return end_value + (init_value - end_value) * cos**exponent

    return schedule


def cosine_decay(init_value: Value, decay_steps: int, alpha: Value = 0.0, exponent: Value = 1.0) -> Schedule:
    """Cosine annealing from ``init_value`` to ``alpha * init_value`` (``optax.cosine_decay_schedule``).

    ``value = e + (init - e) * (0.5 * (1 + cos(pi * t / T))) ** exponent`` with
    ``e = alpha * init_value``, ``t = min(count, T)``, ``T = decay_steps``; it stays at ``e``
    after ``T``. ``cosine_decay(b, T, eta_min / b)`` equals ``CosineAnnealingLR(T_max=T,
    eta_min=eta_min)`` for the first ``T + 1`` steps (torch's then rises again; use :func:`sgdr`
    for restarts).

    References: Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts",
    2017, arXiv 1608.03983.
    """
    _check_value("init_value", init_value)
    _check_value("alpha", alpha)
    _check_value("exponent", exponent)
    _check_int("decay_steps", decay_steps, 1)
    return _cosine(init_value, alpha * init_value, decay_steps, exponent)


def piecewise_constant(init_value: Value, boundaries_and_scales: Mapping[int, Value] | None = None) -> Schedule:
    """A step function: ``init_value`` times every scale whose boundary is <= count.

    Like ``optax.piecewise_constant_schedule``. ``piecewise_constant(b, {30: 0.1, 80: 0.1})`` is
    ``MultiStepLR(milestones=[30, 80], gamma=0.1)``; ``ConstantLR(factor=f, total_iters=n)`` is
    ``piecewise_constant(b * f, {n: 1 / f})``.

    Args:
        init_value: value before the first boundary.
        boundaries_and_scales: ``{count: factor}``; from ``count`` on the value is multiplied by
            ``factor`` (boundaries are ints >= 0).
    """
    _check_value("init_value", init_value)
    items = sorted((boundaries_and_scales or {}).items())
    for b, s in items:
        _check_int("piecewise_constant boundary", b, 0)
        _check_value(f"piecewise_constant scale at boundary {b}", s)

    def schedule(count):
        c = _as_count(count)
        value = _full(c, init_value)
        for b, s in items:
            value = torch.where(c >= b, value * s, value)
        return value

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Switches between schedules at boundaries, restarting each one's count at 0.

    Like ``optax.join_schedules`` and ``torch.optim.lr_scheduler.SequentialLR``: for
    ``boundaries[i-1] <= count < boundaries[i]`` the value is ``schedules[i](count -
    boundaries[i-1])``.

    Args:
        schedules: ``n`` schedules.
        boundaries: ``n - 1`` increasing ints (the milestones).
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if not schedules:
        raise FuncoptError("join needs at least one schedule.")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise FuncoptError(f"join: schedules[{i}] is {s!r}, not a callable count -> value.")
    if len(boundaries) != len(schedules) - 1:
        raise FuncoptError(
            f"join needs one boundary fewer than schedules: got {len(schedules)} schedules and "
            f"{len(boundaries)} boundaries."
        )
    for b in boundaries:
        _check_int("join boundary", b, 0)
    if any(b1 > b2 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise FuncoptError(f"join boundaries must be non-decreasing, got {boundaries}.")

    def schedule(count):
        c = count if isinstance(count, torch.Tensor) else torch.as_tensor(count)
        cf = _as_count(c)
        value = _value_like(schedules[0](c), cf)
        for b, s in zip(boundaries, schedules[1:]):
            shifted = torch.clamp(c - b, min=0)
            value = torch.where(c >= b, _value_like(s(shifted), cf), value)
        return value

    return schedule


def warmup_cosine_decay(
    init_value: Value,
    peak_value: Value,
    warmup_steps: int,
    decay_steps: int,
    end_value: Value = 0.0,
    exponent: Value = 1.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    Like ``optax.warmup_cosine_decay_schedule``: ``decay_steps`` is the total length including
    the ``warmup_steps``. Equals ``SequentialLR([LinearLR(init / peak, 1.0, warmup_steps),
    CosineAnnealingLR(decay_steps - warmup_steps, end_value)], [warmup_steps])``.

    References: Goyal et al., "Accurate, Large Minibatch SGD", 2017, arXiv 1706.02677
    (warmup); Loshchilov & Hutter, 2017, arXiv 1608.03983 (cosine).
    """
    for name, v in (("init_value", init_value), ("peak_value", peak_value), ("end_value", end_value)):
        _check_value(name, v)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("decay_steps", decay_steps, warmup_steps + 1)
    cos = _cosine(peak_value, end_value, decay_steps - warmup_steps, exponent)
    if warmup_steps == 0:
        return cos
    return join([linear(init_value, peak_value, warmup_steps), cos], [warmup_steps])


def warmup_exponential_decay(
    init_value: Value,
    peak_value: Value,
    warmup_steps: int,
    transition_steps: int,
    decay_rate: Value,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: Value | None = None,
) -> Schedule:
    """Linear warmup to ``peak_value``, then :func:`exponential_decay` from it.

    Like ``optax.warmup_exponential_decay_schedule``; the decay's count starts at 0 after the
    warmup. Equals ``SequentialLR([LinearLR(init / peak, 1.0, warmup_steps),
    ExponentialLR(gamma)], [warmup_steps])`` for ``transition_steps=1``.
    """
    _check_int("warmup_steps", warmup_steps, 0)
    decay = exponential_decay(peak_value, transition_steps, decay_rate, transition_begin, staircase, end_value)
    if warmup_steps == 0:
        return decay
    return join([linear(init_value, peak_value, warmup_steps), decay], [warmup_steps])
