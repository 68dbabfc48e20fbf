"""The LR range test :func:`lr_find` (see :mod:`funcopt.lr_finder`)."""

from __future__ import annotations

import math
from typing import Any, Callable
from collections.abc import Iterable

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, apply_updates
from funcopt.lr_finder._common import _accumulated, _bar, _check_params, _cycle, _prepare, _scalar_loss
from funcopt.lr_finder._ladder import _check_int, _is_real, lr_ladder
from funcopt.lr_finder._result import LRFinderResult

__all__ = ["lr_find"]


# ---------------------------------------------------------------------------------------------
# lr_find


def lr_find(
    loss_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    optimizer: Callable[..., GradientTransformation] | GradientTransformation,
    data: Iterable[Any],
    *,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    num_steps: int = 100,
    mode: str = "exponential",
    smoothing: float = 0.98,
    diverge_threshold: float | None = 4.0,
    accumulate: int = 1,
    progress: bool = True,
    opt_state: Any = None,
) -> LRFinderResult:
    """Runs the learning-rate range test on a copy of ``params``, like Lightning's ``lr_find``.

    Step ``i`` sets the learning rate to rung ``i`` of :func:`lr_ladder`, computes the loss
    and gradient at the current params (the mean over ``accumulate`` batches), records the
    loss, and takes one optimizer step. The recorded curve is smoothed by an exponential
    moving average with bias correction, ``s_i = ema_i / (1 - smoothing ** (i + 1))``, so the
    first smoothed value equals the first loss. The test stops early when a loss is NaN/Inf
    or the smoothed loss exceeds ``diverge_threshold`` times the best so far (for a best loss
    ``b <= 0``: exceeds ``b + (diverge_threshold - 1) * |b|``); that point is still recorded.

    Nothing outside the call changes: ``params`` and ``opt_state`` are only read, no file is
    written, so there is nothing to restore.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a 0-dim loss, or ``(loss, aux)``.
        params: the pytree of floating-point tensors to train (a copy is trained).
        optimizer: a factory taking ``learning_rate`` (``funcopt.adam``,
            ``lambda learning_rate: funcopt.sgd(learning_rate, momentum=0.9)``, or one building a
            ``multi_transform`` of param groups from one ``learning_rate``), or an
            ``inject_hyperparams`` transformation. With several injected learning rates (one per
            param group) the first gets the ladder value and the others keep their ratio to it.
        data: an iterable of batches, cycled if it has fewer than ``num_steps * accumulate``.
            A one-shot iterator's batches are kept to be replayed.
        min_lr: the first learning rate (default 1e-8).
        max_lr: the last learning rate (default 1.0).
        num_steps: the number of rungs and steps (default 100).
        mode: ``'exponential'`` (default) or ``'linear'`` spacing of the ladder.
        smoothing: the EMA factor in [0, 1) (default 0.98; 0 turns smoothing off).
        diverge_threshold: the early-stop factor (> 1, default 4.0); ``None`` never stops on
            divergence (NaN/Inf still stop).
        accumulate: batches per step; gradients and the recorded loss are their means.
        progress: show a tqdm bar (ignored when tqdm is not installed).
        opt_state: the state of an ``inject_hyperparams`` transformation to start from (e.g.
            mid-training); by default ``optimizer.init(params)``. It is not modified.

    Returns:
        An :class:`LRFinderResult` with ``kind='lr_find'``; ``result.suggestion()`` gives the
        ``steepest`` rule's learning rate.

    Example:
        >>> result = funcopt.lr_find(loss_fn, params, funcopt.adam, batches, progress=False)
        >>> lr = result.suggestion()            # or result.suggestion("valley")
        >>> result.plot("lr_find.png")

    References: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", 2017,
    arXiv 1506.01186.
    """
    lrs = lr_ladder(min_lr, max_lr, num_steps, mode)
    if not _is_real(smoothing) or not 0 <= smoothing < 1:
        raise FuncoptError(f"smoothing must be a number in [0, 1), got {smoothing!r}.")
    if diverge_threshold is not None and (not _is_real(diverge_threshold) or not diverge_threshold > 1):
        raise FuncoptError(f"diverge_threshold must be a number > 1 or None, got {diverge_threshold!r}.")
    _check_int("accumulate", accumulate, 1)
    _check_params(params, "lr_find")
    params = _tree.map(lambda p: p.detach(), params)
    tx, state, set_lr = _prepare(optimizer, params, opt_state, lrs[0])
    grad_fn = torch.func.grad_and_value(_scalar_loss(loss_fn))
    batches = _cycle(data)
    raw: list[float] = []
    smooth: list[float] = []
    s, best, stopped = 0.0, math.inf, False
    bar = _bar(progress, num_steps, "lr_find")
    try:
        for i, lr in enumerate(lrs):
            state = set_lr(state, lr)
            grads, loss = _accumulated(grad_fn, params, batches, accumulate)
            value = float(loss)
            raw.append(value)
            if math.isfinite(value):
                s = s + (1.0 - smoothing) / (1.0 - smoothing ** (i + 1)) * (value - s)
                best = min(best, s)
            else:
                s = value
            smooth.append(s)
            bar.update()
            bar.set_postfix_str(f"lr={lr:.2e} loss={s:.4g}")
            diverged = not math.isfinite(s) or (
                diverge_threshold is not None and s - best > (diverge_threshold - 1.0) * abs(best)
            )
            if diverged and i < num_steps - 1:
                stopped = True
                break
            if i == num_steps - 1:
                break
            with torch.no_grad():
                updates, new_state = tx.update(grads, state, params)
                params = apply_updates(params, updates)
            if i == 0:
                set_lr.check(new_state, lr)
            state = new_state
    finally:
        bar.close()
    n = len(raw)
    return LRFinderResult(lrs=lrs[:n], losses=smooth, raw_losses=raw, stopped_early=stopped, kind="lr_find")
