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
from funcopt.base import GradientTransformation, PyTree, check_state
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


def _ema(average: PyTree, x: PyTree, decay: Any, names: tuple[str, str] | None = None) -> PyTree:
    """The moving average ``decay * average + (1 - decay) * x`` leaf-wise (``names`` label the
    two trees in a structure-mismatch error)."""
    return _tree.map(lambda m, u: _lerp(m, u, 1 - decay), average, x, names=names)


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


def _moment_block(
    name: str,
    state_type: type,
    init: int | Callable[[PyTree], Any],
    advance: Callable[[PyTree, Any], tuple[PyTree, tuple]],
) -> GradientTransformation:
    """The block ``name`` whose state is ``state_type(count, *moments)``.

    ``init``: how many params-shaped zero trees the moments start as, or a function
    ``params -> state``. ``advance(updates, state)`` returns the new updates and the new moments;
    the count advances by one. The update checks the state it is given and needs no params.
    """

    def init_fn(params):
        return _zeros_state(state_type, params, init) if isinstance(init, int) else init(params)

    def update(updates, state, params=None, **extra_args):
        check_state(state, state_type, name)
        out, moments = advance(updates, state)
        return out, state_type(state.count + 1, *moments)

    return GradientTransformation(init_fn, update)
