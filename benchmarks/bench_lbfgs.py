"""Convergence and efficiency of funcopt.lbfgs vs torch.optim.LBFGS and scipy's L-BFGS-B.

Problems (float64): Rosenbrock 2-D and 100-D from (-1.2, 1, -1.2, 1, ...), a 100-D quadratic
with condition number 1e4 (random rotation, seed 0), and L2-regularized logistic regression on
scikit-learn's breast_cancer data (standardized, 30 features + bias, lambda = 1e-3).

Fair counting: every method sees the same objective wrapper, which counts each value+gradient
evaluation as one and records the first evaluation whose gradient has L2 norm <= tol. All three
methods use memory 10. The reference optimum is independent of all three: ones for Rosenbrock,
a linear solve for the quadratic, Newton's method with the exact Hessian for the logistic loss.
Wall times are medians over --repeats runs after one warm-up, methods interleaved.

Run: python benchmarks/bench_lbfgs.py [--tol 1e-8] [--repeats 5] [--fast]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.optimize
import torch

import funcopt
from funcopt.solvers import lbfgs
from funcopt.solvers import minimize

DTYPE = torch.float64


class _Converged(Exception):
    pass


def rosenbrock(n):
    x0 = torch.full((n,), -1.2, dtype=DTYPE)
    x0[1::2] = 1.0

    def f(x):
        return torch.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

    return f, x0, torch.ones(n, dtype=DTYPE)


def quadratic(n=100, cond=1e4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    eig = torch.logspace(0, float(np.log10(cond)), n, dtype=DTYPE)
    a = (q * eig) @ q.T
    a = 0.5 * (a + a.T)
    c = torch.randn(n, generator=g, dtype=DTYPE)

    def f(x):
        r = x - c
        return 0.5 * r @ (a @ r)

    return f, torch.zeros(n, dtype=DTYPE), c


def logistic(lam=1e-3):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=DTYPE)
    x = (x - x.mean(0)) / x.std(0)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], 1)
    y = torch.tensor(data.target, dtype=DTYPE)

    def f(w):
        z = x @ w
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.5 * lam * (w[:-1] @ w[:-1])

    w = torch.zeros(x.shape[1], dtype=DTYPE)
    reg = torch.eye(x.shape[1], dtype=DTYPE) * lam
    reg[-1, -1] = 0.0
    for _ in range(50):  # Newton with the exact Hessian: an independent reference optimum
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) / len(y) + reg @ w
        hess = (x.T * (p * (1 - p))) @ x / len(y) + reg
        w = w - torch.linalg.solve(hess, grad)
    return f, torch.zeros(x.shape[1], dtype=DTYPE), w


PROBLEMS = {
    "rosenbrock-2": lambda: rosenbrock(2),
    "rosenbrock-100": lambda: rosenbrock(100),
    "quadratic-100 (cond 1e4)": quadratic,
    "logistic breast_cancer": logistic,
}


class Counter:
    """Wraps f: counts value+grad evaluations, records the first one with |g| <= tol."""

    def __init__(self, f, tol, raise_on_converge):
        self.f, self.tol, self.raise_on_converge = f, tol, raise_on_converge
        self.evals, self.first, self.x, self.best = 0, None, None, float("inf")

    def record(self, x, value, grad):
        self.evals += 1
        self.best = min(self.best, float(torch.linalg.vector_norm(grad)))
        if self.first is None and float(torch.linalg.vector_norm(grad)) <= self.tol:
            self.first, self.x = self.evals, x.detach().clone()
            if self.raise_on_converge:
                raise _Converged


def run_funcopt(f, x0, tol, max_steps=5000):
    counter = Counter(f, tol, False)

    def fun(p):
        return f(p["x"])

    res = minimize(fun, {"x": x0.clone()}, lbfgs(memory_size=10), max_steps=max_steps, tol=tol)
    counter.evals, counter.x, counter.best = res.num_evals, res.params["x"], res.grad_norm
    counter.first = res.num_evals if res.converged else None
    return counter, res.num_steps, res.converged


def run_torch(f, x0, tol, max_iter=5000):
    counter = Counter(f, tol, True)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x], lr=1, max_iter=max_iter, max_eval=10 * max_iter, tolerance_grad=0.0,
        tolerance_change=0.0, history_size=10, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        v = f(x)
        v.backward()
        counter.record(x, v, x.grad)
        return v

    try:
        opt.step(closure)
    except _Converged:
        pass
    return counter, opt.state[x]["n_iter"], counter.first is not None


def run_scipy(f, x0, tol, max_iter=5000):
    counter = Counter(f, tol, True)
    iters = [0]

    def fg(z):
        x = torch.tensor(z, dtype=DTYPE, requires_grad=True)
        v = f(x)
        (g,) = torch.autograd.grad(v, x)
        counter.record(x, v, g)
        return float(v.detach()), g.numpy()

    try:
        scipy.optimize.minimize(
            fg, x0.numpy(), jac=True, method="L-BFGS-B",
            callback=lambda _: iters.__setitem__(0, iters[0] + 1),
            options={"maxcor": 10, "maxiter": max_iter, "maxfun": 10 * max_iter, "gtol": 0.0, "ftol": 0.0},
        )
    except _Converged:
        pass
    return counter, iters[0] + (1 if counter.first is not None else 0), counter.first is not None


METHODS = {"funcopt.lbfgs": run_funcopt, "torch LBFGS": run_torch, "scipy L-BFGS-B": run_scipy}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-8, help="gradient L2-norm tolerance")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--fast", action="store_true", help="small problems only, one repeat")
    parser.add_argument("--problems", nargs="*", default=None, help=f"subset of {list(PROBLEMS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = list(PROBLEMS)[:1] if args.fast else (args.problems or list(PROBLEMS))
    repeats = 1 if args.fast else args.repeats
    print(f"funcopt {funcopt.__version__}, torch {torch.__version__}, tol={args.tol:g} (|grad|_2), float64")
    print("| problem | method | iterations | evaluations | f - f* | max abs x - x* | ms (median) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        f, x0, xstar = PROBLEMS[name]()
        fstar = float(f(xstar))
        times = {m: [] for m in METHODS}
        outcome = {}
        for rep in range(repeats + 1):
            for mname, method in METHODS.items():
                t0 = time.perf_counter()
                counter, iters, ok = method(f, x0, args.tol)
                dt = time.perf_counter() - t0
                if rep > 0 or repeats == 1:
                    times[mname].append(dt)
                outcome[mname] = (counter, iters, ok)
        for mname in METHODS:
            counter, iters, ok = outcome[mname]
            ms = 1000 * statistics.median(times[mname])
            if not ok:
                print(f"| {name} | {mname} | {iters} | {counter.evals} (stopped) | stalled at grad norm "
                      f"{counter.best:.1e} | | {ms:.1f} |")
                continue
            fx = float(f(counter.x))
            dx = float((counter.x - xstar).abs().max())
            print(f"| {name} | {mname} | {iters} | {counter.first} | {fx - fstar:.1e} | {dx:.1e} | {ms:.1f} |")


if __name__ == "__main__":
    main()
