"""Hyperparameters held in the optimizer state: ``inject_hyperparams`` and its accessors.

Like ``optax.inject_hyperparams``: the wrapped optimizer keeps its numeric hyperparameters as
0-dim tensors in ``state.hyperparams``. They can then be read and changed between steps
(:func:`set_hyperparams`), reduced on plateau, saved in a checkpoint, and batched by
``torch.func.vmap`` to train K configurations at once.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple
from collections.abc import Iterable

import torch

from funcopt.base import FuncoptError, GradientTransformation, PyTree, check_state, stable_name
from funcopt.transforms._common import _find_states, _value_at, first_device

__all__ = [
    "InjectHyperparamsState",
    "inject_hyperparams",
    "get_hyperparams",
    "set_hyperparams",
    "injected_states",
]


@stable_name("funcopt.InjectHyperparamsState")
class InjectHyperparamsState(NamedTuple):
    """State of an :func:`inject_hyperparams` optimizer.

    ``count`` is the 0-dim int64 step count; ``hyperparams`` maps each injected name to a 0-dim
    tensor (the value used by the most recent step, or the initial value before any step);
    ``inner_state`` is the wrapped optimizer's own state.
    """

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]
    inner_state: Any


def _is_injectable(value: Any) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return False
    return isinstance(value, (float, torch.Tensor)) or callable(value)


def inject_hyperparams(
    optimizer_factory: Callable[..., GradientTransformation],
    *,
    static_args: Iterable[str] = ("mask",),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Wraps an optimizer factory so that its numeric hyperparameters live in the state.

    ``inject_hyperparams(funcopt.adam)(learning_rate=schedule, b1=0.9)`` returns a
    transformation whose state holds every float argument of ``adam`` (those given and the
    defaults) as a 0-dim tensor in ``state.hyperparams``. A callable argument is a schedule,
    evaluated at the step count before each update (the k-th update uses ``schedule(k - 1)``,
    exactly as the un-injected optimizer does). Integers, booleans, strings and the names in
    ``static_args`` stay static Python values, as do ``mask`` and every ``*_mask`` argument
    (masks may be functions of the params, never schedules); pass ``1.0``, not ``1``, to
    inject a value.

    Results equal the un-injected optimizer's: bitwise in float64.

    Args:
        optimizer_factory: a function returning a ``GradientTransformation``, e.g. ``funcopt.adam``.
        static_args: more argument names never injected (``mask`` and ``*_mask`` never are).
        hyperparam_dtype: dtype of the hyperparameter tensors; float64 by default (float32 on MPS).

    Example:
        >>> tx = funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=0.1, momentum=0.9)
        >>> state = tx.init(params)
        >>> state = funcopt.set_hyperparams(state, learning_rate=0.01)
    """
    signature = inspect.signature(optimizer_factory)
    masks = {k for k in signature.parameters if k == "mask" or k.endswith("_mask")}
    static_names = set(static_args) | masks
    name = getattr(optimizer_factory, "__name__", "optimizer")

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise FuncoptError(f"inject_hyperparams({name}): {e}") from None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        numeric = {k: v for k, v in arguments.items() if k not in static_names and _is_injectable(v)}
        static = {k: v for k, v in arguments.items() if k not in numeric}
        schedules = {k: v for k, v in numeric.items() if callable(v)}
        # Build once with the Python values so that range checks run at construction time.
        optimizer_factory(**arguments)

        def _as_tensor(value: Any, device: torch.device) -> torch.Tensor:
            dtype = hyperparam_dtype or (torch.float32 if device.type == "mps" else torch.float64)
            if isinstance(value, torch.Tensor):
                return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
            return torch.as_tensor(value, dtype=dtype, device=device)

        def _values(count: torch.Tensor, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = dict(current)
            for k, fn in schedules.items():
                out[k] = _as_tensor(fn(count), count.device)
            return out

        def init(params: PyTree) -> InjectHyperparamsState:
            device = first_device(params)
            count = torch.zeros((), dtype=torch.int64, device=device)
            hparams = {
                k: _as_tensor(_value_at(v, count), device) for k, v in numeric.items()
            }
            inner = optimizer_factory(**static, **hparams)
            return InjectHyperparamsState(count, hparams, inner.init(params))

        def update(updates, state, params=None, **extra_args):
            check_state(state, InjectHyperparamsState, f"inject_hyperparams({name})")
            hparams = _values(state.count, state.hyperparams)
            inner = optimizer_factory(**static, **hparams)
            updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
            return updates, InjectHyperparamsState(state.count + 1, hparams, inner_state)

        return GradientTransformation(init, update)

    wrapped.__name__ = f"inject_hyperparams_{name}"
    wrapped.__doc__ = f"{name} with its numeric hyperparameters held in the state.\n\n" + (
        optimizer_factory.__doc__ or ""
    )
    return wrapped


def injected_states(state: Any) -> list[InjectHyperparamsState]:
    """Every :class:`InjectHyperparamsState` in an optimizer state, outermost first."""
    return _find_states(state, InjectHyperparamsState, nested=True)


def get_hyperparams(state: Any) -> dict[str, torch.Tensor]:
    """The hyperparameters of the (first) ``inject_hyperparams`` state found in ``state``."""
    found = injected_states(state)
    if not found:
        raise FuncoptError(
            "No inject_hyperparams state found. Build the optimizer with "
            "funcopt.inject_hyperparams(factory)(...) to keep hyperparameters in the state."
        )
    return dict(found[0].hyperparams)


def set_hyperparams(state: Any, **values: Any) -> Any:
    """Returns a copy of ``state`` with hyperparameters replaced, like editing
    ``opt_state.hyperparams`` in optax. The input state is not modified.

    Works on an ``InjectHyperparamsState`` or any pytree containing them (e.g. a chain's tuple);
    each value is converted to the dtype and device of the existing entry. A value may be a
    batched tensor (shape ``(K,)``) for use under ``vmap``. A scheduled hyperparameter is
    recomputed from its schedule at the next step, so setting it has no lasting effect.
    """
    found = injected_states(state)
    if not found:
        raise FuncoptError(
            "set_hyperparams found no inject_hyperparams state. Build the optimizer with "
            "funcopt.inject_hyperparams(factory)(...) first."
        )
    known = set().union(*(s.hyperparams for s in found))
    unknown = sorted(set(values) - known)
    if unknown:
        raise FuncoptError(
            f"Unknown hyperparameter(s) {unknown}; this state has {sorted(known)}. "
            "Integer, boolean and static arguments are not injected."
        )

    def replace(node: Any) -> Any:
        if isinstance(node, InjectHyperparamsState):
            hp = dict(node.hyperparams)
            for k, v in values.items():
                if k in hp:
                    old = hp[k]
                    if isinstance(v, torch.Tensor):
                        hp[k] = v.to(device=old.device, dtype=old.dtype)
                    else:  # build in the target dtype: a float32 detour would round 0.01
                        hp[k] = torch.tensor(v, device=old.device, dtype=old.dtype)
            return node._replace(hyperparams=hp, inner_state=replace(node.inner_state))
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(replace(c) for c in node))
        if isinstance(node, (tuple, list)):
            return type(node)(replace(c) for c in node)
        if isinstance(node, dict):
            return {k: replace(c) for k, c in node.items()}
        return node

    return replace(state)
