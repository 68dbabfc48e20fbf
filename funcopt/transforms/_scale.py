"""Non-adaptive blocks: scaling, learning rates, momentum, weight decay, trust ratio, clipping.

Part of ``funcopt.transforms`` (import the blocks from there or from ``funcopt``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    stable_name,
    EmptyState,
    FuncoptError,
    GradientTransformation,
    PyTree,
    ScalarOrSchedule,
    check_state,
    require_params,
)
from funcopt.transforms._common import (
    _check_range,
    _init_empty,
    init_count,
    _is_number,
    is_python_zero,
    check_learning_rate,
    check_non_negative,
)

__all__ = [
    "ScaleByScheduleState",
    "TraceState",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "trace",
    "add_decayed_weights",
    "scale_by_trust_ratio",
    "clip",
    "clip_by_global_norm",
]

# ---------------------------------------------------------------------------------------------
# Scaling and learning rates


@stable_name("funcopt.ScaleByScheduleState")
class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: the 0-dim int64 step count."""

    count: torch.Tensor


def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiplies updates by a constant ``step_size`` (``optax.scale``)."""
    _check_range("step_size", step_size)

    def update(updates, state, params=None, **extra_args):
        return _tree.map(lambda u: u * step_size, updates), state

    return GradientTransformation(_init_empty, update)


def scale_by_schedule(step_size_fn: Callable[[torch.Tensor], Any]) -> GradientTransformation:
    """Multiplies updates by ``step_size_fn(count)``, the count starting at 0."""
    if not callable(step_size_fn):
        raise FuncoptError("scale_by_schedule needs a callable count -> value.")

    def init(params):
        return ScaleByScheduleState(count=init_count(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByScheduleState, "scale_by_schedule")
        factor = step_size_fn(state.count)
        updates = _tree.map(lambda u: u * factor, updates)
        return updates, ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Multiplies updates by ``-learning_rate`` (``optax.scale_by_learning_rate``).

    ``learning_rate`` is a float, a 0-dim tensor, or a schedule ``count -> value`` evaluated at
    the 0-based count of this block's updates (the k-th update uses ``schedule(k - 1)``, the
    value ``torch.optim.lr_scheduler`` gives the k-th ``optimizer.step()``).
    """
    check_learning_rate(learning_rate)
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)


# ---------------------------------------------------------------------------------------------
# Momentum, weight decay, trust ratio, clipping


@stable_name("funcopt.TraceState")
class TraceState(NamedTuple):
    """State of :func:`trace`: count and the momentum buffer shaped like the params."""

    count: torch.Tensor
    momentum_buffer: PyTree


def trace(decay: float, *, dampening: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum with torch.optim.SGD's semantics (``optax.trace`` with dampening).

    ``b = g`` on the first step, then ``b = decay * b + (1 - dampening) * g``; returns ``b``, or
    ``g + decay * b`` with ``nesterov=True`` (Sutskever et al., 2013).
    """
    _check_range("decay", decay, 0.0)
    _check_range("dampening", dampening, 0.0, 1.0)
    if nesterov and _is_number(dampening) and dampening != 0:
        raise FuncoptError("Nesterov momentum requires dampening=0 (as in torch.optim.SGD).")
    if nesterov and is_python_zero(decay):
        raise FuncoptError("Nesterov momentum requires a momentum (decay) > 0.")

    def init(params):
        return TraceState(init_count(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, TraceState, "trace")
        first = state.count == 0
        buf = _tree.map(
            lambda b, g: torch.where(first, g, b * decay + g * (1 - dampening)),
            state.momentum_buffer,
            updates,
            names=("momentum_buffer", "updates"),
        )
        out = _tree.map(lambda g, b: g + b * decay, updates, buf) if nesterov else buf
        return out, TraceState(state.count + 1, buf)

    return GradientTransformation(init, update)


def _resolve_mask(mask: Any, params: PyTree, what: str) -> PyTree:
    m = mask(params) if callable(mask) else mask
    if _tree.structure(m) != _tree.structure(params):
        _tree.check_same_structure(params, m, ("params", f"{what} mask"))
    for path, leaf in zip(_tree.paths(m), _tree.leaves(m)):
        if not isinstance(leaf, bool):
            raise FuncoptError(f"{what} mask leaf at {path} is {leaf!r}; mask leaves must be True or False.")
    return m


def add_decayed_weights(
    weight_decay: float = 0.0, mask: PyTree | Callable[[PyTree], PyTree] | None = None
) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates (``optax.add_decayed_weights``).

    Placed before an adaptive block it is L2 regularization (``torch.optim.Adam(weight_decay)``);
    placed after it, before the learning rate, it is decoupled weight decay (AdamW, Loshchilov &
    Hutter, 2019). ``mask`` (a pytree of bools shaped like params, or a function of params
    returning one) limits the decay to the leaves marked True.
    """
    _check_range("weight_decay", weight_decay, 0.0)

    def init(params):
        if mask is not None:
            _resolve_mask(mask, params, "add_decayed_weights")
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        require_params(params, "add_decayed_weights")
        if mask is None:
            out = _tree.map(lambda u, p: u + p * weight_decay, updates, params, names=("updates", "params"))
        else:
            m = _resolve_mask(mask, params, "add_decayed_weights")
            out = _tree.map(
                lambda u, p, keep: u + p * weight_decay if keep else u, updates, params, m,
                names=("updates", "params", "mask"),
            )
        return out, state

    return GradientTransformation(init, update)


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> GradientTransformation:
    """Scales each leaf's update by ``||p|| / ||u||`` (LARS/LAMB; You et al., 2019, arXiv 1904.00962).

    Norms are per leaf and floored at ``min_norm``; the ratio is 1 where either norm is zero.
    """
    check_non_negative("min_norm", min_norm)
    check_non_negative("eps", eps)

    def update(updates, state, params=None, **extra_args):
        require_params(params, "scale_by_trust_ratio")

        def _scale(u, p):
            p_norm = torch.clamp(torch.linalg.vector_norm(p), min=min_norm)
            u_norm = torch.clamp(torch.linalg.vector_norm(u), min=min_norm)
            ratio = trust_coefficient * p_norm / (u_norm + eps)
            zero = (p_norm == 0) | (u_norm == 0)
            return u * torch.where(zero, torch.ones_like(ratio), ratio)

        return _tree.map(_scale, updates, params, names=("updates", "params")), state

    return GradientTransformation(_init_empty, update)


def clip(max_delta: float) -> GradientTransformation:
    """Clamps every update element to ``[-max_delta, max_delta]`` (``optax.clip``)."""
    _check_range("max_delta", max_delta, 0.0)

    def update(updates, state, params=None, **extra_args):
        return _tree.map(lambda u: torch.clamp(u, -max_delta, max_delta), updates), state

    return GradientTransformation(_init_empty, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescales all updates together so their global L2 norm is at most ``max_norm``.

    Updates with a smaller norm pass unchanged (``optax.clip_by_global_norm``; like
    ``torch.nn.utils.clip_grad_norm_`` without its 1e-6 in the denominator).
    """
    _check_range("max_norm", max_norm, 0.0, low_open=True)

    def update(updates, state, params=None, **extra_args):
        g_norm = _tree.norm(updates)
        factor = max_norm / torch.clamp(g_norm, min=max_norm)
        return _tree.map(lambda u: u * factor, updates), state

    return GradientTransformation(_init_empty, update)
