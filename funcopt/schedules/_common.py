"""Private helpers shared by the schedules: validation of hyperparameters and the count as a tensor."""

from __future__ import annotations

from typing import Any, Union

import torch

from funcopt.base import FuncoptError

Value = Union[float, torch.Tensor]


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
