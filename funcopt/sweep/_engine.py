"""The training loop of a sweep: any subset of the K configurations, on the shared batches.

``_run_configs(plan, indices, start, stop)`` trains configurations ``indices`` and returns
per-configuration results; sweeps run it per chunk, and a distributed sweep can run it per rank
and concatenate the results along axis 0.

Where the time of a small model's sweep step goes (profiled on the digits MLP, K=16, 2 CPU
threads), and what this module does about it:

- the gradients: ``vmap(grad(loss_fn))`` wraps every tensor of the forward and backward pass
  in two functorch levels. Here only the forward runs under ``vmap`` (K losses from batched
  kernels) and ``torch.autograd.grad`` of their sum gives the K gradients (each loss depends
  only on its own configuration's params, so the sum's gradient is each loss's own);
- the optimizer step: a chain of per-leaf ops costs its dispatch overhead once per leaf. When
  all params share one dtype, the K stacked parameter trees live in ONE ``(K, N)`` buffer
  whose column blocks are the leaves (the loss function sees ``(K, *shape)`` views of it, so
  the backward writes one ``(K, N)`` gradient), and the optimizer state's params-shaped
  subtrees are kept the same way: the step is one chain of ops on one leaf. A probe at plan
  time checks that this layout gives the per-leaf results (an optimizer that treats leaves
  differently, e.g. ``masked`` or ``multi_transform``, keeps the per-leaf layout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree
from funcopt.sweep._rows import RowKernels
from funcopt.transforms import inject_hyperparams
from funcopt.sweep._stacked import (
    init_stacked,
    select,
    stack_params,
    stack_states,
    stacked_update,
    vmapped_update,
)

__all__: list[str] = []

_KEY = "funcopt.sweep.columns"  # the one key of a flat-layout subtree


def _batch_source(data: Any, replay: bool) -> Callable[[int], Any]:
    if callable(data):
        return data
    if isinstance(data, (torch.Tensor, tuple, dict)):
        return lambda step: data
    if isinstance(data, Sequence):
        if not data:
            raise FuncoptError("data is an empty sequence; pass batches or a function step -> batch.")
        return lambda step: data[step % len(data)]
    if isinstance(data, Iterable):
        if replay and iter(data) is data:
            raise FuncoptError(
                "data is a one-shot iterator, but chunk_size/halving replay the steps for each "
                "chunk of configurations: pass a list of batches, a DataLoader or a function "
                "step -> batch."
            )
        state = {"it": iter(data)}

        def nxt(step: int) -> Any:
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = iter(data)
                try:
                    return next(state["it"])
                except StopIteration:
                    raise FuncoptError("data yielded no batches.") from None

        return nxt
    raise FuncoptError(
        f"data must be a function step -> batch, a list/DataLoader of batches, or one fixed batch "
        f"(tensor, tuple or dict); got {type(data).__name__}."
    )


# ---------------------------------------------------------------------------------------------
# Training any subset of the configurations (one chunk, or one rank of a distributed sweep)


@dataclass
class _Plan:
    """Everything needed to train any subset of the K configurations (one chunk, one rank)."""

    loss_fn: Callable[[PyTree, Any], torch.Tensor]
    tx: GradientTransformation
    values: dict[str, list[float]]
    init_params: Any
    seeds: list[int] | None
    batch: Callable[[int], Any]
    eval_fn: Callable[[PyTree], Any] | None
    eval_every: int | None
    step_mode: str
    randomness: str
    k: int
    metric: str = "loss"
    mode: str = "min"
    step_reason: str = ""
    columns: bool = False  # the one-buffer layout gives the same steps (columns_agree)
    eval_names: list[str] = field(default_factory=list)
    factory: Callable[..., GradientTransformation] | None = None  # the optimizer factory swept, if given

    def init(self, indices: list[int]) -> tuple[PyTree, PyTree]:
        if self.seeds is None:
            params = stack_params(self.init_params, len(indices))
        else:
            params = init_stacked(self.init_params, [self.seeds[i] for i in indices])
        hp = {n: [v[i] for i in indices] for n, v in self.values.items()}
        if self.factory is not None:
            # each configuration's own init: hyperparameters that init reads (rprop's first step
            # sizes are its learning rate, adagrad's initial accumulator) differ per configuration,
            # which set_hyperparams on one init would miss
            states = [inject_hyperparams(self.factory)(**{n: v[j] for n, v in hp.items()}).init(select(params, j))
                      for j in range(len(indices))]
            return params, _tree.stack(states)
        return params, stack_states(self.tx, params, hp)

    def evaluate(self, params: PyTree) -> dict[str, torch.Tensor]:
        out = torch.func.vmap(self.eval_fn, randomness=self.randomness)(params)
        # copies: a metric may be a view of the params, which later steps update in place
        if isinstance(out, Mapping):
            return {str(k): torch.as_tensor(v).detach().reshape(-1).clone() for k, v in out.items()}
        return {"eval": torch.as_tensor(out).detach().reshape(-1).clone()}


@dataclass
class _Run:
    """Per-configuration results of :func:`_run_configs` for the configurations ``indices``."""

    indices: list[int]
    params: PyTree
    state: PyTree
    losses: torch.Tensor  # (k, steps)
    evals: dict[str, torch.Tensor]  # name -> (k, number of evaluations)
    eval_steps: list[int]


class _Columns:
    """K stacked parameter trees of one dtype as one ``(K, N)`` buffer of column blocks."""

    def __init__(self, spec: Any, shapes: list[torch.Size], k: int):
        self.spec, self.shapes, self.k = spec, shapes, k
        self.sizes = [s.numel() for s in shapes]

    @staticmethod
    def of(params: PyTree) -> _Columns | None:
        """The layout of stacked ``params``, or None where one buffer cannot hold them."""
        leaves, spec = optree.tree_flatten(params, none_is_leaf=False)
        if len(leaves) < 2 or not all(type(x) is torch.Tensor and x.ndim >= 1 for x in leaves):
            return None
        k = leaves[0].shape[0]
        if any(x.shape[0] != k or x.dtype != leaves[0].dtype or x.device != leaves[0].device for x in leaves):
            return None
        if not leaves[0].is_floating_point():
            return None
        return _Columns(spec, [x.shape[1:] for x in leaves], k)

    def fits(self, subtree: Any) -> bool:
        leaves, spec = optree.tree_flatten(subtree, none_is_leaf=False)
        return spec == self.spec

    def pack(self, subtree: Any) -> torch.Tensor | None:
        leaves = optree.tree_leaves(subtree, none_is_leaf=False)
        if not all(type(x) is torch.Tensor and x.shape[1:] == s and x.shape[0] == self.k
                   for x, s in zip(leaves, self.shapes)):
            return None
        dtypes = {x.dtype for x in leaves}
        if len(dtypes) != 1:
            return None
        return torch.cat([x.reshape(self.k, -1) for x in leaves], dim=1)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        # one split (its backward is one cat), not one slice per leaf (one zero-filled (K, N)
        # gradient per leaf, then their sum)
        return [x.view(self.k, *s) for x, s in zip(flat.split(self.sizes, dim=1), self.shapes)]

    def unpack(self, flat: torch.Tensor) -> PyTree:
        return optree.tree_unflatten(self.spec, [v.contiguous() for v in self.views(flat)])

    def state_to_columns(self, state: PyTree) -> PyTree | None:
        """``state`` with every params-shaped subtree as ``{_KEY: (K, N)}``, or None."""
        failed = []

        def convert(x: Any) -> Any:
            if not self.fits(x):
                return x
            flat = self.pack(x)
            if flat is None:
                failed.append(x)
                return x
            return {_KEY: flat}

        out = optree.tree_map(convert, state, is_leaf=self.fits, none_is_leaf=False)
        return None if failed else out

    def state_from_columns(self, state: PyTree) -> PyTree:
        is_flat = lambda x: type(x) is dict and len(x) == 1 and _KEY in x  # noqa: E731
        return optree.tree_map(lambda x: self.unpack(x[_KEY]) if is_flat(x) else x, state,
                               is_leaf=is_flat, none_is_leaf=False)


def columns_agree(tx: GradientTransformation, params: PyTree, state: PyTree, steps: int = 2) -> bool:
    """Whether the one-buffer layout (:class:`_Columns`) gives the per-leaf stacked step's
    results for this optimizer, on random probe gradients of a different scale per leaf."""
    layout = _Columns.of(params)
    if layout is None:
        return False
    flat_state = layout.state_to_columns(state)
    if flat_state is None:
        return False
    gen = torch.Generator().manual_seed(1)
    p_tree, s_tree = params, state
    p_flat = {_KEY: layout.pack(params)}
    for _ in range(steps):
        leaves = optree.tree_leaves(params, none_is_leaf=False)
        g = [torch.randn(x.shape, generator=gen, dtype=torch.float64).mul(10.0 ** (i % 3 - 1)).to(x.dtype)
             for i, x in enumerate(leaves)]
        g_tree = optree.tree_unflatten(layout.spec, g)
        try:
            with torch.no_grad():
                u_t, s_tree = stacked_update(tx, g_tree, s_tree, p_tree)
                u_f, flat_state = stacked_update(tx, {_KEY: layout.pack(g_tree)}, flat_state, p_flat)
        except (FuncoptError, RuntimeError, TypeError, ValueError):
            return False
        p_tree = _tree.map(torch.add, p_tree, u_t)
        p_flat = {_KEY: p_flat[_KEY] + u_f[_KEY]}
    back = layout.state_from_columns(flat_state)
    a_leaves, a_spec = optree.tree_flatten((layout.unpack(p_flat[_KEY]), back), none_is_leaf=False)
    b_leaves, b_spec = optree.tree_flatten((p_tree, s_tree), none_is_leaf=False)
    if a_spec != b_spec:
        return False
    for a, b in zip(a_leaves, b_leaves):
        if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            tol = 1e-12 if a.dtype == torch.float64 else 1e-5
            if not torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True):
                return False
        elif not torch.equal(a, b):
            return False
    return True


def row_kernels(plan: _Plan, params: PyTree, state: PyTree, indices: list[int]) -> RowKernels | None:
    """The per-configuration row kernels of ``plan`` on stacked ``params``/``state`` (configurations
    ``indices``) in the one-buffer layout, or None where they do not apply."""
    layout = _Columns.of(params)
    flat_state = None if layout is None else layout.state_to_columns(state)
    if flat_state is None:
        return None
    return RowKernels.of(plan.factory, plan.values, indices, flat_state, layout.pack(params), _KEY)


class _Stepper:
    """One sweep step at a time on K stacked configurations, in the fastest valid layout."""

    def __init__(self, plan: _Plan, params: PyTree, state: PyTree, indices: list[int]):
        self.plan = plan
        self.layout = _Columns.of(params) if plan.step_mode == "stacked" and plan.columns else None
        flat_state = None if self.layout is None else self.layout.state_to_columns(state)
        if flat_state is None:
            self.layout = None
        self.rows: RowKernels | None = None
        if self.layout is not None:
            self.flat = self.layout.pack(params)
            self.state = flat_state
            # the engine owns these buffers (pack copies): the row kernels may write them in place
            self.rows = RowKernels.of(plan.factory, plan.values, indices, flat_state, self.flat, _KEY)
        else:
            self.tree, self.state = params, state
        self.k = _tree.leaves(params)[0].shape[0]
        self.forward = torch.func.vmap(plan.loss_fn, in_dims=(0, None), randomness=plan.randomness)
        self.grad_fn = torch.func.vmap(
            torch.func.grad_and_value(plan.loss_fn), in_dims=(0, None), randomness=plan.randomness
        )

    def params(self) -> PyTree:
        """The current stacked params in the user's tree layout (views where one buffer holds them)."""
        if self.layout is None:
            return self.tree
        return optree.tree_unflatten(self.layout.spec, self.layout.views(self.flat))

    def result(self) -> tuple[PyTree, PyTree]:
        if self.layout is None:
            return self.tree, self.state
        return self.layout.unpack(self.flat), self.layout.state_from_columns(self.state)

    def _grads(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """(gradients, the K losses): the forward under vmap, the backward by autograd."""
        if torch._C._are_functorch_transforms_active():  # nested in the user's transform
            grads, loss = self.grad_fn(self.params(), batch)
            return (grads if self.layout is None else self.layout.pack(grads)), loss
        if self.layout is not None:
            inputs = [self.flat.detach().requires_grad_()]
            tree = optree.tree_unflatten(self.layout.spec, self.layout.views(inputs[0]))
        else:
            leaves, spec = optree.tree_flatten(self.tree, none_is_leaf=False)
            inputs = [x.detach().requires_grad_() for x in leaves]
            tree = optree.tree_unflatten(spec, inputs)
        with torch.enable_grad():
            losses = self.forward(tree, batch)
            if not isinstance(losses, torch.Tensor) or losses.shape != (self.k,):
                raise FuncoptError(
                    "loss_fn must return a 0-dim tensor (the loss of one configuration); got "
                    + (f"shape {tuple(losses.shape[1:])}" if isinstance(losses, torch.Tensor) else type(losses).__name__)
                    + " per configuration."
                )
            if losses.requires_grad:
                grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
            else:
                grads = (None,) * len(inputs)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
        if self.layout is not None:
            return grads[0], losses.detach()
        return optree.tree_unflatten(spec, grads), losses.detach()

    def step(self, batch: Any) -> torch.Tensor:
        grads, loss = self._grads(batch)
        step_fn = stacked_update if self.plan.step_mode == "stacked" else vmapped_update
        with torch.no_grad():
            if self.rows is not None and self.rows.usable():
                self.state = self.rows.step(self.flat, grads, self.state)
            elif self.layout is not None:
                updates, self.state = step_fn(self.plan.tx, {_KEY: grads}, self.state, {_KEY: self.flat})
                self.flat = self.flat + updates[_KEY]
            else:
                updates, self.state = step_fn(self.plan.tx, grads, self.state, self.tree)
                self.tree = _tree.map(_add, self.tree, updates)
        return loss


def _add(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    out = p + u
    return out if out.dtype == p.dtype else out.to(p.dtype)


def _run_configs(
    plan: _Plan,
    indices: list[int],
    start: int,
    stop: int,
    params: PyTree | None = None,
    state: PyTree | None = None,
    *,
    eval_at_end: bool = True,
    bar: Any = None,
) -> _Run:
    """Trains configurations ``indices`` from step ``start`` to ``stop`` on the shared batches.

    Starts from ``plan.init(indices)`` unless stacked ``params``/``state`` are given. This is
    the unit a distributed sweep runs per rank (results are per configuration, so ranks' runs
    concatenate along axis 0).
    """
    if params is None or state is None:
        params, state = plan.init(indices)
    stepper = _Stepper(plan, params, state, list(indices))
    losses, evals, eval_steps = [], {}, []
    for step in range(start, stop):
        losses.append(stepper.step(plan.batch(step)))
        done = step + 1
        due = plan.eval_every is not None and done % plan.eval_every == 0
        if plan.eval_fn is not None and (due or (eval_at_end and done == stop)):
            with torch.no_grad():
                for name, v in plan.evaluate(stepper.params()).items():
                    evals.setdefault(name, []).append(v)
            eval_steps.append(done)
        if bar is not None:
            bar.update(len(indices))
    params, state = stepper.result()
    loss_t = torch.stack(losses, dim=1) if losses else torch.zeros(len(indices), 0)
    return _Run(
        list(indices), params, state, loss_t,
        {n: torch.stack(v, dim=1) for n, v in evals.items()}, eval_steps,
    )


def _concat(runs: list[_Run]) -> _Run:
    if len(runs) == 1:
        return runs[0]
    cat = lambda *xs: torch.cat(xs, dim=0)  # noqa: E731
    return _Run(
        [i for r in runs for i in r.indices],
        _tree.map(cat, *[r.params for r in runs]),
        _tree.map(cat, *[r.state for r in runs]),
        torch.cat([r.losses for r in runs], dim=0),
        {n: torch.cat([r.evals[n] for r in runs], dim=0) for n in runs[0].evals},
        runs[0].eval_steps,
    )


def _chunks(indices: list[int], chunk_size: int | None) -> list[list[int]]:
    if chunk_size is None:
        return [indices]
    return [indices[i : i + chunk_size] for i in range(0, len(indices), chunk_size)]
