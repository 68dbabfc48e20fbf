"""Guards on the values that reach the params: ``zero_nans``, ``keep_params_nonnegative``, and
``skip_updates_if`` with optax's two skip predicates ``skip_not_finite`` and
``skip_large_updates``.

Part of ``funcopt.transforms``; optax 0.2.8's numerics and names. Decisions on tensor values are
taken with ``torch.where`` (no Python branch), so everything runs under ``vmap``/``grad``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    FuncoptError,
    GradientTransformation,
    OptState,
    PyTree,
    check_state,
    require_params,
    stable_name,
)
from funcopt.transforms._common import _init_empty, init_count
from funcopt.transforms._conditional import _tree_select

__all__ = [
    "ZeroNansState",
    "SkipUpdatesState",
    "zero_nans",
    "keep_params_nonnegative",
    "skip_not_finite",
    "skip_large_updates",
    "skip_updates_if",
]


@stable_name("funcopt.ZeroNansState")
class ZeroNansState(NamedTuple):
    """State of :func:`zero_nans`: ``found_nan``, shaped like the params with one 0-dim bool
    per leaf, True where the last update of that leaf held a NaN."""

    found_nan: PyTree


def zero_nans() -> GradientTransformation:
    """Replaces NaNs in the updates by zeros (``optax.zero_nans``); the state records, per leaf,
    whether the last update had any (infinities pass unchanged)."""

    def init(params):
        return ZeroNansState(_tree.map(lambda p: torch.zeros((), dtype=torch.bool, device=p.device), params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ZeroNansState, "zero_nans")
        found = _tree.map(lambda u: torch.isnan(u).any(), updates)
        return _tree.map(lambda u: torch.where(torch.isnan(u), torch.zeros_like(u), u), updates), ZeroNansState(found)

    return GradientTransformation(init, update)


def keep_params_nonnegative() -> GradientTransformation:
    """Changes the updates so that no parameter becomes negative (``optax.keep_params_nonnegative``).

    Where ``p + u < 0`` the update becomes ``-p`` (the parameter lands on 0). Put it last in a
    chain, after the learning rate. Parameters that are already negative are moved to 0.
    """

    def update(updates, state, params=None, **extra_args):
        require_params(params, "keep_params_nonnegative")
        out = _tree.map(lambda u, p: torch.where(p + u < 0.0, -p, u), updates, params, names=("updates", "params"))
        return out, state

    return GradientTransformation(_init_empty, update)


def _any_tensor(updates: PyTree) -> torch.Tensor:
    leaves = _tree.leaves(updates)
    if not leaves:
        raise FuncoptError("skip predicate: `updates` has no tensor leaves.")
    return leaves[0]


def skip_not_finite(updates: PyTree, gradient_step: torch.Tensor, params: PyTree | None) -> tuple[torch.Tensor, dict]:
    """A skip predicate for :func:`skip_updates_if` (``optax.skip_not_finite``): skip when any
    update element is NaN or infinite.

    Returns ``(should_skip, {"should_skip": should_skip, "num_not_finite": n})``, a 0-dim bool
    and the 0-dim int64 count of non-finite elements.
    """
    del gradient_step, params
    _any_tensor(updates)
    count = sum((~torch.isfinite(u)).sum() for u in _tree.leaves(updates))
    should_skip = count > 0
    return should_skip, {"should_skip": should_skip, "num_not_finite": count}


def skip_large_updates(
    updates: PyTree, gradient_step: torch.Tensor, params: PyTree | None, max_squared_norm: float | torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """A skip predicate for :func:`skip_updates_if` (``optax.skip_large_updates``): skip when the
    squared global norm of the updates is not below ``max_squared_norm`` (NaN norms skip too).

    Bind the threshold first: ``functools.partial(skip_large_updates, max_squared_norm=100.0)``.
    Returns ``(should_skip, {"should_skip": should_skip, "norm_squared": n2})``.
    """
    del gradient_step, params
    _any_tensor(updates)
    norm_sq = sum(torch.sum(u * u) for u in _tree.leaves(updates))
    should_skip = ~(norm_sq < max_squared_norm)
    return should_skip, {"should_skip": should_skip, "norm_squared": norm_sq}


@stable_name("funcopt.SkipUpdatesState")
class SkipUpdatesState(NamedTuple):
    """State of :func:`skip_updates_if`: ``gradient_step``, the 0-dim int64 count of steps that
    were applied; ``inner_state``; ``skip_state``, what the predicate returned last (a dict)."""

    gradient_step: torch.Tensor
    inner_state: OptState
    skip_state: Any


def skip_updates_if(
    inner: GradientTransformation,
    should_skip_update_fn: Callable[[PyTree, torch.Tensor, PyTree | None], tuple[torch.Tensor, Any]],
) -> GradientTransformation:
    """Skips the steps that ``should_skip_update_fn`` rejects: they return zeros and leave the
    inner state as it was, as if they never happened.

    This is ``optax.MultiSteps(inner, every_k_schedule=1, should_skip_update_fn=...)`` (wrap an
    :func:`funcopt.accumulate` inside to skip micro-batches before accumulating them). The
    predicate is called as ``fn(updates, gradient_step, params)`` on the incoming updates and
    returns ``(should_skip, skip_state)``: a 0-dim bool tensor and any pytree of tensors, kept in
    the state for monitoring (:func:`skip_not_finite`, :func:`skip_large_updates`). The inner
    update is computed on every call and selected with ``torch.where``.

    Args:
        inner: the transformation to guard, e.g. ``funcopt.adam(1e-3)``.
        should_skip_update_fn: the predicate.

    Returns:
        A ``GradientTransformation`` with state :class:`SkipUpdatesState`.
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"skip_updates_if expects a GradientTransformation, got {type(inner).__name__}.")
    if not callable(should_skip_update_fn):
        raise FuncoptError(
            "skip_updates_if: should_skip_update_fn must be a function (updates, gradient_step, params) -> "
            "(should_skip, skip_state), e.g. funcopt.skip_not_finite."
        )

    def _ask(updates, gradient_step, params):
        out = should_skip_update_fn(updates, gradient_step, params)
        skip = out[0] if isinstance(out, tuple) and len(out) == 2 else None
        if not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool or skip.dim() != 0:
            raise FuncoptError(
                "skip_updates_if: should_skip_update_fn must return (should_skip, skip_state) with "
                f"should_skip a 0-dim bool tensor; got {out!r:.200}."
            )
        return out

    def init(params):
        step = init_count(params)
        _, skip_state = _ask(_tree.zeros_like(params), step, params)
        return SkipUpdatesState(step, inner.init(params), skip_state)

    def update(updates, state, params=None, **extra_args):
        check_state(state, SkipUpdatesState, "skip_updates_if")
        skip, skip_state = _ask(updates, state.gradient_step, params)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        out = _tree.map(lambda u: torch.where(skip, torch.zeros_like(u), u), new_updates)
        inner_state = _tree_select(~skip, new_inner, state.inner_state, "skip_updates_if")
        step = state.gradient_step + (~skip).to(state.gradient_step.dtype)
        return out, SkipUpdatesState(step, inner_state, skip_state)

    return GradientTransformation(init, update)
