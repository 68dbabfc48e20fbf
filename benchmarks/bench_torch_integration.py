"""Overhead of funcopt inside ordinary PyTorch code, measured against the torch reference.

1. Optimizer step: ``as_torch_optimizer(funcopt.adam)`` and the functional ``tx.update`` +
   ``apply_updates`` vs ``torch.optim.Adam(fused=True)`` (the reference; foreach, torch's
   default, shown too), on an MLP whose gradients are fixed (only the step is timed).
2. Drop-in with two param groups (weights with weight decay, biases without), constant lr and
   a ``LambdaLR`` changing the lr at every step: ``as_torch_optimizer(funcopt.adamw, groups)``
   vs ``torch.optim.AdamW(groups, fused=True)`` under the same scheduler (``scheduler.step()``
   is timed with the optimizer step in both).
3. Data-parallel step on 2 local gloo ranks: ``chain(average_gradients(), adam)`` in a functional
   loop, and ``all_reduce`` + a donating ``apply_gradients`` (fused in-place Adam), vs
   ``DistributedDataParallel`` + ``torch.optim.Adam`` (forward, backward, all-reduce and the
   optimizer step are timed together).

Each round runs every variant once in an interleaved order after a warm-up that is not counted;
the tables report the median per-step time and its ratio to the torch reference measured in the
same process. On a machine shared with other jobs the absolute times are noisy; only the ratios
(interleaved, medians) are meaningful, and they move by a few percent between runs.

Run:
    python benchmarks/bench_torch_integration.py                       # 4M-parameter MLP
    python benchmarks/bench_torch_integration.py --hidden 512 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import funcopt
from funcopt import distributed as fd


def make_mlp(hidden: int, layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.Tanh()]
    return torch.nn.Sequential(*mods[:-1])


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def bench_step(hidden: int, rounds: int, steps: int) -> list[tuple[str, float]]:
    variants = {}

    def torch_variant(name, make_opt):
        model = make_mlp(hidden)
        opt = make_opt(model.parameters())
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        variants[name] = opt.step

    torch_variant("torch.optim.Adam (foreach)", lambda p: torch.optim.Adam(p, lr=1e-3))
    torch_variant("torch.optim.Adam (fused)", lambda p: torch.optim.Adam(p, lr=1e-3, fused=True))
    torch_variant("as_torch_optimizer(funcopt.adam)", lambda p: funcopt.as_torch_optimizer(funcopt.adam(1e-3), list(p)))

    model = make_mlp(hidden)
    params, _ = funcopt.nn.extract(model)
    grads = funcopt.tree.map(lambda p: torch.randn_like(p) * 1e-3, params)
    tx = funcopt.adam(1e-3)
    box = {"params": params, "state": tx.init(params)}

    def functional():
        updates, box["state"] = tx.update(grads, box["state"], box["params"])
        box["params"] = funcopt.apply_updates(box["params"], updates)

    variants["functional tx.update + apply_updates"] = functional
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        timed(fn, 2)  # warm-up
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, steps))
    return [(k, statistics.median(v)) for k, v in times.items()]


def two_groups(model: torch.nn.Module) -> list[dict]:
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n.endswith("weight")], "weight_decay": 0.1},
            {"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0}]


def bench_groups(hidden: int, rounds: int, steps: int) -> list[tuple[str, float, str]]:
    """Rows ``(variant, seconds per step, its torch reference)``."""
    variants = {}

    def variant(name, make_opt, per_step_lr):
        model = make_mlp(hidden)
        opt = make_opt(two_groups(model))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        if not per_step_lr:
            variants[name] = opt.step
            return
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 1e-3 * s))

        def step():
            opt.step()
            sched.step()

        variants[name] = step

    torch_adamw = lambda g: torch.optim.AdamW(g, lr=1e-3, fused=True)  # noqa: E731
    adapter = lambda g: funcopt.as_torch_optimizer(funcopt.adamw, g, lr=1e-3)  # noqa: E731
    ref = {"constant lr": "torch.optim.AdamW(fused=True), constant lr",
           "LambdaLR": "torch.optim.AdamW(fused=True) + LambdaLR"}
    variant(ref["constant lr"], torch_adamw, False)
    variant("as_torch_optimizer(funcopt.adamw), constant lr", adapter, False)
    variant(ref["LambdaLR"], torch_adamw, True)
    variant("as_torch_optimizer(funcopt.adamw) + LambdaLR", adapter, True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        timed(fn, 2)  # warm-up
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, steps))
    return [(k, statistics.median(v), ref["LambdaLR" if "LambdaLR" in k else "constant lr"]) for k, v in times.items()]


def dp_rank(hidden: int, rounds: int, steps: int, batch: int) -> list[tuple[str, float]]:
    rank, world = fd.rank_and_world_size()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(batch, hidden, generator=g)
    Y = torch.randn(batch, hidden, generator=g)
    xs, ys = fd.shard((X, Y), rank, world)

    ddp_model = torch.nn.parallel.DistributedDataParallel(make_mlp(hidden))
    ddp_opt = torch.optim.Adam(ddp_model.parameters(), lr=1e-3)

    def ddp_step():
        ddp_opt.zero_grad()
        torch.nn.functional.mse_loss(ddp_model(xs), ys).backward()
        ddp_opt.step()

    model = make_mlp(hidden)
    params, _ = funcopt.nn.extract(model)
    tx = funcopt.chain(fd.average_gradients(), funcopt.adam(1e-3))
    box = {"params": params, "state": tx.init(params)}
    grad_fn = torch.func.grad(lambda p: torch.nn.functional.mse_loss(funcopt.nn.apply(model, p, None, xs), ys))

    def funcopt_step():
        grads = grad_fn(box["params"])
        updates, box["state"] = tx.update(grads, box["state"], box["params"])
        box["params"] = funcopt.apply_updates(box["params"], updates)

    adam = funcopt.adam(1e-3)
    donated = {"params": funcopt.nn.extract(model)[0]}
    donated["state"] = adam.init(donated["params"])

    def donating_step():
        grads = fd.all_reduce(grad_fn(donated["params"]))
        donated["params"], donated["state"] = funcopt.apply_gradients(
            adam, grads, donated["state"], donated["params"], donate=True
        )

    variants = {
        "DDP + torch.optim.Adam": ddp_step,
        "funcopt chain(average_gradients(), adam) + apply_updates": funcopt_step,
        "funcopt all_reduce + apply_gradients(adam, donate=True)": donating_step,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        timed(fn, 2)
    for _ in range(rounds):
        for name, fn in variants.items():
            torch.distributed.barrier()
            times[name].append(timed(fn, steps))
    return [(k, statistics.median(v)) for k, v in times.items()]


def table(rows: list[tuple], reference: str | None = None) -> str:
    """Rows ``(name, seconds)`` against ``reference``, or ``(name, seconds, reference)``."""
    times = {row[0]: row[1] for row in rows}
    lines = ["| variant | ms / step | ratio to reference |", "| --- | ---: | ---: |"]
    for row in rows:
        name, t = row[0], row[1]
        lines.append(f"| {name} | {t * 1e3:.3f} | {t / times[row[2] if len(row) > 2 else reference]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="MLP width (4 layers: ~4M params at 1024)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256, help="global batch of the data-parallel step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = sum(p.numel() for p in make_mlp(args.hidden).parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MLP with {n / 1e6:.2f}M float32 params\n")
    print("Optimizer step only (gradients fixed):")
    print(table(bench_step(args.hidden, args.rounds, args.steps), "torch.optim.Adam (fused)"))
    print("\nTwo param groups, constant lr and a per-step LambdaLR (ratio to torch.optim.AdamW(fused=True) "
          "with the same schedule):")
    print(table(bench_groups(args.hidden, args.rounds, args.steps)))
    print("\nData-parallel training step, 2 gloo ranks on this machine (1 thread each):")
    rows = fd.launch(dp_rank, 2, (args.hidden, args.rounds, args.steps, args.batch))[0]
    print(table(rows, "DDP + torch.optim.Adam"))


if __name__ == "__main__":
    main()
