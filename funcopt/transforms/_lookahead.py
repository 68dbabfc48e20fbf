"""``lookahead``: k fast steps forward, one step back towards the slow weights.

Part of ``funcopt.transforms``. optax 0.2.8's numerics (``optax.lookahead``), with two ways to
hold the slow weights:

* **in the state** (funcopt's default): the params you hold, differentiate and pass to
  ``apply_updates`` are the fast weights, a plain pytree as for any optimizer; the slow weights
  live in :class:`LookaheadState` and :func:`lookahead_slow_params` reads them for evaluation.
  Everything that takes a ``GradientTransformation`` (``make_step``, checkpoints, the
  ``torch.optim`` adapter, ``vmap`` sweeps) works unchanged.
* **in the params** (optax's layout): ``params = LookaheadParams.init_synced(p)`` holds both;
  gradients are taken at ``params.fast`` and the updates are a ``LookaheadParams`` that
  ``apply_updates`` adds to both halves.

The layout is chosen by what ``init`` receives.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, OptState, PyTree, check_state, require_params, stable_name
from funcopt.transforms._common import _check_range, _find_states, init_count

__all__ = ["LookaheadParams", "LookaheadState", "lookahead", "lookahead_slow_params"]


@stable_name("funcopt.LookaheadParams")
class LookaheadParams(NamedTuple):
    """Fast and slow weights in one pytree (``optax.LookaheadParams``).

    Compute gradients at ``fast``; evaluate with ``slow``. ``apply_updates(params, updates)``
    moves both.
    """

    fast: PyTree
    slow: PyTree

    @classmethod
    def init_synced(cls, params: PyTree) -> LookaheadParams:
        """Both halves equal to ``params`` (copies, so the two never share a tensor)."""
        return cls(fast=params, slow=_tree.map(torch.clone, params))


@stable_name("funcopt.LookaheadState")
class LookaheadState(NamedTuple):
    """State of :func:`lookahead`.

    ``fast_state``: the fast optimizer's state; ``steps_since_sync``: fast steps since the last
    synchronization (0-dim int64); ``slow``: the slow weights when they live in the state (a
    pytree like the params), None when the params are :class:`LookaheadParams`.
    """

    fast_state: OptState
    steps_since_sync: torch.Tensor
    slow: PyTree | None


def lookahead(
    fast_optimizer: GradientTransformation,
    sync_period: int,
    slow_step_size: float | torch.Tensor,
    reset_state: bool = False,
) -> GradientTransformation:
    """Lookahead around ``fast_optimizer`` (``optax.lookahead``).

    Every step is a fast step ``fast += u``. Every ``sync_period``-th step then moves the slow
    weights a fraction ``slow_step_size`` of the way to the fast ones,
    ``slow += slow_step_size * (fast - slow)``, and restarts the fast weights from the new slow
    ones; with ``reset_state=True`` the fast optimizer's state is re-initialized there too. The
    returned updates must reach the params unchanged (put nothing after ``lookahead`` that
    rescales them).

    Example (slow weights in the state)::

        tx = funcopt.lookahead(funcopt.adam(1e-3), sync_period=5, slow_step_size=0.5)
        state = tx.init(params)
        updates, state = tx.update(torch.func.grad(loss)(params), state, params)
        params = funcopt.apply_updates(params, updates)
        eval_params = funcopt.lookahead_slow_params(state)

    Args:
        fast_optimizer: the inner optimizer.
        sync_period: fast steps between synchronizations (int >= 1).
        slow_step_size: the slow weights' step, alpha in the paper (in [0, 1]).
        reset_state: re-initialize the fast optimizer's state at each synchronization.

    Returns:
        A ``GradientTransformation`` with state :class:`LookaheadState`.

    References:
        Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back", 2019
        (arXiv 1907.08610).
    """
    if not isinstance(fast_optimizer, GradientTransformation):
        raise TypeError(f"lookahead expects a GradientTransformation, got {type(fast_optimizer).__name__}.")
    if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
        raise FuncoptError(f"lookahead: sync_period must be an int >= 1, got {sync_period!r}.")
    _check_range("slow_step_size", slow_step_size, 0.0, 1.0)

    def init(params):
        if isinstance(params, LookaheadParams):
            return LookaheadState(fast_optimizer.init(params.fast), init_count(params.fast), None)
        return LookaheadState(fast_optimizer.init(params), init_count(params), _tree.map(torch.clone, params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, LookaheadState, "lookahead")
        require_params(params, "lookahead")
        in_params = isinstance(params, LookaheadParams)
        if in_params != (state.slow is None):
            raise FuncoptError(
                "lookahead: the state was built for "
                + ("plain params (slow weights in the state)" if state.slow is not None else "LookaheadParams")
                + " but update got "
                + ("LookaheadParams" if in_params else "plain params")
                + ". Pass the same kind of params to init and update."
            )
        fast, slow = (params.fast, params.slow) if in_params else (params, state.slow)
        inner, fast_state = fast_optimizer.update(updates, state.fast_state, fast, **extra_args)
        sync = state.steps_since_sync == sync_period - 1
        # diff = fast + u - slow; slow += alpha * sync * diff; fast += u - (1 - alpha) * sync * diff
        diff = _tree.map(lambda f, u, s: f + u - s, fast, inner, slow, names=("fast params", "updates", "slow params"))
        slow_updates = _tree.map(lambda d: slow_step_size * sync.to(d.dtype) * d, diff)
        fast_updates = _tree.map(lambda u, d: u - sync.to(d.dtype) * (1 - slow_step_size) * d, inner, diff)
        if reset_state:
            fresh = fast_optimizer.init(fast)
            fast_state = _tree.map(lambda cur, new: torch.where(sync, new, cur), fast_state, fresh)
        steps = torch.remainder(state.steps_since_sync + 1, sync_period)
        if in_params:
            return LookaheadParams(fast=fast_updates, slow=slow_updates), LookaheadState(fast_state, steps, None)
        new_slow = _tree.map(lambda s, d: s + d, slow, slow_updates)
        return fast_updates, LookaheadState(fast_state, steps, new_slow)

    return GradientTransformation(init, update)


def lookahead_slow_params(state: Any) -> PyTree:
    """The slow weights of the (first) :func:`lookahead` state found in ``state``, the weights to
    evaluate with. Only where they live in the state (plain params); with
    :class:`LookaheadParams` read ``params.slow``."""
    found = [s for s in _find_states(state, LookaheadState) if s.slow is not None]
    if not found:
        raise FuncoptError(
            "lookahead_slow_params: no lookahead state with slow weights found. Pass the state of a "
            "funcopt.lookahead(...) optimizer initialized with plain params (with LookaheadParams, "
            "read params.slow)."
        )
    return found[0].slow

