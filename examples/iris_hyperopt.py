"""Per-weight weight decay tuned by implicit hypergradients on Iris (Lorraine et al. 2019).

A bias-free MLP 4-h-h-3 (h = 128: 17,280 weights, so 17,280 hyperparameters) is trained
full-batch on 60 Iris flowers with one weight-decay coefficient per weight, exp(lambda_i):

    L_T(w, lambda) = CE(train) + 1/2 sum_i exp(lambda_i) w_i^2,      L_V(w) = CE(validation).

Each outer iteration trains the network for a few inner steps (warm-started, a funcopt
optimizer), then takes one Adam step on lambda along the implicit hypergradient
dL_V/dlambda = -(d^2 L_T / dlambda dw) H^{-1} dL_V/dw, computed by funcopt.hypergradient with
truncated CG (or a Neumann series) over Hessian-vector products, never a Hessian. Baselines
are trained the same way with fixed decay: none, the seed blog's uniform 1e-5, and a uniform
decay tuned on the validation split from a grid. Each split is 60 train / 60 validation /
30 test with its own fixed seed; results are mean +- std over the splits, because 30 test
points cannot separate the methods on one split.

Run:  python examples/iris_hyperopt.py            (10 splits, h = 128, a few minutes on CPU)
      python examples/iris_hyperopt.py --fast     (CI smoke run, seconds)
      python examples/iris_hyperopt.py --hidden 1024 --splits 3
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_iris

import funcopt
from funcopt import linalg, tree


def make_split(X, y, seed):
    """60 train / 60 validation / 30 test, stratification-free, from a fixed per-split seed."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    idx = perm[:60], perm[60:120], perm[120:150]
    return [(X[i], y[i]) for i in idx]


def init_mlp(hidden, seed, dtype):
    """Bias-free 4-h-h-3 weights with nn.Linear's default scale, stored as (in, out) matrices."""
    g = torch.Generator().manual_seed(1000 + seed)
    sizes = [(4, hidden), (hidden, hidden), (hidden, 3)]
    return {
        f"w{i}": ((torch.rand(n_in, n_out, generator=g) * 2 - 1) / math.sqrt(n_in)).to(dtype)
        for i, (n_in, n_out) in enumerate(sizes)
    }


def forward(w, X, act):
    h = act(X @ w["w0"])
    h = act(h @ w["w1"])
    return h @ w["w2"]


def penalty(w, log_decay):
    return 0.5 * tree.vdot(tree.map(torch.exp, log_decay), tree.map(torch.square, w))


def losses(w, data, act):
    with torch.no_grad():
        return [F.cross_entropy(forward(w, X, act), y).item() for X, y in data]


def run_ho(data, args, seed, act, log=print):
    """Alternates inner training and hypergradient steps; returns the curves and final weights."""
    (Xt, yt), (Xv, yv) = data[0], data[1]
    w = init_mlp(args.hidden, seed, args.dtype)
    log_decay = tree.full_like(w, math.log(args.init_decay))

    def inner(w_, lam):
        return F.cross_entropy(forward(w_, Xt, act), yt) + penalty(w_, lam)

    def outer(w_, lam):
        return F.cross_entropy(forward(w_, Xv, act), yv)

    if args.solver == "cg":
        # A ReLU net after a few warm-started steps is not at a strict minimum: CG may meet
        # negative curvature; it then stops at its last iterate (a truncated solve), which is
        # what truncated-CG hyperparameter optimization wants, so no warning every iteration.
        solve = functools.partial(linalg.solve_cg, maxiter=args.terms, on_negative_curvature="ignore")
    else:
        solve = functools.partial(linalg.solve_neumann, iters=args.terms, alpha=args.alpha)
    inner_tx = funcopt.adam(args.inner_lr)
    inner_state = inner_tx.init(w)
    hyper_tx = funcopt.adam(args.hyper_lr)
    hyper_state = hyper_tx.init(log_decay)
    grad_inner = torch.func.grad(inner)
    curves = []
    for it in range(args.outer):
        for _ in range(args.inner_steps):
            updates, inner_state = inner_tx.update(grad_inner(w, log_decay), inner_state, w)
            w = funcopt.apply_updates(w, updates)
        hg = funcopt.hypergradient(inner, outer, w, log_decay, solve=solve, damping=args.damping)
        updates, hyper_state = hyper_tx.update(hg, hyper_state, log_decay)
        log_decay = funcopt.apply_updates(log_decay, updates)
        curves.append(losses(w, data, act))
        if args.verbose and (it % args.print_every == 0 or it == args.outer - 1):
            tr, va, te = curves[-1]
            mean_decay = float(torch.cat([x.reshape(-1) for x in tree.leaves(log_decay)]).exp().mean())
            log(f"  split {seed} outer {it:3d}: train {tr:.4f} val {va:.4f} test {te:.4f} "
                f"mean decay {mean_decay:.3g} |hypergrad| {float(tree.norm(hg)):.3g}")
    return curves, w, log_decay


def baselines(data, args, seed, act, decays):
    """Trains one network per fixed uniform decay, all at once under torch.func.vmap.

    The K decays are stacked along a leading axis of the log-decay pytree; minimize_inner is
    pure, so vmap runs the K full-batch trainings as one batched computation. Returns a list
    of (train, validation, test) losses, one per decay.
    """
    (Xt, yt) = data[0]
    w0 = init_mlp(args.hidden, seed, args.dtype)

    def inner(w_, lam):
        return F.cross_entropy(forward(w_, Xt, act), yt) + penalty(w_, lam)

    logs = torch.tensor([math.log(d) if d > 0 else -math.inf for d in decays], dtype=args.dtype)
    lam = tree.map(lambda w: logs.reshape(-1, *([1] * w.dim())).expand(-1, *w.shape), w0)
    steps = args.outer * args.inner_steps

    def train(lam_k):
        return funcopt.implicit.minimize_inner(inner, w0, lam_k, funcopt.adam(args.inner_lr), steps)

    trained = torch.func.vmap(train)(lam)
    return [losses(w_k, data, act) for w_k in tree.unstack(trained)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="small CI run (h=32, 2 splits, 8 outer iterations)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--outer", type=int, default=100, help="outer (hypergradient) iterations")
    p.add_argument("--inner-steps", type=int, default=10, help="inner Adam steps per outer iteration")
    p.add_argument("--inner-lr", type=float, default=1e-2)
    p.add_argument("--hyper-lr", type=float, default=0.3, help="Adam step on lambda = log decay")
    p.add_argument("--init-decay", type=float, default=1e-5)
    p.add_argument("--solver", choices=["cg", "neumann"], default="cg")
    p.add_argument("--terms", type=int, default=10, help="CG iterations / Neumann terms")
    p.add_argument("--alpha", type=float, default=None, help="Neumann step (default: 1/lambda_max estimate)")
    p.add_argument("--damping", type=float, default=0.0)
    p.add_argument("--activation", choices=["relu", "tanh", "gelu"], default="relu")
    p.add_argument("--grid", type=str, default="1e-4,1e-3,3e-3,1e-2,3e-2", help="uniform decays tried for the tuned baseline")
    p.add_argument("--float64", action="store_true")
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--quiet", dest="verbose", action="store_false")
    p.add_argument("--out", type=str, default=".", help="directory for the PNG plot")
    args = p.parse_args(argv)
    if args.fast:
        args.hidden, args.splits, args.outer, args.inner_steps = 32, 2, 8, 10
        args.grid, args.print_every = "1e-3,1e-2", 2
    args.dtype = torch.float64 if args.float64 else torch.float32
    return args


def summarize(name, finals):
    t = torch.tensor(finals, dtype=torch.float64)
    std = t.std().item() if len(finals) > 1 else 0.0
    return name, t.mean().item(), std


def plot(ho_curves, table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = torch.tensor(ho_curves, dtype=torch.float64)  # splits x outer x (train, val, test)
    mean = c.mean(0)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for j, (label, color) in enumerate([("HO train CE", "C0"), ("HO validation CE", "C1"), ("HO test CE", "C2")]):
        ax.plot(range(1, len(mean) + 1), mean[:, j], color=color, label=label)
    for (name, m, _), style in zip(table[1:], [":", "--", "-."]):
        ax.axhline(m, color="gray", linestyle=style, label=f"{name} (final test)")
    ax.set_xlabel("outer iteration")
    ax.set_ylabel("cross-entropy (mean over splits)")
    ax.set_yscale("log")
    ax.set_title("Iris: per-weight decay by implicit hypergradients")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: threading overhead dominates (and CPUs may be shared)
    X, y = load_iris(return_X_y=True)
    X, y = torch.tensor(X, dtype=args.dtype), torch.tensor(y)
    act = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}[args.activation]
    grid = [float(s) for s in args.grid.split(",")]
    n_hyper = 4 * args.hidden + args.hidden**2 + 3 * args.hidden
    print(f"Iris HO: MLP 4-{args.hidden}-{args.hidden}-3, {n_hyper} hyperparameters, {args.splits} splits, "
          f"{args.outer} outer x {args.inner_steps} inner steps, {args.solver}-{args.terms}")
    start = time.perf_counter()
    results = {"no decay": [], "uniform 1e-5": [], "uniform tuned": [], "HO per-weight": []}
    chosen, ho_curves = [], []
    for s in range(args.splits):
        data = make_split(X, y, seed=s)
        curves, _, _ = run_ho(data, args, s, act)
        ho_curves.append(curves)
        results["HO per-weight"].append(curves[-1][2])
        base = baselines(data, args, s, act, [0.0, 1e-5, *grid])
        results["no decay"].append(base[0][2])
        results["uniform 1e-5"].append(base[1][2])
        best_losses, best_decay = min(zip(base[2:], grid), key=lambda t: t[0][1])  # by validation CE
        chosen.append(best_decay)
        results["uniform tuned"].append(best_losses[2])
        print(f"split {s}: final test CE  HO {curves[-1][2]:.4f}  no decay {results['no decay'][-1]:.4f}  "
              f"1e-5 {results['uniform 1e-5'][-1]:.4f}  tuned({best_decay:g}) {best_losses[2]:.4f}")
    elapsed = time.perf_counter() - start
    table = [summarize(k, results[k]) for k in ["HO per-weight", "no decay", "uniform 1e-5", "uniform tuned"]]
    print(f"\nFinal test cross-entropy over {args.splits} splits ({elapsed:.1f} s):")
    print("| method | test CE mean | std |")
    print("| --- | --- | --- |")
    for name, m, sd in table:
        print(f"| {name} | {m:.3f} | {sd:.3f} |")
    print(f"tuned uniform decays chosen on validation: {chosen}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "iris_hyperopt.png")
    plot(ho_curves, table, path)
    print(f"saved {path}")
    return table


if __name__ == "__main__":
    main()
