"""The declaration of an optimizer's fast route, and the generic dispatcher that runs it.

An optimizer factory decorated with :func:`declare` keeps its reference math (the chain of
blocks it returns) and gains a second implementation of the same step: its declared kernel,
run over flat multi-tensor lists. The dispatcher (:class:`FastPath`) holds no per-optimizer
branch: the state layout comes from the reference ``init`` itself, the hyperparameters and
buffers from the :class:`FastRoute` declaration.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import optree
import torch

from funcopt.base import GradientTransformation, PyTree
from funcopt.fast._backends import _BACKENDS
from funcopt.fast._control import AUTO_ALLOCATOR
from funcopt.fast._memo import Memo, PureMemo
from funcopt.fast._plan import (
    KernelCall,
    Layout,
    Plan,
    absent,
    columns,
    count_ok,
    flatten,
    learning_rate_at,
    params_fit,
    per_dtype_group,
    scalar_ok,
    schedule_position,
    scalar,
    state_with,
    traced_reason,
)
from funcopt.fast._switch import FAST_SWITCH
from funcopt.fast._shards import update_on_shards

__all__ = ["FastRoute", "declare", "fast_path_of"]


class FastRoute(NamedTuple):
    """How an optimizer's step runs as one multi-tensor kernel (one declaration per optimizer).

    Attributes:
        kernel: ``kernel(call: KernelCall) -> outputs``; with ``call.in_place`` it writes the
            new params into ``call.p`` and the new state into ``call.bufs`` and returns
            ``call.p``; otherwise it returns fresh updates, leaves the new state buffers in
            ``call.bufs`` and writes nothing it was given (but see ``writes_state``).
        hyperparams: factory arguments read as Python floats (a tensor argument is read with
            ``float()`` at each step; one requiring grad or batched keeps the reference path);
            a tuple of numbers (e.g. Rprop's ``etas``) is read as a tuple of floats.
        flags: factory arguments read as Python bools.
        buffers: the params-shaped state fields the kernel reads, by field name (the state
            layout itself is read from the reference ``init``).
        constants: extra entries of ``call.h`` (e.g. ``{"decoupled": True}``).
        learning_rate: ``fn(arguments) -> float or schedule``, the learning rate the
            reference chain uses (default: the ``learning_rate`` argument).
        needs_params: hyperparameters that, when non-zero, make the kernel read the params.
        unsupported: arguments that must be None for the fast route (e.g. ``mask``).
        writes_state: the kernel writes the state buffers in place even in a pure step, so
            the dispatcher hands it copies (torch's ``_fused_*`` kernels).
        needs_first_step: the kernel reads ``call.first`` (momentum starts at the first
            step); it is read from the step count, which on CUDA waits for the device.
        copies_for_pure_step: the pure training step (``apply_gradients(donate=False)``)
            runs the kernel in place on fresh copies of the params and state, rather than a
            pure update plus one multi-tensor add; always so with ``writes_state``. Which is
            faster depends on how many fresh tensors the kernel's pure mode allocates: measure
            with ``benchmarks/bench_step.py`` / ``bench_catalog.py``.
        family: the kernel family backends may provide (default: the factory's name).
        scalars: 0-dim tensor state fields the kernel reads and replaces, by field name
            (``call.scalars``; e.g. ASGD's ``eta`` and ``mu``); backends do not take such routes.
    """

    kernel: Callable[[KernelCall], list[torch.Tensor]]
    hyperparams: tuple[str, ...]
    flags: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    constants: dict[str, Any] = {}
    learning_rate: Callable[[dict[str, Any]], Any] | None = None
    needs_params: tuple[str, ...] = ("weight_decay",)
    unsupported: tuple[str, ...] = ()
    writes_state: bool = False
    needs_first_step: bool = False
    copies_for_pure_step: bool = False
    family: str | None = None
    scalars: tuple[str, ...] = ()


class FastPath:
    """The fast implementation of one optimizer built by a :func:`declare`-d factory."""

    def __init__(self, name: str, route: FastRoute, reference: GradientTransformation, arguments: dict[str, Any]):
        self.name = name
        self.route = route
        self.family = route.family or name
        self.reference = reference
        self.arguments = arguments
        lr = arguments["learning_rate"] if route.learning_rate is None else route.learning_rate(arguments)
        self.learning_rate = lr
        # Python-number hyperparameters are read once; tensors are read at every step.
        static = not any(
            isinstance(v, torch.Tensor) or (type(v) is tuple and any(isinstance(x, torch.Tensor) for x in v))
            for v in arguments.values()
        )
        self._static_h = self._hyperparams() if static else None
        self._reads_params = type(self._static_h) is dict and self.reads_params(self._static_h)
        self._layout: Layout | None = None
        self.memo: Memo | None = None
        self.pure_memo: PureMemo | None = None

    # -- checks ---------------------------------------------------------------------------

    def _hyperparams(self) -> dict[str, Any] | str:
        """The hyperparameters as Python numbers, or why they cannot be read so."""
        args, route = self.arguments, self.route
        for name in route.unsupported:
            if args.get(name) is not None:
                why = "the kernel updates every leaf" if name == "mask" else "the kernel does not take it"
                return f"{name}= is given ({why})"
        h: dict[str, Any] = dict(route.constants)
        for name in route.hyperparams:
            value = args[name]
            if type(value) is tuple:
                items = tuple(scalar(v) for v in value)
                value = None if None in items else items
            else:
                value = scalar(value)
            if value is None:
                return f"hyperparameter {name} is not a Python number or a plain 0-dim tensor without grad"
            h[name] = value
        for name in route.flags:
            if not isinstance(args[name], bool):
                return f"flag {name} is not a Python bool"
            h[name] = args[name]
        return h

    def python_inputs(self) -> tuple[dict[str, Any], float] | str:
        """The kernel's ``h`` and ``lr`` as Python numbers (0-dim tensors read with ``float()``), or
        why not (a schedule, a batched tensor); for callers running ``route.kernel`` on their own rows."""
        h = self._static_h if self._static_h is not None else self._hyperparams()
        lr = None if callable(self.learning_rate) else scalar(self.learning_rate)
        return h if type(h) is str else (h, lr) if lr is not None else "the learning rate is a schedule or batched"

    def reads_params(self, h: dict[str, Any]) -> bool:
        """Whether a pure step with these hyperparameters reads the params (weight decay)."""
        return any(h[name] for name in self.route.needs_params if name in h)

    def layout(self) -> Layout:
        """The state layout of this configuration, read once from ``init({})``."""
        if self._layout is None:
            self._layout = Layout.of(
                self.reference.init({}), self.route.buffers, f"fast route of {self.name}", self.route.scalars
            )
        return self._layout

    def plan(self, grads: PyTree, state: Any, params: PyTree | None, donate: bool) -> Plan | str:
        """Everything the kernels need, or a short reason why the fast route does not apply."""
        h = self._static_h or self._hyperparams()
        if type(h) is str:
            return h
        layout = self.layout()
        if type(state) is not tuple or tuple(map(type, state)) != layout.types:
            return "the state does not have the layout this optimizer's init builds"
        lr = learning_rate_at(self.learning_rate, state, schedule_position(layout))
        if type(lr) is str:
            return lr
        g, spec = flatten(grads)
        needs_params = donate or (self._reads_params if h is self._static_h else self.reads_params(h))
        if params is None and needs_params:
            return "params were not passed (weight decay and in-place steps read them)"
        buffers: dict[str, list[torch.Tensor] | None] = {}
        for name, (i, k) in layout.buffers.items():
            subtree = state[i][k]
            if absent(subtree):
                return "the state does not have the layout this optimizer's init builds"
            leaves, sub_spec = flatten(subtree)
            if sub_spec != spec:
                return f"the state's {name} is not shaped like the gradients"
            buffers[name] = leaves
        for name, where in layout.unused.items():
            if where is not None and not absent(state[where[0]][where[1]]):
                return "the state does not have the layout this optimizer's init builds"
            buffers[name] = None
        p = None
        if params is not None and needs_params:
            p, p_spec = flatten(params)
            if p_spec != spec:
                return "params and gradients have different tree structures"
        lists = [g] + ([p] if p is not None else []) + [b for b in buffers.values() if b is not None]
        cols = columns(lists, check_overlap=donate)
        if cols is None:
            return "columns"  # explain() turns this into the leaf and the reason
        counts = {i: state[i].count for i in layout.counted}
        for c in counts.values():
            if not count_ok(c, cols.device):
                return "a step count is not a 0-dim int64 tensor on the params' device"
        scalars = {name: state[i][k] for name, (i, k) in layout.scalars.items()}
        for name, x in scalars.items():
            if not scalar_ok(x, cols.device):
                return f"the state's {name} is not a plain 0-dim tensor on the params' device"
        return Plan(h, lr, spec, cols, p, g, buffers, counts, scalars)

    # -- execution ------------------------------------------------------------------------

    def _kernel_call(
        self, plan: Plan, new_counts: dict[int, torch.Tensor], first: bool | None
    ) -> tuple[torch.Tensor, bool]:
        """``(step, first)`` of this step's kernel calls (see :class:`KernelCall`)."""
        counted = self._layout.counted  # set by plan() before any run
        if not counted:
            return torch.ones((), dtype=torch.int64, device=plan.columns.device), False
        if first is None:
            first = self.route.needs_first_step and int(plan.counts[counted[0]]) == 0
        return new_counts[counted[0]], first

    def run(
        self, plan: Plan, state: tuple, donate: bool, new_containers: bool = False, first: bool | None = None
    ) -> tuple[list[torch.Tensor], tuple]:
        """Runs the declaration's kernel; returns (flat outputs, new chain state).

        The outputs are the new params (``donate``, written into the params buffers) or fresh
        updates (pure). Pure runs never write into ``plan``'s input tensors. A donating run
        hands the state's containers on as they are, or, with ``new_containers``, builds new
        ones around ``plan``'s buffers (for :meth:`pure_step`, whose buffers are copies).
        ``first`` (whether momentum starts now) is read from the step count when not given.
        """
        out, new_state, _ = self._execute(plan, state, donate, new_containers, first)
        return out, new_state

    def _execute(
        self, plan: Plan, state: tuple, donate: bool, new_containers: bool = False, first: bool | None = None
    ) -> tuple[list[torch.Tensor], tuple, dict[str, list[torch.Tensor] | None]]:
        """:meth:`run`, also returning the new state's buffers (leaf lists in the grads' order)."""
        new_counts = {k: c + 1 for k, c in plan.counts.items()}
        step, first = self._kernel_call(plan, new_counts, first)
        kernel, h, lr = self.route.kernel, plan.h, plan.lr
        copy_state = not donate and self.route.writes_state
        new_scalars: dict[str, torch.Tensor] = {}

        def group_step(g, p, bufs):
            if copy_state:
                bufs = {k: (None if v is None else [x.clone() for x in v]) for k, v in bufs.items()}
            else:
                bufs = dict(bufs)
            if not plan.scalars:
                return kernel(KernelCall(h, lr, p, g, bufs, donate, donate, step, first)), bufs
            # each dtype group reads the step's old scalars; all compute the same new ones
            scalars = dict(plan.scalars)
            out = kernel(KernelCall(h, lr, p, g, bufs, donate, donate, step, first, scalars))
            new_scalars.update(scalars)
            return out, bufs

        if len(plan.columns.groups) == 1:  # the common case: one dtype, no re-indexing
            out, new_buffers = group_step(plan.g, plan.p, plan.buffers)
        else:
            out, new_buffers = per_dtype_group(plan, group_step)
        layout = self._layout
        if donate and not new_containers:  # written in place: the containers are handed on
            return out, state_with(layout, plan.spec, state, None, new_counts, new_scalars), new_buffers
        return out, state_with(layout, plan.spec, state, new_buffers, new_counts, new_scalars), new_buffers

    def run_backend(self, plan: Plan, state: tuple, write_params: bool) -> tuple[list[torch.Tensor], tuple] | None:
        """Runs the first registered backend that takes this pure step, or returns None."""
        result = self._backend(plan, state, write_params)
        return None if result is None else result[:2]

    def _backend(
        self, plan: Plan, state: tuple, write_params: bool
    ) -> tuple[list[torch.Tensor], tuple, dict[str, list[torch.Tensor] | None]] | None:
        """:meth:`run_backend`, also returning the new state's buffers."""
        if plan.scalars:  # backend kernels know no scalar state fields
            return None
        for backend in _BACKENDS:
            kernel = backend.kernels.get(self.family)
            if kernel is None or backend.reason(plan) is not None:
                continue
            new_counts = {k: c + 1 for k, c in plan.counts.items()}
            step, first = self._kernel_call(plan, new_counts, None)
            h, lr = plan.h, plan.lr

            def group_step(g, p, bufs):
                bufs = dict(bufs)
                return kernel(KernelCall(h, lr, p, g, bufs, False, write_params, step, first)), bufs

            out, new_buffers = per_dtype_group(plan, group_step)
            return out, state_with(self.layout(), plan.spec, state, new_buffers, new_counts), new_buffers
        return None

    # -- entry points ---------------------------------------------------------------------

    def usable(self) -> bool:
        return FAST_SWITCH.enabled and traced_reason() is None

    def update(self, updates: PyTree, state: Any, params: PyTree | None = None, **extra_args: Any):
        if not torch.compiler.is_compiling() and self.usable():
            memo = self.pure_memo
            plan = memo.replan(updates, state, params) if memo is not None and state is memo.state else None
            first = False if plan is not None else None  # a returned state has counted a step
            if plan is None:
                plan = self.plan(updates, state, params, donate=False)
                if type(plan) is not Plan or not (params is None or plan.p is not None or params_fit(params, plan)):
                    plan = None
                elif AUTO_ALLOCATOR.pending and plan.columns.device.type == "cpu":
                    AUTO_ALLOCATOR.consider(plan.g)
            if plan is not None:
                result = self._backend(plan, state, write_params=False)
                if result is None:
                    result = self._execute(plan, state, donate=False, first=first)
                out, new_state, buffers = result
                self._remember_pure(new_state, plan, updates, buffers, plan.p is not None, memo if first is False else None)
                return optree.tree_unflatten(plan.spec, out), new_state
            on_shards = update_on_shards(self, updates, state, params)  # DTensors (FSDP2)
            if on_shards is not None:
                return on_shards
        return self.reference.update(updates, state, params, **extra_args)

    def _remember_pure(
        self, state: tuple, plan: Plan, grads: PyTree, buffers: dict, needs_params: bool, memo: PureMemo | None
    ) -> None:
        """Keeps what this pure step checked for the next one (static hyperparameters only);
        ``memo``: the memo that planned this step, if any."""
        if memo is not None and memo.needs_params == needs_params:
            self.pure_memo = memo.next(state, plan, buffers)
        elif type(self._static_h) is dict:
            self.pure_memo = PureMemo.of(state, plan, grads, buffers, self._layout, self.learning_rate, needs_params)

    def pure_step(self, grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any] | None:
        """``update`` followed by ``apply_updates`` in one pure step: returns (new params, new
        state), or None where the fast route does not apply.

        A backend that takes the step (the native CPU kernels: one pass, 28 bytes per element
        for Adam) writes the new params and state into fresh tensors. Otherwise a kernel that
        writes its state in place anyway (``writes_state``: torch's ``_fused_*``) runs in place
        on fresh copies of the params and the state, so the new params come straight out of
        the kernel (no zeroed update buffer, no separate addition), and so does one that asks
        for it (``copies_for_pure_step``); any other kernel computes fresh updates in its pure
        mode, added to the params with one multi-tensor add, which moves fewer bytes than
        copying every buffer first. Nothing passed in is written. A step given the state the
        previous pure step returned reuses that step's checks (:class:`PureMemo`).
        """
        if not self.usable():
            return None
        memo = self.pure_memo
        repeated = memo is not None and state is memo.state and memo.needs_params
        plan = memo.replan(grads, state, params) if repeated else None
        first = False if plan is not None else None  # a returned state has counted a step
        if plan is None:
            plan = self.plan(grads, state, params, donate=True)
            if type(plan) is not Plan:
                return None
            if AUTO_ALLOCATOR.pending and plan.columns.device.type == "cpu":
                AUTO_ALLOCATOR.consider(plan.g)
        result = self._backend(plan, state, write_params=True)
        if result is None and not (self.route.writes_state or self.route.copies_for_pure_step):
            updates, new_state, buffers = self._execute(plan, state, donate=False, first=first)
            result = torch._foreach_add(plan.p, updates), new_state, buffers
        if result is None:
            copies = plan._replace(
                p=[x.clone() for x in plan.p],
                buffers={k: (None if v is None else [x.clone() for x in v]) for k, v in plan.buffers.items()},
            )
            result = self._execute(copies, state, donate=True, new_containers=True, first=first)
        out, new_state, buffers = result
        self._remember_pure(new_state, plan, grads, buffers, True, memo if first is False else None)
        return optree.tree_unflatten(plan.spec, out), new_state

    def returned(self, state: Any) -> bool:
        """Whether ``state`` is the state this optimizer's last donated step returned."""
        memo = self.memo
        return memo is not None and state is memo.state

    def repeat_step(self, grads: PyTree, state: Any, params: PyTree) -> tuple[Any, list[torch.Tensor]] | None:
        """The donated step after a donated step, for ``apply_gradients``'s hot path.

        Applies only when ``state`` is the state the previous donated step returned and the
        checks it remembered (:class:`Memo`) still hold; then writes the step into ``params``
        and the state buffers and returns ``(new_state, replaced)``, where ``replaced`` are the
        old state's tensors the new state no longer holds (its step counts). Returns None,
        having written nothing, otherwise. The new params are ``params``, updated in place.
        """
        if not self.usable():
            return None
        result = self._repeat(grads, state, params)
        return None if result is None else (result[1], result[2])

    def _repeat(self, grads: PyTree, state: Any, params: PyTree) -> tuple[list, Any, list, Any] | None:
        memo = self.memo
        if memo is None or state is not memo.state:
            return None
        plan = memo.replan(grads, state, params)
        if plan is None:
            return None
        # The state came out of a donated step, so its counts are at least 1: no device read.
        out, new_state = self.run(plan, state, donate=True, first=False)
        self.memo = memo._replace(state=new_state)
        return out, new_state, list(plan.counts.values()), plan.spec

    def donated_update(self, grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any] | None:
        """One step writing into ``params`` and the state buffers; returns (new params, new
        state), or None (having written nothing) where the fast route does not apply."""
        result = self.donated_run(grads, state, params)
        if result is None:
            return None
        out, new_state, _, spec = result
        return optree.tree_unflatten(spec, out), new_state

    def donated_run(self, grads: PyTree, state: Any, params: PyTree) -> tuple[list, Any, list, Any] | None:
        """Runs a donated step; returns (params leaves written, new state, replaced counts, the
        params' tree structure), or None.

        A step given the state the previous donated step returned, with params in the same
        memory, reuses that step's checks (:class:`Memo`): only the gradients, the params'
        memory and the state's containers are looked at again. Otherwise the step is planned
        and checked from scratch, and its checks are remembered for the next step.
        """
        if not self.usable():
            return None
        repeated = self._repeat(grads, state, params)
        if repeated is not None:
            return repeated
        self.memo = None
        plan = self.plan(grads, state, params, donate=True)
        if type(plan) is not Plan:
            return None
        out, new_state = self.run(plan, state, donate=True)
        if self._static_h is not None and type(self._static_h) is dict:
            self.memo = Memo.of(new_state, plan, params, out, self.layout(), self.learning_rate)
        return out, new_state, list(plan.counts.values()), plan.spec


def fast_path_of(tx: GradientTransformation) -> FastPath | None:
    """The :class:`FastPath` of a transformation built by a declared factory, else None."""
    return getattr(tx.update, "_funcopt_fast_path", None)


def declare(route: FastRoute) -> Callable[[Callable[..., GradientTransformation]], Callable[..., GradientTransformation]]:
    """Gives an optimizer factory the fast route ``route`` (the factory returns the reference chain).

    The decorated factory returns a ``GradientTransformation`` with the reference chain's
    ``init`` and an ``update`` that runs the fast route where it applies and the chain's own
    ``update`` otherwise. The signature (read by ``inject_hyperparams``) is kept, and the
    declaration is reachable as ``factory.fast_route``.

    Example (SGD with a heavy-ball momentum, declared next to its reference chain; the test
    ``tests/test_fast_declare.py`` runs a fuller version)::

        def _heavy_ball_kernel(call):
            buf = call.bufs["momentum_buffer"]
            if call.in_place:  # a donated step: write params and buffers
                if call.first:
                    torch._foreach_copy_(buf, call.g)
                else:
                    torch._foreach_mul_(buf, call.h["momentum"])
                    torch._foreach_add_(buf, call.g)
                torch._foreach_add_(call.p, buf, alpha=-call.lr)
                return call.p
            new = ([g.clone() for g in call.g] if call.first
                   else torch._foreach_add(torch._foreach_mul(buf, call.h["momentum"]), call.g))
            call.bufs["momentum_buffer"] = new  # pure: fresh state, fresh updates
            return torch._foreach_mul(new, -call.lr)

        @declare(FastRoute(_heavy_ball_kernel, hyperparams=("momentum",),
                           buffers=("momentum_buffer",), needs_first_step=True))
        def heavy_ball(learning_rate, momentum=0.9):
            return chain(trace(momentum), scale_by_learning_rate(learning_rate))
    """
    if not isinstance(route, FastRoute):
        raise TypeError(f"declare expects a FastRoute, got {type(route).__name__}")

    def decorate(factory: Callable[..., GradientTransformation]) -> Callable[..., GradientTransformation]:
        signature = inspect.signature(factory)
        for name in route.hyperparams + route.flags + route.unsupported:
            if name not in signature.parameters:
                raise TypeError(f"declare: {factory.__name__} has no argument {name!r}")

        @functools.wraps(factory)
        def wrapper(*args: Any, **kwargs: Any) -> GradientTransformation:
            reference = factory(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            fp = FastPath(factory.__name__, route, reference, dict(bound.arguments))

            def update(updates, state, params=None, **extra_args):
                return fp.update(updates, state, params, **extra_args)

            update._funcopt_fast_path = fp  # type: ignore[attr-defined]
            return GradientTransformation(reference.init, update)

        wrapper.fast_route = route  # type: ignore[attr-defined]
        return wrapper

    return decorate
