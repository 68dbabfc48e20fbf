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

The code is split by concept: :mod:`funcopt.distributed_collectives` (process-group helpers,
collectives, ``average_gradients``, ``shard``), :mod:`funcopt.distributed_checkpoint` (DCP
``save``/``load``), :mod:`funcopt.distributed_sweep` (``sweep``) and
:mod:`funcopt.distributed_launch` (``launch``). Every public name is importable from here.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters, gradients and the optimizer
state are DTensor shards; :func:`module_params`, :func:`module_grads`, :func:`apply_updates_`
and :func:`module_step` run ``tx.init``/``tx.update`` on them (each rank holds 1/N of the
state; norms reduce over whole tensors), and :func:`save`/:func:`load` reshard them N -> M.
See docs/distributed.md.
"""

from __future__ import annotations

from funcopt.distributed._checkpoint import checkpoint_info, load, save
from funcopt.distributed._collectives import (
    all_reduce,
    average_gradients,
    broadcast,
    check_same_structure_across_ranks,
    is_initialized,
    rank_and_world_size,
    shard,
)
from funcopt.distributed._launch import launch
from funcopt.distributed._sharded import (
    apply_updates_,
    distribute_like,
    full_tensors,
    local_nbytes,
    module_grads,
    module_params,
    module_step,
)
from funcopt.distributed._sweep import sweep

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
    "module_params",
    "module_grads",
    "apply_updates_",
    "module_step",
    "local_nbytes",
    "full_tensors",
    "distribute_like",
]
