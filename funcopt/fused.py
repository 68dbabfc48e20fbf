"""Fast path for the elementwise optimizers: multi-tensor fused kernels, chosen automatically.

``funcopt.sgd``, ``adam``, ``adamw``, ``adagrad``, ``rmsprop`` and ``lion`` are chains of small
per-leaf blocks (the *reference path*). An optimizer step is memory-bound, and the reference
path makes one fresh tensor per operation per leaf, so this module gives those optimizers a
second implementation of the same step (the *fast path*):

- Adam, AdamW, SGD and Adagrad run torch's own multi-tensor kernels (``torch._fused_adam_``,
  ``_fused_adamw_``, ``_fused_sgd_``, ``_fused_adagrad_``, the kernels behind
  ``torch.optim.Adam(fused=True)``); RMSprop and Lion run ``torch._foreach_*`` ops.
- In a plain ``update`` the kernels work on fresh copies of the state and on a zero-filled
  update buffer, so ``update`` stays pure: it never writes into its arguments.
- In a *donating* step (:func:`funcopt.train_step.make_step`, :func:`funcopt.apply_gradients`)
  the kernels update the params and state buffers that the caller gave up, in place.

The fast path returns the same state pytree types (e.g. ``(ScaleByAdamState(count, mu, nu,
nu_max), EmptyState())``) as the reference chain and the same numbers to float rounding, so
a run may switch paths at any step, and checkpoints do not depend on the path. It is used only
where it is valid, and the reference path runs otherwise:

- not while ``torch.compile`` traces (the reference path compiles with ``fullgraph=True``) and
  not under functorch transforms (``vmap``, ``grad``, ``jvp``, ``vjp``, ``jacrev``...);
- every tensor (params, updates, state) a plain dense contiguous ``torch.Tensor`` of dtype
  float32 or float64 (mixed is fine) on one CPU or CUDA device, none requiring grad (and,
  when donating, no two buffers starting at the same address, e.g. tied weights);
- every hyperparameter a Python number or an unbatched 0-dim tensor not requiring grad (as
  ``inject_hyperparams`` passes them; they are read with ``float()``); no ``mask``;
- the state has the layout this optimizer's ``init`` builds.

Use :func:`fast_path_enabled` to force the reference path (e.g. to compare the two).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import threading
from typing import Any, Callable, NamedTuple
from collections.abc import Iterator

import optree
import torch

from funcopt.base import EmptyState, GradientTransformation, PyTree
from funcopt.transforms import (
    ScaleByAdamState,
    ScaleByLionState,
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByScheduleState,
    TraceState,
)

__all__ = [
    "FAST_PATH_OPTIMIZERS",
    "fast_path",
    "fast_path_enabled",
    "is_fast_path_enabled",
    "fast_path_applies",
    "configure_cpu_allocator",
]

FAST_PATH_OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop", "lion")
"""Names of the optimizers that have a fast path."""

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


class _Switch(threading.local):
    enabled = True


_SWITCH = _Switch()


def is_fast_path_enabled() -> bool:
    """Whether the fast path may be used in this thread (True unless switched off)."""
    return _SWITCH.enabled


@contextlib.contextmanager
def fast_path_enabled(enabled: bool) -> Iterator[None]:
    """Context manager switching the fast path on or off in this thread, like ``torch.no_grad``.

    Example:
        >>> with funcopt.fused.fast_path_enabled(False):
        ...     updates, state = tx.update(grads, state, params)  # the per-leaf reference path
    """
    previous = _SWITCH.enabled
    _SWITCH.enabled = bool(enabled)
    try:
        yield
    finally:
        _SWITCH.enabled = previous


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
# Kernels. Each takes flat leaf lists for one dtype group and either returns fresh update
# tensors (pure) or writes the new params into ``p`` (donate). State buffers are written in
# place; in the pure case the caller passes fresh copies.


def _fold_l2(g: list[torch.Tensor], p: list[torch.Tensor], wd: float, maximize: bool) -> list[torch.Tensor]:
    """Fresh ``(-g if maximize else g) + wd * p`` (L2 weight decay added to the gradient)."""
    out = torch._foreach_neg(g) if maximize else [x.clone() for x in g]
    torch._foreach_add_(out, p, alpha=wd)
    return out


def _adam_kernel(h, lr, p, g, mu, nu, nu_max, step, donate, decoupled):
    wd, maximize = h["weight_decay"], h["maximize"]
    steps = [step] * len(g)
    common = dict(beta1=h["b1"], beta2=h["b2"], eps=h["eps"], amsgrad=nu_max is not None)
    if donate:
        fn = torch._fused_adamw_ if decoupled else torch._fused_adam_
        fn(p, g, mu, nu, nu_max or [], steps, lr=lr, weight_decay=wd, maximize=maximize, **common)
        return p
    if wd and not decoupled:
        g, maximize = _fold_l2(g, p, wd, maximize), False
    out = [torch.zeros_like(x) for x in g]
    torch._fused_adam_(out, g, mu, nu, nu_max or [], steps, lr=lr, weight_decay=0.0, maximize=maximize, **common)
    if wd and decoupled:
        torch._foreach_add_(out, p, alpha=-lr * wd)
    return out


def _sgd_kernel(h, lr, p, g, buf, first, donate):
    """SGD; returns (out, momentum buffers), the buffers new lists where pure."""
    wd, maximize = h["weight_decay"], h["maximize"]
    momentum = h["momentum"] if buf is not None else 0.0
    kwargs = dict(
        momentum=momentum, lr=lr, dampening=h["dampening"], nesterov=h["nesterov"], is_first_step=first
    )
    if donate:
        torch._fused_sgd_(p, g, buf or [], weight_decay=wd, maximize=maximize, **kwargs)
        return p, buf
    if wd:
        g, maximize = _fold_l2(g, p, wd, maximize), False
    if buf is None:
        return torch._foreach_mul(g, lr if maximize else -lr), None
    if h["dampening"] == 0 and not h["nesterov"] and not maximize:
        # Two passes instead of the kernel's four (zeroed output, buffer copy, kernel, add):
        # the new buffer g + momentum * buf, then the update -lr * buffer.
        new_buf = [x.clone() for x in g] if first else torch._foreach_add(g, buf, alpha=momentum)
        return torch._foreach_mul(new_buf, -lr), new_buf
    out = [torch.zeros_like(x) for x in g]
    new_buf = [torch.empty_like(x) for x in g] if first else [x.clone() for x in buf]
    torch._fused_sgd_(out, g, new_buf, weight_decay=0.0, maximize=maximize, **kwargs)
    return out, new_buf


def _adagrad_kernel(h, lr, p, g, acc, step, donate):
    wd, maximize = h["weight_decay"], h["maximize"]
    steps = [step] * len(g)
    if donate:
        torch._fused_adagrad_(p, g, acc, steps, lr=lr, lr_decay=0.0, weight_decay=wd, eps=h["eps"], maximize=maximize)
        return p
    if wd:
        g, maximize = _fold_l2(g, p, wd, maximize), False
    out = [torch.zeros_like(x) for x in g]
    torch._fused_adagrad_(out, g, acc, steps, lr=lr, lr_decay=0.0, weight_decay=0.0, eps=h["eps"], maximize=maximize)
    return out


def _signed_grads(h, p, g):
    """The gradient after the chain's sign flip and L2 term (``g`` itself, read-only, if neither)."""
    wd, maximize = h.get("weight_decay", 0.0), h.get("maximize", False)
    if wd:
        return _fold_l2(g, p, wd, maximize)
    return torch._foreach_neg(g) if maximize else g


def _rmsprop_kernel(h, lr, p, g, nu, mu, buf, first, donate):
    """RMSprop with ``torch._foreach_*`` ops; returns (out, nu, mu, buf), new lists where pure."""
    g = _signed_grads(h, p, g)
    w = 1 - h["alpha"]
    g2 = torch._foreach_mul(g, g)
    if donate:
        torch._foreach_lerp_(nu, g2, w)
    else:
        nu = torch._foreach_lerp(nu, g2, w)
    if mu is not None:
        if donate:
            torch._foreach_lerp_(mu, g, w)
        else:
            mu = torch._foreach_lerp(mu, g, w)
        denom = g2  # reuse the scratch: denom = sqrt(nu - mu * mu)
        torch._foreach_copy_(denom, mu)
        torch._foreach_mul_(denom, mu)
        torch._foreach_sub_(denom, nu)
        torch._foreach_neg_(denom)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(nu)
        del g2
    torch._foreach_add_(denom, h["eps"])
    direction = torch._foreach_div(g, denom)
    del denom
    if buf is not None:
        if donate:
            if first:
                torch._foreach_copy_(buf, direction)
            else:
                torch._foreach_mul_(buf, h["momentum"])
                torch._foreach_add_(buf, direction)
        elif first:
            buf = direction
        else:
            buf = torch._foreach_mul(buf, h["momentum"])
            torch._foreach_add_(buf, direction)
        direction = buf
    if donate:
        torch._foreach_add_(p, direction, alpha=-lr)
        return p, nu, mu, buf
    return torch._foreach_mul(direction, -lr), nu, mu, buf


def _lion_kernel(h, lr, p, g, mu, donate):
    """Lion with ``torch._foreach_*`` ops; returns (out, mu), new lists where pure."""
    direction = torch._foreach_lerp(mu, g, 1 - h["b1"])
    torch._foreach_sign_(direction)
    if donate:
        torch._foreach_lerp_(mu, g, 1 - h["b2"])
    else:
        mu = torch._foreach_lerp(mu, g, 1 - h["b2"])
    wd = h["weight_decay"]
    if wd:
        torch._foreach_add_(direction, p, alpha=wd)
    if donate:
        torch._foreach_add_(p, direction, alpha=-lr)
        return p, mu
    torch._foreach_mul_(direction, -lr)
    return direction, mu


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


class _FastPath:
    """The fast implementation of one optimizer built by a ``@fast_path`` factory."""

    def __init__(self, kind: str, reference: GradientTransformation, arguments: dict[str, Any]):
        self.kind = kind
        self.reference = reference
        self.arguments = arguments
        # Python-number hyperparameters are read once; tensors are read at every step.
        static = not any(isinstance(v, torch.Tensor) for v in arguments.values())
        self._static_h = self._hyperparams() if static else None
        self._memo: _Memo | None = None

    # -- checks ---------------------------------------------------------------------------

    def _hyperparams(self) -> dict[str, Any] | None:
        args = self.arguments
        if args.get("mask") is not None:
            return None
        h: dict[str, Any] = {}
        for name in _FLOAT_ARGS[self.kind]:
            value = _scalar(args[name])
            if value is None:
                return None
            h[name] = value
        for name in _BOOL_ARGS:
            if name in args:
                if not isinstance(args[name], bool):
                    return None
                h[name] = args[name]
        return h

    def _learning_rate(self, state: tuple, positions: dict[Any, int]) -> float | None:
        args = self.arguments
        value = args["learning_rate"]
        scheduled = callable(value) or (self.kind == "adagrad" and not _is_python_zero(args["lr_decay"]))
        if scheduled != ("schedule" in positions):
            return None
        if scheduled:
            count = state[positions["schedule"]].count
            if type(count) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(count):
                return None
            if callable(value):
                value = value(count)
            if self.kind == "adagrad" and not _is_python_zero(args["lr_decay"]):
                # The same expression as funcopt.optimizers.adagrad, so the numbers agree.
                value = torch.div(torch.as_tensor(value, dtype=torch.float64), 1 + count.to(torch.float64) * args["lr_decay"])
        return _scalar(value)

    def plan(self, grads: PyTree, state: Any, params: PyTree | None, donate: bool) -> _Plan | None:
        """Everything the kernels need, or None where the fast path does not apply."""
        kind = self.kind
        positions = _parse_chain_state(kind, state)
        if positions is None:
            return None
        h = self._static_h or self._hyperparams()
        if h is None:
            return None
        lr = self._learning_rate(state, positions)
        if lr is None:
            return None
        g, spec = _flatten(grads)
        needs_params = donate or bool(h.get("weight_decay"))
        if params is None and needs_params:
            return None
        buffers: dict[str, list[torch.Tensor] | None] = {}
        counts: dict[Any, torch.Tensor] = {}

        def take(name: str, subtree: Any) -> bool:
            if _absent(subtree):
                buffers[name] = None
                return True
            leaves, sub_spec = _flatten(subtree)
            if sub_spec != spec:
                return False
            buffers[name] = leaves
            return True

        if kind in ("adam", "adamw"):
            if ScaleByAdamState not in positions:
                return None
            s = state[positions[ScaleByAdamState]]
            counts[ScaleByAdamState] = s.count
            amsgrad = h["amsgrad"]
            if _absent(s.nu_max) == amsgrad:
                return None
            ok = take("mu", s.mu) and take("nu", s.nu) and take("nu_max", s.nu_max)
        elif kind == "sgd":
            has_trace = TraceState in positions
            if has_trace != (h["momentum"] != 0 or h["nesterov"]) or (h["nesterov"] and not has_trace):
                return None
            ok = True
            if has_trace:
                s = state[positions[TraceState]]
                counts[TraceState] = s.count
                ok = take("buf", s.momentum_buffer)
            else:
                buffers["buf"] = None
        elif kind == "adagrad":
            if ScaleByRssState not in positions:
                return None
            ok = take("acc", state[positions[ScaleByRssState]].sum_of_squares)
        elif kind == "rmsprop":
            if ScaleByRmsState not in positions or _absent(state[positions[ScaleByRmsState]].mu) == h["centered"]:
                return None
            s = state[positions[ScaleByRmsState]]
            ok = take("nu", s.nu) and take("mu", s.mu)
            if TraceState in positions:
                t = state[positions[TraceState]]
                counts[TraceState] = t.count
                ok = ok and take("buf", t.momentum_buffer)
            else:
                buffers["buf"] = None
        else:  # lion
            if ScaleByLionState not in positions:
                return None
            s = state[positions[ScaleByLionState]]
            counts[ScaleByLionState] = s.count
            ok = take("mu", s.mu)
        if not ok:
            return None
        p = None
        if params is not None and needs_params:
            p, p_spec = _flatten(params)
            if p_spec != spec:
                return None
        lists = [g] + ([p] if p is not None else []) + [b for b in buffers.values() if b is not None]
        columns = _columns(lists, check_overlap=donate)
        if columns is None:
            return None
        for c in counts.values():
            if not _count_ok(c, columns.device):
                return None
        if "schedule" in positions:
            counts["schedule"] = state[positions["schedule"]].count
            if not _count_ok(counts["schedule"], columns.device):
                return None
        return _Plan(h, lr, spec, columns, p, g, buffers, counts, positions)

    # -- execution ------------------------------------------------------------------------

    def run(self, plan: _Plan, state: tuple, donate: bool) -> tuple[list[torch.Tensor], tuple]:
        """Runs the kernels; returns (flat outputs, new chain state).

        The outputs are the new params (``donate``, written into the params buffers) or fresh
        updates (pure). Pure runs never write into ``plan``'s input tensors.
        """
        kind = self.kind
        new_counts = {k: c + 1 for k, c in plan.counts.items()}
        step = None  # the kernels read the 1-based step from a tensor (int64 is accepted)
        if kind in ("adam", "adamw"):
            step = new_counts[ScaleByAdamState]
        elif kind == "adagrad":
            step = torch.ones((), dtype=torch.int64, device=plan.columns.device)  # unused: lr_decay=0
        first = TraceState in plan.counts and int(plan.counts[TraceState]) == 0
        groups = plan.columns.groups
        if donate and len(groups) == 1:  # the common case, with no re-indexing
            self._kernel(plan, plan.p, plan.g, dict(plan.buffers), step, first, True)
            # the buffers were written in place: their containers are handed on as they are
            return plan.p, _with_counts(state, plan.positions, new_counts)
        n = len(plan.g)
        out: list[Any] = [None] * n
        new_buffers: dict[str, list[Any] | None] = {
            k: (None if v is None else [None] * n) for k, v in plan.buffers.items()
        }
        copy_state = not donate and kind in ("adam", "adamw", "adagrad")
        for idx in groups:
            g = _pick(plan.g, idx)
            p = _pick(plan.p, idx) if plan.p is not None else None
            bufs = {k: (None if v is None else _pick(v, idx)) for k, v in plan.buffers.items()}
            if copy_state:
                bufs = {k: (None if v is None else [x.clone() for x in v]) for k, v in bufs.items()}
            res = self._kernel(plan, p, g, bufs, step, first, donate)
            if len(idx) == n:  # one dtype group: the lists are already in leaf order
                out, new_buffers = list(res), bufs
                break
            for j, i in enumerate(idx):
                out[i] = res[j]
                for k, v in bufs.items():
                    if v is not None:
                        new_buffers[k][i] = v[j]
        if donate:  # the buffers were written in place: their containers are handed on as they are
            return out, _with_counts(state, plan.positions, new_counts)
        return out, self._new_state(plan, state, new_buffers, new_counts)

    def _kernel(
        self,
        plan: _Plan,
        p: list[torch.Tensor] | None,
        g: list[torch.Tensor],
        bufs: dict[str, list[torch.Tensor] | None],
        step: torch.Tensor | None,
        first: bool,
        donate: bool,
    ) -> list[torch.Tensor]:
        """Runs this optimizer's kernel on one dtype group; returns the outputs and leaves the
        (new, for the foreach kernels when pure) state buffers in ``bufs``."""
        kind, h, lr = self.kind, plan.h, plan.lr
        if kind in ("adam", "adamw"):
            return _adam_kernel(h, lr, p, g, bufs["mu"], bufs["nu"], bufs["nu_max"], step, donate, kind == "adamw")
        if kind == "sgd":
            res, bufs["buf"] = _sgd_kernel(h, lr, p, g, bufs["buf"], first, donate)
            return res
        if kind == "adagrad":
            return _adagrad_kernel(h, lr, p, g, bufs["acc"], step, donate)
        if kind == "rmsprop":
            res, bufs["nu"], bufs["mu"], bufs["buf"] = _rmsprop_kernel(
                h, lr, p, g, bufs["nu"], bufs["mu"], bufs["buf"], first, donate
            )
            return res
        res, bufs["mu"] = _lion_kernel(h, lr, p, g, bufs["mu"], donate)
        return res

    def _new_state(
        self, plan: _Plan, state: tuple, new: dict[str, list[Any] | None], counts: dict[Any, torch.Tensor]
    ) -> tuple:
        def tree_of(name: str, absent: Any = None) -> Any:
            leaves = new.get(name)
            return absent if leaves is None else optree.tree_unflatten(plan.spec, leaves)

        entries = list(state)
        pos = plan.positions
        if ScaleByAdamState in pos:
            old = state[pos[ScaleByAdamState]]
            entries[pos[ScaleByAdamState]] = ScaleByAdamState(
                counts[ScaleByAdamState], tree_of("mu"), tree_of("nu"), tree_of("nu_max", old.nu_max)
            )
        if ScaleByRssState in pos:
            entries[pos[ScaleByRssState]] = ScaleByRssState(tree_of("acc"))
        if ScaleByRmsState in pos:
            old = state[pos[ScaleByRmsState]]
            entries[pos[ScaleByRmsState]] = ScaleByRmsState(tree_of("nu"), tree_of("mu", old.mu))
        if ScaleByLionState in pos:
            entries[pos[ScaleByLionState]] = ScaleByLionState(counts[ScaleByLionState], tree_of("mu"))
        if TraceState in pos:
            entries[pos[TraceState]] = TraceState(counts[TraceState], tree_of("buf"))
        if "schedule" in pos:
            entries[pos["schedule"]] = ScaleByScheduleState(counts["schedule"])
        return tuple(entries)

    # -- entry points ---------------------------------------------------------------------

    def usable(self) -> bool:
        return _SWITCH.enabled and not _in_traced_context()

    def update(self, updates: PyTree, state: Any, params: PyTree | None = None, **extra_args: Any):
        if not torch.compiler.is_compiling() and self.usable():
            plan = self.plan(updates, state, params, donate=False)
            if plan is not None:
                out, new_state = self.run(plan, state, donate=False)
                return optree.tree_unflatten(plan.spec, out), new_state
        return self.reference.update(updates, state, params, **extra_args)

    def returned(self, state: Any) -> bool:
        """Whether ``state`` is the state this optimizer's last donated step returned."""
        memo = self._memo
        return memo is not None and state is memo.state

    def repeat_step(self, grads: PyTree, state: Any, params: PyTree) -> tuple[Any, list[torch.Tensor]] | None:
        """The donated step after a donated step, for ``apply_gradients``'s hot path.

        Applies only when ``state`` is the state the previous donated step returned and the
        checks it remembered (:class:`_Memo`) still hold; then writes the step into ``params``
        and the state buffers and returns ``(new_state, replaced)``, where ``replaced`` are the
        old state's tensors the new state no longer holds (its step counts). Returns None,
        having written nothing, otherwise. The new params are ``params``, updated in place.
        """
        memo = self._memo
        if memo is None or state is not memo.state or not _SWITCH.enabled or _in_traced_context():
            return None
        plan = memo.replan(self, grads, state, params)
        if plan is None:
            return None
        _, new_state = self.run(plan, state, donate=True)
        self._memo = memo._replace(state=new_state)
        return new_state, list(plan.counts.values())

    def donated_update(self, grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any] | None:
        """One step writing into ``params`` and the state buffers; returns (new params, new state).

        Returns None (and writes nothing) where the fast path does not apply. The new params
        are a tree of the tensors passed in, updated in place.
        """
        result = self.donated_run(grads, state, params)
        if result is None:
            return None
        out, new_state, _, spec = result
        return optree.tree_unflatten(spec, out), new_state

    def donated_run(
        self, grads: PyTree, state: Any, params: PyTree
    ) -> tuple[list[torch.Tensor], Any, list[torch.Tensor], Any] | None:
        """Runs a donated step; returns (params leaves written, new state, replaced counts, the
        params' tree structure).

        A step given the state the previous donated step returned, with params in the same
        memory, reuses that step's checks (:class:`_Memo`): only the gradients, the params'
        memory and the state's containers are looked at again. Otherwise the step is planned
        and checked from scratch, and its checks are remembered for the next step.
        """
        if not _SWITCH.enabled or _in_traced_context():
            return None
        memo = self._memo
        if memo is not None and state is memo.state:
            plan = memo.replan(self, grads, state, params)
            if plan is not None:
                out, new_state = self.run(plan, state, donate=True)
                self._memo = memo._replace(state=new_state)
                return out, new_state, list(plan.counts.values()), plan.spec
        self._memo = None
        plan = self.plan(grads, state, params, donate=True)
        if plan is None:
            return None
        out, new_state = self.run(plan, state, donate=True)
        if self._static_h is not None:
            self._memo = _Memo.of(new_state, plan, params, out, self.kind)
        return out, new_state, list(plan.counts.values()), plan.spec


class _LeafReader:
    """Reads the leaves of trees with one known structure, faster than flattening them.

    For a flat ``dict`` of leaves (what ``funcopt.nn.extract`` returns) the leaves are read with
    one ``operator.itemgetter`` in optree's (sorted-key) order; other trees are flattened and
    their structure compared. ``leaves`` returns None for a tree of another structure.
    """

    def __init__(self, tree: PyTree, spec: Any):
        self.spec = spec
        self.n = spec.num_leaves
        self.getter: Callable[[dict], Any] | None = None
        if type(tree) is dict and spec.num_nodes == self.n + 1 == len(tree) + 1 and self.n > 1:
            order = [path[0] for path in optree.tree_paths(tree, none_is_leaf=False)]
            self.getter = operator.itemgetter(*order)

    def leaves(self, tree: PyTree) -> list[Any] | None:
        if self.getter is not None and type(tree) is dict and len(tree) == self.n:
            try:
                return list(self.getter(tree))
            except (KeyError, TypeError):
                return None
        leaves, spec = _flatten(tree)
        return leaves if spec == self.spec else None


class _Memo(NamedTuple):
    """What a donated step checked, kept for the next step (see :meth:`replan`).

    It holds the state that step returned (so the state's memory stays alive until the next
    donated step of this optimizer or until the optimizer is dropped).
    """

    state: tuple
    plan: _Plan
    reader: _LeafReader
    pointers: list[int]  # data_ptr of each params buffer written
    shapes: list[torch.Size]  # of the params, which the gradients must share
    dtypes: list[torch.dtype]  # of the params, which the gradients must share
    devices: list[int]  # of the params (``get_device()``), which the gradients must share
    written: frozenset[int]  # data_ptr of every buffer the kernels write
    containers: tuple[tuple[Any, list[torch.Tensor]], ...]  # state subtrees and their leaves

    @staticmethod
    def of(state: tuple, plan: _Plan, params: PyTree, out: list[torch.Tensor], kind: str) -> _Memo:
        containers = tuple(
            (subtree, _container_leaves(subtree))
            for name, leaves in plan.buffers.items()
            if leaves is not None
            for subtree in (_buffer_tree(kind, name, state, plan.positions),)
        )
        return _Memo(
            state,
            plan._replace(g=[], p=None, counts={}),
            _LeafReader(params, plan.spec),
            [t.data_ptr() for t in out],
            [t.shape for t in out],
            [t.dtype for t in out],
            [t.get_device() for t in out],
            frozenset(t.data_ptr() for b in plan.buffers.values() if b is not None for t in b)
            | frozenset(t.data_ptr() for t in out),
            containers,
        )

    def replan(self, fp: _FastPath, grads: PyTree, state: tuple, params: PyTree) -> _Plan | None:
        """The remembered plan with this step's params, gradients, counts and learning rate, or
        None where anything it relied on changed (the caller then plans from scratch).

        ``state`` is the state the remembered step returned. Checked again: the params are
        plain tensors in the same memory with the same shapes, not requiring grad (so in-place
        resizes, ``.data`` swaps and ``requires_grad_()`` are caught); the gradients are plain
        contiguous tensors of the params' shapes, dtypes and device, not requiring grad and not
        aliasing a written buffer; the state's containers still hold the same buffers.
        """
        old = self.plan
        p = self.reader.leaves(params)
        g = self.reader.leaves(grads)
        if p is None or g is None:
            return None
        try:  # one C-level map per property: the per-step cost of this path
            if (
                not set(map(type, p)) <= _PLAIN_SET
                or not set(map(type, g)) <= _PLAIN_SET
                or list(map(_Tensor.data_ptr, p)) != self.pointers
                or list(map(_SHAPE, p)) != self.shapes
                or list(map(_SHAPE, g)) != self.shapes
                or True in map(_REQUIRES_GRAD, p)
                or True in map(_REQUIRES_GRAD, g)
                or list(map(_DTYPE, g)) != self.dtypes
                or list(map(_Tensor.get_device, g)) != self.devices
                or not all(map(_Tensor.is_contiguous, g))
                or not self.written.isdisjoint(map(_Tensor.data_ptr, g))
            ):
                return None
        except (AttributeError, RuntimeError, TypeError):
            return None
        for subtree, leaves in self.containers:
            current = _container_leaves(subtree)
            if len(current) != len(leaves) or not all(map(operator.is_, current, leaves)):
                return None
        lr = fp._learning_rate(state, old.positions)
        if lr is None:
            return None
        counts = {k: state[old.positions[k]].count for k in _COUNTED if k in old.positions}
        return old._replace(lr=lr, p=p, g=g, counts=counts)


_COUNTED = (ScaleByAdamState, TraceState, ScaleByLionState, "schedule")


def _container_leaves(subtree: Any) -> list[Any]:
    """The leaves of a state subtree, in insertion order for a flat dict (cheap), else optree's."""
    if type(subtree) is dict:
        return list(subtree.values())
    return _flatten(subtree)[0]


def _with_counts(state: tuple, positions: dict[Any, int], counts: dict[Any, torch.Tensor]) -> tuple:
    """The chain state with new step counts and every other entry (and container) unchanged."""
    entries = list(state)
    for key, count in counts.items():
        i = positions[key]
        entries[i] = ScaleByScheduleState(count) if key == "schedule" else entries[i]._replace(count=count)
    return tuple(entries)


def _buffer_tree(kind: str, name: str, state: tuple, positions: dict[Any, int]) -> Any:
    """The subtree of the chain state holding the buffer ``name`` (as ``plan`` reads it)."""
    if name == "buf":
        return state[positions[TraceState]].momentum_buffer
    if name == "acc":
        return state[positions[ScaleByRssState]].sum_of_squares
    if kind in ("adam", "adamw"):
        return getattr(state[positions[ScaleByAdamState]], name)
    if kind == "rmsprop":
        return getattr(state[positions[ScaleByRmsState]], name)
    return state[positions[ScaleByLionState]].mu


def _absent(x: Any) -> bool:
    """An unused optional state field: ``()`` (what funcopt's transforms store) or ``None``."""
    return x is None or (type(x) is tuple and len(x) == 0)


def _is_python_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _fast_path_of(tx: GradientTransformation) -> _FastPath | None:
    return getattr(tx.update, "_funcopt_fast_path", None)


def fast_path(kind: str) -> Callable[[Callable[..., GradientTransformation]], Callable[..., GradientTransformation]]:
    """Decorator giving an optimizer factory the fast path named ``kind`` (internal use).

    The decorated factory returns a ``GradientTransformation`` with the reference chain's
    ``init`` and an ``update`` that runs the fast path where it applies and the chain's own
    ``update`` otherwise. The signature (read by ``inject_hyperparams``) is kept.
    """
    if kind not in FAST_PATH_OPTIMIZERS:
        raise ValueError(f"fast_path: unknown kind {kind!r}; expected one of {FAST_PATH_OPTIMIZERS}.")

    def decorate(factory: Callable[..., GradientTransformation]) -> Callable[..., GradientTransformation]:
        signature = inspect.signature(factory)

        @functools.wraps(factory)
        def wrapper(*args: Any, **kwargs: Any) -> GradientTransformation:
            reference = factory(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            fp = _FastPath(kind, reference, dict(bound.arguments))

            def update(updates, state, params=None, **extra_args):
                return fp.update(updates, state, params, **extra_args)

            update._funcopt_fast_path = fp  # type: ignore[attr-defined]
            return GradientTransformation(reference.init, update)

        return wrapper

    return decorate


def fast_path_applies(tx: GradientTransformation, updates: PyTree, state: Any, params: PyTree | None = None) -> bool:
    """Whether ``tx.update(updates, state, params)`` would run the fast path here and now.

    False for transformations without one (``funcopt.chain`` of blocks, ``inject_hyperparams``
    wrappers, ...), under ``torch.compile``/functorch transforms, with the fast path switched
    off, or for inputs it does not support (see the module docstring).
    """
    fp = _fast_path_of(tx)
    if fp is None or not fp.usable():
        return False
    return fp.plan(updates, state, params, donate=False) is not None


def configure_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
    """Makes glibc keep large freed CPU blocks for reuse instead of returning them to the OS.

    Like setting ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` before starting Python.
    By default glibc serves every block above 32 MB with a fresh ``mmap``, whose pages fault
    on first touch: a pure optimizer step on one 16M-element tensor then spends most of its
    time in page faults (see the README section "Performance: the fast path and donation"). Raising both thresholds keeps those
    blocks in the heap so the next step reuses them. The price: freed memory stays with the
    process (its resident size does not shrink). Process-wide and opt-in; funcopt never calls
    it by itself.

    Args:
        mmap_threshold: blocks at least this large (bytes) still come from ``mmap``.
        trim_threshold: free memory at the top of the heap above this size is returned.

    Returns:
        True if both settings were applied (Linux with glibc), False elsewhere.
    """
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if name is None:
            return False
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
        return bool(ok and libc.mallopt(m_trim_threshold, int(trim_threshold)) == 1)
    except (OSError, AttributeError):
        return False
