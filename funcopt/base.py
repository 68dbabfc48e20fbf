"""The core types: ``GradientTransformation``, ``chain``, ``identity`` and ``apply_updates``."""

from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple, Protocol, Union

import optree
import torch

from funcopt import native as _native
from funcopt import tree as _tree

__all__ = [
    "PyTree",
    "OptState",
    "Schedule",
    "ScalarOrSchedule",
    "GradientTransformation",
    "TransformInitFn",
    "TransformUpdateFn",
    "EmptyState",
    "FuncoptError",
    "chain",
    "identity",
    "apply_updates",
]

PyTree = Any
OptState = Any
Schedule = Callable[[torch.Tensor], Union[float, torch.Tensor]]
"""A schedule maps the 0-dim integer step count to a value (``optax.Schedule``)."""
ScalarOrSchedule = Union[float, torch.Tensor, Schedule]


class FuncoptError(ValueError):
    """Raised for invalid input to a funcopt function; the message says what and how to fix."""


class TransformInitFn(Protocol):
    def __call__(self, params: PyTree) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: PyTree, state: OptState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pair of pure functions, like ``optax.GradientTransformation``.

    ``init(params) -> state`` builds the state; ``update(updates, state, params=None,
    **extra_args) -> (updates, new_state)`` transforms gradients (or updates from a previous
    transformation). Neither function mutates its arguments. ``update`` accepts and ignores
    extra keyword arguments it does not use (line searches read ``value``, ``grad``,
    ``value_fn``; plateau reduction reads ``value``).
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def _init_empty(params: PyTree) -> EmptyState:
    del params
    return EmptyState()


def identity() -> GradientTransformation:
    """A transformation that returns the updates unchanged (``optax.identity``)."""

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return updates, state

    return GradientTransformation(_init_empty, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in sequence, like ``optax.chain``.

    The state is a plain tuple holding one state per transformation. Extra keyword arguments
    given to ``update`` are passed to every member.

    Example:
        >>> tx = chain(clip_by_global_norm(1.0), scale_by_adam(), scale_by_learning_rate(1e-3))
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain argument {i} is a {type(t).__name__}, not a GradientTransformation. "
                "Pass transformations such as funcopt.scale_by_adam() (note the call)."
            )

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, **extra_args):
        if not isinstance(state, tuple) or len(state) != len(transforms) or hasattr(state, "_fields"):
            raise FuncoptError(
                f"chain of {len(transforms)} transformation(s) got a state of type "
                f"{type(state).__name__}"
                + (f" with {len(state)} entries" if isinstance(state, tuple) else "")
                + ". Pass the state returned by this optimizer's init (was it built for a "
                "different optimizer?)."
            )
        new_states = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, **extra_args)
            new_states.append(s)
        return updates, tuple(new_states)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Returns ``params + updates`` leaf-wise, like ``optax.apply_updates``.

    Each result keeps the dtype of its parameter. The two trees must have the same structure;
    a mismatch raises ``ValueError`` naming the first differing path. Plain tensors of equal
    dtype, shape and device, none requiring grad, are added with one multi-tensor
    ``torch._foreach_add`` (the same numbers, less per-leaf overhead), or, for large
    float32/float64 CPU trees, with :func:`funcopt.native.add` (one pass, streaming stores;
    bitwise the same sums); elsewhere (under ``torch.func`` transforms and ``torch.compile``,
    or for mixed leaves) leaf by leaf.
    """
    p, spec = optree.tree_flatten(params, none_is_leaf=False)
    u, u_spec = optree.tree_flatten(updates, none_is_leaf=False)
    if u_spec != spec:
        _tree.check_same_structure(params, updates, ("params", "updates"))
    if _can_add_together(p, u):
        if _native_can_add(p, u):
            return optree.tree_unflatten(spec, _native.add(p, u))
        if len(p) > 1:
            return optree.tree_unflatten(spec, torch._foreach_add(p, u))

    def _apply(p, u):
        out = p + u
        return out if out.dtype == p.dtype else out.to(p.dtype)

    return optree.tree_unflatten(spec, [_apply(a, b) for a, b in zip(p, u)])


_PLAIN_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _native_can_add(p: list[Any], u: list[Any]) -> bool:
    """Whether ``funcopt.native.add`` may add these leaves (already checked by
    :func:`_can_add_together`): one float32/float64 dtype, all contiguous, all on the CPU."""
    return (
        p[0].dtype in _NATIVE_DTYPES
        and _native.usable(p)  # first: it rejects small trees cheaply
        and len(set(map(_DTYPE, p))) == 1
        and set(map(torch.Tensor.get_device, p)) == {-1}
        and all(map(torch.Tensor.is_contiguous, p))
        and all(map(torch.Tensor.is_contiguous, u))
    )


_NATIVE_DTYPES = (torch.float32, torch.float64)


def _can_add_together(p: list[Any], u: list[Any]) -> bool:
    """Whether one multi-tensor add of ``p`` and ``u`` gives exactly ``[a + b for a, b in zip(p, u)]``."""
    if not p or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    try:
        return (
            set(map(type, p)) <= _PLAIN_TENSORS
            and set(map(type, u)) <= _PLAIN_TENSORS
            and list(map(_DTYPE, p)) == list(map(_DTYPE, u))
            and list(map(_SHAPE, p)) == list(map(_SHAPE, u))
            and list(map(torch.Tensor.get_device, p)) == list(map(torch.Tensor.get_device, u))
            and True not in map(_REQUIRES_GRAD, p)
            and True not in map(_REQUIRES_GRAD, u)
            and all(map(torch.Tensor.is_floating_point, p))
        )
    except (AttributeError, RuntimeError):
        return False


def check_state(state: Any, expected: type, transform_name: str) -> None:
    """Raises ``FuncoptError`` if ``state`` is not an instance of ``expected``."""
    if not isinstance(state, expected):
        raise FuncoptError(
            f"{transform_name} expected its state to be a {expected.__name__}, got "
            f"{type(state).__name__}. Pass the state returned by this optimizer's own init "
            "(a state from a different optimizer or chain position does not fit)."
        )


def require_params(params: Any, transform_name: str) -> None:
    """Raises ``FuncoptError`` when a transformation that needs ``params`` got ``None``."""
    if params is None:
        raise FuncoptError(
            f"{transform_name} needs the current parameters: call "
            "`tx.update(grads, state, params)` instead of `tx.update(grads, state)`."
        )
