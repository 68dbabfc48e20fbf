"""Optimizer step time of the torch.optim optimizers without a fused kernel, against torch's foreach.

For Adadelta, Rprop, ASGD, Adafactor and Muon: funcopt's pure step (``update`` +
``apply_updates``), its pure training step (``apply_gradients(donate=False)``) and its donated
step (``apply_gradients(donate=True)``) against ``torch.optim.X(foreach=True)`` (and the
for-loop ``foreach=False``), measured in this one process, interleaved in a shuffled order
every round, each step with the last-level cache evicted first (as in ``bench_step.py``).
"ratio" is the median over rounds of the row's time over torch foreach's in the same round.
Muon runs on the 2-D leaves only (torch.optim.Muon takes nothing else) and has no foreach
implementation in torch: its reference is torch's for-loop.

Shapes: S1 = ResNet-18's 62 parameter tensors (11.7M elements; Muon: its 2-D fc weight),
S3 = an Iris MLP 4-1024-1024-3 (1.06M elements; Muon: its three weight matrices). fp32.

Run:
    python benchmarks/bench_catalog.py                 # all optimizers, S1 and S3 (a few minutes)
    python benchmarks/bench_catalog.py --quick         # few rounds
    python benchmarks/bench_catalog.py --optimizers rprop,asgd --sizes S3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

import torch
from bench_step import resnet18_shapes  # the same ResNet-18 shapes (this folder is on sys.path)

import funcopt
from funcopt import apply_gradients

SHAPES = {
    "S1": resnet18_shapes(),
    "S3": [(1024, 4), (1024,), (1024, 1024), (1024,), (3, 1024), (3,)],
}

# name: (torch class, torch kwargs, funcopt factory, funcopt kwargs, torch has foreach)
OPTIMIZERS: dict[str, tuple[type, dict, Callable[..., funcopt.GradientTransformation], dict, bool]] = {
    "adadelta": (torch.optim.Adadelta, dict(lr=1.0), funcopt.adadelta, dict(learning_rate=1.0), True),
    "rprop": (torch.optim.Rprop, dict(lr=1e-2), funcopt.rprop, dict(learning_rate=1e-2), True),
    "asgd": (torch.optim.ASGD, dict(lr=1e-2, t0=1.0), funcopt.asgd, dict(learning_rate=1e-2, t0=1.0), True),
    "adafactor": (torch.optim.Adafactor, dict(lr=1e-2), funcopt.adafactor, dict(learning_rate=1e-2), True),
    "muon": (torch.optim.Muon, dict(lr=2e-2), funcopt.muon, dict(learning_rate=2e-2), False),
}


class Row:
    def __init__(self, name: str, step: Callable[[], None]):
        self.name, self.step, self.times = name, step, []


def make_rows(which: str, shapes: list[tuple[int, ...]]) -> list[Row]:
    torch_cls, torch_kwargs, factory, kwargs, has_foreach = OPTIMIZERS[which]
    if which == "muon":
        shapes = [s for s in shapes if len(s) == 2]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
    keys = [f"p{i:02d}" for i in range(len(base))]
    rows = []
    for label, flags in (("torch.optim for-loop", dict(foreach=False)), ("torch.optim foreach", dict(foreach=True))):
        if label.endswith("foreach") and not has_foreach:
            continue
        params = [torch.nn.Parameter(t.clone()) for t in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        extra = flags if which != "muon" else {}
        rows.append(Row(label, torch_cls(params, **torch_kwargs, **extra).step))
    grads_tree = {k: g.clone() for k, g in zip(keys, grads)}

    def funcopt_row(label: str, mode: str) -> None:
        tx = factory(**kwargs)
        box = {"p": {k: t.clone() for k, t in zip(keys, base)}}
        box["s"] = tx.init(box["p"])

        if mode == "update":
            def step():
                u, box["s"] = tx.update(grads_tree, box["s"], box["p"])
                box["p"] = funcopt.apply_updates(box["p"], u)
        else:
            donate = mode == "donated"

            def step():
                box["p"], box["s"] = apply_gradients(tx, grads_tree, box["s"], box["p"], donate=donate)

        rows.append(Row(label, step))

    funcopt_row("funcopt update+apply", "update")
    funcopt_row("funcopt apply_gradients(donate=False)", "pure_step")
    funcopt_row("funcopt apply_gradients(donate=True)", "donated")
    return rows


def run(which: str, size: str, rounds: int, warmup: int) -> str:
    shapes = SHAPES[size]
    rows = make_rows(which, shapes)
    numel = sum(torch.Size(s).numel() for s in (shapes if which != "muon" else [s for s in shapes if len(s) == 2]))
    if numel < 4_000_000:
        rounds *= 4  # short steps: more rounds for the same precision
    evict = torch.empty(1 << 24)  # 64 MB: more than this machine's last-level cache
    order = random.Random(0)
    for r in range(warmup + rounds):
        for row in order.sample(rows, len(rows)):
            evict.fill_(float(r))
            t = time.perf_counter()
            row.step()
            if r >= warmup:
                row.times.append(time.perf_counter() - t)
    ref_name = "torch.optim foreach" if any(row.name == "torch.optim foreach" for row in rows) else "torch.optim for-loop"
    ref = next(row for row in rows if row.name == ref_name)
    lines = [
        f"### {which}, {size} ({numel / 1e6:.2f}M elements)",
        "",
        f"| implementation | median ms | ratio to {ref_name} | ratio of minima |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        paired = statistics.median(t / f for t, f in zip(row.times, ref.times))
        lines.append(
            f"| {row.name} | {statistics.median(row.times) * 1e3:.2f} | {paired:.2f} | {min(row.times) / min(ref.times):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="S1,S3")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    warmup = 1 if args.quick else 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds after {warmup} warm-up\n")
    for which in args.optimizers.split(","):
        for size in args.sizes.split(","):
            print(run(which, size, rounds, warmup), flush=True)


if __name__ == "__main__":
    main()
