"""Adadelta, Rprop and ASGD blocks, with ``torch.optim``'s numerics.

Part of ``funcopt.transforms`` (import the blocks from there or from ``funcopt``). Each block
keeps the per-parameter state torch keeps, under torch's names (``square_avg``/``acc_delta``,
``prev``/``step_size``, ``ax``/``eta``/``mu``), so that ``funcopt.interop`` converts it both ways.
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
    _value_at,
    check_learning_rate,
    check_non_negative,
    first_device,
    init_count,
)

__all__ = [
    "ScaleByAdadeltaState",
    "ScaleByRpropState",
    "ScaleByAsgdState",
    "scale_by_adadelta",
    "scale_by_rprop",
    "scale_by_asgd",
    "asgd_averaged_params",
]

_REDUCED = (torch.bfloat16, torch.float16)


def _scaled(x: torch.Tensor, s: Any) -> torch.Tensor:
    """``x * s`` as torch multiplies a tensor by a Python number, also for a 0-dim tensor ``s``.

    ``s`` is rounded to the tensor's dtype (to float32 for bfloat16/float16, where torch computes
    in float32 and rounds once), so a 0-dim float64 hyperparameter never promotes a 0-dim leaf.
    """
    if not isinstance(s, torch.Tensor):
        return x * s
    if x.dtype in _REDUCED:
        return (x.float() * s.float()).to(x.dtype)
    return x * s.to(x.dtype)


def _addcmul(x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: Any = 1.0) -> torch.Tensor:
    """``x + value * t1 * t2`` rounded as torch's in-place ``x.addcmul_(t1, t2, value=value)``.

    One rounding in float32/float64 (``value * t1`` first, as torch's kernel); bfloat16 and
    float16 are computed in float32 and rounded once, as torch's CPU kernels do.
    """
    if x.dtype in _REDUCED:
        return torch.addcmul(x.float(), _scaled(t1.float(), value), t2.float()).to(x.dtype)
    return torch.addcmul(x, _scaled(t1, value), t2)


def _add_scaled(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x + scale * t`` rounded as torch's ``x.add_(t, alpha=scale.item())``.

    One rounding, with ``alpha`` rounded to the tensor's dtype first (for bfloat16/float16 the
    sum is then computed in float32, as torch's CPU kernel does).
    """
    scale = scale.to(x.dtype)
    if x.dtype in _REDUCED:
        return torch.addcmul(x.float(), t.float(), scale.float()).to(x.dtype)
    return torch.addcmul(x, t, scale)


def _like(value: Any, x: torch.Tensor) -> Any:
    """A tensor hyperparameter in the dtype of ``x`` (numbers as they are)."""
    return value.to(x.dtype) if isinstance(value, torch.Tensor) else value


def _map_n(fn: Any, n: int, trees: tuple[PyTree, ...], names: tuple[str, ...]) -> tuple[PyTree, ...]:
    """``fn`` over the leaves of trees of one structure, returning ``n`` trees of that structure."""
    for other, name in zip(trees[1:], names[1:]):
        _tree.check_same_structure(trees[0], other, (names[0], name))
    spec = _tree.structure(trees[0])
    results = [fn(*xs) for xs in zip(*(_tree.leaves(t) for t in trees))]
    return tuple(spec.unflatten([r[i] for r in results]) for i in range(n))


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps its per-parameter scalars in (``_get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Adadelta


@stable_name("funcopt.ScaleByAdadeltaState")
class ScaleByAdadeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta`.

    ``count`` is the 0-dim int64 number of updates so far; ``square_avg`` the running mean of
    squared gradients and ``acc_delta`` the running mean of squared updates, shaped like the
    params (torch's names).
    """

    count: torch.Tensor
    square_avg: PyTree
    acc_delta: PyTree


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    """Adadelta's scaling, as ``torch.optim.Adadelta``.

    ``square_avg = rho * square_avg + (1 - rho) * g**2``; returns
    ``delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g`` and tracks
    ``acc_delta = rho * acc_delta + (1 - rho) * delta**2``. Follow it with
    :func:`scale_by_learning_rate` (torch's ``lr``, 1.0 by default).

    Args:
        rho: decay of both running means, in [0, 1] (default 0.9).
        eps: added inside both square roots, >= 0 (default 1e-6).

    References: Zeiler, "ADADELTA: An Adaptive Learning Rate Method", 2012, arXiv 1212.5701.
    """
    _check_range("rho", rho, 0.0, 1.0)
    check_non_negative("eps", eps)

    def init(params):
        return ScaleByAdadeltaState(init_count(params), _tree.zeros_like(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByAdadeltaState, "scale_by_adadelta")
        w = 1 - rho
        square_avg = _tree.map(
            lambda s, g: _addcmul(_scaled(s, rho), g, g, w), state.square_avg, updates, names=("square_avg", "updates")
        )

        def delta(g, s, a):
            e = _like(eps, s)
            return torch.sqrt(a + e) / torch.sqrt(s + e) * g

        out = _tree.map(delta, updates, square_avg, state.acc_delta)
        acc_delta = _tree.map(lambda a, d: _addcmul(_scaled(a, rho), d, d, w), state.acc_delta, out)
        return out, ScaleByAdadeltaState(state.count + 1, square_avg, acc_delta)

    return GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# Rprop


@stable_name("funcopt.ScaleByRpropState")
class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop`.

    ``count`` is the 0-dim int64 number of updates so far; ``prev`` the previous gradient
    (zero where its sign flipped) and ``step_size`` the per-element step sizes, shaped like
    the params (torch's names).
    """

    count: torch.Tensor
    prev: PyTree
    step_size: PyTree


def _full_like(p: torch.Tensor, value: Any) -> torch.Tensor:
    """``torch.full_like(p, value)`` for a number or a (possibly batched) 0-dim tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=p.device, dtype=p.dtype).expand(p.shape).clone()
    return torch.full_like(p, value)


def scale_by_rprop(
    learning_rate: float | torch.Tensor = 1e-2,
    eta_minus: float = 0.5,
    eta_plus: float = 1.2,
    min_step_size: float = 1e-6,
    max_step_size: float = 50.0,
) -> GradientTransformation:
    """Resilient backpropagation, as ``torch.optim.Rprop``; returns the update itself.

    Each element keeps its own step size, ``learning_rate`` at the start. At each step, where
    ``g * prev`` is positive the step size grows by ``eta_plus``, where it is negative (the
    gradient's sign flipped) it shrinks by ``eta_minus`` and the gradient counts as zero (no
    move, and ``prev = 0`` so the next step does not shrink again), elsewhere it is kept; step
    sizes are clipped to ``[min_step_size, max_step_size]``. The update is
    ``-sign(g) * step_size`` (the sign and size of the step are included, as in
    ``optax.scale_by_rprop``: no learning-rate block follows).

    Args:
        learning_rate: the initial step size (a number or a 0-dim tensor; read only by
            ``init``, as torch reads ``lr`` only when it creates the state).
        eta_minus, eta_plus: the factors, ``0 < eta_minus < 1 < eta_plus`` (0.5, 1.2).
        min_step_size, max_step_size: the bounds of the step sizes (1e-6, 50.0).

    References: Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation
    Learning: The RPROP Algorithm", ICNN 1993.
    """
    if callable(learning_rate) and not isinstance(learning_rate, torch.Tensor):
        raise FuncoptError(
            "scale_by_rprop: learning_rate is only Rprop's initial step size (read once, by init), "
            "so it cannot be a schedule; pass a number or a 0-dim tensor."
        )
    check_learning_rate(learning_rate)
    _check_range("eta_minus", eta_minus, 0.0, 1.0, low_open=True, high_open=True)
    _check_range("eta_plus", eta_plus, 1.0, None, low_open=True)
    check_non_negative("min_step_size", min_step_size)
    check_non_negative("max_step_size", max_step_size)
    if isinstance(min_step_size, (int, float)) and isinstance(max_step_size, (int, float)):
        if min_step_size > max_step_size:
            raise FuncoptError(
                f"min_step_size ({min_step_size}) must not exceed max_step_size ({max_step_size})."
            )

    def init(params):
        return ScaleByRpropState(
            init_count(params),
            _tree.zeros_like(params),
            _tree.map(lambda p: _full_like(p, learning_rate), params),
        )

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByRpropState, "scale_by_rprop")

        def leaf(g, prev, step_size):
            # torch's sequence (its capturable branch): +1 -> eta_plus, then -1 -> eta_minus,
            # then 0 -> 1, each in the gradient's dtype.
            minus = _like(eta_minus, g)
            factor = torch.sign(g * prev)
            factor = torch.where(factor > 0, _like(eta_plus, g), factor)
            factor = torch.where(factor < 0, minus, factor)
            factor = torch.where(factor == 0, 1.0, factor)
            step_size = torch.clamp(step_size * factor, _like(min_step_size, g), _like(max_step_size, g))
            g = torch.where(factor == minus, 0.0, g)
            return -(torch.sign(g) * step_size), g, step_size

        trees = (updates, state.prev, state.step_size)
        direction, prev, step_size = _map_n(leaf, 3, trees, ("updates", "prev", "step_size"))
        return direction, ScaleByRpropState(state.count + 1, prev, step_size)

    return GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# ASGD


@stable_name("funcopt.ScaleByAsgdState")
class ScaleByAsgdState(NamedTuple):
    """State of :func:`scale_by_asgd`.

    ``count``: the 0-dim int64 number of updates so far. ``eta``: the step size the next update
    uses; ``mu``: the averaging weight the next update uses; both 0-dim tensors in torch's
    scalar dtype (float32, or float64 when the default dtype is float64), whose rounding enters
    every step as it does in torch. ``ax``: the running average of the iterates, shaped like
    the params (read it with :func:`asgd_averaged_params`).

    torch keeps ``eta``, ``mu`` and ``step`` once per parameter; they are functions of the
    shared step count and the learning rate of each step, so every parameter's copies hold the
    same values whenever all parameters step together, which a funcopt update always does (one
    ``count`` per block, likewise). One copy keeps the state independent of the number of
    leaves and batchable by ``vmap``; ``funcopt.interop`` writes it into each torch parameter's
    state and, reading torch's, checks that the copies agree.
    """

    count: torch.Tensor
    eta: torch.Tensor
    mu: torch.Tensor
    ax: PyTree


def _as_float64(x: Any, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _asgd_schedule(lr: Any, lambd: Any, alpha: Any, t0: Any, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eta, mu)`` after ``step`` updates at learning rate ``lr``, as float64 0-dim tensors.

    ``eta = lr / (1 + lambd * lr * step) ** alpha`` and ``mu = 1 / max(1, step - t0)``,
    evaluated in torch's order (round them to the state's dtype to store them).
    """
    lr = _as_float64(lr, step.device)
    eta = torch.div(lr, (1 + lambd * lr * step) ** alpha)
    mu = 1 / torch.clamp(step - t0, min=1)
    return eta, mu


def scale_by_asgd(
    learning_rate: ScalarOrSchedule = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
) -> GradientTransformation:
    """Averaged SGD, as ``torch.optim.ASGD``; returns the update itself and averages the iterates.

    The update with the current step size ``eta`` (``learning_rate`` at the first step) is
    ``p_new = p * (1 - lambd * eta) - eta * g``, returned as ``p_new - p`` (no learning-rate
    block follows). The average ``ax`` then moves to ``p_new`` with weight ``mu``: it equals
    ``p_new`` while ``mu == 1``, that is for the first ``t0 + 2`` steps (an integer ``t0``),
    and then is the mean of the iterates from step ``t0 + 2`` on. The step size and
    weight of the next update are ``eta = lr / (1 + lambd * lr * t) ** alpha`` and
    ``mu = 1 / max(1, t - t0)`` after ``t`` updates, with ``lr`` this step's learning rate
    (a schedule changes ``eta`` from the next update on, as a torch LR scheduler does).

    Args:
        learning_rate: a number, a 0-dim tensor or a schedule ``count -> value`` (>= 0).
        lambd: the decay term (default 1e-4, >= 0).
        alpha: the power of the step-size decay (default 0.75, >= 0).
        t0: the number of steps after which averaging starts (default 1e6: no averaging in
            practice; lower it to use the average).

    References: Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging",
    SIAM J. Control and Optimization, 1992.
    """
    check_learning_rate(learning_rate)
    check_non_negative("lambd", lambd)
    check_non_negative("alpha", alpha)
    _check_range("t0", t0)

    def lr_at(count):
        return _value_at(learning_rate, count)

    def init(params):
        count = init_count(params)
        dtype, device = _scalar_dtype(), first_device(params)
        eta = torch.as_tensor(lr_at(count), device=device).to(dtype).clone()
        mu = torch.ones((), dtype=dtype, device=device)
        return ScaleByAsgdState(count, eta, mu, _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByAsgdState, "scale_by_asgd")
        require_params(params, "scale_by_asgd")
        eta = state.eta.to(torch.float64)  # torch reads it as a Python float
        decay = 1 - lambd * eta
        neg_eta = -eta
        is_one = state.mu == 1

        def leaf(g, p, ax):
            p_new = _add_scaled(_scaled(p, decay), g, neg_eta)
            # torch: ax.add_(param.sub(ax).mul_(mu)), in place (so in ax's dtype), or
            # ax.copy_(param) while mu == 1
            ax_new = torch.where(is_one, p_new, ax + ((p_new - ax) * state.mu).to(ax.dtype))
            return p_new - p, ax_new

        direction, ax = _map_n(leaf, 2, (updates, params, state.ax), ("updates", "params", "ax"))
        count = state.count + 1
        new_eta, new_mu = _asgd_schedule(lr_at(state.count), lambd, alpha, t0, count.to(torch.float64))
        dtype = state.eta.dtype
        return direction, ScaleByAsgdState(count, new_eta.to(dtype), new_mu.to(dtype), ax)

    return GradientTransformation(init, update)


def asgd_averaged_params(state: Any) -> PyTree:
    """The averaged params ``ax`` of an ASGD optimizer's state, for evaluation.

    Finds the one :class:`ScaleByAsgdState` in ``state`` (the state of :func:`funcopt.asgd`,
    possibly inside ``inject_hyperparams`` or a chain) and returns its ``ax``: the running
    average of the iterates, shaped like the params. For the first ``t0 + 2`` steps ``ax``
    equals the latest params (zeros before the first step); after ``T`` steps it is the mean
    of the iterates ``t0 + 2 .. T`` (``tests/test_classic.py`` checks this closed form).

    Example:
        >>> tx = funcopt.asgd(1e-2, t0=100.0)
        >>> # ... training steps ...
        >>> eval_params = funcopt.asgd_averaged_params(state)
    """
    found = _find_states(state, ScaleByAsgdState)
    if len(found) != 1:
        raise FuncoptError(
            f"asgd_averaged_params found {len(found)} ScaleByAsgdState entries in the state; pass the "
            "state of one funcopt.asgd optimizer (or the part of a larger state that holds it)."
        )
    return found[0].ax
