"""``sam``: sharpness-aware minimization (optax.contrib.sam), two gradient evaluations per step.

SAM takes the gradient at an adversarially perturbed point ``w + rho * g / ||g||`` and applies
it at ``w``. A pure optimizer cannot call the loss itself, so, as in optax, there are two ways
to give it the second gradient:

* **transparent** (default): every call of ``update`` is one gradient evaluation. Calls
  1..k-1 of each group of ``sync_period = k`` return the adversarial move (the params you hold
  become the perturbed point, where you take the next gradient); call k returns the update
  that brings the params back to the cached point and applies the outer optimizer there. The
  training loop is an ordinary loop (compute the gradient at the params you hold, update,
  apply); it just takes k calls per SAM step, on the same batch.
* **opaque** (``opaque_mode=True``): one call is one SAM step; ``update`` takes
  ``grad_fn=`` (``grad_fn(params, i) -> grads``) and calls it k-1 times at the perturbed
  points. The params you hold never leave the real trajectory (what BatchNorm-style side
  effects need).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    FuncoptError,
    GradientTransformation,
    OptState,
    PyTree,
    apply_updates,
    chain,
    stable_name,
)
from funcopt.transforms import init_count, normalize, scale

__all__ = ["SAMState", "sam"]


@stable_name("funcopt.SAMState")
class SAMState(NamedTuple):
    """State of :func:`sam`.

    ``steps_since_sync``: adversarial steps since the last outer update (0-dim int64);
    ``opt_state``, ``adv_state``: the outer and the adversarial optimizer's states; ``cache``:
    the real (unperturbed) params in transparent mode, None in opaque mode.
    """

    steps_since_sync: torch.Tensor
    opt_state: OptState
    adv_state: OptState
    cache: PyTree | None


def _select(cond: torch.Tensor, a: PyTree, b: PyTree) -> PyTree:
    return _tree.map(lambda x, y: torch.where(cond, x, y) if isinstance(x, torch.Tensor) else x, a, b)


def sam(
    optimizer: GradientTransformation,
    adv_optimizer: GradientTransformation | None = None,
    sync_period: int = 2,
    reset_state: bool = True,
    opaque_mode: bool = False,
    *,
    rho: float = 0.05,
) -> GradientTransformation:
    """Sharpness-aware minimization around ``optimizer`` (``optax.contrib.sam``).

    With the defaults (``sync_period=2``, the adversary ``chain(normalize(), sgd(rho))``) this is
    the SAM of the paper: ascend to ``w + rho * g / ||g||``, take the gradient there, and give
    it to ``optimizer`` at ``w``. The adversary's updates are negated (``sgd`` descends, the
    adversary ascends), as in optax. ``adv_optimizer=None`` builds that default adversary from
    ``rho``; pass your own for other perturbations (several adversarial steps with
    ``sync_period > 2``).

    Example (transparent mode: two calls per SAM step, both on the same batch)::

        tx = funcopt.sam(funcopt.sgd(0.1, momentum=0.9), rho=0.05)
        state = tx.init(params)
        for x, y in batches:
            for _ in range(2):  # adversarial step, then the real one
                grads = torch.func.grad(loss)(params, x, y)
                updates, state = tx.update(grads, state, params)
                params = funcopt.apply_updates(params, updates)

    Example (opaque mode: one call per SAM step)::

        tx = funcopt.sam(funcopt.sgd(0.1), opaque_mode=True)
        grad_fn = lambda p, i: torch.func.grad(loss)(p, x, y)
        updates, state = tx.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)

    Args:
        optimizer: the outer optimizer.
        adv_optimizer: the adversarial optimizer (its negated updates perturb the params);
            None for ``chain(normalize(), sgd(rho))``.
        sync_period: calls per SAM step, the last one being the outer step (int >= 1; 2 in
            the paper). With 1 there is no adversarial step: plain ``optimizer``.
        reset_state: re-initialize the adversary's state after every outer step.
        opaque_mode: run the adversarial steps inside ``update`` with its ``grad_fn`` argument.
        rho: the perturbation radius of the default adversary (ignored with ``adv_optimizer``).

    Returns:
        A ``GradientTransformation`` with state :class:`SAMState`.

    References:
        Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently
        Improving Generalization", ICLR 2021 (arXiv 2010.01412).
    """
    for name, tx in (("optimizer", optimizer), ("adv_optimizer", adv_optimizer)):
        if tx is not None and not isinstance(tx, GradientTransformation):
            raise TypeError(f"sam: `{name}` must be a GradientTransformation, got {type(tx).__name__}.")
    if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
        raise FuncoptError(f"sam: sync_period must be an int >= 1, got {sync_period!r}.")
    if adv_optimizer is None:
        if isinstance(rho, (int, float)) and not rho > 0:
            raise FuncoptError(f"sam: rho must be > 0, got {rho!r}.")
        adv_optimizer = chain(normalize(), scale(-rho))

    def init(params):
        count = init_count(params)
        cache = None if opaque_mode else _tree.map(torch.clone, params)
        return SAMState(count, optimizer.init(params), adv_optimizer.init(params), cache)

    def _check(state, params):
        if not isinstance(state, SAMState):
            raise FuncoptError(f"sam expected its state to be a SAMState, got {type(state).__name__}; pass sam's own init.")
        if params is None:
            raise FuncoptError("sam needs the current parameters: call `tx.update(grads, state, params)`.")

    def transparent_update(updates, state, params=None, **extra_args):
        _check(state, params)
        extra_args.pop("grad_fn", None)
        first = state.steps_since_sync == 0
        last = state.steps_since_sync == sync_period - 1
        cache = _select(first, params, state.cache)

        adv_updates, adv_state = adv_optimizer.update(updates, state.adv_state, params, **extra_args)
        adv_updates = _tree.map(torch.neg, adv_updates)
        opt_updates, opt_state = optimizer.update(updates, state.opt_state, cache, **extra_args)
        # from the perturbed params back to the cache, then the outer step
        opt_updates = _tree.map(lambda c, p, u: c - p + u, cache, params, opt_updates)

        out = _select(last, opt_updates, adv_updates)
        if reset_state:
            adv_state = _select(last, adv_optimizer.init(params), adv_state)
        else:
            adv_state = _select(last, state.adv_state, adv_state)
        opt_state = _select(last, opt_state, state.opt_state)
        steps = torch.remainder(state.steps_since_sync + 1, sync_period)
        return out, SAMState(steps, opt_state, adv_state, cache)

    def opaque_update(updates, state, params=None, *, grad_fn: Callable[[PyTree, int], PyTree] | None = None, **extra_args):
        _check(state, params)
        if grad_fn is None:
            raise FuncoptError(
                "sam(opaque_mode=True) needs `grad_fn`: call tx.update(grads, state, params, "
                "grad_fn=lambda p, i: torch.func.grad(loss)(p, batch)); it is called sync_period - 1 "
                "times, at the perturbed params."
            )
        adv_params, adv_grads, adv_state = params, updates, state.adv_state
        for i in range(sync_period - 1):
            adv_updates, adv_state = adv_optimizer.update(adv_grads, adv_state, adv_params, **extra_args)
            adv_params = apply_updates(adv_params, _tree.map(torch.neg, adv_updates))
            adv_grads = grad_fn(adv_params, i)
        if reset_state:
            adv_state = adv_optimizer.init(params)
        out, opt_state = optimizer.update(adv_grads, state.opt_state, params, **extra_args)
        return out, SAMState(torch.zeros_like(state.steps_since_sync), opt_state, adv_state, None)

    return GradientTransformation(init, opaque_update if opaque_mode else transparent_update)
