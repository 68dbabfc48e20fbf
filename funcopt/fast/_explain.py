"""Which route a step takes, and why a faster one was not taken."""

from __future__ import annotations

from typing import Any, NamedTuple

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree
from funcopt.fast._backends import _BACKENDS
from funcopt.fast._plan import Plan, columns_reason, flatten, traced_reason
from funcopt.fast._route import FastPath, fast_path_of
from funcopt.fast._shards import explain_on_shards, has_dtensor
from funcopt.fast._switch import FAST_SWITCH

__all__ = ["Route", "explain", "fast_path_applies"]

_STEPS = ("update", "apply_gradients")


class Route(NamedTuple):
    """The route of one step, as :func:`explain` reports it.

    Attributes:
        route: ``"fast"`` (the optimizer's declared multi-tensor kernel or a backend's),
            ``"fast, in place"`` (a donated step writing the params and state buffers),
            ``"fast, in place, remembered checks"`` (a donated step after a donated step),
            ``"reference"`` (the per-leaf chain of blocks; for ``apply_gradients`` followed by
            ``apply_updates``, or, when donating, by an in-place add into the params).
        backend: the kernels that run: a backend's name (``"native"``), ``"torch"`` (the
            declaration's kernel) or None on the reference route.
        reasons: why each faster route was not taken, fastest first; empty when the fastest
            route for this call runs.
    """

    route: str
    backend: str | None
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        head = self.route + (f" ({self.backend} kernels)" if self.backend else "")
        if not self.reasons:
            return head
        return head + "\n" + "\n".join(f"  not faster because: {r}" for r in self.reasons)


def _plan_reason(fp: FastPath, plan: str, grads: PyTree, state: Any, params: PyTree | None, donate: bool) -> str:
    if plan != "columns":
        return plan
    layout = fp.layout()
    g = flatten(grads)[0]
    named = [("grads", g, _tree.paths(grads))]
    if params is not None:
        named.append(("params", flatten(params)[0], _tree.paths(params)))
    for name, (i, k) in layout.buffers.items():
        subtree = state[i][k]
        named.append((f"state[{i}].{name}", flatten(subtree)[0], _tree.paths(subtree)))
    return columns_reason(named, donate)


def _backend_choice(fp: FastPath, plan: Plan, reasons: list[str]) -> str:
    for backend in _BACKENDS:
        if fp.family not in backend.kernels:
            reasons.append(f"the {backend.name} backend has no {fp.family!r} kernel")
            continue
        why = backend.reason(plan)
        if why is None:
            return backend.name
        reasons.append(f"{backend.name} backend: {why}")
    return "torch"


def explain(
    tx: GradientTransformation,
    grads: PyTree,
    state: Any,
    params: PyTree | None = None,
    *,
    step: str = "update",
    donate: bool = False,
) -> Route:
    """Says which route ``tx.update(grads, state, params)`` (or ``apply_gradients``) takes here.

    Like ``torch.backends.*.is_available()`` for one call: nothing runs, nothing is written.
    Read ``route.reasons`` to see why a faster route was not taken (under ``vmap``, a ``mask``
    given, a hyperparameter that requires grad, a DTensor or bfloat16 leaf, the native
    kernels not built here or the step below their size threshold...).

    Args:
        tx: the optimizer.
        grads, state, params: the arguments of the step.
        step: ``"update"`` (``tx.update``) or ``"apply_gradients"``
            (:func:`funcopt.apply_gradients`).
        donate: with ``step="apply_gradients"``, whether the step donates its inputs.

    Example:
        >>> print(funcopt.fast.explain(funcopt.adam(1e-3), grads, state, params))
        fast (native kernels)
    """
    if step not in _STEPS:
        raise ValueError(f"explain: step must be one of {_STEPS}, got {step!r}")
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"explain expects a GradientTransformation as tx, got {type(tx).__name__}")
    in_place = step == "apply_gradients" and donate
    fp = fast_path_of(tx)
    reasons: list[str] = []
    if fp is None:
        reasons.append("this transformation has no declared fast route (a chain of blocks or a wrapper)")
    elif not FAST_SWITCH.enabled:
        reasons.append("the fast routes are switched off in this thread (fast_path_enabled(False))")
    elif traced_reason() is not None:
        reasons.append(traced_reason())
    else:
        if in_place and fp.memo is not None and state is fp.memo.state:
            if fp.memo.replan(grads, state, params) is not None:
                return Route("fast, in place, remembered checks", "torch", ())
            reasons.append("the previous donated step's checks no longer hold (checked again)")
        whole = step == "apply_gradients"
        if not whole and has_dtensor(grads):  # FSDP2: the kernel on each rank's local shards
            return explain_on_shards(explain, tx, fp, grads, state, params)
        plan = fp.plan(grads, state, params, donate=whole)
        if type(plan) is Plan:
            if in_place:
                return Route("fast, in place", "torch", tuple(reasons))
            return Route("fast", _backend_choice(fp, plan, reasons), tuple(reasons))
        reasons.append(_plan_reason(fp, plan, grads, state, params, whole))
    return Route("reference", None, tuple(reasons))


def fast_path_applies(tx: GradientTransformation, updates: PyTree, state: Any, params: PyTree | None = None) -> bool:
    """Whether ``tx.update(updates, state, params)`` would run a fast route here and now
    (:func:`explain` says which, and why not)."""
    fp = fast_path_of(tx)
    if fp is None or not fp.usable():
        return False
    return type(fp.plan(updates, state, params, donate=False)) is Plan
