"""The vmapped sweep of the LR finder: :func:`lr_sweep` trains K copies of the params at the
K learning rates of a ladder in parallel under ``torch.func.vmap``."""

from __future__ import annotations

from typing import Any, Callable
from collections.abc import Iterable, Iterator

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, apply_updates
from funcopt.lr_finder._common import _accumulated, _bar, _check_params, _cycle, _prepare, _scalar_loss
from funcopt.lr_finder._ladder import _check_int, lr_ladder
from funcopt.lr_finder._result import LRFinderResult

__all__ = ["lr_sweep"]


# ---------------------------------------------------------------------------------------------
# lr_sweep


def lr_sweep(
    loss_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    optimizer: Callable[..., GradientTransformation] | GradientTransformation,
    data: Iterable[Any],
    *,
    min_lr: float = 1e-5,
    max_lr: float = 1.0,
    num_lrs: int = 16,
    steps: int = 100,
    mode: str = "exponential",
    eval_batch: Any = None,
    accumulate: int = 1,
    progress: bool = True,
    opt_state: Any = None,
) -> LRFinderResult:
    """Trains ``num_lrs`` copies of ``params`` at the lrs of a ladder in parallel under ``vmap``.

    The vmapped counterpart of :func:`lr_find`: copy ``k`` is trained for ``steps`` steps at
    the fixed learning rate ``lr_ladder(min_lr, max_lr, num_lrs, mode)[k]`` on the same
    batches as every other copy. Params and optimizer states are stacked along a new leading
    axis (``funcopt.tree.stack``) with the learning rate batched in the ``inject_hyperparams``
    state, and every step runs the gradient and the optimizer update under
    ``torch.func.vmap``, so the result equals ``num_lrs`` separate runs (to rounding) at
    about the cost of one run on a ``num_lrs``-times larger batch. The curve is each copy's
    loss on ``eval_batch`` after training; a copy that diverges gives NaN/Inf, which the rules
    ignore. Memory grows ``num_lrs``-fold (params, gradients and optimizer state).

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning a 0-dim loss, or ``(loss, aux)``; it must
            work under ``torch.func.vmap`` (``funcopt.nn.apply`` does).
        params: the pytree of floating-point tensors; only read.
        optimizer: as for :func:`lr_find`.
        data: an iterable of batches, cycled as needed.
        min_lr: the smallest learning rate (default 1e-5).
        max_lr: the largest learning rate (default 1.0).
        num_lrs: K, the number of learning rates (default 16).
        steps: training steps per copy (default 100).
        mode: ``'exponential'`` (default) or ``'linear'`` spacing.
        eval_batch: the batch the final loss is measured on (default: the first batch of data).
        accumulate: batches per step, gradients averaged.
        progress: show a tqdm bar (ignored when tqdm is not installed).
        opt_state: as for :func:`lr_find`; not modified.

    Returns:
        An :class:`LRFinderResult` with ``kind='lr_sweep'``, ``losses == raw_losses`` the final
        losses, ``train_losses`` the per-step training losses, no skips, and ``'best'`` (the lr
        of the lowest final loss) as the default suggestion.

    Example:
        >>> sweep = funcopt.lr_sweep(loss_fn, params, funcopt.adam, batches, num_lrs=16, steps=50)
        >>> lr = sweep.suggestion()  # the lr with the lowest loss after 50 steps
    """
    lrs = lr_ladder(min_lr, max_lr, num_lrs, mode)
    _check_int("steps", steps, 1)
    _check_int("accumulate", accumulate, 1)
    _check_params(params, "lr_sweep")
    params = _tree.map(lambda p: p.detach(), params)
    tx, state0, set_lr = _prepare(optimizer, params, opt_state, lrs[0])
    k = len(lrs)

    # Stack K copies; keep only tensor leaves of the state batched (Python values stay static).
    p_spec = _tree.structure(params)
    p_leaves = _tree.leaves(_tree.stack([params] * k))
    states = [set_lr(state0, lr) for lr in lrs]
    s_flat, s_spec = optree.tree_flatten(states[0], none_is_leaf=False)
    is_tensor = [isinstance(x, torch.Tensor) for x in s_flat]
    static = [None if t else x for x, t in zip(s_flat, is_tensor)]
    flats = [optree.tree_leaves(st, none_is_leaf=False) for st in states]
    s_leaves = [torch.stack([f[j] for f in flats]) for j, t in enumerate(is_tensor) if t]

    def unflatten_state(tensors: list[torch.Tensor]) -> Any:
        it = iter(tensors)
        return optree.tree_unflatten(s_spec, [next(it) if t else v for t, v in zip(is_tensor, static)])

    value_fn = _scalar_loss(loss_fn)
    lane_grad = torch.func.grad_and_value(value_fn)

    def grad_lane(leaves: list[torch.Tensor], batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        grads, loss = lane_grad(optree.tree_unflatten(p_spec, leaves), batch)
        return _tree.leaves(grads), loss

    def update_lane(grads: list[torch.Tensor], s_tensors: list[torch.Tensor], leaves: list[torch.Tensor]):
        p = optree.tree_unflatten(p_spec, leaves)
        updates, new_state = tx.update(optree.tree_unflatten(p_spec, grads), unflatten_state(s_tensors), p)
        new_flat, new_spec = optree.tree_flatten(new_state, none_is_leaf=False)
        if new_spec != s_spec or any(not t and v != x for t, v, x in zip(is_tensor, static, new_flat)):
            raise FuncoptError(
                "lr_sweep: the optimizer's update changed the structure or a Python (non-tensor) value of "
                "its state; only tensor state can be batched under vmap."
            )
        return _tree.leaves(apply_updates(p, updates)), [x for x, t in zip(new_flat, is_tensor) if t]

    vgrad = torch.func.vmap(grad_lane, in_dims=(0, None))
    vupdate = torch.func.vmap(update_lane, in_dims=(0, 0, 0))
    vloss = torch.func.vmap(lambda leaves, batch: value_fn(optree.tree_unflatten(p_spec, leaves), batch), in_dims=(0, None))

    batches = _cycle(data)
    first = next(batches)
    batches_from_start = _chain_first(first, batches)
    history: list[torch.Tensor] = []
    bar = _bar(progress, steps, f"lr_sweep (K={k})")
    try:
        for step in range(steps):
            grads, loss = _accumulated(vgrad, p_leaves, batches_from_start, accumulate)
            history.append(loss.detach())
            with torch.no_grad():
                p_leaves, s_leaves = vupdate(grads, s_leaves, p_leaves)
            if step == 0:
                set_lr.check(unflatten_state(s_leaves), lrs)
            bar.update()
        final = vloss(p_leaves, first if eval_batch is None else eval_batch)
    finally:
        bar.close()
    losses = final.detach().double().cpu().tolist()
    train = torch.stack(history, dim=1).double().cpu().tolist()  # (K, steps), one read-back
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        raw_losses=losses,
        kind="lr_sweep",
        skip_begin=0,
        skip_end=0,
        default_method="best",
        train_losses=train,
    )


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
