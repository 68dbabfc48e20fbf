"""The local multi-process launcher: :func:`launch` runs a function in ``world_size`` new
processes joined in a process group, like ``torchrun --nproc-per-node`` for a function.

Part of :mod:`funcopt.distributed`, which re-exports it.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import traceback
from typing import Any, Callable
from collections.abc import Sequence

import torch
import torch.distributed as dist

from funcopt.base import FuncoptError
from funcopt.distributed._collectives import is_initialized

__all__ = ["launch"]


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
