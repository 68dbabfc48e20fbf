"""Wrappers that change when a transformation applies: ``apply_if_finite`` skips steps with
NaN/Inf gradients; ``accumulate`` averages gradients over ``k`` micro-batches
(``optax.MultiSteps``).

Both are pure and branch-free on tensor values: decisions that depend on a tensor (is this step
finite? is this the k-th micro-batch?) are taken with ``torch.where``, so they run under
``torch.func.vmap``/``grad`` and ``torch.compile``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    FuncoptError,
    GradientTransformation,
    OptState,
    PyTree,
    check_state,
    stable_name,
)
from funcopt.transforms._common import init_count

__all__ = [
    "ApplyIfFiniteState",
    "AccumulateState",
    "apply_if_finite",
    "accumulate",
]


# ---------------------------------------------------------------------------------------------
# apply_if_finite


@stable_name("funcopt.ApplyIfFiniteState")
class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    ``notfinite_count``: consecutive steps with non-finite gradients (0-dim int64);
    ``last_finite``: whether the last step's gradients were all finite (0-dim bool);
    ``total_notfinite``: all non-finite steps so far (0-dim int64); ``inner_state``: the
    wrapped transformation's state (unchanged by a skipped step).
    """

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: OptState


def _all_finite(tree: PyTree) -> torch.Tensor:
    """True when no leaf holds NaN or Inf, as a 0-dim bool tensor.

    ``(x * 0).sum()`` is 0 when ``x`` is finite and NaN as soon as one element is NaN or Inf
    (no overflow is possible), in two passes where ``isfinite(x).all()`` takes about five.
    """
    flat = _tree.leaves(tree)
    if not flat:
        return torch.ones((), dtype=torch.bool)
    total = None
    for x in flat:
        term = (x * 0).sum()
        total = term if total is None else total + term
    return total == 0


def _tree_select(cond: torch.Tensor, new: PyTree, old: PyTree, what: str) -> PyTree:
    """Leaf-wise ``torch.where(cond, new, old)`` over two inner states of equal structure."""

    def pick(a, b):
        if isinstance(a, torch.Tensor):
            return torch.where(cond, a, b)
        if a != b:
            pairs = zip(_tree.paths(new), _tree.leaves(new), _tree.leaves(old))
            bad = [p for p, x, y in pairs if not isinstance(x, torch.Tensor) and x != y]
            raise FuncoptError(
                f"{what}: the inner state holds a non-tensor value at {bad[0] if bad else '?'} that "
                f"changed ({b!r} -> {a!r}); state entries that change must be tensors."
            )
        return a

    return _tree.map(pick, new, old, names=("new inner state", "old inner state"))


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skips updates whose gradients contain NaN or Inf, like ``optax.apply_if_finite``.

    A step whose input updates are not all finite returns zeros and leaves the inner state
    unchanged; it is counted in the state. After more than ``max_consecutive_errors``
    consecutive bad steps the wrapper gives up and applies the inner update anyway (so NaNs
    reach the params and the failure becomes visible instead of silently stalling). The inner
    update is computed on every call and selected with ``torch.where`` (no Python branch on a
    tensor value), so it works under ``vmap`` and ``torch.compile``.

    Args:
        inner: the transformation to protect, e.g. ``funcopt.adam(1e-3)``.
        max_consecutive_errors: how many consecutive non-finite steps to skip (>= 0).

    Returns:
        A ``GradientTransformation`` with state :class:`ApplyIfFiniteState`.
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"apply_if_finite expects a GradientTransformation, got {type(inner).__name__}.")
    if isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int) or max_consecutive_errors < 0:
        raise FuncoptError(
            f"apply_if_finite: max_consecutive_errors must be an int >= 0, got {max_consecutive_errors!r}."
        )

    def init(params):
        zero = init_count(params)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool, device=zero.device), zero.clone(), inner.init(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ApplyIfFiniteState, "apply_if_finite")
        finite = _all_finite(updates).to(state.last_finite.device)
        notfinite_count = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        total = torch.where(finite, state.total_notfinite, state.total_notfinite + 1)
        apply = finite | (notfinite_count > max_consecutive_errors)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        out = _tree.map(lambda u: torch.where(apply, u, 0.0), new_updates)
        inner_state = _tree_select(apply, new_inner, state.inner_state, "apply_if_finite")
        return out, ApplyIfFiniteState(notfinite_count, finite, total, inner_state)

    return GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# accumulate


@stable_name("funcopt.AccumulateState")
class AccumulateState(NamedTuple):
    """State of :func:`accumulate`.

    ``mini_step``: micro-batches accumulated since the last real update (0-dim int64, 0 right
    after an update); ``gradient_step``: real updates so far (0-dim int64); ``inner_state``:
    the wrapped transformation's state; ``acc_grads``: the running sum of gradients.
    """

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_state: OptState
    acc_grads: PyTree


def accumulate(inner: GradientTransformation, every_k: int, *, average: bool = True) -> GradientTransformation:
    """Gradient accumulation: updates with the mean gradient of ``every_k`` micro-batches.

    Like ``optax.MultiSteps``. Calls 1..k-1 of each group add the gradients to an accumulator
    and return zeros (the params do not move); call k gives ``inner`` the mean (or, with
    ``average=False``, the sum) of the k gradients and returns its update. With a mean loss over
    equal-sized micro-batches this is exactly one step on the concatenated batch. The inner
    update is computed on every call and selected with ``torch.where`` (no Python branch on the
    step count), which keeps it usable under ``vmap`` and ``torch.compile``; its cost is one
    optimizer step per micro-batch. ``state.mini_step == 0`` tells that the last call updated.

    Args:
        inner: the optimizer to run every k micro-batches.
        every_k: number of micro-batches per update (int >= 1).
        average: divide the accumulated gradient by ``every_k`` (default) or pass the sum.

    Returns:
        A ``GradientTransformation`` with state :class:`AccumulateState`.
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"accumulate expects a GradientTransformation, got {type(inner).__name__}.")
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise FuncoptError(f"accumulate: every_k must be an int >= 1, got {every_k!r}.")

    def init(params):
        zero = init_count(params)
        return AccumulateState(zero, zero.clone(), inner.init(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, AccumulateState, "accumulate")
        acc = _tree.map(lambda a, g: a + g, state.acc_grads, updates, names=("acc_grads", "updates"))
        emit = state.mini_step == every_k - 1
        grads = _tree.map(lambda a: a / every_k, acc) if average else acc
        new_updates, new_inner = inner.update(grads, state.inner_state, params, **extra_args)
        out = _tree.map(lambda u: torch.where(emit, u, 0.0), new_updates)
        inner_state = _tree_select(emit, new_inner, state.inner_state, "accumulate")
        acc = _tree.map(lambda a: torch.where(emit, 0.0, a), acc)
        mini_step = torch.where(emit, torch.zeros_like(state.mini_step), state.mini_step + 1)
        return out, AccumulateState(mini_step, state.gradient_step + emit.to(state.gradient_step.dtype), inner_state, acc)

    return GradientTransformation(init, update)
