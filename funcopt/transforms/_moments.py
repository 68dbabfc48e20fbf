"""Pieces shared by the moment-based blocks (Adam's family): hyperparameter checks, the
zero-initialized state, moving averages of the updates, their bias corrections, and the
``init``/``update`` pair of a block whose state is a step count and its moments.

Part of ``funcopt.transforms`` (private helpers; no public names). Every moving average is
``torch.lerp(m, x, 1 - decay)`` (torch.optim's form), so a block written with these helpers
computes the same numbers as one spelling the lerps out.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, check_state
from funcopt.transforms._common import _float_step, _lerp, check_beta, check_non_negative, init_count

__all__: list[str] = []


def _check_moment_args(b1: Any, b2: Any, eps: Any, eps_root: Any = 0.0) -> None:
    """Validates Adam's hyperparameters: ``b1``, ``b2`` in [0, 1), ``eps``, ``eps_root`` >= 0."""
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_non_negative("eps", eps)
    check_non_negative("eps_root", eps_root)


def _zeros_state(state_type: type, params: PyTree, buffers: int, *rest: Any) -> Any:
    """``state_type(count, m_1, ..., m_buffers, *rest)``: a zero step count, then ``buffers``
    params-shaped zero trees (each its own tensors), then ``rest`` as given."""
    return state_type(init_count(params), *(_tree.zeros_like(params) for _ in range(buffers)), *rest)


def _decayed_sum(m: torch.Tensor, u: torch.Tensor, decay: Any) -> torch.Tensor:
    """``decay * m + (1 - decay) * u``: ``torch.lerp`` where ``m`` and ``u`` share a dtype; for a
    moment stored in another dtype (``mu_dtype``) optax's arithmetic, ``(1 - decay) * u + decay *
    m`` with each product rounded in its operand's dtype (``decay`` cast to it first, as JAX casts
    a Python scalar to the array's dtype) and the sum in the wider of the two."""
    if m.dtype == u.dtype:
        return _lerp(m, u, 1 - decay)
    out = torch.promote_types(m.dtype, u.dtype)
    scaled_m = m * torch.as_tensor(decay, dtype=m.dtype, device=m.device)
    scaled_u = u * torch.as_tensor(1 - decay, dtype=u.dtype, device=u.device)
    return scaled_u.to(out) + scaled_m.to(out)


def _ema(average: PyTree, x: PyTree, decay: Any, names: tuple[str, str] | None = None) -> PyTree:
    """The moving average ``decay * average + (1 - decay) * x`` leaf-wise (``names`` label the
    two trees in a structure-mismatch error); see :func:`_decayed_sum` for an ``average`` stored
    in a narrower dtype."""
    return _tree.map(lambda m, u: _decayed_sum(m, u, decay), average, x, names=names)


def _ema_of_squares(average: PyTree, x: PyTree, decay: Any, names: tuple[str, str] | None = None) -> PyTree:
    """The moving average of ``x**2``: ``decay * average + (1 - decay) * x * x`` leaf-wise."""
    return _tree.map(lambda v, u: _lerp(v, u * u, 1 - decay), average, x, names=names)


def _moments(updates: PyTree, state: Any, b1: Any, b2: Any) -> tuple[PyTree, PyTree]:
    """Adam's new moments from a state with ``mu`` and ``nu``: the moving averages of the
    updates (decay ``b1``) and of their squares (decay ``b2``)."""
    mu = _ema(state.mu, updates, b1, names=("mu", "updates"))
    nu = _ema_of_squares(state.nu, updates, b2, names=("nu", "updates"))
    return mu, nu


def _bias_corrections(count: torch.Tensor, *decays: Any) -> tuple[torch.Tensor, ...]:
    """``1 - decay**t`` for each decay, ``t = count + 1`` the 1-based step (float64 0-dim)."""
    step = _float_step(count)
    return tuple(1 - b**step for b in decays)


def check_mu_dtype(mu_dtype: Any) -> None:
    """``mu_dtype`` is None or a floating-point ``torch.dtype``."""
    if mu_dtype is not None and not (isinstance(mu_dtype, torch.dtype) and mu_dtype.is_floating_point):
        raise FuncoptError(
            f"mu_dtype must be None or a floating-point torch.dtype (e.g. torch.bfloat16), got {mu_dtype!r}."
        )


def _moment_block(
    name: str,
    state_type: type,
    init: int | Callable[[PyTree], Any],
    advance: Callable[[PyTree, Any], tuple[PyTree, tuple]],
    *,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The block ``name`` whose state is ``state_type(count, *moments)``.

    ``init``: how many params-shaped zero trees the moments start as, or a function
    ``params -> state``. ``advance(updates, state)`` returns the new updates and the new moments;
    the count advances by one. The update checks the state it is given and needs no params.
    ``mu_dtype`` (optax's option): the state's ``mu`` field is stored in that dtype; the moving
    average reads it as optax does (:func:`_decayed_sum`) and the new value is cast back.
    """
    check_mu_dtype(mu_dtype)
    mu_at = state_type._fields.index("mu") - 1 if mu_dtype is not None else -1  # among the moments

    def init_fn(params):
        state = _zeros_state(state_type, params, init) if isinstance(init, int) else init(params)
        if mu_dtype is not None:
            state = state._replace(mu=_tree.map(lambda m: m.to(mu_dtype), state.mu))
        return state

    def update(updates, state, params=None, **extra_args):
        check_state(state, state_type, name)
        out, moments = advance(updates, state)
        if mu_dtype is not None:
            moments = tuple(_tree.map(lambda m: m.to(mu_dtype), x) if i == mu_at else x for i, x in enumerate(moments))
        return out, state_type(state.count + 1, *moments)

    return GradientTransformation(init_fn, update)
