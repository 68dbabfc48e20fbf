"""Process-group helpers and collectives over pytrees: ``all_reduce``, ``broadcast``, the
cross-rank structure check, the ``average_gradients`` transformation and ``shard``.

Part of :mod:`funcopt.distributed`, which re-exports every public name here.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch
import torch.distributed as dist

from funcopt import tree as _tree
from funcopt.base import EmptyState, FuncoptError, GradientTransformation, PyTree

__all__ = [
    "is_initialized",
    "rank_and_world_size",
    "all_reduce",
    "average_gradients",
    "broadcast",
    "check_same_structure_across_ranks",
    "shard",
]

_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


# ---------------------------------------------------------------------------------------------
# Process group helpers


def is_initialized() -> bool:
    """Whether a default ``torch.distributed`` process group exists (``dist.is_initialized``)."""
    return dist.is_available() and dist.is_initialized()


def _require(what: str) -> None:
    if not is_initialized():
        raise FuncoptError(
            f"{what} needs an initialized torch.distributed process group. Call "
            "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (CUDA) on every rank "
            "first (torchrun sets RANK, WORLD_SIZE and MASTER_ADDR), or start local processes "
            "with funcopt.distributed.launch(fn, world_size). For single-process training, "
            "leave the distributed helpers out."
        )


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when no process group is initialized."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _buckets(tree: PyTree) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], PyTree]]:
    """Flattens the tensor leaves into one new 1-D buffer per (dtype, device); returns the
    buffers and the inverse (the inputs are never written)."""
    flat, spec = optree.tree_flatten(tree, none_is_leaf=False)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(flat):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"distributed collectives need tensor leaves; leaf {_tree.paths(tree)[i]} is a "
                f"{type(x).__name__}."
            )
        groups.setdefault((x.dtype, x.device), []).append(i)
    buffers = [torch.cat([flat[i].reshape(-1) for i in idx]) for idx in groups.values()]

    def rebuild(reduced: list[torch.Tensor]) -> PyTree:
        out: list[Any] = [None] * len(flat)
        for buf, idx in zip(reduced, groups.values()):
            parts = torch.split(buf, [flat[i].numel() for i in idx])
            for i, part in zip(idx, parts):
                out[i] = part.reshape(flat[i].shape)
        return optree.tree_unflatten(spec, out)

    return buffers, rebuild


def all_reduce(tree: PyTree, op: str = "mean", group: Any = None) -> PyTree:
    """Reduces every leaf across ranks and returns a new tree, like ``jax.lax.pmean`` (``op=
    'mean'``) or ``psum`` (``'sum'``); ``'max'`` and ``'min'`` also work.

    The leaves are packed into one buffer per dtype and device, so a whole gradient tree costs
    one ``torch.distributed.all_reduce`` per dtype. The input tree is not modified.

    Raises:
        FuncoptError: without an initialized process group, or for an unknown ``op``.
    """
    if op not in _OPS:
        raise FuncoptError(f"all_reduce: op must be one of {sorted(_OPS)}, got {op!r}.")
    _require("funcopt.distributed.all_reduce")
    buffers, rebuild = _buckets(tree)
    world = dist.get_world_size(group)
    for buf in buffers:
        if op == "mean" and not buf.is_floating_point():
            raise FuncoptError(f"all_reduce(op='mean') needs floating tensors, got {buf.dtype}; use op='sum'.")
        dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
        if op == "mean":
            buf.div_(world)
    return rebuild(buffers)


def broadcast(tree: PyTree, src: int = 0, group: Any = None) -> PyTree:
    """Returns ``src``'s values of ``tree`` on every rank (``torch.distributed.broadcast``).

    Use it once at the start so that every rank trains from the same initial params. The input
    tree is not modified; every rank must pass a tree of the same structure, shapes and dtypes.
    """
    _require("funcopt.distributed.broadcast")
    check_same_structure_across_ranks(tree, "broadcast", group)
    buffers, rebuild = _buckets(tree)
    for buf in buffers:
        dist.broadcast(buf, src=src, group=group)
    return rebuild(buffers)


def _signature(tree: PyTree) -> list[tuple[str, str]]:
    out = []
    for path, x in zip(_tree.paths(tree), _tree.leaves(tree)):
        if isinstance(x, torch.Tensor):
            out.append((path, f"{x.dtype} {tuple(x.shape)}"))
        else:
            out.append((path, type(x).__name__))
    return out


def check_same_structure_across_ranks(tree: PyTree, what: str = "tree", group: Any = None) -> None:
    """Raises ``FuncoptError`` on every rank if the ranks' trees differ in paths, shapes or dtypes.

    A collective (``all_gather_object``): call it on all ranks. Mismatched trees would otherwise
    make the collectives that follow hang or mix unrelated tensors.
    """
    _require(f"funcopt.distributed.check_same_structure_across_ranks({what})")
    mine = _signature(tree)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    reference = gathered[0]
    for r, sig in enumerate(gathered[1:], start=1):
        if sig == reference:
            continue
        ref_d, sig_d = dict(reference), dict(sig)
        only0 = [p for p in ref_d if p not in sig_d]
        onlyr = [p for p in sig_d if p not in ref_d]
        if only0 or onlyr:
            detail = f"paths only on rank 0: {only0[:5]}, only on rank {r}: {onlyr[:5]}"
        else:
            p = next(p for p in ref_d if ref_d[p] != sig_d[p])
            detail = f"leaf {p} is {ref_d[p]} on rank 0 but {sig_d[p]} on rank {r}"
        raise FuncoptError(
            f"{what}: the ranks hold different pytrees ({detail}). Every rank must build the same "
            "model and optimizer (same code, same arguments)."
        )


def average_gradients(group: Any = None, *, check: bool = True) -> GradientTransformation:
    """A transformation that averages the updates (gradients) across ranks, like
    ``torch.nn.parallel.DistributedDataParallel``'s gradient all-reduce; put it first in a chain.

    ``chain(average_gradients(), adam(1e-3))`` on every rank, each computing gradients of the
    mean loss on an equal share of the batch, follows the same trajectory as ``adam(1e-3)`` on
    the full batch in one process (up to floating-point rounding of the sum).

    Args:
        group: the process group (default: the world).
        check: whether ``init`` verifies (one ``all_gather_object``) that every rank has the
            same params structure, shapes and dtypes.

    ``init`` and ``update`` are collectives: call them on every rank. They need an initialized
    process group (``FuncoptError`` otherwise) and run eagerly (not under ``vmap``).
    """

    def init(params: PyTree) -> EmptyState:
        _require("funcopt.distributed.average_gradients")
        if check:
            check_same_structure_across_ranks(params, "average_gradients (params)", group)
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return all_reduce(updates, "mean", group), state

    return GradientTransformation(init, update)


def shard(batch: PyTree, rank: int | None = None, world_size: int | None = None) -> PyTree:
    """This rank's contiguous share of ``batch`` along dim 0, like ``DistributedSampler`` with
    ``shuffle=False`` applied to one batch.

    Every leaf's first dimension must be divisible by ``world_size``: with equal shares the mean
    of the per-rank mean losses is the full-batch mean loss. ``rank``/``world_size`` default to
    the process group's.
    """
    if rank is None or world_size is None:
        _require("funcopt.distributed.shard (without rank= and world_size=)")
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise FuncoptError(f"shard: rank must lie in [0, {world_size}), got {rank}.")

    def cut(path: str, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] if x.dim() else None
        if n is None or n % world_size:
            raise FuncoptError(
                f"shard: leaf {path} has leading size {n}, not divisible by world_size={world_size}. "
                "Use a batch size that is a multiple of the number of ranks (unequal shares would "
                "weight the ranks' mean losses unequally)."
            )
        size = n // world_size
        return x[rank * size : (rank + 1) * size]

    return _tree.map_with_path(cut, batch)
