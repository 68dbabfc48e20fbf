"""DCP checkpoints of pytrees: :func:`save`, :func:`load` and :func:`checkpoint_info`, through
``torch.distributed.checkpoint`` (imported only inside the functions).

A checkpoint saved by N ranks loads with M ranks, or in one process without a process group.
Part of :mod:`funcopt.distributed`, which re-exports every public name here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from typing import Any
from collections.abc import Iterator, Sequence

import optree
import torch
import torch.distributed as dist

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree
from funcopt.distributed._collectives import check_same_structure_across_ranks, is_initialized, rank_and_world_size

__all__ = ["save", "load", "checkpoint_info"]

_FORMAT = "funcopt.distributed/1"
_META_KEY = "__funcopt_meta__"


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
