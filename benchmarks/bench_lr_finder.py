"""Benchmark of funcopt.lr_find and funcopt.lr_sweep against plain training loops.

    python benchmarks/bench_lr_finder.py             # timings (about a minute on 2 idle cores)
    python benchmarks/bench_lr_finder.py --quick     # fewer repetitions
    python benchmarks/bench_lr_finder.py --study     # instead: how smoothing and steps move the suggestions

Measured in one process, interleaved (A, B, A, B, ...), first repetition of each excluded as
warm-up, medians reported:

1. ``lr_find`` for 100 steps vs 100 plain training steps (``grad_and_value`` + ``adam.update``
   + ``apply_updates``) on the same data: the overhead ratio of the range test (learning-rate
   injection, loss read-back, smoothing).
2. ``lr_sweep`` with K=16 learning rates for S steps under ``vmap`` vs 16 sequential plain runs
   of S steps each.

The problem is an MLP on scikit-learn's digits (64-128-10, batch 128, float32).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from sklearn.datasets import load_digits

import funcopt


def problem(hidden: int = 128, batch: int = 128):
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[order], y[order]
    data = [(X[i : i + batch], y[i : i + batch]) for i in range(0, len(X) - batch + 1, batch)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    params, _ = funcopt.nn.extract(model)

    def loss_fn(p, b):
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(model, p, None, b[0]), b[1])

    return model, params, loss_fn, data, (X, y)


def plain_run(loss_fn, params, data, lr: float, steps: int) -> float:
    tx = funcopt.adam(lr)
    state = tx.init(params)
    step = torch.func.grad_and_value(loss_fn)
    loss = torch.zeros(())
    for i in range(steps):
        grads, loss = step(params, data[i % len(data)])
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
    return float(loss)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, reps: int) -> dict:
    """Runs the callables in turn ``reps + 1`` times; drops the first round; returns medians."""
    times = {k: [] for k in fns}
    for r in range(reps + 1):
        for k, fn in fns.items():
            t = timed(fn)
            if r:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(reps: int, sweep_steps: int) -> None:
    _, params, loss_fn, data, _ = problem()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average before: {os.getloadavg()[0]:.1f}")
    find = interleaved(
        {
            "lr_find 100 steps": lambda: funcopt.lr_find(
                loss_fn, params, funcopt.adam, data, min_lr=1e-6, max_lr=1e-1, num_steps=100,
                diverge_threshold=None, progress=False,
            ),
            "plain loop 100 steps": lambda: plain_run(loss_fn, params, data, 1e-3, 100),
        },
        reps,
    )
    k = 16
    lrs = funcopt.lr_finder.lr_ladder(1e-4, 1.0, k)
    sweep = interleaved(
        {
            f"lr_sweep K={k}, {sweep_steps} steps (vmap)": lambda: funcopt.lr_sweep(
                loss_fn, params, funcopt.adam, data, min_lr=1e-4, max_lr=1.0, num_lrs=k, steps=sweep_steps,
                progress=False,
            ),
            f"{k} sequential plain runs of {sweep_steps} steps": lambda: [
                plain_run(loss_fn, params, data, lr, sweep_steps) for lr in lrs
            ],
        },
        max(1, reps // 2),
    )
    print("\n| measurement | median wall time (s) | ratio |\n| --- | --- | --- |")
    (a, ta), (b, tb) = find.items()
    print(f"| {a} | {ta:.3f} | {ta / tb:.2f}x the plain loop |")
    print(f"| {b} | {tb:.3f} | 1.00 |")
    (a, ta), (b, tb) = sweep.items()
    print(f"| {a} | {ta:.3f} | {ta / tb:.2f}x the sequential runs ({tb / ta:.1f}x faster) |")
    print(f"| {b} | {tb:.3f} | 1.00 |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


def study() -> None:
    """How the EMA factor and the number of steps move the suggestions (and the result of training)."""
    model, params, loss_fn, data, (X, y) = problem(hidden=64, batch=64)
    Xtr, ytr, Xte, yte = X[:1437], y[:1437], X[1437:], y[1437:]
    train = [(Xtr[i : i + 64], ytr[i : i + 64]) for i in range(0, len(Xtr), 64)]

    def accuracy(lr: float) -> float:
        tx = funcopt.adam(lr)
        p, state = params, tx.init(params)
        g = torch.func.grad(loss_fn)
        for _ in range(15):
            for b in train:
                u, state = tx.update(g(p, b), state, p)
                p = funcopt.apply_updates(p, u)
        with torch.no_grad():
            return (funcopt.nn.apply(model, p, None, Xte).argmax(1) == yte).float().mean().item()

    print("\n| num_steps | smoothing | steepest | valley | minimum | test acc. (steepest) | test acc. (valley) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for steps, beta in [(100, 0.98), (100, 0.9), (100, 0.0), (300, 0.98), (300, 0.9)]:
        r = funcopt.lr_find(loss_fn, params, funcopt.adam, train, min_lr=1e-6, max_lr=1.0, num_steps=steps,
                            smoothing=beta, progress=False)
        s = r.suggestions()
        print(f"| {steps} | {beta} | {s['steepest']:.3g} | {s['valley']:.3g} | {s['minimum']:.3g} | "
              f"{accuracy(s['steepest']):.4f} | {accuracy(s['valley']):.4f} |")
        if (steps, beta) == (100, 0.98):
            first = (r, accuracy)
    r, accuracy = first
    lrs, losses = r.lrs[10:-1], r.losses[10:-1]  # Lightning's rule: slope against lr in linear units
    linear = [(losses[i + 1] - losses[i - 1]) / (lrs[i + 1] - lrs[i - 1]) for i in range(1, len(lrs) - 1)]
    lr = lrs[1 + min(range(len(linear)), key=linear.__getitem__)]
    print(f"\nSlope against lr in linear units (Lightning >= 2.5.3) on the 100-step, 0.98 curve: {lr:.3g}, "
          f"test accuracy {accuracy(lr):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--study", action="store_true", help="run the smoothing/steps study instead")
    args = parser.parse_args()
    if args.study:
        study()
    else:
        bench(reps=3 if args.quick else 7, sweep_steps=30 if args.quick else 50)


if __name__ == "__main__":
    main()
