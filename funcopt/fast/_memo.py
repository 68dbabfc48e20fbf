"""What a donated step checked, remembered for the next one.

A donated step whose state is the one the previous donated step returned, with params in the
same memory, reuses that step's plan and checks only what may have changed since
(:class:`Memo`). Generic over every declared optimizer: the buffers are found through the
optimizer's :class:`~funcopt.fast._plan.Layout`.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple

import optree
import torch

from funcopt.base import PyTree
from funcopt.fast._plan import (
    _DTYPE,
    _PLAIN_SET,
    _REQUIRES_GRAD,
    _SHAPE,
    Layout,
    Plan,
    _Tensor,
    flatten,
    learning_rate_at,
    schedule_position,
)

__all__: list[str] = []


class LeafReader:
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
        leaves, spec = flatten(tree)
        return leaves if spec == self.spec else None


def _container_leaves(subtree: Any) -> list[Any]:
    """The leaves of a state subtree, in insertion order for a flat dict (cheap), else optree's."""
    if type(subtree) is dict:
        return list(subtree.values())
    return flatten(subtree)[0]


class Memo(NamedTuple):
    """What a donated step checked, kept for the next step (see :meth:`replan`).

    It holds the state that step returned (so the state's memory stays alive until the next
    donated step of this optimizer or until the optimizer is dropped).
    """

    state: tuple
    plan: Plan
    reader: LeafReader
    pointers: list[int]  # data_ptr of each params buffer written
    shapes: list[torch.Size]  # of the params, which the gradients must share
    dtypes: list[torch.dtype]  # of the params, which the gradients must share
    devices: list[int]  # of the params (``get_device()``), which the gradients must share
    written: frozenset[int]  # data_ptr of every buffer the kernels write
    containers: tuple[tuple[Any, list[torch.Tensor]], ...]  # state subtrees and their leaves
    layout: Layout
    learning_rate: Any  # a float or a schedule

    @staticmethod
    def of(
        state: tuple, plan: Plan, params: PyTree, out: list[torch.Tensor], layout: Layout, learning_rate: Any
    ) -> Memo:
        containers = tuple(
            (subtree, _container_leaves(subtree))
            for i, k in layout.buffers.values()
            for subtree in (state[i][k],)
        )
        return Memo(
            state,
            plan._replace(g=[], p=None, counts={}, scalars={}),
            LeafReader(params, plan.spec),
            [t.data_ptr() for t in out],
            [t.shape for t in out],
            [t.dtype for t in out],
            [t.get_device() for t in out],
            frozenset(t.data_ptr() for b in plan.buffers.values() if b is not None for t in b)
            | frozenset(t.data_ptr() for t in out),
            containers,
            layout,
            learning_rate,
        )

    def replan(self, grads: PyTree, state: tuple, params: PyTree) -> Plan | None:
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
        layout = self.layout
        if callable(self.learning_rate):  # a schedule: this step's value
            lr = learning_rate_at(self.learning_rate, state, schedule_position(layout))
            if type(lr) is str:
                return None
        else:  # a Python number (a remembered step has static hyperparameters)
            lr = old.lr
        counts = {i: state[i].count for i in layout.counted}
        scalars = {name: state[i][k] for name, (i, k) in layout.scalars.items()}
        return old._replace(lr=lr, p=p, g=g, counts=counts, scalars=scalars)


class PureMemo(NamedTuple):
    """What a pure step (``update`` or the pure training step) checked, kept for the next one.

    The everyday loop hands the state a pure step returned straight back to the next step.
    Its buffers are then tensors the fast route made itself (plain, contiguous, of the
    gradients' shapes, dtypes and device), so :meth:`replan` checks only what the caller
    brings anew: the gradients and the params. It holds the state that step returned (which
    the caller holds anyway until the next step).
    """

    state: tuple
    plan: Plan  # with that state's buffers; g, p, counts and scalars are filled in per step
    reader: LeafReader
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    devices: list[int]
    containers: tuple[tuple[Any, list[torch.Tensor]], ...]
    layout: Layout
    learning_rate: Any  # a float or a schedule
    needs_params: bool  # whether the kernels read the params (a pure step adds into them)

    @staticmethod
    def of(
        state: tuple, plan: Plan, grads: PyTree, buffers: dict[str, list[torch.Tensor] | None], layout: Layout,
        learning_rate: Any, needs_params: bool,
    ) -> PureMemo:
        containers = tuple(
            (subtree, _container_leaves(subtree))
            for i, k in layout.buffers.values()
            for subtree in (state[i][k],)
        )
        g = plan.g
        return PureMemo(
            state,
            plan._replace(g=[], p=None, counts={}, scalars={}, buffers=buffers),
            LeafReader(grads, plan.spec),
            list(map(_SHAPE, g)),
            list(map(_DTYPE, g)),
            list(map(_Tensor.get_device, g)),
            containers,
            layout,
            learning_rate,
            needs_params,
        )

    def replan(self, grads: PyTree, state: tuple, params: PyTree | None) -> Plan | None:
        """The remembered plan with this step's gradients, params, counts and learning rate, or
        None where anything it relied on changed (the caller then plans from scratch).

        ``state`` is the state the remembered step returned; its containers must still hold
        the buffers that step made. Checked again: the gradients (and, where the kernels read
        them, the params) are plain contiguous tensors of the remembered shapes, dtypes and
        device, not requiring grad; params the kernels do not read match the gradients in
        structure, shape and dtype.
        """
        g = self.reader.leaves(grads)
        if g is None:
            return None
        p = None
        try:  # one C-level map per property
            if (
                not set(map(type, g)) <= _PLAIN_SET
                or list(map(_SHAPE, g)) != self.shapes
                or list(map(_DTYPE, g)) != self.dtypes
                or list(map(_Tensor.get_device, g)) != self.devices
                or True in map(_REQUIRES_GRAD, g)
                or not all(map(_Tensor.is_contiguous, g))
            ):
                return None
            if params is not None:
                p = self.reader.leaves(params)
                if (
                    p is None
                    or not set(map(type, p)) <= _PLAIN_SET
                    or list(map(_SHAPE, p)) != self.shapes
                    or list(map(_DTYPE, p)) != self.dtypes
                ):
                    return None
                if self.needs_params and (
                    list(map(_Tensor.get_device, p)) != self.devices
                    or True in map(_REQUIRES_GRAD, p)
                    or not all(map(_Tensor.is_contiguous, p))
                ):
                    return None
            elif self.needs_params:
                return None
        except (AttributeError, RuntimeError, TypeError):
            return None
        for subtree, leaves in self.containers:
            current = _container_leaves(subtree)
            if len(current) != len(leaves) or not all(map(operator.is_, current, leaves)):
                return None
        layout = self.layout
        old = self.plan
        if callable(self.learning_rate):
            lr = learning_rate_at(self.learning_rate, state, schedule_position(layout))
            if type(lr) is str:
                return None
        else:
            lr = old.lr
        counts = {i: state[i].count for i in layout.counted}
        if any([c.dim() for c in counts.values()]):  # a count emptied by a donated step since
            return None
        scalars = {name: state[i][k] for name, (i, k) in layout.scalars.items()} if layout.scalars else {}
        return Plan(old.h, lr, old.spec, old.columns, p if self.needs_params else None, g, old.buffers, counts, scalars)

    def next(self, state: tuple, plan: Plan, buffers: dict[str, list[torch.Tensor] | None]) -> PureMemo:
        """This memo for the state a step planned by :meth:`replan` returned."""
        containers = tuple(
            (subtree, _container_leaves(subtree))
            for i, k in self.layout.buffers.values()
            for subtree in (state[i][k],)
        )
        old = plan
        kept = Plan(old.h, old.lr, old.spec, old.columns, None, [], buffers, {}, {})
        return PureMemo(
            state, kept, self.reader, self.shapes, self.dtypes, self.devices, containers, self.layout,
            self.learning_rate, self.needs_params,
        )
