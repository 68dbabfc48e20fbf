"""When a fast route applies, and the plan of one step: generic over every declared optimizer.

A :class:`Layout` is the shape of an optimizer's chain state as its own ``init`` builds it
(read once from ``init({})``); :func:`plan_step` checks a (grads, state, params) triple
against it and returns a :class:`Plan` (everything one step's kernels need), or a short reason
why the fast route does not apply (read by :func:`funcopt.fast.explain`).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import optree
import torch

from funcopt.base import PyTree

__all__ = ["KernelCall"]

_FLOAT_DTYPES = (torch.float32, torch.float64)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN_TYPES)
_Tensor = torch.Tensor
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def traced_reason() -> str | None:
    """Why no fast route may run here (``torch.compile`` tracing, a functorch transform), or None."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing (the reference path compiles with fullgraph=True)"
    if torch._C._are_functorch_transforms_active():
        return "a torch.func transform (vmap, grad, jvp, vjp...) is active"
    return None


def flatten(tree: PyTree) -> tuple[list[Any], Any]:
    return optree.tree_flatten(tree, none_is_leaf=False)


def absent(x: Any) -> bool:
    """An unused optional state field: ``()`` (what funcopt's transforms store) or ``None``."""
    return x is None or (type(x) is tuple and len(x) == 0)


def scalar(x: Any) -> float | None:
    """A hyperparameter as a Python float, or None where the fast route must not read it."""
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


def count_ok(count: Any, device: torch.device) -> bool:
    return (
        type(count) is torch.Tensor
        and count.dim() == 0
        and count.dtype == torch.int64
        and count.device == device
        and not torch._C._functorch.is_functorch_wrapped_tensor(count)
    )


# ---------------------------------------------------------------------------------------------
# The state layout an optimizer's init builds


class Layout(NamedTuple):
    """Where an optimizer's chain state keeps its counts and buffers.

    ``types``: the type of each chain entry; ``counted``: positions of entries with a ``count``
    field (each step adds one) and ``count_index`` that field's index in each; ``buffers``:
    buffer name (a field name) -> (position, field index) for the params-shaped fields this
    configuration uses; ``unused``: the same for declared buffers this configuration leaves
    empty (``()``), or None where it has no such field at all; ``scalars``: name -> (position,
    field index) of the declared 0-dim tensor fields (e.g. ASGD's ``eta``), which each step
    replaces like a count.
    """

    types: tuple[type, ...]
    counted: tuple[int, ...]
    count_index: tuple[int, ...]
    buffers: dict[str, tuple[int, int]]
    unused: dict[str, tuple[int, int] | None]
    scalars: dict[str, tuple[int, int]] = {}

    @staticmethod
    def of(empty_state: Any, declared: tuple[str, ...], where: str, scalars: tuple[str, ...] = ()) -> Layout:
        """The layout of ``init({})`` (a chain state over no params) for the declared buffers
        and 0-dim ``scalars`` fields."""
        if type(empty_state) is not tuple:
            raise TypeError(f"{where}: a fast route needs a chain state (a tuple), got {type(empty_state).__name__}")
        counted: list[int] = []
        count_index: list[int] = []
        buffers: dict[str, tuple[int, int]] = {}
        unused: dict[str, tuple[int, int] | None] = {}
        found_scalars: dict[str, tuple[int, int]] = {}
        for i, entry in enumerate(empty_state):
            fields = getattr(type(entry), "_fields", None)
            if fields is None:
                raise TypeError(f"{where}: chain entry {i} is a {type(entry).__name__}, not a NamedTuple state")
            for k, (field, value) in enumerate(zip(fields, entry)):
                if field == "count":
                    counted.append(i)
                    count_index.append(k)
                elif field in scalars:
                    if field in found_scalars or not isinstance(value, torch.Tensor) or value.dim() != 0:
                        raise TypeError(f"{where}: the scalar {field!r} is not one 0-dim tensor field of the chain state")
                    found_scalars[field] = (i, k)
                elif field in declared:
                    if field in buffers or field in unused:
                        raise TypeError(f"{where}: the buffer name {field!r} appears twice in the chain state")
                    if absent(value):
                        unused[field] = (i, k)
                    else:
                        buffers[field] = (i, k)
                elif not absent(value):
                    raise TypeError(
                        f"{where}: state field {type(entry).__name__}.{field} is not among the declared "
                        f"buffers {declared}"
                    )
        for name in declared:  # a block this configuration leaves out (e.g. no momentum)
            if name not in buffers and name not in unused:
                unused[name] = None
        missing = [name for name in scalars if name not in found_scalars]
        if missing:
            raise TypeError(f"{where}: the chain state has no scalar field {missing[0]!r}")
        types = tuple(type(s) for s in empty_state)
        return Layout(types, tuple(counted), tuple(count_index), buffers, unused, found_scalars)


# ---------------------------------------------------------------------------------------------
# Aligned tensor columns


class Columns(NamedTuple):
    """Flat, aligned lists of one step's tensors, grouped by dtype (the kernels need one)."""

    groups: list[list[int]]
    device: torch.device


def columns(lists: list[list[torch.Tensor]], check_overlap: bool) -> Columns | None:
    """Checks aligned leaf lists (params, grads, state buffers) and groups their indices by dtype.

    Every tensor must be a plain dense contiguous float32/float64 tensor not requiring grad,
    with the dtype, shape and device of its leaf in the first list. With ``check_overlap``
    (when the kernels write into these buffers) no two may start at the same address (tied
    weights, one state tensor used twice). This is the fast route's per-step overhead, so each
    property is read with one C-level ``map`` per list. :func:`columns_reason` says why not.
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
        return Columns([list(range(n))], t0.device) if dtypes[0] in _FLOAT_DTYPES else None
    groups: dict[torch.dtype, list[int]] = {}
    for i, dtype in enumerate(dtypes):
        if dtype not in _FLOAT_DTYPES:
            return None
        groups.setdefault(dtype, []).append(i)
    return Columns(list(groups.values()), t0.device)


def columns_reason(named: list[tuple[str, list[Any], list[str]]], check_overlap: bool) -> str:
    """Why :func:`columns` refused ``named`` = [(tree name, leaves, leaf paths)...] (slow; for
    :func:`funcopt.fast.explain` only)."""
    first_name, first, first_paths = named[0]
    if not first:
        return f"{first_name} has no tensor leaves"
    seen: dict[int, str] = {}
    for name, column, paths in named:
        for leaf, path, ref, ref_path in zip(column, paths, first, first_paths):
            where = f"{name}{'' if path == '<root>' else path}"
            if type(leaf) not in _PLAIN_SET:
                kind = type(leaf).__name__
                extra = " (a DTensor: the fast kernels run on plain local tensors only)" if kind == "DTensor" else ""
                return f"{where} is a {kind}, not a plain torch.Tensor{extra}"
            if leaf.layout is not torch.strided:
                return f"{where} has layout {leaf.layout} (the kernels need dense tensors)"
            if leaf.device.type not in ("cpu", "cuda"):
                return f"{where} is on {leaf.device} (the kernels run on cpu and cuda)"
            if leaf.dtype not in _FLOAT_DTYPES:
                return f"{where} has dtype {leaf.dtype} (the kernels take float32 and float64)"
            if leaf.requires_grad:
                return f"{where} requires grad"
            if not leaf.is_contiguous():
                return f"{where} is not contiguous"
            if leaf.shape != ref.shape or leaf.dtype != ref.dtype or leaf.device != ref.device:
                return (
                    f"{where} has shape {tuple(leaf.shape)}, {leaf.dtype} on {leaf.device}, but "
                    f"{first_name}{ref_path} has {tuple(ref.shape)}, {ref.dtype} on {ref.device}"
                )
            if check_overlap:
                other = seen.setdefault(leaf.data_ptr(), where)
                if other != where:
                    return f"{where} shares memory with {other} (tied weights?): an in-place step would write it twice"
    return "the tensors do not line up"


def learning_rate_at(value: Any, state: tuple, schedule_pos: int | None) -> float | str:
    """This step's learning rate as a Python float (a schedule reads the count of the chain
    entry at ``schedule_pos``), or why it cannot be read so."""
    if callable(value):
        if schedule_pos is None:
            return "the learning-rate schedule's state is missing"
        count = state[schedule_pos].count
        if type(count) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(count):
            return "the schedule's step count is not a plain tensor"
        value = value(count)
    lr = scalar(value)
    return "the learning rate is not a Python number or a plain 0-dim tensor without grad" if lr is None else lr


def schedule_position(layout: Layout) -> int | None:
    """The chain entry whose count a learning-rate schedule reads: the last (the learning-rate
    block's), where it has a count."""
    last = len(layout.types) - 1
    return last if last in layout.counted else None


# ---------------------------------------------------------------------------------------------
# The plan of one step


class KernelCall(NamedTuple):
    """One call of a kernel on one dtype group: the inputs and where the outputs go.

    ``h``: hyperparameters (floats, bools, the declaration's constants); ``lr``: this step's
    learning rate; ``p``: params leaves (None when not needed); ``g``: gradient leaves;
    ``bufs``: buffer name -> leaves (None where unused; the kernel puts the new state buffers
    here); ``in_place``: write params and state buffers in place; ``write_params``
    (backends): return the new params instead of updates; ``step``: the new step count
    (1-based) of the first counted state entry, a 0-dim int64 tensor on the device (ones
    where the state counts nothing); ``first``: whether this is the first step (read only for
    declarations with ``needs_first_step``, else False); ``scalars``: the declaration's 0-dim
    state fields by name (None where it declares none), which the kernel replaces with new
    tensors of the same dtype and device (never writing the old ones, even in place).
    """

    h: dict[str, Any]
    lr: float
    p: list[torch.Tensor] | None
    g: list[torch.Tensor]
    bufs: dict[str, list[torch.Tensor] | None]
    in_place: bool
    write_params: bool
    step: torch.Tensor
    first: bool
    scalars: dict[str, torch.Tensor] | None = None


class Plan(NamedTuple):
    """Everything one step's kernels need.

    ``h``: the hyperparameters as Python floats/bools (with the declaration's constants);
    ``lr``: the learning rate of this step; ``spec``: the grads' tree structure; ``p``/``g``:
    the params (or None) and grads leaves; ``buffers``: buffer name -> leaves (None where this
    configuration has no such buffer); ``counts``: chain position -> step count tensor;
    ``scalars``: the declared 0-dim state fields by name.
    """

    h: dict[str, Any]
    lr: float
    spec: Any
    columns: Columns
    p: list[torch.Tensor] | None
    g: list[torch.Tensor]
    buffers: dict[str, list[torch.Tensor] | None]
    counts: dict[int, torch.Tensor]
    scalars: dict[str, torch.Tensor] = {}


def state_with(
    layout: Layout,
    spec: Any,
    state: tuple,
    new: dict[str, list[Any] | None] | None,
    counts: dict[int, torch.Tensor],
    scalars: dict[str, torch.Tensor] | None = None,
) -> tuple:
    """The chain state with new counts and scalars and, where ``new`` is given, new buffers (as
    trees of ``spec``); every other entry (and, without ``new``, every container) unchanged."""
    entries = list(state)
    touched: dict[int, list[Any]] = {}
    for i, k in zip(layout.counted, layout.count_index):
        values = touched.get(i) or touched.setdefault(i, list(entries[i]))
        values[k] = counts[i]
    for name, (i, k) in layout.scalars.items():
        if scalars and name in scalars:
            values = touched.get(i) or touched.setdefault(i, list(entries[i]))
            values[k] = scalars[name]
    if new is not None:
        for name, (i, k) in layout.buffers.items():
            leaves = new.get(name)
            if leaves is not None:
                values = touched.get(i) or touched.setdefault(i, list(entries[i]))
                values[k] = optree.tree_unflatten(spec, leaves)
    types = layout.types
    for i, values in touched.items():
        entries[i] = tuple.__new__(types[i], values)  # the NamedTuple, as ``_make`` builds it
    return tuple(entries)


def params_fit(params: PyTree, plan: Plan) -> bool:
    """Whether params the kernel does not read still match the gradients in structure, shape and
    dtype (else the reference path runs, whose input checks name the leaf)."""
    p, spec = flatten(params)
    return spec == plan.spec and list(map(_SHAPE, p)) == list(map(_SHAPE, plan.g)) and (
        list(map(_DTYPE, p)) == list(map(_DTYPE, plan.g))
    )


def scalar_ok(x: Any, device: torch.device) -> bool:
    return (
        type(x) is torch.Tensor
        and x.dim() == 0
        and x.device == device
        and not x.requires_grad
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def _pick(column: list[torch.Tensor], idx: list[int]) -> list[torch.Tensor]:
    return column if len(idx) == len(column) else [column[i] for i in idx]


def per_dtype_group(plan: Plan, step: Any) -> tuple[list[Any], dict[str, list[Any] | None]]:
    """Runs ``step(g, p, buffers) -> (outputs, new buffers)`` on each dtype group of ``plan``
    and returns the outputs and new buffers in leaf order."""
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
