"""Fast path for the elementwise optimizers: multi-tensor fused kernels, chosen automatically.

``funcopt.sgd``, ``adam``, ``adamw``, ``adagrad``, ``rmsprop`` and ``lion`` are chains of small
per-leaf blocks (the *reference path*). An optimizer step is memory-bound, and the reference
path makes one fresh tensor per operation per leaf, so this module gives those optimizers a
second implementation of the same step (the *fast path*):

- Adam, AdamW, SGD and Adagrad run torch's own multi-tensor kernels (``torch._fused_adam_``,
  ``_fused_adamw_``, ``_fused_sgd_``, ``_fused_adagrad_``, the kernels behind
  ``torch.optim.Adam(fused=True)``); RMSprop and Lion run ``torch._foreach_*`` ops.
- In a plain ``update`` on the CPU, Adam, AdamW and SGD run :mod:`funcopt.native`'s
  single-pass kernels (built from C at first use where a compiler is found), which read the
  old state and write the updates and the new state into fresh tensors. Elsewhere the
  kernels work on fresh copies of the state and on a zero-filled update buffer. Either way
  ``update`` stays pure: it never writes into its arguments. (Without the native kernels,
  SGD with plain momentum uses two foreach ops, ``g + momentum * buf`` and ``-lr * buf``.)
- In a pure training step (:func:`funcopt.apply_gradients` with ``donate=False``) the native
  kernels write the new params and state in one pass; without them the kernels work on
  fresh copies of the params and the state, so the new params come out of the kernel.
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

This module holds the switch, the dispatch (``_FastPath``) and the public helpers; the
checks and the step plan are in ``funcopt.fused_checks``, the torch kernels in
``funcopt.fused_kernels``, the native route in ``funcopt.fused_native`` and the remembered
checks of donated steps in ``funcopt.fused_memo``.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import AbstractContextManager
from typing import Any, Callable

import optree
import torch

from funcopt.base import GradientTransformation, PyTree
from funcopt.fused_checks import (
    _BOOL_ARGS,
    _FLOAT_ARGS,
    _absent,
    _columns,
    _count_ok,
    _flatten,
    _in_traced_context,
    _is_python_zero,
    _parse_chain_state,
    _per_dtype_group,
    _Plan,
    _scalar,
)
from funcopt.fused_kernels import _adagrad_kernel, _adam_kernel, _lion_kernel, _rmsprop_kernel, _sgd_kernel
from funcopt.fused_memo import _Memo, _with_counts
from funcopt.fused_native import native_step
from funcopt.thread_switch import ThreadSwitch
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

_SWITCH = ThreadSwitch()


def is_fast_path_enabled() -> bool:
    """Whether the fast path may be used in this thread (True unless switched off)."""
    return _SWITCH.enabled


def fast_path_enabled(enabled: bool) -> AbstractContextManager[None]:
    """Context manager switching the fast path on or off in this thread, like ``torch.no_grad``.

    Example:
        >>> with funcopt.fused.fast_path_enabled(False):
        ...     updates, state = tx.update(grads, state, params)  # the per-leaf reference path
    """
    return _SWITCH.set(enabled)



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

    def run(
        self, plan: _Plan, state: tuple, donate: bool, new_containers: bool = False, first: bool | None = None
    ) -> tuple[list[torch.Tensor], tuple]:
        """Runs the kernels; returns (flat outputs, new chain state).

        The outputs are the new params (``donate``, written into the params buffers) or fresh
        updates (pure). Pure runs never write into ``plan``'s input tensors. A donating run
        hands the state's containers on as they are, or, with ``new_containers``, builds new
        ones around ``plan``'s buffers (for :meth:`pure_step`, whose buffers are copies).
        ``first`` (whether this is the momentum buffer's first step) is read from the step
        count when not given, which on CUDA waits for the device.
        """
        kind = self.kind
        new_counts = {k: c + 1 for k, c in plan.counts.items()}
        step = None  # the kernels read the 1-based step from a tensor (int64 is accepted)
        if kind in ("adam", "adamw"):
            step = new_counts[ScaleByAdamState]
        elif kind == "adagrad":
            step = torch.ones((), dtype=torch.int64, device=plan.columns.device)  # unused: lr_decay=0
        if first is None:
            first = TraceState in plan.counts and int(plan.counts[TraceState]) == 0
        groups = plan.columns.groups
        if donate and len(groups) == 1:  # the common case, with no re-indexing
            bufs = dict(plan.buffers)
            self._kernel(plan, plan.p, plan.g, bufs, step, first, True)
            if new_containers:
                return plan.p, self._new_state(plan, state, bufs, new_counts)
            # the buffers were written in place: their containers are handed on as they are
            return plan.p, _with_counts(state, plan.positions, new_counts)
        copy_state = not donate and kind in ("adam", "adamw", "adagrad")

        def group_step(g, p, bufs):
            if copy_state:
                bufs = {k: (None if v is None else [x.clone() for x in v]) for k, v in bufs.items()}
            return self._kernel(plan, p, g, bufs, step, first, donate), bufs

        out, new_buffers = _per_dtype_group(plan, group_step)
        if donate and not new_containers:  # written in place: the containers are handed on
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
                result = native_step(self, plan, state, write_params=False)
                out, new_state = result if result is not None else self.run(plan, state, donate=False)
                return optree.tree_unflatten(plan.spec, out), new_state
        return self.reference.update(updates, state, params, **extra_args)

    def pure_step(self, grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any] | None:
        """``update`` followed by ``apply_updates`` in one pure step: returns (new params, new
        state), or None where the fast path does not apply.

        On CPU, Adam, AdamW and SGD run :mod:`funcopt.native`'s single-pass kernels, which
        read the old params and state and write the new ones into fresh tensors (Adam: 28
        bytes moved per element, as torch's in-place step). Elsewhere the kernels run as in a
        donated step, on fresh copies of the params and the state buffers, so the new params
        come straight out of the kernel: no zeroed update buffer and no separate addition
        (Adam: 64 bytes per element instead of 76). The numbers are those of the donated step
        and of ``update`` + ``apply_updates`` on the fast path. Nothing passed in is written.
        """
        if not self.usable():
            return None
        plan = self.plan(grads, state, params, donate=True)
        if plan is None:
            return None
        result = native_step(self, plan, state, write_params=True)
        if result is None:
            copies = plan._replace(
                p=[x.clone() for x in plan.p],
                buffers={k: (None if v is None else [x.clone() for x in v]) for k, v in plan.buffers.items()},
            )
            result = self.run(copies, state, donate=True, new_containers=True)
        out, new_state = result
        return optree.tree_unflatten(plan.spec, out), new_state

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
        if not _SWITCH.enabled or _in_traced_context():
            return None
        result = self._repeat(grads, state, params)
        return None if result is None else (result[1], result[2])

    def _repeat(
        self, grads: PyTree, state: Any, params: PyTree
    ) -> tuple[list[torch.Tensor], Any, list[torch.Tensor], Any] | None:
        """The remembered-checks step (see :meth:`repeat_step`), in :meth:`donated_run`'s form."""
        memo = self._memo
        if memo is None or state is not memo.state:
            return None
        plan = memo.replan(self, grads, state, params)
        if plan is None:
            return None
        # The state came out of a donated step, so its counts are at least 1: no device read.
        out, new_state = self.run(plan, state, donate=True, first=False)
        self._memo = memo._replace(state=new_state)
        return out, new_state, list(plan.counts.values()), plan.spec

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
        repeated = self._repeat(grads, state, params)
        if repeated is not None:
            return repeated
        self._memo = None
        plan = self.plan(grads, state, params, donate=True)
        if plan is None:
            return None
        out, new_state = self.run(plan, state, donate=True)
        if self._static_h is not None:
            self._memo = _Memo.of(new_state, plan, params, out, self.kind)
        return out, new_state, list(plan.counts.values()), plan.spec


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
