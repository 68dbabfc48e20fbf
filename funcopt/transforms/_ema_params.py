"""``ema_params``: an exponential moving average of the parameters, kept in the state.

Part of ``funcopt.transforms``. ``optax.ema`` averages the *updates* (``funcopt.ema``); what one
usually evaluates with is an average of the *parameters* (Polyak averaging, the "EMA model" of
``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``). This wrapper keeps that
average in the optimizer state, so it is checkpointed, resumed and ``vmap``-ed with the rest.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, OptState, PyTree, check_state, stable_name
from funcopt.transforms._common import _check_range, _find_states, _lerp, init_count

__all__ = ["EmaParamsState", "ema_params", "ema_params_of"]


@stable_name("funcopt.EmaParamsState")
class EmaParamsState(NamedTuple):
    """State of :func:`ema_params`: ``count``, the steps averaged so far (0-dim int64);
    ``ema``, the average (a pytree like the params, each leaf in its param's dtype);
    ``inner_state``, the wrapped optimizer's state."""

    count: torch.Tensor
    ema: PyTree
    inner_state: OptState


def ema_params(inner: GradientTransformation, decay: float | torch.Tensor = 0.999) -> GradientTransformation:
    """Runs ``inner`` and keeps an exponential moving average of the parameters it produces.

    After each step, with ``p`` the new params (``apply_updates(params, updates)``): the first
    step sets ``ema = p``; later steps ``ema = decay * ema + (1 - decay) * p`` (``torch.lerp``).
    That is ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``
    with ``update_parameters`` called after every ``optimizer.step()``. The updates pass through
    unchanged; read the average with :func:`ema_params_of`. Wrap the whole optimizer (the
    average must see the final updates).

    Example::

        tx = funcopt.ema_params(funcopt.adamw(1e-3), decay=0.999)
        ...
        eval_params = funcopt.ema_params_of(state)

    Args:
        inner: the optimizer whose parameters are averaged.
        decay: the weight of the old average, in [0, 1] (default 0.999).

    Returns:
        A ``GradientTransformation`` with state :class:`EmaParamsState`.

    References:
        Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", 1992;
        Tarvainen & Valpola, "Mean teachers are better role models", 2017 (arXiv 1703.01780).
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"ema_params expects a GradientTransformation, got {type(inner).__name__}.")
    _check_range("decay", decay, 0.0, 1.0)

    def init(params):
        return EmaParamsState(init_count(params), _tree.map(torch.clone, params), inner.init(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, EmaParamsState, "ema_params")
        if params is None:
            raise FuncoptError(
                "ema_params needs the current parameters: call `tx.update(grads, state, params)`."
            )
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        first = state.count == 0

        def average(e, p, u):
            new = (p + u).to(p.dtype)
            return torch.where(first, new, _lerp(e, new, 1 - decay))

        ema = _tree.map(average, state.ema, params, updates, names=("ema", "params", "updates"))
        return updates, EmaParamsState(state.count + 1, ema, inner_state)

    return GradientTransformation(init, update)


def ema_params_of(state: Any) -> PyTree:
    """The parameter average of the (first) :func:`ema_params` state found in ``state``: the
    params to evaluate with (equal to the initial params before the first step)."""
    found = _find_states(state, EmaParamsState)
    if not found:
        raise FuncoptError(
            "ema_params_of: no ema_params state found. Wrap the optimizer: "
            "tx = funcopt.ema_params(funcopt.adam(1e-3), decay=0.999)."
        )
    return found[0].ema
