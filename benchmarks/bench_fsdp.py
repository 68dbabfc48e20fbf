"""funcopt under FSDP2 (``fully_shard``, CPU/gloo): the optimizer step time against
``torch.optim.AdamW(foreach=True)`` on the same sharded model, and optimizer-state bytes per
rank at 1, 2 and 4 ranks.

The step is timed alone (after one backward, the gradients stay): funcopt's functional route
``funcopt.distributed.module_step(funcopt.adamw(...), state, model)`` (the fast route on the
local shards) and torch's ``optimizer.step()``, alternating in the same processes, medians of
``--rounds`` rounds; the table reports rank 0's ratio funcopt / torch.

    python benchmarks/bench_fsdp.py                 # 2 ranks for the timing, 1/2/4 for the bytes
    python benchmarks/bench_fsdp.py --width 256 --rounds 3 --worlds 1 2   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import funcopt
from funcopt import distributed as fd


def make_model(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not fd.is_initialized():
        return model
    mesh = init_device_mesh("cpu", (fd.rank_and_world_size()[1],))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def backward(model: torch.nn.Module, width: int) -> None:
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(1))
    F.mse_loss(model(x), torch.zeros(8, width)).backward()


def torch_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for per_param in opt.state.values():
        for v in per_param.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


def bytes_per_rank(width: int, depth: int) -> dict:
    model = shard(make_model(width, depth))
    tx = funcopt.adamw(1e-3, weight_decay=1e-2)
    state = tx.init(fd.module_params(model))
    backward(model, width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True)
    opt.step()
    return {"params": fd.local_nbytes(fd.module_params(model)), "funcopt": fd.local_nbytes(state),
            "torch": torch_state_bytes(opt)}


def step_times(width: int, depth: int, rounds: int, steps: int) -> dict:
    model = shard(make_model(width, depth))
    backward(model, width)
    tx = funcopt.adamw(1e-3, weight_decay=1e-2)
    state = tx.init(fd.module_params(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True)
    route = str(funcopt.fast.explain(tx, fd.module_grads(model), state, fd.module_params(model))).splitlines()[0]
    times: dict[str, list[float]] = {"funcopt": [], "torch": []}
    for r in range(rounds + 1):  # round 0 warms up
        for name in ("funcopt", "torch") if r % 2 else ("torch", "funcopt"):
            start = time.perf_counter()
            for _ in range(steps):
                if name == "funcopt":
                    state = fd.module_step(tx, state, model)
                else:
                    opt.step()
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"route": route, "funcopt_ms": med["funcopt"] * 1e3, "torch_ms": med["torch"] * 1e3,
            "ratio": med["funcopt"] / med["torch"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    n = args.depth * (args.width * args.width + args.width)
    print(f"MLP {args.depth} x Linear({args.width}, {args.width}), {n:,} float32 params, CPU/gloo")
    print("\noptimizer state bytes per rank (AdamW: exp_avg + exp_avg_sq + steps)")
    print("| ranks | params/rank | funcopt state/rank | torch.optim state/rank |")
    print("| ---: | ---: | ---: | ---: |")
    for world in args.worlds:
        if world == 1:
            res = bytes_per_rank(args.width, args.depth)
        else:
            res = fd.launch(bytes_per_rank, world, (args.width, args.depth))[0]
        print(f"| {world} | {res['params']:,} | {res['funcopt']:,} | {res['torch']:,} |")
    world = 2
    res = fd.launch(step_times, world, (args.width, args.depth, args.rounds, args.steps), timeout_s=600)[0]
    print(f"\noptimizer step under FSDP2, {world} ranks (rank 0, medians of {args.rounds} alternating rounds)")
    print(f"funcopt route: {res['route']}")
    print("| step | ms | ratio |\n| --- | ---: | ---: |")
    print(f"| torch.optim.AdamW(foreach) | {res['torch_ms']:.2f} | 1.00 |")
    print(f"| funcopt.adamw (module_step) | {res['funcopt_ms']:.2f} | {res['ratio']:.2f} |")


if __name__ == "__main__":
    main()
