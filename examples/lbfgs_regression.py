"""L-BFGS with funcopt: linear and logistic regression, stopped mid-way, saved, resumed, finished.

The linear-regression part is the seed article's ``torch.optim.LBFGS`` example done right:

* the true coefficients match the 10 features (the article used 9 with a 10-feature model,
  which does not even broadcast), and predictions (N, 1) are compared with targets (N, 1)
  (the article's ``MSELoss`` broadcast (N, 1) against (N,) into an (N, N) matrix);
* the loss and its gradient are computed by a function of the params, which L-BFGS may call
  several times per step (``torch.optim.LBFGS`` needs a closure; the article called
  ``optimizer.step()`` without one, which raises);
* the optimizer history (L-BFGS pairs, line-search value and gradient, step counts) is an
  ordinary state pytree: it is saved in a safe checkpoint half way, loaded back on whatever
  device is available, and the resumed run ends bitwise where an uninterrupted run ends;
* the result is checked against the closed-form least-squares solution.

The second part fits L2-regularized logistic regression on scikit-learn's bundled
breast_cancer data (a torch.nn.Linear model, trained through funcopt.nn) and checks the
weights against scikit-learn's own solver.

Run: python examples/lbfgs_regression.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

import torch

import funcopt
from funcopt import checkpoint

DTYPE = torch.float64


def linear_data(n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g, dtype=DTYPE)
    coef = torch.arange(2.0, 12.0, dtype=DTYPE).reshape(10, 1)  # 10 coefficients for 10 features
    y = x @ coef + 10.0 + 0.1 * torch.randn(n, 1, generator=g, dtype=DTYPE)  # (N, 1) targets
    return x, y


def run_in_two_halves(loss, params, tx, steps_first, out_path, device):
    """Runs ``steps_first`` L-BFGS steps, saves, loads on ``device`` and finishes the run."""
    first = funcopt.minimize(loss, params, tx, max_steps=steps_first, tol=1e-8)
    checkpoint.save(out_path, {"params": first.params, "opt_state": first.state}, step=first.num_steps)
    template = {"params": params, "opt_state": tx.init(params)}
    restored = checkpoint.load(out_path, like=template, device=device)
    print(f"  saved after {first.num_steps} steps ({first.num_evals} evaluations) to {out_path}, "
          f"loss {float(first.value):.6f}; resumed on {device}")
    second = funcopt.minimize(loss, restored["params"], tx, max_steps=200, tol=1e-8, state=restored["opt_state"])
    return first, second


def linear_regression(out_dir, device):
    print("Linear regression (the seed's example, fixed)")
    x, y = linear_data()
    torch.manual_seed(0)  # the model's initial weights
    model = torch.nn.Linear(10, 1).to(DTYPE)
    params, _ = funcopt.nn.extract(model)

    def loss(p, x=x, y=y):
        pred = funcopt.nn.apply(model, p, None, x)  # (N, 1), same shape as y
        return torch.nn.functional.mse_loss(pred, y)

    tx = funcopt.lbfgs(memory_size=10)
    first, second = run_in_two_halves(loss, params, tx, 5, os.path.join(out_dir, "linreg_mid.safetensors"), device)
    whole = funcopt.minimize(loss, params, tx, max_steps=205, tol=1e-8)
    same = all(torch.equal(a.cpu(), b) for a, b in zip(funcopt.tree.leaves(second.params), funcopt.tree.leaves(whole.params)))
    print(f"  finished: {first.num_steps + second.num_steps} steps, {first.num_evals + second.num_evals} "
          f"evaluations, loss {float(second.value):.6f}, converged={second.converged}")
    print(f"  resumed run equals the uninterrupted run bitwise: {same}")

    # Closed-form least squares with an intercept column.
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], 1)
    sol = torch.linalg.lstsq(xb, y).solution.reshape(-1)
    fitted = torch.cat([second.params["weight"].reshape(-1).cpu(), second.params["bias"].cpu()])
    err = float((fitted - sol).abs().max())
    print(f"  max |coef - least squares| = {err:.2e}; coefficients {[round(v, 3) for v in fitted.tolist()]}")
    assert same and err < 1e-6, "linear regression check failed"


def logistic_regression(out_dir, device, c=1.0):
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    print("Logistic regression on breast_cancer (569 samples, 30 standardized features)")
    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=DTYPE)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=DTYPE).reshape(-1, 1)
    lam = 1.0 / (c * len(y))  # sklearn minimizes C * sum(logloss) + |w|^2 / 2

    model = torch.nn.Linear(30, 1).to(DTYPE)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    params, _ = funcopt.nn.extract(model)

    def loss(p, x=x, y=y):
        logits = funcopt.nn.apply(model, p, None, x)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 0.5 * lam * torch.sum(p["weight"] ** 2)

    tx = funcopt.lbfgs()
    first, second = run_in_two_halves(loss, params, tx, 10, os.path.join(out_dir, "logreg_mid.safetensors"), device)
    print(f"  finished: {first.num_steps + second.num_steps} steps, {first.num_evals + second.num_evals} "
          f"evaluations, loss {float(second.value):.6f}, |grad| {second.grad_norm:.1e}, converged={second.converged}")
    funcopt.nn.load(model, funcopt.tree.map(lambda t: t.cpu(), second.params))
    with torch.no_grad():
        acc = float(((model(x) > 0).to(DTYPE) == y).to(DTYPE).mean())
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x.numpy(), data.target)
    err = float((model.weight.detach().reshape(-1) - torch.tensor(ref.coef_.reshape(-1))).abs().max())
    print(f"  training accuracy {acc:.4f} (sklearn {ref.score(x.numpy(), data.target):.4f}); "
          f"max |w - sklearn w| = {err:.1e}")
    assert second.converged and err < 1e-4, "logistic regression check failed"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="CI mode (the example is quick anyway)")
    parser.add_argument("--out", default=".", help="directory for the mid-run checkpoints")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    linear_regression(args.out, device)
    logistic_regression(args.out, device)


if __name__ == "__main__":
    main()
