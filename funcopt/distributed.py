"""Data-parallel functional training on ``torch.distributed``, and DCP checkpoints of pytrees.

Every rank holds the same params and optimizer state, computes gradients on its shard of the
batch, and the gradients are averaged across ranks (``all_reduce``) before the optimizer::

    torch.distributed.init_process_group("gloo")          # torchrun sets rank and world size
    tx = funcopt.chain(funcopt.distributed.average_gradients(), funcopt.adam(1e-3))
    params = funcopt.distributed.broadcast(params)          # every rank starts from rank 0's
    state = tx.init(params)
    for batch in batches:
        grads = torch.func.grad(loss_fn)(params, funcopt.distributed.shard(batch))
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
    funcopt.distributed.save("ckpt", {"params": params, "opt_state": state})

:func:`save` / :func:`load` go through ``torch.distributed.checkpoint`` (DCP): every leaf is a
DCP entry keyed by its pytree path, replicated tensors are written once, and a checkpoint saved
by N ranks loads with M ranks (or in one process without a process group). The functions here
do communication, so they run eagerly: not under ``vmap``/``grad``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import os
import shutil
import socket
import traceback
import warnings
from typing import Any, Callable
from collections.abc import Iterator, Sequence

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
    "save",
    "load",
    "checkpoint_info",
    "launch",
    "sweep",
]

_FORMAT = "funcopt.distributed/1"
_META_KEY = "__funcopt_meta__"
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


# ---------------------------------------------------------------------------------------------
# DCP checkpoints


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silences DCP's warning that it runs in one process (intended here without a group)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _flatten(tree: PyTree, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    tensors, scalars, paths = {}, {}, []
    for path, x in zip(_tree.paths(tree), _tree.leaves(tree)):
        key = prefix + path
        paths.append(key)
        if isinstance(x, torch.Tensor):
            tensors[key] = x
        elif x is None or isinstance(x, (bool, int, float, str)):
            scalars[key] = x
        else:
            raise TypeError(
                f"funcopt.distributed.save: leaf {path} is a {type(x).__name__}; leaves must be "
                "tensors or Python scalars/strings."
            )
    return tensors, scalars, paths


def _tensor_meta(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()}


def save(path: str | os.PathLike, tree: PyTree, *, per_rank: PyTree | None = None, group: Any = None) -> None:
    """Saves a pytree (e.g. ``{"params": params, "opt_state": state, "step": step}``) with
    ``torch.distributed.checkpoint``, like ``dcp.save(model.state_dict())`` for pytrees.

    Call it on every rank (a collective). ``tree`` is replicated (the same on every rank): each
    leaf is stored once, keyed by its path (``params['fc.weight']``, ``opt_state[1][0].mu[...]``),
    with the writing spread over the ranks. DTensor leaves are saved as the shards they are.
    ``per_rank`` is an optional tree that differs between ranks (e.g. each rank's RNG state or
    data position), stored for each rank separately; it can only be restored with the same
    number of ranks. Without a process group it saves from this one process.

    The checkpoint directory is written under a temporary name and renamed when complete, so an
    existing checkpoint at ``path`` is replaced only by a complete one.

    Raises:
        FuncoptError: if the ranks' trees differ in structure, shapes or dtypes.
    """
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    if os.path.exists(path) and not (
        os.path.isdir(path) and (not os.listdir(path) or os.path.isfile(os.path.join(path, ".metadata")))
    ):
        raise FuncoptError(
            f"funcopt.distributed.save: {path!r} exists and is not a DCP checkpoint; refusing to "
            "replace it. Pass a new directory name (or an earlier checkpoint's, to overwrite it)."
        )
    distributed = is_initialized()
    rank, world = rank_and_world_size(group)
    if distributed:
        check_same_structure_across_ranks(tree, "funcopt.distributed.save (tree)", group)
        if per_rank is not None:
            check_same_structure_across_ranks(per_rank, "funcopt.distributed.save (per_rank)", group)
    tensors, scalars, paths = _flatten(tree, "tree")
    meta = {
        "format": _FORMAT,
        "world_size": world,
        "paths": paths,
        "tensors": _tensor_meta(tensors),
        "scalars": scalars,
        "treespec": str(_tree.structure(tree)),
        "per_rank": None,
    }
    state_dict: dict[str, Any] = dict(tensors)
    if per_rank is not None:
        own_t, own_s, own_p = _flatten(per_rank, f"rank{rank}/per_rank")
        own_s = {k.split("/", 1)[1]: v for k, v in own_s.items()}
        gathered: list[Any] = [own_s]
        if distributed:
            gathered = [None] * world
            dist.all_gather_object(gathered, own_s, group=group)
        meta["per_rank"] = {
            "paths": [p.split("/", 1)[1] for p in own_p],
            "tensors": {k.split("/", 1)[1]: v for k, v in _tensor_meta(own_t).items()},
            "scalars": gathered,
        }
        state_dict.update(own_t)
    state_dict[_META_KEY] = json.dumps(meta)

    tmp = path.rstrip("/\\") + ".funcopt-tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    if distributed:
        dist.barrier(group)
    with _quiet_single_process():
        dcp.save(state_dict, checkpoint_id=tmp, process_group=group, no_dist=not distributed)
    if distributed:
        dist.barrier(group)
    if rank == 0:
        old = path.rstrip("/\\") + ".funcopt-old"
        if os.path.exists(path):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if os.path.exists(old):
            shutil.rmtree(old)
    if distributed:
        dist.barrier(group)


def _read_meta(path: str, group: Any) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FuncoptError(
            f"No DCP checkpoint at {path!r} (no .metadata file). Pass the directory given to "
            "funcopt.distributed.save."
        )
    holder: dict[str, Any] = {_META_KEY: ""}
    try:
        with _quiet_single_process():
            dcp.load(holder, checkpoint_id=path, process_group=group, no_dist=not is_initialized())
    except Exception as e:  # a DCP checkpoint not written by funcopt.distributed.save
        raise FuncoptError(
            f"{path!r} is a DCP checkpoint without funcopt metadata ({type(e).__name__}); it was not "
            "written by funcopt.distributed.save. Load it with torch.distributed.checkpoint.load."
        ) from None
    meta = json.loads(holder[_META_KEY])
    if meta.get("format") != _FORMAT:
        raise FuncoptError(f"{path!r}: unknown funcopt checkpoint format {meta.get('format')!r}.")
    return meta


def checkpoint_info(path: str | os.PathLike, group: Any = None) -> dict[str, Any]:
    """What a :func:`save` checkpoint holds: ``world_size`` it was saved with, leaf ``paths``,
    ``tensors`` (path -> [dtype, shape]), ``scalars`` and ``per_rank`` (or ``None``)."""
    return _read_meta(os.fspath(path), group)


def _check_against(meta_paths: Sequence[str], meta_tensors: dict, meta_scalars: dict, like: PyTree, prefix: str, what: str) -> None:
    tensors, scalars, paths = _flatten(like, prefix)
    saved, here_paths = set(meta_paths), set(paths)
    missing = [p for p in paths if p not in saved]
    extra = [p for p in meta_paths if p not in here_paths]
    if missing or extra:
        raise FuncoptError(
            f"funcopt.distributed.load: the template {what} does not match the checkpoint: leaves "
            f"missing from the checkpoint: {missing[:5]}, leaves in the checkpoint but not in the "
            f"template: {extra[:5]}. Build the template (like=) the same way as the saved tree "
            "(same model, same optimizer)."
        )
    for key, x in tensors.items():
        if key not in meta_tensors:
            raise FuncoptError(f"funcopt.distributed.load: {key} is a tensor in the template but a Python value in the checkpoint.")
        dtype, shape = meta_tensors[key]
        here = [str(x.dtype).removeprefix("torch."), list(x.shape)]
        if here != [dtype, shape]:
            raise FuncoptError(
                f"funcopt.distributed.load: leaf {key} is {dtype} of shape {tuple(shape)} in the "
                f"checkpoint but {here[0]} of shape {tuple(here[1])} in the template (like=)."
            )
    for key in scalars:
        if key not in meta_scalars:
            raise FuncoptError(f"funcopt.distributed.load: {key} is a Python value in the template but a tensor in the checkpoint.")


def load(
    path: str | os.PathLike,
    like: PyTree,
    *,
    per_rank_like: PyTree | None = None,
    group: Any = None,
) -> Any:
    """Loads a :func:`save` checkpoint into new tensors shaped like the template ``like``.

    Works with any number of ranks (a collective when a process group is initialized) and in a
    single process without one. Each tensor is read onto the device of its template leaf; the
    result has the template's pytree types (NamedTuple states included) and the template is not
    modified. With ``per_rank_like``, also restores this rank's per-rank tree and returns
    ``(tree, per_rank)``.

    Raises:
        FuncoptError: naming the first leaf whose path, shape or dtype differs from the template,
            or when per-rank state is requested with a different number of ranks than saved it.
    """
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    rank, world = rank_and_world_size(group)
    meta = _read_meta(path, group)
    _check_against(meta["paths"], meta["tensors"], meta["scalars"], like, "tree", "(like=)")
    tensors, _, _ = _flatten(like, "tree")
    state_dict: dict[str, Any] = {k: torch.empty_like(v) for k, v in tensors.items()}
    if per_rank_like is not None:
        saved = meta["per_rank"]
        if saved is None:
            raise FuncoptError(
                f"funcopt.distributed.load: {path!r} holds no per-rank state; drop per_rank_like=."
            )
        if meta["world_size"] != world:
            raise FuncoptError(
                f"funcopt.distributed.load: {path!r} was saved by {meta['world_size']} rank(s) with "
                f"per-rank state, but this run has {world}. Per-rank state (each rank's RNG, data "
                "position, ...) cannot be split or merged: restore with the same number of ranks, "
                "or load without per_rank_like= to restore only the replicated tree (that works "
                "with any number of ranks)."
            )
        scalars = {f"rank{rank}/{k}": v for k, v in saved["scalars"][rank].items()}
        own_paths = [f"rank{rank}/{p}" for p in saved["paths"]]
        own_tensors = {f"rank{rank}/{k}": v for k, v in saved["tensors"].items()}
        _check_against(own_paths, own_tensors, scalars, per_rank_like, f"rank{rank}/per_rank", "(per_rank_like=)")
        pr_tensors, _, _ = _flatten(per_rank_like, f"rank{rank}/per_rank")
        state_dict.update({k: torch.empty_like(v) for k, v in pr_tensors.items()})
    with _quiet_single_process():
        dcp.load(state_dict, checkpoint_id=path, process_group=group, no_dist=not is_initialized())

    def rebuild(template: PyTree, prefix: str, saved_scalars: dict[str, Any]) -> PyTree:
        keys = [prefix + p for p in _tree.paths(template)]
        values = [state_dict[k] if k in state_dict else saved_scalars[k] for k in keys]
        return optree.tree_unflatten(_tree.structure(template), values)

    tree = rebuild(like, "tree", meta["scalars"])
    if per_rank_like is None:
        return tree
    return tree, rebuild(per_rank_like, f"rank{rank}/per_rank", scalars)


# ---------------------------------------------------------------------------------------------
# Distributed sweeps


def _to_cpu(tree: PyTree) -> PyTree:
    return _tree.map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, tree)


def _concat_trees(trees: list[PyTree]) -> PyTree:
    return optree.tree_map(
        lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0], *trees, none_is_leaf=False
    )


def sweep(
    loss_fn: Callable[[PyTree, Any], torch.Tensor],
    init_params: PyTree | Callable[[int], PyTree],
    optimizer: Any,
    hparams: Any,
    data: Any,
    *,
    steps: int,
    seeds: Sequence[int] | None = None,
    dst: int | None = 0,
    group: Any = None,
    progress: bool = False,
    **sweep_kwargs: Any,
) -> Any:
    """Splits the K configurations of :func:`funcopt.sweep.sweep` across ranks and gathers one
    ``SweepResult`` on rank ``dst``, like running the whole sweep in one process.

    Rank ``r`` trains a contiguous share of the configurations (sizes differ by at most one)
    with the local batched sweep; the shares' loss and metric histories, final stacked params
    and optimizer states are gathered (``gather_object``, on CPU) and concatenated in
    configuration order. Every rank must pass the same arguments and see the same ``data``;
    a params tree given as ``init_params`` is broadcast from rank 0 first.

    Args:
        loss_fn, init_params, optimizer, hparams, data, steps, seeds: as for
            :func:`funcopt.sweep.sweep` (``hparams``: name -> K values).
        dst: the rank that receives the result (the others get ``None``); ``None`` gives it to
            every rank (``all_gather_object``).
        group: the process group.
        progress: a progress bar on the receiving rank.
        **sweep_kwargs: passed to :func:`funcopt.sweep.sweep` (``eval_fn``, ``eval_every``,
            ``metric``, ``mode``, ``chunk_size``, ``step_mode``, ``randomness``).

    Returns:
        The ``SweepResult`` of all K configurations (``seconds`` is the distributed wall time),
        or ``None`` on ranks other than ``dst``.

    Raises:
        FuncoptError: without an initialized process group, or for mismatched ``hparams``.
    """
    import time

    from funcopt import sweep as _sweep

    _require("funcopt.distributed.sweep")
    start = time.perf_counter()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    values = {str(k): list(v) for k, v in (hparams or {}).items()}
    lengths = {len(v) for v in values.values()} | ({len(seeds)} if seeds is not None else set())
    if len(lengths) != 1:
        raise FuncoptError(
            f"funcopt.distributed.sweep: hparams and seeds define different numbers of "
            f"configurations {sorted(lengths) or '(none)'}; give every name one value per configuration."
        )
    k = lengths.pop()
    if not callable(init_params):
        init_params = broadcast(init_params, group=group)  # the same start on every rank
    bounds = [round(i * k / world) for i in range(world + 1)]
    share = list(range(bounds[rank], bounds[rank + 1]))
    receives = dst is None or rank == dst
    # A rank without configurations (K < world size) trains configuration 0 and discards it
    # (it would otherwise wait idle); the receiving rank needs a local result to build on.
    run_idx = share or [0]
    local = _sweep.sweep(
        loss_fn, init_params, optimizer,
        {n: [v[i] for i in run_idx] for n, v in values.items()}, data, steps=steps,
        seeds=None if seeds is None else [seeds[i] for i in run_idx],
        progress=progress and receives, **sweep_kwargs,
    )
    payload = None
    if share:
        payload = {
            "loss": local.loss, "evals": local.evals, "eval_steps": local.eval_steps,
            "steps_trained": local.steps_trained, "params": _to_cpu(local.params),
            "opt_state": _to_cpu(local.opt_state), "step_mode": local.step_mode, "step_note": local.step_note,
        }
    if dst is None:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, payload, group=group)
    else:
        gathered = [None] * world if rank == dst else None
        dist.gather_object(payload, gathered, dst=dst, group=group)
    if not receives:
        return None
    parts = [g for g in gathered if g is not None]
    if any(p["eval_steps"] != parts[0]["eval_steps"] for p in parts):
        raise FuncoptError("funcopt.distributed.sweep: the ranks evaluated at different steps; pass the same arguments on every rank.")
    modes = sorted({p["step_mode"] for p in parts})
    return dataclasses.replace(
        local,
        hparams=values,
        loss=torch.cat([p["loss"] for p in parts]),
        evals={n: torch.cat([p["evals"][n] for p in parts]) for n in parts[0]["evals"]},
        eval_steps=parts[0]["eval_steps"],
        steps_trained=[s for p in parts for s in p["steps_trained"]],
        params=_concat_trees([p["params"] for p in parts]),
        opt_state=_concat_trees([p["opt_state"] for p in parts]),
        kept=list(range(k)),
        step_mode=modes[0] if len(modes) == 1 else "/".join(modes),
        step_note="; ".join(sorted({p["step_note"] for p in parts if p["step_note"]})),
        seconds=time.perf_counter() - start,
        seeds=None if seeds is None else [int(s) for s in seeds],
    )


# ---------------------------------------------------------------------------------------------
# Local multi-process launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, backend: str, timeout_s: float, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        torch.set_num_threads(1)
        if backend == "nccl" and torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())  # one GPU per rank
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        result = fn(*args)
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # report any failure to the parent instead of hanging the others
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    start_method: str = "forkserver",
) -> list[Any]:
    """Runs ``fn(*args)`` in ``world_size`` new local processes joined in a process group, like
    ``torchrun --nproc-per-node world_size`` for a function; returns each rank's result.

    Meant for tests, notebooks and examples on one machine (CPU with ``gloo`` by default); for
    real jobs start the script with ``torchrun``. ``fn`` must be importable (defined at module
    level) and its result must be ``torch.save``-able. If any rank fails, the others are stopped
    and a ``RuntimeError`` carries the failing rank's traceback.

    Args:
        fn: the function each rank runs, after ``init_process_group``; its return value is
            sent back (through ``torch.save``, so tensors are copied, not shared).
        world_size: number of processes (ranks).
        args: positional arguments for ``fn`` (picklable).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one CUDA device per rank, ``LOCAL_RANK`` set).
        timeout_s: the process group's timeout; a rank stuck longer fails the launch.
        start_method: ``"forkserver"`` (default: a server process imports torch once and forks
            the ranks from it), ``"spawn"`` (fresh interpreters, slowest, most isolated) or
            ``"fork"`` (fastest; not with CUDA initialized in the parent).

    Each rank runs with one intra-op thread (``torch.set_num_threads(1)``, as torchrun's
    ``OMP_NUM_THREADS=1`` default), so the ranks do not oversubscribe the CPU cores.
    """
    import queue as _queue

    import torch.multiprocessing as mp

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise FuncoptError(f"launch: world_size must be a positive int, got {world_size!r}.")
    if start_method not in ("forkserver", "spawn", "fork"):
        raise FuncoptError(f"launch: start_method must be 'forkserver', 'spawn' or 'fork', got {start_method!r}.")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # The server imports torch once; each rank is then forked from it already imported.
        # (torch._dynamo is what the first torch.func.grad call would import in every rank.)
        ctx.set_forkserver_preload(
            ["torch", "torch._dynamo", "torch.distributed.checkpoint", "funcopt.distributed"]
        )
    results_queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, backend, timeout_s, fn, tuple(args), results_queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s + 60)
    try:
        while len(results) < world_size:
            try:
                rank, ok, payload = results_queue.get(timeout=0.2)
            except _queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    raise RuntimeError(
                        f"launch: rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result."
                    ) from None
                if datetime.datetime.now() > deadline:
                    raise RuntimeError(f"launch: no result from ranks {sorted(set(range(world_size)) - set(results))} "
                                       f"within {timeout_s + 60:.0f} s.") from None
                continue
            if not ok:
                raise RuntimeError(f"launch: rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join()
    return [results[r] for r in range(world_size)]
