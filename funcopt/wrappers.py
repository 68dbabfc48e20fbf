"""Wrappers that change where or when a transformation applies.

``masked`` and ``multi_transform`` route leaves to transformations (torch.optim's param
groups, the functional way); ``freeze`` zeroes the updates of some leaves; ``apply_if_finite``
skips steps with NaN/Inf gradients; ``accumulate`` averages gradients over ``k`` micro-batches
(``optax.MultiSteps``).

Everything is pure and branch-free on tensor values: decisions that depend on a tensor (is this
step finite? is this the k-th micro-batch?) are taken with ``torch.where``, so every wrapper runs
under ``torch.func.vmap``/``grad`` and ``torch.compile``. Masks and labels are static Python
values (bools and hashable labels), resolved against the params' structure.

Labels and masks may be given as a full tree (one entry per leaf) or as a *prefix* of the params
tree: ``{"encoder": "frozen", "head": "adam"}`` labels every leaf under ``params["encoder"]``
``"frozen"``. A callable ``fn(params) -> tree`` is evaluated on the params (or the updates when
``update`` gets no params).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, Callable, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    EmptyState,
    FuncoptError,
    GradientTransformation,
    OptState,
    PyTree,
    check_state,
)
from funcopt.transforms_common import _init_count

__all__ = [
    "MaskedState",
    "MultiTransformState",
    "ApplyIfFiniteState",
    "AccumulateState",
    "set_to_zero",
    "masked",
    "freeze",
    "multi_transform",
    "apply_if_finite",
    "accumulate",
]

MaskOrFn = Any
"""A pytree of Python bools (full or a prefix of the params) or ``fn(params) -> such a tree``."""


# ---------------------------------------------------------------------------------------------
# Resolving masks and labels against the params tree (private)


def _is_container(node: Any) -> bool:
    return node is None or isinstance(node, (dict, list, tuple))


def _rebuild(node: Any, children: Any) -> Any:
    """A container of ``node``'s type holding ``children`` (a dict or a list)."""
    if isinstance(node, dict):
        if type(node) is dict:
            return children
        try:
            return type(node)(children)
        except TypeError:  # e.g. defaultdict needs its factory
            return dict(children)
    if hasattr(node, "_fields"):
        return type(node)(*children)
    return type(node)(children)


def _zip_map(fn: Callable[..., Any], tree: Any, *others: Any) -> Any:
    """Applies ``fn(leaf, *matching)`` over the leaves of ``tree`` by structural recursion.

    ``tree`` leads: its dicts, lists, tuples, NamedTuples and ``None`` are walked, and ``others``
    are indexed the same way (they may hold anything at ``tree``'s leaf positions). Plain Python
    recursion instead of optree: under ``torch.compile`` dynamo cannot take the treespec of a
    tree of bools or labels built in the graph, and its pytree polyfill does not promise
    optree's dict-key order, so leaves are matched by position, never by leaf order.
    """
    if tree is None:
        return None
    if isinstance(tree, dict):
        return _rebuild(tree, {k: _zip_map(fn, tree[k], *(o[k] for o in others)) for k in tree})
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [_zip_map(fn, c, *(o[i] for o in others)) for i, c in enumerate(tree)])
    return fn(tree, *others)


def _dict_keys(node: dict) -> list:
    """Keys in optree's leaf order: sorted for dict/defaultdict when sortable, else insertion."""
    if isinstance(node, OrderedDict):
        return list(node)
    try:
        return sorted(node)
    except TypeError:
        return list(node)


def _entries(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a tree of entries, in optree's order (used for error messages)."""
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [e for k in _dict_keys(tree) for e in _entries(tree[k], f"{path}[{k!r}]")]
    if isinstance(tree, (list, tuple)):
        fields = getattr(tree, "_fields", None)
        return [
            e for i, c in enumerate(tree) for e in _entries(c, path + (f".{fields[i]}" if fields else f"[{i}]"))
        ]
    return [(path or "<root>", tree)]


def _describe(node: Any) -> str:
    if isinstance(node, torch.Tensor):
        return f"a tensor of shape {tuple(node.shape)}"
    if isinstance(node, dict):
        return f"a dict with keys {sorted(map(str, node))}"
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return f"a {type(node).__name__}"
    if isinstance(node, (list, tuple)):
        return f"a {type(node).__name__} of length {len(node)}"
    return repr(node)


def _expand(
    spec: Any, target: Any, path: str, what: str, is_entry: Callable[[Any], bool], entry_help: str
) -> Any:
    """Broadcasts ``spec`` (a full tree or prefix of ``target``) to one entry per leaf of ``target``.

    Returns a tree with the structure of ``target`` whose leaves are the entries; ``None``
    nodes of ``target`` stay ``None``. Raises ``FuncoptError`` naming the path on mismatch.
    """
    where = path or "<root>"
    if is_entry(spec):
        return _zip_map(lambda _: spec, target)
    if not _is_container(spec):
        raise FuncoptError(f"{what} at {where} is {spec!r} ({type(spec).__name__}); {entry_help}")
    if target is None:
        if spec is None:
            return None
        raise FuncoptError(f"{what} at {where} is {_describe(spec)} but the params hold None there.")
    if spec is None:
        raise FuncoptError(f"{what} at {where} is None but the params hold {_describe(target)}; {entry_help}")
    if isinstance(target, dict):
        if not isinstance(spec, dict):
            raise FuncoptError(
                f"{what} at {where} is {_describe(spec)} but the params hold {_describe(target)}. "
                "Give a dict with the same keys, or a single entry for the whole subtree."
            )
        missing = sorted(map(str, set(target) - set(spec)))
        extra = sorted(map(str, set(spec) - set(target)))
        if missing or extra:
            raise FuncoptError(
                f"{what} at {where} does not match the params' keys: missing {missing}, "
                f"unexpected {extra}. Give one entry per key (or a single entry for the subtree)."
            )
        return _rebuild(
            target, {k: _expand(spec[k], target[k], f"{path}[{k!r}]", what, is_entry, entry_help) for k in target}
        )
    if isinstance(target, (list, tuple)):
        if not isinstance(spec, (list, tuple)) or len(spec) != len(target):
            raise FuncoptError(
                f"{what} at {where} is {_describe(spec)} but the params hold {_describe(target)}. "
                "Give a sequence of the same length, or a single entry for the whole subtree."
            )
        fields = getattr(target, "_fields", None)
        children = [
            _expand(s, t, path + (f".{fields[i]}" if fields else f"[{i}]"), what, is_entry, entry_help)
            for i, (s, t) in enumerate(zip(spec, target))
        ]
        return _rebuild(target, children)
    # target is a leaf (tensor) but spec is a container
    raise FuncoptError(
        f"{what} at {where} is {_describe(spec)} but the params hold {_describe(target)} there; "
        f"{entry_help}"
    )


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _is_label(x: Any) -> bool:
    return (
        not _is_container(x)
        and not isinstance(x, torch.Tensor)
        and isinstance(x, Hashable)
    )


_MASK_HELP = "mask entries must be Python bools (True or False), one per leaf or one per subtree."
_LABEL_HELP = (
    "labels must be hashable non-container values such as strings, one per leaf or one per subtree."
)


def _resolve_mask(mask: MaskOrFn, tree: PyTree, what: str) -> PyTree:
    """The mask as a tree of bools with the structure of ``tree`` (prefixes broadcast)."""
    spec = mask(tree) if callable(mask) else mask
    if isinstance(spec, torch.Tensor):
        raise FuncoptError(f"{what}: the mask is a tensor; {_MASK_HELP}")
    return _expand(spec, tree, "", f"{what} mask", _is_bool, _MASK_HELP)


def _resolve_labels(labels: Any, tree: PyTree, known: Mapping[Hashable, Any], what: str) -> PyTree:
    """The labels as a tree with the structure of ``tree``; unknown labels raise naming the path."""
    spec = labels(tree) if callable(labels) else labels
    full = _expand(spec, tree, "", f"{what} labels", _is_label, _LABEL_HELP)
    unknown = [(p, lab) for p, lab in _entries(full) if lab not in known]
    if unknown:
        shown = ", ".join(f"{p} -> {lab!r}" for p, lab in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise FuncoptError(
            f"{what}: label(s) with no transformation: {shown}{more}. The transformations are "
            f"keyed by {sorted(map(repr, known))}; add the missing key(s) or fix the labels."
        )
    return full


def _placeholder(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.new_empty((0,))
    return torch.empty((0,))


def _select(tree: PyTree, keep: PyTree) -> PyTree:
    """Replaces the leaves of ``tree`` where ``keep`` is False by empty tensors of shape ``(0,)``.

    Empty tensors rather than ``None``/``()`` keep the tree's structure and leaf kinds unchanged
    (``torch.func.vmap`` needs tensor outputs; ``torch.compile`` cannot take the treespec of a
    dict it built whose leaves are not tensors) while costing no memory; elementwise blocks and
    global norms treat them as nothing. Leaves are matched by position, never by leaf order
    (dynamo's pytree polyfill may order dict keys differently from optree).
    """
    return _zip_map(lambda x, k: x if k else _placeholder(x), tree, keep)


def _merge(full: PyTree, keep: PyTree, part: PyTree, what: str) -> PyTree:
    """Takes the selected leaves from ``part`` and the others from ``full`` (same structure)."""
    try:
        return _zip_map(lambda x, k, q: q if k else x, full, keep, part)
    except (KeyError, IndexError, TypeError) as e:
        raise FuncoptError(
            f"{what}: the inner transformation returned updates whose structure differs from its "
            f"input ({type(e).__name__}: {e}); it must keep the structure of the updates."
        ) from None


# ---------------------------------------------------------------------------------------------
# set_to_zero, masked, freeze


def set_to_zero() -> GradientTransformation:
    """Replaces every update by zeros (``optax.set_to_zero``); use it to freeze leaves."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        return _tree.zeros_like(updates), state

    return GradientTransformation(init, update)


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


# ---------------------------------------------------------------------------------------------
# apply_if_finite


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    ``notfinite_count``: consecutive steps with non-finite gradients (0-dim int64);
    ``last_finite``: whether the last step's gradients were all finite (0-dim bool);
    ``total_notfinite``: all non-finite steps so far (0-dim int64); ``inner_state``: the
    wrapped transformation's state (unchanged by a skipped step).
    """

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: OptState


def _all_finite(tree: PyTree) -> torch.Tensor:
    """True when no leaf holds NaN or Inf, as a 0-dim bool tensor.

    ``(x * 0).sum()`` is 0 when ``x`` is finite and NaN as soon as one element is NaN or Inf
    (no overflow is possible), in two passes where ``isfinite(x).all()`` takes about five.
    """
    flat = _tree.leaves(tree)
    if not flat:
        return torch.ones((), dtype=torch.bool)
    total = None
    for x in flat:
        term = (x * 0).sum()
        total = term if total is None else total + term
    return total == 0


def _tree_select(cond: torch.Tensor, new: PyTree, old: PyTree, what: str) -> PyTree:
    """Leaf-wise ``torch.where(cond, new, old)`` over two inner states of equal structure."""

    def pick(a, b):
        if isinstance(a, torch.Tensor):
            return torch.where(cond, a, b)
        if a != b:
            pairs = zip(_tree.paths(new), _tree.leaves(new), _tree.leaves(old))
            bad = [p for p, x, y in pairs if not isinstance(x, torch.Tensor) and x != y]
            raise FuncoptError(
                f"{what}: the inner state holds a non-tensor value at {bad[0] if bad else '?'} that "
                f"changed ({b!r} -> {a!r}); state entries that change must be tensors."
            )
        return a

    return _tree.map(pick, new, old, names=("new inner state", "old inner state"))


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skips updates whose gradients contain NaN or Inf, like ``optax.apply_if_finite``.

    A step whose input updates are not all finite returns zeros and leaves the inner state
    unchanged; it is counted in the state. After more than ``max_consecutive_errors``
    consecutive bad steps the wrapper gives up and applies the inner update anyway (so NaNs
    reach the params and the failure becomes visible instead of silently stalling). The inner
    update is computed on every call and selected with ``torch.where`` (no Python branch on a
    tensor value), so it works under ``vmap`` and ``torch.compile``.

    Args:
        inner: the transformation to protect, e.g. ``funcopt.adam(1e-3)``.
        max_consecutive_errors: how many consecutive non-finite steps to skip (>= 0).

    Returns:
        A ``GradientTransformation`` with state :class:`ApplyIfFiniteState`.
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"apply_if_finite expects a GradientTransformation, got {type(inner).__name__}.")
    if isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int) or max_consecutive_errors < 0:
        raise FuncoptError(
            f"apply_if_finite: max_consecutive_errors must be an int >= 0, got {max_consecutive_errors!r}."
        )

    def init(params):
        zero = _init_count(params)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool, device=zero.device), zero.clone(), inner.init(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ApplyIfFiniteState, "apply_if_finite")
        finite = _all_finite(updates).to(state.last_finite.device)
        notfinite_count = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        total = torch.where(finite, state.total_notfinite, state.total_notfinite + 1)
        apply = finite | (notfinite_count > max_consecutive_errors)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        out = _tree.map(lambda u: torch.where(apply, u, 0.0), new_updates)
        inner_state = _tree_select(apply, new_inner, state.inner_state, "apply_if_finite")
        return out, ApplyIfFiniteState(notfinite_count, finite, total, inner_state)

    return GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# accumulate


class AccumulateState(NamedTuple):
    """State of :func:`accumulate`.

    ``mini_step``: micro-batches accumulated since the last real update (0-dim int64, 0 right
    after an update); ``gradient_step``: real updates so far (0-dim int64); ``inner_state``:
    the wrapped transformation's state; ``acc_grads``: the running sum of gradients.
    """

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_state: OptState
    acc_grads: PyTree


def accumulate(inner: GradientTransformation, every_k: int, *, average: bool = True) -> GradientTransformation:
    """Gradient accumulation: updates with the mean gradient of ``every_k`` micro-batches.

    Like ``optax.MultiSteps``. Calls 1..k-1 of each group add the gradients to an accumulator
    and return zeros (the params do not move); call k gives ``inner`` the mean (or, with
    ``average=False``, the sum) of the k gradients and returns its update. With a mean loss over
    equal-sized micro-batches this is exactly one step on the concatenated batch. The inner
    update is computed on every call and selected with ``torch.where`` (no Python branch on the
    step count), which keeps it usable under ``vmap`` and ``torch.compile``; its cost is one
    optimizer step per micro-batch. ``state.mini_step == 0`` tells that the last call updated.

    Args:
        inner: the optimizer to run every k micro-batches.
        every_k: number of micro-batches per update (int >= 1).
        average: divide the accumulated gradient by ``every_k`` (default) or pass the sum.

    Returns:
        A ``GradientTransformation`` with state :class:`AccumulateState`.
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"accumulate expects a GradientTransformation, got {type(inner).__name__}.")
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise FuncoptError(f"accumulate: every_k must be an int >= 1, got {every_k!r}.")

    def init(params):
        zero = _init_count(params)
        return AccumulateState(zero, zero.clone(), inner.init(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, AccumulateState, "accumulate")
        acc = _tree.map(lambda a, g: a + g, state.acc_grads, updates, names=("acc_grads", "updates"))
        emit = state.mini_step == every_k - 1
        grads = _tree.map(lambda a: a / every_k, acc) if average else acc
        new_updates, new_inner = inner.update(grads, state.inner_state, params, **extra_args)
        out = _tree.map(lambda u: torch.where(emit, u, 0.0), new_updates)
        inner_state = _tree_select(emit, new_inner, state.inner_state, "accumulate")
        acc = _tree.map(lambda a: torch.where(emit, 0.0, a), acc)
        mini_step = torch.where(emit, torch.zeros_like(state.mini_step), state.mini_step + 1)
        return out, AccumulateState(mini_step, state.gradient_step + emit.to(state.gradient_step.dtype), inner_state, acc)

    return GradientTransformation(init, update)
