"""Validation and scalar helpers shared by the building blocks (``funcopt.transforms``).

Range checks for Python-number hyperparameters (tensors, as ``inject_hyperparams`` passes them,
are not checked), the step count every stateful block keeps, the float64 1-based step, and the
search for one block's state inside an optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch

from funcopt import tree as _tree
from funcopt.base import (
    EmptyState,
    FuncoptError,
    PyTree,
)

__all__ = ["check_beta", "check_non_negative", "check_learning_rate", "first_device", "init_count", "is_python_zero"]

# ---------------------------------------------------------------------------------------------
# Validation and scalar helpers (private)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_python_zero(x: Any) -> bool:
    """True only for a Python number equal to 0; tensors never count as zero.

    Used for structural choices (whether a block exists at all), which must not depend on a
    tensor's value so that the state structure is the same under ``inject_hyperparams``/``vmap``.
    """
    return _is_number(x) and x == 0


def _check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or value is None:
        raise FuncoptError(f"{name} must be a number or a 0-dim tensor, got {value!r}.")
    if isinstance(value, torch.Tensor) or callable(value):
        return
    if not _is_number(value):
        raise FuncoptError(f"{name} must be a number or a 0-dim tensor, got {type(value).__name__}.")
    if value != value:
        raise FuncoptError(f"{name} must not be NaN.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise FuncoptError(f"{name} must lie in {interval}, got {value!r}.")


def check_beta(name: str, value: Any) -> None:
    """Validates a decay rate (beta) in [0, 1) when it is a Python number."""
    _check_range(name, value, 0.0, 1.0, high_open=True)


def check_non_negative(name: str, value: Any) -> None:
    """Raises ``FuncoptError`` if ``value`` is a negative Python number (tensors pass unchecked)."""
    _check_range(name, value, 0.0)


def check_learning_rate(value: Any) -> None:
    """Raises ``FuncoptError`` for a negative Python learning rate, pointing at ``maximize=True``."""
    if _is_number(value) and value < 0:
        raise FuncoptError(
            f"learning_rate must be >= 0, got {value!r}. To ascend instead of descend, pass "
            "maximize=True (or use funcopt.scale(-1.0) in a chain)."
        )
    if not callable(value):
        _check_range("learning_rate", value, 0.0)


def _init_empty(params: PyTree) -> EmptyState:
    """The ``init`` of a stateless block."""
    return EmptyState()


def first_device(params: PyTree) -> torch.device:
    """The device of the first tensor leaf of ``params`` (CPU for a tree without tensors)."""
    for leaf in _tree.leaves(params):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def init_count(params: PyTree) -> torch.Tensor:
    """A step count for a new state: a 0-dim int64 zero on the device of ``params``."""
    return torch.zeros((), dtype=torch.int64, device=first_device(params))


def _float_step(count: torch.Tensor) -> torch.Tensor:
    """``count + 1`` as a float64 0-dim tensor (the 1-based step torch.optim uses)."""
    return (count + 1).to(torch.float64)


def _value_at(value: Any, count: torch.Tensor) -> Any:
    """A hyperparameter at the step ``count``: ``value(count)`` for a schedule, else ``value``."""
    return value(count) if callable(value) else value


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: Any) -> torch.Tensor:
    """``torch.lerp`` whose tensor weight is cast to the leaf dtype (a batched float64
    hyperparameter under ``vmap`` next to float32 params would otherwise be rejected)."""
    if isinstance(weight, torch.Tensor) and weight.dtype != start.dtype:
        weight = weight.to(start.dtype)
    return torch.lerp(start, end, weight)


def _scalar_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def _scalar_state(value: Any, count: torch.Tensor) -> torch.Tensor:
    """A new 0-dim scalar of a block's state holding ``value``: float64 (float32 on MPS), on the
    device of the state's ``count``."""
    return torch.as_tensor(value, dtype=_scalar_dtype(count), device=count.device).clone()


def _find_states(state: Any, state_type: type, *, nested: bool = False) -> list[Any]:
    """Every ``state_type`` node of an optimizer state, outermost and first first.

    Searches tuples (named ones included), lists and dict values. A found node is searched
    further only with ``nested=True`` (wrappers whose inner state may hold another one).
    """
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, state_type):
            found.append(node)
            if not nested:
                return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return found


def _missing_value(where: str) -> FuncoptError:
    """The error of a block whose update reads the loss (``value=``) and was called without it."""
    return FuncoptError(
        f"{where} needs the loss at the current params: call `tx.update(grads, state, params, value=loss)` "
        "(grads, loss = torch.func.grad_and_value(loss_fn)(params) gives both; funcopt.make_step and "
        "funcopt.apply_gradients(..., value=loss) pass it for you)."
    )
