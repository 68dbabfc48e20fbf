"""Benchmark: K configurations of a digits MLP trained as one vmapped sweep vs a Python loop.

For K in {1, 8, 32} AdamW configurations (learning rate x weight decay) of a 64-64-10 tanh MLP
on scikit-learn's digits, minibatches of 128, N steps each, measured in the same process,
interleaved, medians of ``--repeats`` runs after one warm-up:

- ``loop torch.optim``: K separate runs of an ``nn.Module`` with ``torch.optim.AdamW``
  (the usual way to sweep);
- ``loop funcopt``: K separate runs of ``funcopt.adamw`` with ``torch.func.grad_and_value``;
- ``sweep vmap-step``: ``funcopt.sweep.sweep(step_mode="vmap")`` (vmap of the optimizer update);
- ``sweep stacked``: ``funcopt.sweep.sweep(step_mode="stacked")`` (the default for AdamW).

Run: ``python benchmarks/bench_sweep.py [--steps 100] [--repeats 3] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits

import funcopt
from funcopt import sweep as S


def setup(batch: int, steps: int):
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    batches = []
    while len(batches) < steps:
        perm = torch.randperm(len(X), generator=g)
        batches += [(X[perm[i : i + batch]], y[perm[i : i + batch]]) for i in range(0, len(X) - batch + 1, batch)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    return model, batches[:steps]


def configs(k: int) -> dict[str, list[float]]:
    lrs = [1e-3 * (1.5**i) for i in range(max(1, k // 4) if k >= 4 else k)]
    wds = [0.0, 1e-3, 1e-2, 1e-1][: (4 if k >= 4 else 1)]
    return S.grid(learning_rate=lrs, weight_decay=wds)


def loop_torch(model, batches, hp):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for lr, wd in zip(hp["learning_rate"], hp["weight_decay"]):
        model.load_state_dict(state)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        for xb, yb in batches:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.load_state_dict(state)


def loop_funcopt(model, batches, hp):
    params0, _ = funcopt.nn.extract(model)
    loss_fn = make_loss(model)
    vg = torch.func.grad_and_value(loss_fn)
    for lr, wd in zip(hp["learning_rate"], hp["weight_decay"]):
        tx = funcopt.adamw(lr, weight_decay=wd)
        params, state = params0, tx.init(params0)
        for b in batches:
            grads, _ = vg(params, b)
            updates, state = tx.update(grads, state, params)
            params = funcopt.apply_updates(params, updates)


def make_loss(model):
    def loss_fn(p, batch):
        xb, yb = batch
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(model, p, None, xb), yb)

    return loss_fn


def run_sweep(model, batches, hp, step_mode):
    params0, _ = funcopt.nn.extract(model)
    return S.sweep(make_loss(model), params0, funcopt.adamw, hp, batches, steps=len(batches),
                   step_mode=step_mode, progress=False)


def step_only(model, k: int, repeats: int, inner: int = 20) -> dict[str, float]:
    """Milliseconds per optimizer step for K configurations (no forward/backward)."""
    from funcopt.sweep import stacked_update, vmapped_update

    params0, _ = funcopt.nn.extract(model)
    hp = configs(k)
    grads = [{n: torch.randn_like(v) for n, v in params0.items()} for _ in range(k)]
    modules = []
    for lr, wd in zip(hp["learning_rate"], hp["weight_decay"]):
        m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd, fused=True)
        for p, g in zip(m.parameters(), grads[len(modules)].values()):
            p.grad = g.clone()
        modules.append(opt)
    txs = [funcopt.adamw(lr, weight_decay=wd) for lr, wd in zip(hp["learning_rate"], hp["weight_decay"])]
    states = [tx.init(params0) for tx in txs]
    tx = funcopt.inject_hyperparams(funcopt.adamw)(learning_rate=1e-3, weight_decay=0.0)
    P = S.stack_params(params0, k)
    St = S.stack_states(tx, P, hp)
    G = funcopt.tree.stack(grads)
    cases = {
        "torch.optim fused x K": lambda: [opt.step() for opt in modules],
        "funcopt update x K": lambda: [t.update(g, s, params0) for t, g, s in zip(txs, grads, states)],
        "vmap(update)": lambda: vmapped_update(tx, G, St, P),
        "stacked update": lambda: stacked_update(tx, G, St, P),
    }
    times = {c: [] for c in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner * 1e3)
    return {c: statistics.median(v) for c, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, batches = setup(args.batch, args.steps)
    methods = {
        "loop torch.optim": lambda hp: loop_torch(model, batches, hp),
        "loop funcopt": lambda hp: loop_funcopt(model, batches, hp),
        "sweep vmap-step": lambda hp: run_sweep(model, batches, hp, "vmap"),
        "sweep stacked": lambda hp: run_sweep(model, batches, hp, "stacked"),
    }
    print(f"digits MLP 64-64-10, AdamW, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats} (seconds)")
    header = ["K", *methods, "speedup vs torch.optim loop", "speedup vs funcopt loop"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for k in args.ks:
        hp = configs(k)
        assert len(hp["learning_rate"]) == k, (k, hp)
        times = {m: [] for m in methods}
        for fn in methods.values():  # warm-up
            fn(configs(1))
        for _ in range(args.repeats):
            for name, fn in methods.items():  # interleaved
                t0 = time.perf_counter()
                fn(hp)
                times[name].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        cells = [str(k), *(f"{med[m]:.3f}" for m in methods),
                 f"{med['loop torch.optim'] / med['sweep stacked']:.1f}x",
                 f"{med['loop funcopt'] / med['sweep stacked']:.1f}x"]
        print("| " + " | ".join(cells) + " |", flush=True)
    print("\nOptimizer step only (AdamW on the same MLP, ms per step for all K configurations)")
    rows = {k: step_only(model, k, args.repeats) for k in args.ks}
    names = list(rows[args.ks[0]])
    print("| K | " + " | ".join(names) + " | vmap / stacked |")
    print("|" + "---|" * (len(names) + 2))
    for k, r in rows.items():
        print(f"| {k} | " + " | ".join(f"{r[n]:.3f}" for n in names)
              + f" | {r['vmap(update)'] / r['stacked update']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
