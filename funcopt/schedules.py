"""Schedules: pure functions ``count -> value`` for learning rates and other hyperparameters.

Like ``optax`` schedules. ``count`` is the 0-based number of updates done so far, a 0-dim int64
tensor (Python ints are accepted too); the value is a float64 tensor on the count's device
(float32 on MPS). Every schedule is written with tensor arithmetic and ``torch.where`` only
(no Python branch on a tensor value), so it runs under ``torch.func.vmap`` (a batch of counts)
and ``torch.compile``. Hyperparameters given as Python numbers are validated when the schedule
is built; they may also be 0-dim tensors.

Pass a schedule as ``learning_rate`` to any optimizer: the k-th ``update`` uses
``schedule(k - 1)``, which is the learning rate ``torch.optim.lr_scheduler`` gives the k-th
``optimizer.step()`` when ``scheduler.step()`` is called after every ``optimizer.step()``.

========================== ==========================================================
funcopt                    torch.optim.lr_scheduler equivalent (base lr ``b``)
========================== ==========================================================
constant(b)                (no scheduler)
linear(b*s, b*e, n)        LinearLR(start_factor=s, end_factor=e, total_iters=n)
polynomial(b, 0, p, n)     PolynomialLR(total_iters=n, power=p)
exponential_decay(b, 1, g) ExponentialLR(gamma=g)
exponential_decay(b, n, g, staircase=True)  StepLR(step_size=n, gamma=g)
piecewise_constant(b, {m: g for m in ms})   MultiStepLR(milestones=ms, gamma=g)
cosine_decay(b, n, e/b)    CosineAnnealingLR(T_max=n, eta_min=e) (up to step n)
sgdr(b, n, m, e)           CosineAnnealingWarmRestarts(T_0=n, T_mult=m, eta_min=e)
one_cycle(n, b, ...)       OneCycleLR(max_lr=b, total_steps=n, ...) (lr)
one_cycle_momentum(n, ...) OneCycleLR(..., cycle_momentum=True) (momentum / beta1)
join([s1, s2], [m])        SequentialLR([sch1, sch2], milestones=[m])
========================== ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Union

import torch

from funcopt.base import FuncoptError, Schedule

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
    "sgdr",
    "cosine_restarts",
    "one_cycle",
    "one_cycle_momentum",
]

Value = Union[float, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Private helpers


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_value(name: str, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        return
    if not _is_number(x):
        raise FuncoptError(f"{name} must be a number or a 0-dim tensor, got {x!r}.")
    if x != x:
        raise FuncoptError(f"{name} must not be NaN.")


def _check_int(name: str, x: Any, minimum: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int):
        raise FuncoptError(f"{name} must be a Python int, got {x!r} ({type(x).__name__}).")
    if x < minimum:
        raise FuncoptError(f"{name} must be >= {minimum}, got {x}.")


def _as_count(count: Any) -> torch.Tensor:
    """The count as a float tensor (float64; float32 on MPS), keeping its device and batch."""
    c = count if isinstance(count, torch.Tensor) else torch.as_tensor(count)
    return c.to(torch.float32 if c.device.type == "mps" else torch.float64)


def _full(c: torch.Tensor, value: Value) -> torch.Tensor:
    return torch.zeros_like(c) + value


def _value_like(value: Any, c: torch.Tensor) -> torch.Tensor:
    """A schedule's output as a tensor of ``c``'s float dtype (user schedules may return floats)."""
    if isinstance(value, torch.Tensor):
        return value.to(c.dtype)
    return _full(c, value)


def _interp_cos(start: Value, end: Value, pct: torch.Tensor) -> torch.Tensor:
    """Cosine from ``start`` (pct 0) to ``end`` (pct 1), written as torch's OneCycleLR does."""
    return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)


def _interp_linear(start: Value, end: Value, pct: torch.Tensor) -> torch.Tensor:
    return (end - start) * pct + start


# ---------------------------------------------------------------------------------------------
# Basic schedules


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


# ---------------------------------------------------------------------------------------------
# Restarts and one-cycle


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
