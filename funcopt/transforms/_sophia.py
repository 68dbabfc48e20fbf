"""Sophia's blocks: ``scale_by_sophia`` and two estimators of the Hessian diagonal.

Part of ``funcopt.transforms``. optax 0.2.8's numerics (``optax.contrib.scale_by_sophia``). The
Hessian-diagonal estimator is itself a ``GradientTransformation`` whose ``update`` returns the
estimate; ``scale_by_sophia`` calls it every ``update_interval`` steps with the extra keyword
arguments given to its own ``update``:

* :func:`hutchinson_estimator_diag_hessian` (Sophia-H) takes ``obj_fn=`` (``params -> loss``)
  and returns ``z * (H z)`` for random signs ``z``, with ``H z`` from
  :func:`funcopt.linalg.hvp` (forward-over-reverse, one extra forward and backward pass);
* :func:`gnb_estimator_diag_hessian` (Sophia-G) takes ``sampled_grads=``, the gradient of the
  mini-batch loss at labels sampled from the model's own predictions, and returns
  ``batch_size * g * g`` (the Gauss-Newton-Bartlett estimator).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt import linalg as _linalg
from funcopt import tree as _tree
from funcopt.base import EmptyState, FuncoptError, GradientTransformation, OptState, check_state, require_params, stable_name
from funcopt.transforms._common import _check_range, _float_step, check_beta, init_count
from funcopt.transforms._random import STREAM_HUTCHINSON, rademacher_like, seed_tensor

__all__ = [
    "HutchinsonState",
    "SophiaState",
    "hutchinson_estimator_diag_hessian",
    "gnb_estimator_diag_hessian",
    "scale_by_sophia",
]


@stable_name("funcopt.HutchinsonState")
class HutchinsonState(NamedTuple):
    """State of :func:`hutchinson_estimator_diag_hessian`: ``key``, the 0-dim int64 seed, and
    ``count``, the estimates drawn so far (0-dim int64; each draw's signs come from both)."""

    key: torch.Tensor
    count: torch.Tensor


def hutchinson_estimator_diag_hessian(random_seed: int | torch.Tensor = 0) -> GradientTransformation:
    """Hutchinson's estimate of the Hessian diagonal, ``z * (H z)`` for Rademacher ``z``
    (``optax.contrib.hutchinson_estimator_diag_hessian``).

    ``update(updates, state, params, obj_fn=...)`` ignores ``updates`` and returns the estimate
    at ``params`` of the Hessian of ``obj_fn(params) -> 0-dim loss``. Its expectation is the
    diagonal; for a diagonal Hessian every draw is exact. The signs are drawn from the seed
    and count in the state (reproducible, ``vmap``-able, bitwise on resume); they differ from
    JAX's draws.
    """
    seed_tensor(random_seed, None, "hutchinson_estimator_diag_hessian")

    def init(params):
        return HutchinsonState(seed_tensor(random_seed, params, "hutchinson_estimator_diag_hessian"), init_count(params))

    def update(updates, state, params=None, *, obj_fn=None, **extra_args):
        check_state(state, HutchinsonState, "hutchinson_estimator_diag_hessian")
        require_params(params, "hutchinson_estimator_diag_hessian")
        if obj_fn is None or not callable(obj_fn):
            raise FuncoptError(
                "hutchinson_estimator_diag_hessian (sophia's default) needs `obj_fn`: call "
                "tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch)), a function of the "
                "params alone returning the 0-dim loss."
            )
        signs = rademacher_like(params, state.key, state.count, STREAM_HUTCHINSON)
        product = _linalg.hvp(obj_fn, params, signs, mode="fwd")
        estimate = _tree.map(lambda h, z: h * z, product, signs)
        return estimate, HutchinsonState(state.key, state.count + 1)

    return GradientTransformation(init, update)


def gnb_estimator_diag_hessian(batch_size: int) -> GradientTransformation:
    """The Gauss-Newton-Bartlett estimate of the Hessian diagonal, ``batch_size * g * g`` (Sophia-G).

    ``update(updates, state, params, sampled_grads=g)``: ``g`` is the gradient of the mean loss
    over the mini-batch at labels *sampled* from the model's predicted distribution (not the
    data's labels), e.g. ``y_hat = torch.distributions.Categorical(logits=logits.detach()).sample()``.
    Its expectation is the Gauss-Newton diagonal of the cross-entropy loss (Liu et al., 2023,
    Algorithm 2).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FuncoptError(f"gnb_estimator_diag_hessian: batch_size must be an int >= 1, got {batch_size!r}.")

    def update(updates, state, params=None, *, sampled_grads=None, **extra_args):
        if sampled_grads is None:
            raise FuncoptError(
                "gnb_estimator_diag_hessian needs `sampled_grads`: the gradient of the batch loss at "
                "labels sampled from the model's predictions, passed as tx.update(..., sampled_grads=g)."
            )
        est = _tree.map(lambda g, u: batch_size * g * g, sampled_grads, updates, names=("sampled_grads", "updates"))
        return est, state

    return GradientTransformation(lambda params: EmptyState(), update)


@stable_name("funcopt.SophiaState")
class SophiaState(NamedTuple):
    """State of :func:`scale_by_sophia`: ``count`` (0-dim int64), ``mu`` (the gradient EMA),
    ``nu`` (the EMA of Hessian-diagonal estimates), both like the params, and
    ``hessian_fn_state``, the estimator's state."""

    count: torch.Tensor
    mu: Any
    nu: Any
    hessian_fn_state: OptState


def scale_by_sophia(
    b1: float | torch.Tensor = 0.965,
    b2: float | torch.Tensor = 0.99,
    eps: float | torch.Tensor = 1e-8,
    gamma: float | torch.Tensor = 0.01,
    clip_threshold: float | torch.Tensor | None = 1.0,
    update_interval: int = 10,
    hessian_diagonal_fn: GradientTransformation | None = None,
) -> GradientTransformation:
    """Sophia's direction: ``clip(m_hat / max(gamma * h, eps), -c, c)`` (``optax.contrib.scale_by_sophia``).

    ``m`` is the EMA of the gradients (rate ``b1``, bias-corrected); ``h`` the EMA (rate ``b2``,
    not bias-corrected) of the Hessian-diagonal estimates, refreshed on steps 0, k, 2k, ...
    (``k = update_interval``) with the estimate at the current params, *after* this step's
    direction is computed (so the first step divides by ``eps`` and is clipped). Extra keyword
    arguments of ``update`` reach the estimator (``obj_fn=`` for the default Hutchinson one).

    On the steps between refreshes the estimator is not called (one 0-dim read of the count
    decides); under ``torch.func`` transforms, where no Python decision on a tensor is
    possible, it is called every step and its result is used on refresh steps only.

    Args:
        b1, b2: EMA rates of the gradient and of the Hessian diagonal.
        eps: floor of the denominator.
        gamma: the scale of the Hessian estimate (rho in the paper).
        clip_threshold: the elementwise clip of the direction, or None for none.
        update_interval: steps between Hessian refreshes (int >= 1).
        hessian_diagonal_fn: the estimator; None for :func:`hutchinson_estimator_diag_hessian`.
    """
    check_beta("b1", b1)
    check_beta("b2", b2)
    _check_range("eps", eps, 0.0)
    _check_range("gamma", gamma, 0.0)
    if clip_threshold is not None:
        _check_range("clip_threshold", clip_threshold, 0.0, low_open=True)
    if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
        raise FuncoptError(f"scale_by_sophia: update_interval must be an int >= 1, got {update_interval!r}.")
    estimator = hutchinson_estimator_diag_hessian() if hessian_diagonal_fn is None else hessian_diagonal_fn
    if not isinstance(estimator, GradientTransformation):
        raise TypeError(f"scale_by_sophia: hessian_diagonal_fn must be a GradientTransformation, got {type(estimator).__name__}.")

    def init(params):
        return SophiaState(init_count(params), _tree.zeros_like(params), _tree.zeros_like(params), estimator.init(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, SophiaState, "scale_by_sophia")
        require_params(params, "scale_by_sophia")
        step = _float_step(state.count)
        mu = _tree.map(lambda m, g: (1 - b1) * g + b1 * m, state.mu, updates, names=("mu", "updates"))
        correction = 1 - b1**step

        def direction(m, h):
            d = (m / correction.to(m.dtype)) / torch.clamp(gamma * h, min=eps)
            return d if clip_threshold is None else torch.clamp(d, -clip_threshold, clip_threshold)

        out = _tree.map(direction, mu, state.nu)
        refresh = state.count % update_interval == 0
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            estimate, est_state = estimator.update(updates, state.hessian_fn_state, params, **extra_args)
            nu = _tree.map(lambda n, e: torch.where(refresh, (1 - b2) * e + b2 * n, n), state.nu, estimate)
            est_state = _tree.map(lambda new, old: torch.where(refresh, new, old), est_state, state.hessian_fn_state)
        elif bool(refresh):
            estimate, est_state = estimator.update(updates, state.hessian_fn_state, params, **extra_args)
            nu = _tree.map(lambda n, e: (1 - b2) * e + b2 * n, state.nu, estimate)
        else:
            nu, est_state = state.nu, state.hessian_fn_state
        return out, SophiaState(state.count + 1, mu, nu, est_state)

    return GradientTransformation(init, update)
