"""The fast path's checks: when it applies, and the plan of one step (``funcopt.fused``).

Private helpers of :mod:`funcopt.fused`: reading hyperparameters as Python floats, checking
that the params, gradients and state buffers are plain dense tensors the kernels can take
(:func:`_columns`), parsing an optimizer's chain state, and :class:`_Plan`, everything one
step's kernels need.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import optree
import torch

from funcopt.base import EmptyState, PyTree
from funcopt.transforms import (
    ScaleByAdamState,
    ScaleByLionState,
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByScheduleState,
    TraceState,
)

__all__: list[str] = []

_FLOAT_DTYPES = (torch.float32, torch.float64)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN_TYPES)
_Tensor = torch.Tensor
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_MAIN_STATES: dict[str, tuple[type, ...]] = {
    "sgd": (TraceState,),
    "adam": (ScaleByAdamState,),
    "adamw": (ScaleByAdamState,),
    "adagrad": (ScaleByRssState,),
    "rmsprop": (ScaleByRmsState, TraceState),
    "lion": (ScaleByLionState,),
}



# ---------------------------------------------------------------------------------------------
# When the fast path applies


def _in_traced_context() -> bool:
    if torch.compiler.is_compiling():
        return True
    return bool(torch._C._are_functorch_transforms_active())


def _flatten(tree: PyTree) -> tuple[list[Any], Any]:
    return optree.tree_flatten(tree, none_is_leaf=False)


def _scalar(x: Any) -> float | None:
    """A hyperparameter as a Python float, or None where the fast path must not read it."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if (
        type(x) in _PLAIN_TYPES
        and x.dim() == 0
        and not x.requires_grad
        and not x.is_complex()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    ):
        return float(x)
    return None


class _Columns(NamedTuple):
    """Flat, aligned lists of one step's tensors, grouped by dtype (the kernels need one)."""

    groups: list[list[int]]
    device: torch.device


def _columns(lists: list[list[torch.Tensor]], check_overlap: bool) -> _Columns | None:
    """Checks aligned leaf lists (params, grads, state buffers) and groups their indices by dtype.

    Every tensor must be a plain dense contiguous float32/float64 tensor not requiring grad,
    with the dtype, shape and device of its leaf in the first list. With ``check_overlap``
    (when the kernels write into these buffers) no two may start at the same address (tied
    weights, one state tensor used twice). This is the fast path's per-step overhead, so
    each property is read with one C-level ``map`` per list and compared with the first
    list's.
    """
    first = lists[0]
    n = len(first)
    if n == 0:
        return None
    t0 = first[0]
    if type(t0) not in _PLAIN_TYPES or t0.device.type not in ("cpu", "cuda"):
        return None
    try:
        if not {type(t) for column in lists for t in column} <= _PLAIN_SET:
            return None
        dtypes = list(map(_DTYPE, first))
        shapes = list(map(_SHAPE, first))
        devices = list(map(_Tensor.get_device, first))
        for column in lists:
            # is_contiguous raises for sparse layouts (caught below)
            if (
                len(column) != n
                or (column is not first and list(map(_DTYPE, column)) != dtypes)
                or (column is not first and list(map(_SHAPE, column)) != shapes)
                or (column is not first and list(map(_Tensor.get_device, column)) != devices)
                or not all(map(_Tensor.is_contiguous, column))
                or True in map(_REQUIRES_GRAD, column)
            ):
                return None
    except (AttributeError, RuntimeError):
        return None
    if check_overlap:
        pointers = [p for column in lists for p in map(_Tensor.data_ptr, column)]
        if len(set(pointers)) != len(pointers):
            return None
    if len(set(dtypes)) == 1:
        return _Columns([list(range(n))], t0.device) if dtypes[0] in _FLOAT_DTYPES else None
    groups: dict[torch.dtype, list[int]] = {}
    for i, dtype in enumerate(dtypes):
        if dtype not in _FLOAT_DTYPES:
            return None
        groups.setdefault(dtype, []).append(i)
    return _Columns(list(groups.values()), t0.device)


def _pick(column: list[torch.Tensor], idx: list[int]) -> list[torch.Tensor]:
    return column if len(idx) == len(column) else [column[i] for i in idx]


def _per_dtype_group(plan: _Plan, step: Any) -> tuple[list[Any], dict[str, list[Any] | None]]:
    """Runs ``step(g, p, buffers) -> (outputs, new buffers)`` on each dtype group of ``plan``
    (the group's gradients, params or None, and state buffers by name) and returns the outputs
    and new buffers in leaf order."""
    n = len(plan.g)
    out: list[Any] = [None] * n
    new_buffers: dict[str, list[Any] | None] = {k: (None if v is None else [None] * n) for k, v in plan.buffers.items()}
    for idx in plan.columns.groups:
        g = _pick(plan.g, idx)
        p = _pick(plan.p, idx) if plan.p is not None else None
        res, res_buffers = step(g, p, {k: (None if v is None else _pick(v, idx)) for k, v in plan.buffers.items()})
        if len(idx) == n:  # one dtype group: the lists are already in leaf order
            return list(res), res_buffers
        for j, i in enumerate(idx):
            out[i] = res[j]
            for k, column in res_buffers.items():
                if column is not None:
                    new_buffers[k][i] = column[j]
    return out, new_buffers


def _parse_chain_state(kind: str, state: Any) -> dict[Any, int] | None:
    """Positions of the known entries of a chain state, or None if the layout is unexpected."""
    if type(state) is not tuple:
        return None
    found: dict[Any, int] = {}
    allowed = _MAIN_STATES[kind]
    last = len(state) - 1
    for i, s in enumerate(state):
        t = type(s)
        if t is EmptyState:
            continue
        if t is ScaleByScheduleState and i == last:
            found["schedule"] = i
        elif t in allowed and t not in found:
            found[t] = i
        else:
            return None
    return found


# ---------------------------------------------------------------------------------------------
# Dispatch

_FLOAT_ARGS = {
    "sgd": ("momentum", "dampening", "weight_decay"),
    "adam": ("b1", "b2", "eps", "weight_decay"),
    "adamw": ("b1", "b2", "eps", "weight_decay"),
    "adagrad": ("eps", "weight_decay"),
    "rmsprop": ("alpha", "eps", "weight_decay", "momentum"),
    "lion": ("b1", "b2", "weight_decay"),
}
_BOOL_ARGS = ("nesterov", "maximize", "amsgrad", "centered")


def _count_ok(count: Any, device: torch.device) -> bool:
    return (
        type(count) is torch.Tensor
        and count.dim() == 0
        and count.dtype == torch.int64
        and count.device == device
        and not torch._C._functorch.is_functorch_wrapped_tensor(count)
    )


class _Plan(NamedTuple):
    h: dict[str, Any]
    lr: float
    spec: Any
    columns: _Columns
    p: list[torch.Tensor] | None
    g: list[torch.Tensor]
    buffers: dict[str, list[torch.Tensor] | None]
    counts: dict[Any, torch.Tensor]
    positions: dict[Any, int]



def _absent(x: Any) -> bool:
    """An unused optional state field: ``()`` (what funcopt's transforms store) or ``None``."""
    return x is None or (type(x) is tuple and len(x) == 0)


def _is_python_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0
