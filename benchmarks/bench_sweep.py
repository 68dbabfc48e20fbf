"""Benchmark: K configurations of a digits MLP trained as one vmapped sweep vs a Python loop.

For K in {1, 8, 32} AdamW configurations (learning rate x weight decay) of a 64-64-10 tanh MLP
on scikit-learn's digits, minibatches of 128, N steps each, measured in the same process,
interleaved, medians of ``--repeats`` runs after one warm-up:

- ``loop torch.optim``: K separate runs of an ``nn.Module`` with ``torch.optim.AdamW``
  (the usual way to sweep);
- ``loop funcopt``: K separate runs of ``funcopt.adamw`` with ``funcopt.grad_and_value``;
- ``sweep vmap-step``: ``funcopt.sweep.sweep(step_mode="vmap")`` (vmap of the optimizer update);
- ``sweep stacked``: ``funcopt.sweep.sweep(step_mode="stacked")`` (the default for AdamW).

``--model conv``: the same on a small convolutional net on the digits as 8x8 images
(conv 1->8 3x3, tanh, conv 8->8 3x3, tanh, linear 512->10). Each table row also states the
hardware limit of one batched step: its matmul/conv FLOPs (forward + backward) and the bytes
the AdamW step must move (28 per parameter element), with the time they take at the matmul
throughput and memory bandwidth measured in the same process.

``--halving``: successive halving (4 rungs, keep 1/2: 47% of the full sweep's configuration
steps) against the full sweep on 10 data orders: how often both pick the same best
configuration (ranked by the final loss on the whole training set), and the compute ratio.

Before the timed runs the imported modules' objects are frozen out of the garbage collector
(``gc.freeze()``) and each run starts after a ``gc.collect()``, so that a full collection of the
interpreter's heap (up to 150 ms) does not land at random in one method's time.

Run: ``python benchmarks/bench_sweep.py [--ks 16] [--steps 100] [--repeats 3] [--threads 2] [--model conv] [--halving]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from sklearn.datasets import load_digits

import funcopt
from funcopt import sweep as S


class Images(torch.nn.Module):
    """(B, 64) digits as (B, 1, 8, 8) images through two 3x3 convolutions and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 64, 10)

    def forward(self, x):
        h = torch.tanh(self.c1(x.reshape(-1, 1, 8, 8)))
        h = torch.tanh(self.c2(h))
        return self.head(h.flatten(-3))


def build(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "conv":
        return Images()
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))


def step_flops(model: torch.nn.Module, batch: int) -> int:
    """Multiply-add FLOPs of one forward + backward pass (3x the forward's) for one configuration."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += 2 * batch * m.in_features * m.out_features
        elif isinstance(m, torch.nn.Conv2d):
            total += 2 * batch * 64 * m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    return 3 * total


def machine_limits(threads: int) -> tuple[float, float]:
    """(matmul FLOP/s, memory bytes/s) measured here: a batched matmul of the sweep's sizes, and
    an in-place add on 64 MB buffers (12 bytes per element)."""
    a, b = torch.randn(16, 128, 64), torch.randn(16, 64, 64)
    x, y = torch.randn(1 << 24), torch.randn(1 << 24)
    flops, bw = [], []
    for _ in range(20):
        t = time.perf_counter()
        torch.bmm(a, b)
        flops.append(2 * 16 * 128 * 64 * 64 / (time.perf_counter() - t))
        t = time.perf_counter()
        x.add_(y)
        bw.append(12 * (1 << 24) / (time.perf_counter() - t))
    return statistics.median(flops), statistics.median(bw)


def setup(batch: int, steps: int, model_name: str = "mlp"):
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    batches = []
    while len(batches) < steps:
        perm = torch.randperm(len(X), generator=g)
        batches += [(X[perm[i : i + batch]], y[perm[i : i + batch]]) for i in range(0, len(X) - batch + 1, batch)]
    return build(model_name), batches[:steps]


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
    vg = funcopt.grad_and_value(loss_fn)  # the everyday loop's gradient (plain autograd)
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


def halving(args) -> None:
    """Successive halving vs the full sweep on 10 data orders (see the module docstring)."""
    k = args.ks[-1] if args.ks != [1, 8, 16, 32] else 16
    hp = configs(k)
    agree, full_cost, sh_cost, seconds = 0, 0, 0, [0.0, 0.0]
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    model = build(args.model)
    loss_fn = make_loss(model)
    params0, _ = funcopt.nn.extract(model)

    def eval_fn(p):
        return {"train_loss": loss_fn(p, (X, y))}

    print(f"successive halving vs full sweep, K={k}, {args.steps} steps, 4 rungs keep 1/2, 10 data orders")
    print("| order | full best | halving best | same |")
    print("|---|---|---|---|")
    for order in range(10):
        g = torch.Generator().manual_seed(order)
        batches = []
        while len(batches) < args.steps:
            perm = torch.randperm(len(X), generator=g)
            batches += [(X[perm[i : i + args.batch]], y[perm[i : i + args.batch]])
                        for i in range(0, len(X) - args.batch + 1, args.batch)]
        common = dict(steps=args.steps, eval_fn=eval_fn, metric="train_loss", progress=False)
        t = time.perf_counter()
        full = S.sweep(loss_fn, params0, funcopt.adamw, hp, batches[: args.steps], **common)
        seconds[0] += time.perf_counter() - t
        t = time.perf_counter()
        sh = S.successive_halving(loss_fn, params0, funcopt.adamw, hp, batches[: args.steps], rungs=4, keep=0.5, **common)
        seconds[1] += time.perf_counter() - t
        a, b = full.best().index, sh.best().index
        agree += a == b
        full_cost += sum(full.steps_trained)
        sh_cost += sum(sh.steps_trained)
        print(f"| {order} | {a} | {b} | {'yes' if a == b else 'no'} |", flush=True)
    print(f"\nsame best configuration in {agree} of 10; configuration-steps {sh_cost / full_cost:.2f} "
          f"of the full sweep's; wall time {seconds[1] / seconds[0]:.2f} of the full sweep's")


def step_only(model, k: int, repeats: int, inner: int = 20) -> dict[str, float]:
    """Milliseconds per optimizer step for K configurations (no forward/backward)."""
    from funcopt.sweep import stacked_update, vmapped_update

    params0, _ = funcopt.nn.extract(model)
    hp = configs(k)
    grads = [{n: torch.randn_like(v) for n, v in params0.items()} for _ in range(k)]
    modules = []
    for lr, wd in zip(hp["learning_rate"], hp["weight_decay"]):
        m = build("mlp") if isinstance(model, torch.nn.Sequential) else build("conv")
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


def raw_floor(model: torch.nn.Module, batches: list, k: int, repeats: int) -> dict[str, float] | None:
    """Milliseconds per step of K configurations' work written by hand for the MLP (no vmap, no
    funcopt): the batched forward + backward (``baddbmm``, ``tanh``, cross-entropy, one autograd
    backward) and AdamW on one ``(K, N)`` buffer with per-row hyperparameters (8 in-place ops),
    against the sweep's per-step time measured as (time of 100 steps - time of 10) / 90 (no
    set-up or probe costs). None for the conv net."""
    if not isinstance(model, torch.nn.Sequential):
        return None
    xb, yb = batches[0]
    ws = [p.detach().expand(k, *p.shape).clone() for p in model.parameters()]  # W1, b1, W2, b2
    yk = yb.repeat(k)

    def forward_backward():
        w1, b1, w2, b2 = [w.detach().requires_grad_() for w in ws]
        h = torch.tanh(torch.baddbmm(b1[:, None, :], xb.expand(k, *xb.shape), w1.transpose(1, 2)))
        logits = torch.baddbmm(b2[:, None, :], h, w2.transpose(1, 2))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yk, reduction="sum") / len(yb)
        return torch.autograd.grad(loss, [w1, b1, w2, b2])

    n = sum(p.numel() for p in model.parameters())
    p, g, m, v = torch.randn(k, n), torch.randn(k, n), torch.zeros(k, n), torch.zeros(k, n)
    lr, wd = torch.linspace(1e-3, 1e-2, k)[:, None], torch.linspace(0.0, 0.1, k)[:, None]

    def adamw(t=[0]):  # noqa: B006 (the step count)
        t[0] += 1
        p.mul_(1 - lr * wd)
        m.lerp_(g, 0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        p.sub_(lr / (1 - 0.9 ** t[0]) * m / (v / (1 - 0.999 ** t[0])).sqrt_().add_(1e-8))

    hp = configs(k)
    params0, _ = funcopt.nn.extract(model)
    loss_fn = make_loss(model)

    def sweep_steps(steps):
        return lambda: S.sweep(loss_fn, params0, funcopt.adamw, hp, batches, steps=steps, progress=False)

    cases = {"fb": (forward_backward, 50), "adamw": (adamw, 50), "s100": (sweep_steps(100), 1), "s10": (sweep_steps(10), 1)}
    times: dict[str, list[float]] = {c: [] for c in cases}
    for fn, _ in cases.values():
        fn()
    for _ in range(max(3, repeats)):
        for name, (fn, inner) in cases.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner * 1e3)
    med = {c: statistics.median(t) for c, t in times.items()}
    return {"raw forward+backward": med["fb"], "raw AdamW (K, N)": med["adamw"],
            "sweep per step": (med["s100"] - med["s10"]) / 90}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--model", choices=["mlp", "conv"], default="mlp")
    ap.add_argument("--halving", action="store_true", help="successive halving vs the full sweep on 10 data orders")
    ap.add_argument("--no-step-table", action="store_true", help="skip the optimizer-step-only table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, batches = setup(args.batch, args.steps, args.model)
    # The objects of the imports (torch, scikit-learn) moved out of the collector's sight: with
    # them, one full collection took up to 150 ms here and fell at random into one method's run
    # (measured with gc.callbacks); every method runs under the same collector settings.
    gc.collect()
    gc.freeze()
    if args.halving:
        halving(args)
        return
    flop_rate, bandwidth = machine_limits(torch.get_num_threads())
    flops = step_flops(model, args.batch)
    n_params = sum(p.numel() for p in model.parameters())
    methods = {
        "loop torch.optim": lambda hp: loop_torch(model, batches, hp),
        "loop funcopt": lambda hp: loop_funcopt(model, batches, hp),
        "sweep vmap-step": lambda hp: run_sweep(model, batches, hp, "vmap"),
        "sweep stacked": lambda hp: run_sweep(model, batches, hp, "stacked"),
    }
    what = "digits MLP 64-64-10" if args.model == "mlp" else "digits conv net (8x8 images)"
    print(f"{what}, AdamW, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats} (seconds)")
    print(f"measured here: batched matmul {flop_rate / 1e9:.0f} GFLOP/s, memory {bandwidth / 1e9:.1f} GB/s; "
          f"per configuration and step: {flops / 1e6:.2f} MFLOP (forward + backward), "
          f"{28 * n_params / 1e3:.0f} kB moved by AdamW")
    header = ["K", *methods, "speedup vs torch.optim loop", "speedup vs funcopt loop",
              "sweep ms/step", "limit ms/step (FLOPs / rate + bytes / bandwidth)"]
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
                gc.collect()  # no method pays for the garbage of the one before
                t0 = time.perf_counter()
                fn(hp)
                times[name].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        cells = [str(k), *(f"{med[m]:.3f}" for m in methods),
                 f"{med['loop torch.optim'] / med['sweep stacked']:.1f}x",
                 f"{med['loop funcopt'] / med['sweep stacked']:.1f}x",
                 f"{med['sweep stacked'] / args.steps * 1e3:.2f}",
                 f"{(k * flops / flop_rate + 28 * k * n_params / bandwidth) * 1e3:.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    for k in args.ks:
        floor = raw_floor(model, batches, k, args.repeats)
        if floor is not None:
            total = floor["raw forward+backward"] + floor["raw AdamW (K, N)"]
            print(f"\nK={k}, per step (ms): hand-written batched forward+backward {floor['raw forward+backward']:.3f} "
                  f"+ AdamW on one (K, N) buffer {floor['raw AdamW (K, N)']:.3f} = {total:.3f}; the sweep's "
                  f"{floor['sweep per step']:.3f} (set-up excluded), {floor['sweep per step'] / total:.2f}x that floor",
                  flush=True)
    if args.no_step_table:
        return
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
