"""Wrappers that route leaves to transformations: ``masked``, ``freeze``, ``multi_transform``.

``masked`` and ``multi_transform`` route leaves to transformations (torch.optim's param
groups, the functional way); ``freeze`` zeroes the updates of some leaves (``set_to_zero``
replaces every update by zeros).

Everything is pure and branch-free on tensor values, so every wrapper runs under
``torch.func.vmap``/``grad`` and ``torch.compile``. Masks and labels are static Python values
(bools and hashable labels), resolved against the params' structure.

Labels and masks may be given as a full tree (one entry per leaf) or as a *prefix* of the params
tree: ``{"encoder": "frozen", "head": "adam"}`` labels every leaf under ``params["encoder"]``
``"frozen"``. A callable ``fn(params) -> tree`` is evaluated on the params (or the updates when
``update`` gets no params).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

from funcopt import tree as _tree
from funcopt.base import (
    FuncoptError,
    GradientTransformation,
    OptState,
    PyTree,
    check_state,
    stable_name,
)
from funcopt.transforms._common import _init_empty
from funcopt.transforms._labels import MaskOrFn, _merge, _resolve_labels, _resolve_mask, _select, _zip_map

__all__ = [
    "MaskedState",
    "MultiTransformState",
    "set_to_zero",
    "masked",
    "freeze",
    "multi_transform",
]


# ---------------------------------------------------------------------------------------------
# set_to_zero, masked, freeze


def set_to_zero() -> GradientTransformation:
    """Replaces every update by zeros (``optax.set_to_zero``); use it to freeze leaves."""

    def update(updates, state, params=None, **extra_args):
        return _tree.zeros_like(updates), state

    return GradientTransformation(_init_empty, update)


@stable_name("funcopt.MaskedState")
class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner state, built on the selected leaves only.

    Leaves that are not selected appear as empty tensors of shape ``(0,)`` in ``inner_state``
    (no memory is spent on them, and the state keeps the params' tree structure).
    """

    inner_state: OptState


def _masked_init(inner: GradientTransformation, keep: PyTree, params: PyTree) -> MaskedState:
    return MaskedState(inner.init(_select(params, keep)))


def _masked_update(
    inner: GradientTransformation, keep: PyTree, updates, state, params, what: str, extra_args
):
    check_state(state, MaskedState, what)
    sub_updates = _select(updates, keep)
    sub_params = _select(params, keep) if params is not None else None
    new_sub, inner_state = inner.update(sub_updates, state.inner_state, sub_params, **extra_args)
    return _merge(updates, keep, new_sub, what), MaskedState(inner_state)


def masked(inner: GradientTransformation, mask: MaskOrFn) -> GradientTransformation:
    """Applies ``inner`` only to the leaves selected by ``mask``; the others pass unchanged.

    Like ``optax.masked``. ``mask`` is a pytree of Python bools with the params' structure, a
    prefix of it (``{"encoder": False, "head": True}`` selects every leaf under
    ``params["head"]``), or a function ``params -> such a tree``. The inner state holds entries
    for the selected leaves only.

    Args:
        inner: the transformation to apply to the selected leaves.
        mask: which leaves ``inner`` transforms (True) or leaves untouched (False).

    Returns:
        A ``GradientTransformation`` with state :class:`MaskedState`.

    Raises:
        FuncoptError: at ``init``/``update`` when the mask does not fit the params; the message
            names the path.

    Example:
        >>> decay = funcopt.masked(funcopt.add_decayed_weights(1e-2), lambda p: tree.map(lambda x: x.ndim > 1, p))
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"masked expects a GradientTransformation, got {type(inner).__name__}.")

    def init(params):
        return _masked_init(inner, _resolve_mask(mask, params, "masked"), params)

    def update(updates, state, params=None, **extra_args):
        keep = _resolve_mask(mask, params if params is not None else updates, "masked")
        return _masked_update(inner, keep, updates, state, params, "masked", extra_args)

    return GradientTransformation(init, update)


def freeze(mask: MaskOrFn) -> GradientTransformation:
    """Zeroes the updates of the leaves where ``mask`` is True (those parameters stay fixed).

    ``chain(freeze(mask), adam(...))`` still keeps Adam moments for frozen leaves (they stay
    zero); to spend no memory on them use
    ``multi_transform({"train": adam(...), "frozen": set_to_zero()}, labels)``. Put ``freeze``
    last in a chain (``chain(adamw(...), freeze(mask))``) when an earlier block adds weight
    decay, so frozen leaves get no decay either.

    Args:
        mask: pytree of bools (full or prefix of the params) or function of params; True means
            frozen.
    """
    return masked(set_to_zero(), mask)


# ---------------------------------------------------------------------------------------------
# multi_transform


@stable_name("funcopt.MultiTransformState")
class MultiTransformState(NamedTuple):
    """State of :func:`multi_transform`: ``{label: MaskedState}``, one per transformation."""

    inner_states: dict


def multi_transform(
    transforms: Mapping[Hashable, GradientTransformation], param_labels: Any
) -> GradientTransformation:
    """Applies a different transformation to each group of leaves, like torch.optim param groups.

    Like ``optax.multi_transform``. ``param_labels`` assigns a label to every leaf: a pytree of
    labels with the params' structure, a prefix of it (``{"encoder": "sgd", "head": "adam"}``),
    or a function ``params -> such a tree``. Each leaf is updated by ``transforms[label]``; each
    transformation's state holds its own leaves only.

    Args:
        transforms: mapping from label to transformation.
        param_labels: the labels, as described above.

    Returns:
        A ``GradientTransformation`` with state :class:`MultiTransformState`.

    Raises:
        FuncoptError: when a leaf has a label that is not a key of ``transforms``, or the labels
            do not fit the params; the message names the path.

    Example:
        >>> tx = funcopt.multi_transform(
        ...     {"body": funcopt.sgd(0.01, momentum=0.9), "head": funcopt.adam(1e-3)},
        ...     {"encoder": "body", "head": "head"},
        ... )
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise FuncoptError("multi_transform needs a non-empty dict {label: transformation}.")
    for label, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"multi_transform: transforms[{label!r}] is a {type(t).__name__}, not a "
                "GradientTransformation (did you forget to call it, e.g. funcopt.adam(1e-3)?)."
            )
    transforms = dict(transforms)

    def keeps(labels_tree):
        return {lab: _zip_map(lambda x, lab=lab: x == lab, labels_tree) for lab in transforms}

    def init(params):
        labels_tree = _resolve_labels(param_labels, params, transforms, "multi_transform")
        masks = keeps(labels_tree)
        return MultiTransformState(
            {lab: _masked_init(t, masks[lab], params) for lab, t in transforms.items()}
        )

    def update(updates, state, params=None, **extra_args):
        check_state(state, MultiTransformState, "multi_transform")
        if set(state.inner_states) != set(transforms):
            raise FuncoptError(
                f"multi_transform state has groups {sorted(map(repr, state.inner_states))} but the "
                f"transformation has {sorted(map(repr, transforms))}; pass the state from its own init."
            )
        labels_tree = _resolve_labels(
            param_labels, params if params is not None else updates, transforms, "multi_transform"
        )
        # Every group reads the original updates (groups are disjoint); all results are put
        # back in one structural pass where each leaf takes its own group's output.
        masks = keeps(labels_tree)
        outputs, new_states = [], {}
        for lab, t in transforms.items():
            check_state(state.inner_states[lab], MaskedState, f"multi_transform group {lab!r}")
            sub_updates = _select(updates, masks[lab])
            sub_params = _select(params, masks[lab]) if params is not None else None
            new_sub, inner_state = t.update(sub_updates, state.inner_states[lab].inner_state, sub_params, **extra_args)
            outputs.append(new_sub)
            new_states[lab] = MaskedState(inner_state)
        index = {lab: i for i, lab in enumerate(transforms)}
        try:
            merged = _zip_map(lambda x, lab, *outs: outs[index[lab]], updates, labels_tree, *outputs)
        except (KeyError, IndexError, TypeError) as e:
            raise FuncoptError(
                f"multi_transform: a group's transformation returned updates whose structure differs "
                f"from its input ({type(e).__name__}: {e}); it must keep the structure of the updates."
            ) from None
        return merged, MultiTransformState(new_states)

    return GradientTransformation(init, update)
