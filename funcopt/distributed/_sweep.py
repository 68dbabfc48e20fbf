"""Distributed sweeps: :func:`sweep` splits the K configurations of
:func:`funcopt.sweep.sweep` across ranks and gathers one ``SweepResult``.

Part of :mod:`funcopt.distributed`, which re-exports it as ``funcopt.distributed.sweep``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable
from collections.abc import Sequence

import optree
import torch
import torch.distributed as dist

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree
from funcopt.distributed._collectives import _require, broadcast

__all__ = ["sweep"]


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
