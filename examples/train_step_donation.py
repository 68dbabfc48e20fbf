"""The recommended training loop: funcopt.make_step with donation, on the digits data set.

Trains a 64-256-256-10 MLP on scikit-learn's bundled 8x8 digits with Adam three ways and
checks that they agree:

- ``make_step(loss_fn, tx)`` (donate=True, the default): the step gives the params and the
  optimizer state's buffers to torch's fused Adam kernel, which updates them in place;
- ``make_step(loss_fn, tx, donate=False)``: the pure step, which leaves its inputs untouched
  (on the CPU through funcopt.fast.native's single-pass kernels where they build, and once more
  with them switched off, torch's kernels on copies);
- ``torch.optim.Adam(fused=True)`` on an identical ``nn.Module``, the usual PyTorch loop.

It prints the test accuracy, the largest parameter difference between the three runs, and the
median time per step of each. Donation's one rule: always rebind the results,
``params, opt_state, loss = step(params, opt_state, x, y)``; the params tensors now hold the
new values (clone before the call what you want to keep) and the old opt_state is invalid.

Run:  python examples/train_step_donation.py          (20 epochs, about a minute on 2 cores)
      python examples/train_step_donation.py --fast   (CI smoke run, a few seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import funcopt
from funcopt import tree


def build_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="2 epochs of batch 128 (CI smoke run)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    epochs = 2 if args.fast else args.epochs
    batch = 128 if args.fast else args.batch
    torch.set_num_threads(min(2, torch.get_num_threads()))

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    model = build_model(0)
    reference = build_model(0)  # identical weights, trained by torch.optim

    def loss_fn(params, xb, yb):
        return F.cross_entropy(funcopt.nn.apply(model, params, None, xb), yb)

    tx = funcopt.adam(1e-3)
    backend = getattr(funcopt.fast, "native", None)  # the optional backend of single-pass CPU kernels
    native = backend is not None and backend.available()  # (built here on first use)
    print(f"funcopt.fast.native kernels: {'built' if native else backend.unavailable_reason() if backend else 'not installed'}")
    configs = [("make_step (donate=True)", True, True), ("make_step (donate=False)", False, True)]
    if native:
        configs.append(("make_step (donate=False), no native", False, False))
    runs = {}
    for name, donate, use_native in configs:
        params, _ = funcopt.nn.extract(model)
        opt_state = tx.init(params)
        step = funcopt.make_step(loss_fn, tx, donate=donate)
        times = []
        with backend.enabled(use_native) if backend is not None else contextlib.nullcontext():
            for epoch in range(epochs):
                order = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))]
                for i in range(0, len(order), batch):
                    idx = order[i : i + batch]
                    t = time.perf_counter()
                    params, opt_state, loss = step(params, opt_state, X[idx], y[idx])
                    times.append(time.perf_counter() - t)
        runs[name] = (params, statistics.median(times))

    torch_opt = torch.optim.Adam(reference.parameters(), lr=1e-3, fused=True)
    times = []
    for epoch in range(epochs):
        order = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))]
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            t = time.perf_counter()
            torch_opt.zero_grad()
            F.cross_entropy(reference(X[idx]), y[idx]).backward()
            torch_opt.step()
            times.append(time.perf_counter() - t)
    runs["torch.optim.Adam(fused=True)"] = (dict(reference.named_parameters()), statistics.median(times))

    donated = runs["make_step (donate=True)"][0]
    print(f"{'run':36s} {'test acc':>8s} {'max |param diff|':>17s} {'ms/step':>8s}")
    for name, (params, median) in runs.items():
        params = tree.map(torch.detach, params)
        with torch.no_grad():
            acc = (funcopt.nn.apply(model, params, None, X[test]).argmax(1) == y[test]).float().mean().item()
        diff = max((a - b).abs().max().item() for a, b in zip(tree.leaves(params), tree.leaves(donated)))
        print(f"{name:36s} {acc:8.3f} {diff:17.2e} {median * 1e3:8.3f}")
        assert diff < 1e-4, f"{name} diverged from the donated run by {diff}"
        assert acc > (0.5 if args.fast else 0.9), f"{name}: test accuracy {acc:.3f} is too low"


if __name__ == "__main__":
    main()
