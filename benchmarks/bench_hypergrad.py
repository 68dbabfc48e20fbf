"""Cost and accuracy of one implicit hypergradient, in units of one gradient of the inner loss.

Two measurements on the Iris weight-decay problem of examples/iris_hyperopt.py (bias-free MLP
4-h-h-3, one log weight decay per weight, L_T = CE(train) + 1/2 sum exp(lambda) w^2,
L_V = CE(validation)):

1. Cost (float32, h = 128 by default, 17,280 parameters and hyperparameters): the time of one
   ``funcopt.hypergradient`` with Neumann and CG at 5 and 20 terms, both Hessian-vector product
   modes ("rev": vjp of grad linearized once; "fwd": jvp of grad), divided by the time of one
   ``torch.func.grad`` of L_T measured in the same process. Rounds are interleaved (every method
   once per round, in a rotating order), the first rounds are warm-up and excluded, medians are
   reported. torchopt's ``custom_root`` with its CG and Neumann solvers is timed on the same
   problem when torchopt imports.
2. Accuracy (float64, tanh, h = 16 by default so that the dense Hessian is cheap): the inner
   problem is solved to a gradient norm < 1e-10 (Adam, then Newton), the exact hypergradient
   comes from a dense solve, and each solver's cosine similarity and relative error are listed
   against the number of terms.

Run:  python benchmarks/bench_hypergrad.py            (about a minute on an idle 2-core CPU)
      python benchmarks/bench_hypergrad.py --rounds 5 --hidden 64
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_iris

import funcopt
from funcopt import linalg, tree
from funcopt.implicit import hypergradient, minimize_inner


def make_problem(hidden, dtype, act, seed=0, decay=1e-3):
    X, y = load_iris(return_X_y=True)
    X, y = torch.tensor(X, dtype=dtype), torch.tensor(y)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(seed))
    (Xt, yt), (Xv, yv) = (X[perm[:60]], y[perm[:60]]), (X[perm[60:120]], y[perm[60:120]])
    g = torch.Generator().manual_seed(seed)
    sizes = [(4, hidden), (hidden, hidden), (hidden, 3)]
    w0 = {f"w{i}": ((torch.rand(a, b, generator=g) * 2 - 1) / math.sqrt(a)).to(dtype) for i, (a, b) in enumerate(sizes)}
    lam = tree.map(lambda w: torch.full_like(w, math.log(decay)) + 0.5 * torch.randn(w.shape, generator=g, dtype=dtype), w0)

    def net(w, X):
        return act(act(X @ w["w0"]) @ w["w1"]) @ w["w2"]

    def inner(w, lam):
        return F.cross_entropy(net(w, Xt), yt) + 0.5 * tree.vdot(tree.map(torch.exp, lam), tree.map(torch.square, w))

    def outer(w, lam):
        return F.cross_entropy(net(w, Xv), yv)

    return inner, outer, w0, lam


def time_rounds(fns: dict, rounds: int, warmup: int) -> dict:
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds + warmup):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t = time.perf_counter()
            fns[k]()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def torchopt_methods(inner, outer, w, lam, terms_list, alpha):
    try:
        import torchopt
    except Exception as err:  # noqa: BLE001 - any import failure means "skip"
        print(f"torchopt not available ({type(err).__name__}: {err}); skipped")
        return {}
    keys = sorted(w)
    w_t = tuple(w[k].detach() for k in keys)

    def optimality(params, *lam_t):
        p = dict(zip(keys, params))
        g = torch.func.grad(inner)(p, dict(zip(keys, lam_t)))
        return tuple(g[k] for k in keys)

    methods = {}
    for terms in terms_list:
        for name, solve in [
            (f"torchopt CG-{terms}", torchopt.linear_solve.solve_cg(maxiter=terms)),
            (f"torchopt Neumann-{terms}", torchopt.linear_solve.solve_inv(ns=True, maxiter=terms, alpha=alpha)),
        ]:
            @torchopt.diff.implicit.custom_root(optimality, argnums=tuple(range(1, len(keys) + 1)), solve=solve)
            def solver(params, *lam_t):
                return w_t

            def run(solver=solver):
                lam_t = tuple(lam[k].detach().requires_grad_(True) for k in keys)
                sol = solver(w_t, *lam_t)
                loss = outer(dict(zip(keys, sol)), lam)
                return dict(zip(keys, torch.autograd.grad(loss, lam_t)))

            methods[name] = run
    return methods


def cost_table(args):
    act = {"relu": torch.relu, "tanh": torch.tanh}[args.activation]
    inner, outer, w0, lam = make_problem(args.hidden, torch.float32, act)
    w = minimize_inner(inner, w0, lam, funcopt.adam(1e-2), args.train_steps)
    lam_max, _ = linalg.power_iteration(linalg.hvp_operator(inner, w, lam), w, iters=30)
    alpha = 1.0 / float(lam_max)
    grad_fn = torch.func.grad(inner)
    def ten_grads():
        for _ in range(10):
            grad_fn(w, lam)

    fns = {"10 x grad L_T": ten_grads}
    solvers = {}
    for terms in (5, 20):
        solvers[f"Neumann-{terms}"] = functools.partial(linalg.solve_neumann, iters=terms, alpha=alpha)
        solvers[f"CG-{terms}"] = functools.partial(
            linalg.solve_cg, maxiter=terms, rtol=0.0, on_negative_curvature="ignore")
    for mode in linalg.HVP_MODES:
        for name, solve in solvers.items():
            fns[f"{name} {mode}"] = functools.partial(hypergradient, inner, outer, w, lam, mode=mode, solve=solve)
    # Hessian-vector products each solver really used (CG stops early at negative curvature)
    op = linalg.hvp_operator(inner, w, lam)
    b = torch.func.grad(outer)(w, lam)
    products = {name: solve(op, b, return_info=True)[1].matvecs for name, solve in solvers.items()}
    products["Neumann-5 rev, alpha=None"] = linalg.solve_neumann(op, b, iters=5, return_info=True)[1].matvecs
    fns["Neumann-5 rev, alpha=None"] = functools.partial(
        hypergradient, inner, outer, w, lam, solve=functools.partial(linalg.solve_neumann, iters=5))
    fns.update(torchopt_methods(inner, outer, w, lam, (5, 20), alpha))
    med = time_rounds(fns, args.rounds, args.warmup)
    med = {"grad L_T (unit)": med.pop("10 x grad L_T") / 10, **med}
    unit = med["grad L_T (unit)"]
    n = tree.num_elements(w)
    print(f"\n## Cost of one hypergradient (MLP 4-{args.hidden}-{args.hidden}-3 {args.activation}, {n} params "
          f"and hyperparameters, float32, {torch.get_num_threads()} thread(s), lambda_max ~ {float(lam_max):.3g}, "
          f"medians of {args.rounds} interleaved rounds)\n")
    print("| method | Hessian-vector products | time (ms) | in grads of L_T |")
    print("| --- | --- | --- | --- |")
    for k, t in med.items():
        used = products.get(k, products.get(k.rsplit(" ", 1)[0], "-"))
        print(f"| {k} | {used} | {t * 1e3:.2f} | {t / unit:.1f} |")
    for terms in (5, 20):
        for kind in ("Neumann", "CG"):
            r, f = med[f"{kind}-{terms} rev"], med[f"{kind}-{terms} fwd"]
            print(f"{kind}-{terms}: fwd / rev = {f / r:.2f}")
    return med


def _exact_setup(args, decay):
    """Solves the inner problem to ||grad|| < 1e-10: Adam, then L-BFGS, then guarded Newton."""
    inner, outer, w0, lam = make_problem(args.exact_hidden, torch.float64, torch.tanh, decay=decay)
    w = minimize_inner(inner, w0, lam, funcopt.adam(1e-2), 1000)
    flat, unravel = tree.ravel(w)
    f = lambda v: inner(unravel(v), lam)
    x = flat.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=2000, tolerance_grad=1e-13, tolerance_change=0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    opt.step(closure)
    flat = x.detach()
    for _ in range(5):
        g = torch.func.grad(f)(flat)
        H = torch.func.hessian(f)(flat)
        if float(g.norm()) < 1e-12 or float(torch.linalg.eigvalsh(H)[0]) <= 0:
            break
        flat = flat - torch.linalg.solve(H, g)
    w = unravel(flat)
    gnorm = float(tree.norm(torch.func.grad(inner)(w, lam)))
    eig = torch.linalg.eigvalsh(torch.func.hessian(f)(flat))
    exact = hypergradient(inner, outer, w, lam, solve=linalg.solve_dense)
    return inner, outer, w, lam, exact, gnorm, eig


def accuracy_table(args, decay):
    inner, outer, w, lam, exact, gnorm, eig = _exact_setup(args, decay)
    e = tree.ravel(exact)[0]
    alpha = 1.0 / float(eig[-1])
    print(f"\n## Accuracy vs the exact hypergradient (MLP 4-{args.exact_hidden}-{args.exact_hidden}-3 tanh, "
          f"{e.numel()} params, float64, decays exp(lambda) ~ {decay:g} x lognormal, ||grad L_T|| = {gnorm:.1e}, Hessian eigenvalues in "
          f"[{float(eig[0]):.3g}, {float(eig[-1]):.3g}], Neumann alpha = 1/lambda_max = {alpha:.3g})\n")
    print("| solver | terms | cosine | relative error | norm ratio | time (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for terms in (1, 5, 10, 20, 50, 100, 200, 500):
        for name, solve in [
            ("Neumann", functools.partial(linalg.solve_neumann, iters=terms, alpha=alpha)),
            ("CG", functools.partial(linalg.solve_cg, maxiter=terms, on_negative_curvature="raise")),
        ]:
            if name == "CG" and terms > 200:
                continue
            reps = []
            for _ in range(3):
                t = time.perf_counter()
                hg = hypergradient(inner, outer, w, lam, solve=solve)
                reps.append(time.perf_counter() - t)
            h = tree.ravel(hg)[0]
            cos = float(h @ e / (h.norm() * e.norm()))
            rel = float((h - e).norm() / e.norm())
            ratio = float(h.norm() / e.norm())
            rows.append((name, terms, cos, rel, ratio))
            print(f"| {name} | {terms} | {cos:.4f} | {rel:.2e} | {ratio:.3f} | {statistics.median(reps) * 1e3:.1f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--activation", choices=["relu", "tanh"], default="relu")
    p.add_argument("--train-steps", type=int, default=500)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--exact-hidden", type=int, default=16)
    p.add_argument("--exact-decays", type=float, nargs="+", default=[1e-2, 1.0],
                   help="typical weight decay of the accuracy problems (larger: better conditioned)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.skip_accuracy:
        for decay in args.exact_decays:
            accuracy_table(args, decay)
    if not args.skip_cost:
        cost_table(args)


if __name__ == "__main__":
    main()
