"""The recommended training step: gradient, update and apply in one call, with donation.

``step = funcopt.make_step(loss_fn, tx)`` returns ``step(params, opt_state, *batch) ->
(params, opt_state, loss)``, the functional version of ``loss.backward(); optimizer.step()``.
With ``donate=True`` (the default) the caller *gives up* the ``params`` and ``opt_state`` it
passes in, as with ``jax.jit(..., donate_argnums=...)``: the step may reuse their memory for
the results, which lets it update everything in place with torch's fused multi-tensor kernels
instead of allocating fresh tensors (on CPU, fresh large tensors cost page faults; see
the README section "Performance: the fast path and donation").

Donation rules:

- The step writes the new values into the params tensors you passed and returns them: the
  returned ``params`` hold the *same tensor objects* (as ``optimizer.step()`` updates a
  model's parameters in place), so any reference you kept to the old params now shows the
  new values. To keep a copy (e.g. the best params so far), clone it before the call:
  ``best = funcopt.tree.map(torch.clone, params)``.
- The state's buffers (Adam's moments, momentum) are updated in place and handed on the same
  way. The state tensors the new state does not hold (its step counts) are emptied
  (``tensor.set_()``, shape ``(0,)``) and marked, so an old ``opt_state`` is *invalid*:
  passing it to a donating step again raises :class:`DonatedValueError` naming its path
  (a cheap check: one tensor per state, not one per leaf). Always rebind:
  ``params, opt_state, loss = step(params, opt_state, x, y)``.
- Memory shared with the params you donate is updated in place too: with
  ``funcopt.nn.extract(model, copy=False)`` the module's own parameters follow training.
- Donation happens only where it is valid: plain tensors not requiring grad, outside
  ``torch.func`` transforms and ``torch.compile``. Elsewhere the step is pure and the inputs
  stay untouched (``donate=False`` asks for that always).

Plain ``tx.update`` never donates and never writes into its arguments.

The optimizer object keeps a reference to the state its last donated step returned, so that
the next step, given that state, can skip re-checking the same buffers (only the gradients,
the params' memory and the state's containers are checked again); that state's memory lives
until the next donated step or until the optimizer is dropped.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

from funcopt.fast._route import fast_path_of
from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, OptState, PyTree, apply_updates

__all__ = ["DonatedValueError", "apply_gradients", "make_step", "is_donated", "grad_and_value"]

_MARK = "_funcopt_donated"


class DonatedValueError(FuncoptError):
    """A tensor given up to an earlier donating step was used again."""


def is_donated(tensor: Any) -> bool:
    """Whether ``tensor`` was given up to a donating step (and is now an empty placeholder)."""
    return isinstance(tensor, torch.Tensor) and getattr(tensor, _MARK, False)


def _raise_donated(tree: PyTree, leaf: torch.Tensor, name: str) -> None:
    bad = next(path for path, x in zip(_tree.paths(tree), _tree.leaves(tree)) if x is leaf)
    raise DonatedValueError(
        f"{name}{'' if bad == '<root>' else bad} was donated to an earlier training step "
        "and is no longer valid. Use the params and opt_state returned by the step "
        "(`params, opt_state, loss = step(params, opt_state, ...)`), clone what you want "
        "to keep before the call, or build the step with donate=False."
    )


def _check_not_donated(tree: PyTree, name: str) -> None:
    for leaf in _tree.leaves(tree):
        if isinstance(leaf, torch.Tensor) and getattr(leaf, _MARK, False):
            _raise_donated(tree, leaf, name)


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _scan(params: PyTree, opt_state: PyTree, leaves: list[Any], n_params: int) -> bool:
    """Raises for a donated leaf; returns whether the params may be updated in place.

    State buffers are checked where they are written in place (``funcopt.fast`` checks its
    buffers; the generic path writes only into the params).
    """
    types = set(map(type, leaves))
    if not types <= _PLAIN:  # numbers or tensor subclasses among the leaves
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        plain = all(type(x) in _PLAIN for x in tensors)
        param_tensors = [x for x in leaves[:n_params] if isinstance(x, torch.Tensor)]
    else:
        tensors, plain, param_tensors = leaves, True, leaves[:n_params]
    marked = [_MARK in x.__dict__ for x in tensors]
    if True in marked:
        leaf = tensors[marked.index(True)]
        i = next(j for j, x in enumerate(leaves) if x is leaf)
        _raise_donated(*((params, leaf, "params") if i < n_params else (opt_state, leaf, "opt_state")))
    if not plain or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return not (True in [x.requires_grad for x in param_tensors] or True in [x.is_inference() for x in tensors])


def _add_in_place(params: PyTree, updates: PyTree, new_state: OptState) -> PyTree | None:
    """``params += updates`` with one multi-tensor op, or None where that is not valid."""
    if _tree.structure(params) != _tree.structure(updates):
        return None
    p, u = _tree.leaves(params), _tree.leaves(updates)
    held = set(map(id, optree.tree_leaves(new_state, none_is_leaf=False)))
    seen: set[int] = set()
    for a, b in zip(p, u):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return None
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device or a.layout is not torch.strided:
            return None
        if not a.is_contiguous() or a.numel() == 0:
            return None
        if a.data_ptr() in seen:  # tied or aliased params would be updated twice
            return None
        if id(a) in held:  # the new state holds this params tensor: writing it would change the state
            return None
        seen.add(a.data_ptr())
    if p:
        torch._foreach_add_(p, u)
    return params


def _mark_donated(tensors: list[Any]) -> None:
    """Empties and marks donated tensors that no result holds, so that a later use is caught."""
    for t in tensors:
        if type(t) in _PLAIN:
            t.set_()
            t.__dict__[_MARK] = True


def apply_gradients(
    tx: GradientTransformation,
    grads: PyTree,
    opt_state: OptState,
    params: PyTree,
    *,
    donate: bool = False,
    **extra_args: Any,
) -> tuple[PyTree, OptState]:
    """One optimizer step from gradients: returns ``(new_params, new_opt_state)``.

    Like flax's ``TrainState.apply_gradients``: ``tx.update`` followed by
    :func:`funcopt.apply_updates`. With ``donate=True`` the caller gives up ``params`` and
    ``opt_state`` (see the module docstring): optimizers with a declared fast route (``sgd``,
    ``adam``, ``adamw``, ``adagrad``, ``rmsprop``, ``lion``) then update their buffers in place
    with their multi-tensor kernels, any other transformation adds its updates into the params in place, the
    returned params are the tensors passed in (updated), and the old state is invalidated.
    ``grads`` are only read.

    Args:
        tx: the optimizer.
        grads: gradients shaped like ``params``.
        opt_state: the state from ``tx.init`` or the previous step.
        params: the current parameters.
        donate: whether the caller gives up ``params`` and ``opt_state``.
        **extra_args: passed to ``tx.update`` (e.g. ``value=loss`` for line searches).

    Raises:
        DonatedValueError: if a tensor in ``params`` or ``opt_state`` was donated before.
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(
            f"apply_gradients expects a GradientTransformation as tx, got {type(tx).__name__}. "
            "Pass an optimizer such as funcopt.adam(1e-3)."
        )
    fast = fast_path_of(tx)
    if donate and fast is not None:
        # The hot path: the state the previous donated step returned, whose checks still hold.
        repeated = fast.repeat_step(grads, opt_state, params)
        if repeated is not None:
            new_state, replaced = repeated
            _mark_donated(replaced)
            return params, new_state
    param_leaves = _tree.leaves(params)
    state_leaves = _tree.leaves(opt_state)
    donatable = _scan(params, opt_state, param_leaves + state_leaves, len(param_leaves))  # raises if donated
    if not donate or not donatable:
        # The pure step: with a fast path, the kernels write fresh copies of the params and
        # state (no update buffer, no separate addition); otherwise update + apply_updates.
        stepped = fast.pure_step(grads, opt_state, params) if fast is not None else None
        if stepped is not None:
            return stepped
        updates, new_state = tx.update(grads, opt_state, params, **extra_args)
        return apply_updates(params, updates), new_state
    result = fast.donated_run(grads, opt_state, params) if fast is not None else None
    if result is not None:
        _, new_state, replaced, _ = result
        _mark_donated(replaced)
        return params, new_state
    updates, new_state = tx.update(grads, opt_state, params, **extra_args)
    if any(isinstance(x, torch.Tensor) and x.requires_grad for x in state_leaves):
        return apply_updates(params, updates), new_state  # nothing donated
    new_params = _add_in_place(params, updates, new_state)
    if new_params is None:
        new_params = apply_updates(params, updates)
    kept = set(map(id, optree.tree_leaves(new_state, none_is_leaf=False))) | set(map(id, param_leaves))
    _mark_donated([x for x in state_leaves if id(x) not in kept])
    return new_params, new_state


def _autograd_grad_and_value(
    loss_fn: Callable[..., Any], has_aux: bool, params: PyTree, args: tuple, kwargs: dict
) -> tuple[PyTree, Any] | None:
    """``torch.func.grad_and_value(loss_fn)(params, ...)`` computed with ``torch.autograd``.

    Same results, less per-call overhead than functorch's wrapping (about 0.25 ms less per step
    on a small MLP). Used only outside ``torch.func`` transforms and ``torch.compile``, for
    floating-point params that do not require grad; returns None elsewhere.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    leaves, spec = optree.tree_flatten(params, none_is_leaf=False)
    if not leaves or not all(
        [type(t) in _PLAIN and t.is_floating_point() and not t.requires_grad for t in leaves]
    ):
        return None
    inputs = [t.detach().requires_grad_() for t in leaves]
    with torch.enable_grad():
        out = loss_fn(optree.tree_unflatten(spec, inputs), *args, **kwargs)
        loss, aux = out if has_aux else (out, None)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            return None  # let torch.func raise its usual error
        grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else [None] * len(inputs)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    if has_aux:
        aux = optree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, aux)
        return optree.tree_unflatten(spec, grads), (loss.detach(), aux)
    return optree.tree_unflatten(spec, grads), loss.detach()


def grad_and_value(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., tuple[PyTree, Any]]:
    """``torch.func.grad_and_value(fn, has_aux=has_aux)`` with less per-call overhead.

    Returns ``g(params, *args, **kwargs) -> (grads, value)`` (``(grads, (value, aux))`` with
    ``has_aux``), the gradient taken with respect to ``params``, the first argument. Outside
    ``torch.func`` transforms and ``torch.compile``, for params that are floating-point
    tensors not requiring grad, it runs ``fn`` under ``torch.autograd`` (one backward, no
    functorch wrapping of every op: about 0.25-0.3 ms less per call on the digits MLP
    64-256-256-10, a third of its forward + backward); elsewhere it calls
    ``torch.func.grad_and_value`` itself, so it composes with ``vmap`` and nested ``grad``.
    The same numbers either way; the value is detached.

    Example:
        >>> grad_and_loss = funcopt.grad_and_value(loss_fn)
        >>> grads, loss = grad_and_loss(params, x, y)
    """
    if not callable(fn):
        raise TypeError(f"grad_and_value expects a callable, got {type(fn).__name__}.")
    functorch = torch.func.grad_and_value(fn, has_aux=has_aux)

    def grad_and_value_fn(params: PyTree, *args: Any, **kwargs: Any) -> tuple[PyTree, Any]:
        result = _autograd_grad_and_value(fn, has_aux, params, args, kwargs)
        return result if result is not None else functorch(params, *args, **kwargs)

    return grad_and_value_fn


def make_step(
    loss_fn: Callable[..., Any],
    tx: GradientTransformation,
    *,
    donate: bool = True,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """Builds ``step(params, opt_state, *args, **kwargs) -> (params, opt_state, loss)``.

    The step computes ``grads, loss`` with :func:`grad_and_value` (``torch.func.grad_and_value``'s
    numbers with less per-call overhead), then calls :func:`apply_gradients` (passing
    ``value=loss`` to ``tx.update``).
    It is the functional ``optimizer.zero_grad(); loss.backward(); optimizer.step()``.

    Args:
        loss_fn: ``loss_fn(params, *args, **kwargs)`` returning a 0-dim loss, or
            ``(loss, aux)`` with ``has_aux=True``.
        tx: the optimizer, e.g. ``funcopt.adam(1e-3)``.
        donate: give up the ``params`` and ``opt_state`` passed to each call so that their
            buffers are reused (default; see the module docstring for the rules). With
            ``donate=False`` the step is pure.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the step then returns
            ``(params, opt_state, loss, aux)``.

    Returns:
        The step function.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> params, _ = funcopt.nn.extract(model)
        >>> def loss_fn(p, x, y):
        ...     return torch.nn.functional.cross_entropy(funcopt.nn.apply(model, p, None, x), y)
        >>> tx = funcopt.adam(1e-2)
        >>> step = funcopt.make_step(loss_fn, tx)
        >>> opt_state = tx.init(params)
        >>> params, opt_state, loss = step(params, opt_state, x, y)
    """
    if not callable(loss_fn):
        raise TypeError(f"make_step expects a callable loss_fn, got {type(loss_fn).__name__}.")
    if not isinstance(tx, GradientTransformation):
        raise TypeError(
            f"make_step expects a GradientTransformation as tx, got {type(tx).__name__}. "
            "Pass an optimizer such as funcopt.adam(1e-3) (note the call)."
        )
    grad_fn = grad_and_value(loss_fn, has_aux=has_aux)
    fast = fast_path_of(tx)

    def step(params: PyTree, opt_state: OptState, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        if donate and (fast is None or not fast.returned(opt_state)):
            _check_not_donated(opt_state, "opt_state")  # fail before computing the loss
        grads, value = grad_fn(params, *args, **kwargs)
        loss, aux = value if has_aux else (value, None)
        new_params, new_state = apply_gradients(tx, grads, opt_state, params, donate=donate, value=loss)
        if has_aux:
            return new_params, new_state, loss, aux
        return new_params, new_state, loss

    step.__doc__ = (
        "One training step: returns (params, opt_state, loss"
        + (", aux)" if has_aux else ")")
        + (". Donates the params and opt_state passed in." if donate else ".")
    )
    return step
