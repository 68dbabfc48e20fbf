"""Quickstart: a functional training loop with funcopt on scikit-learn's bundled digits.

    python examples/quickstart.py            # ~10 s on 2 CPU cores
    python examples/quickstart.py --fast     # a few seconds (what CI runs)

The model is an ordinary nn.Module; its parameters become a pytree (a dict of tensors) that
`funcopt.grad_and_value` differentiates (the numbers of `torch.func.grad_and_value`, with less
per-call overhead) and `funcopt.adam` updates without mutating anything.
The same loop with torch.optim.Adam is run side by side to show that the numbers agree.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import funcopt


def load_data(seed: int = 0):
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = X_train.mean(0), X_train.std(0) + 1e-6
    to_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    return to_x(X_train), torch.tensor(y_train), to_x(X_test), torch.tensor(y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer epochs (for CI)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    epochs = 5 if args.fast else args.epochs
    torch.manual_seed(0)

    X_train, y_train, X_test, y_test = load_data()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    reference = copy.deepcopy(model)  # trained with torch.optim for comparison

    # --- the functional loop -------------------------------------------------------------
    params, buffers = funcopt.nn.extract(model)
    tx = funcopt.adam(learning_rate=args.lr)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = funcopt.nn.apply(model, params, buffers, x)
        return torch.nn.functional.cross_entropy(logits, y)

    grad_and_loss = funcopt.grad_and_value(loss_fn)  # or torch.func.grad_and_value(loss_fn): same numbers
    batch_size = 64
    g = torch.Generator().manual_seed(0)
    orders = [torch.randperm(len(X_train), generator=g) for _ in range(epochs)]

    start = time.perf_counter()
    for epoch in range(epochs):
        for idx in orders[epoch].split(batch_size):
            grads, loss = grad_and_loss(params, X_train[idx], y_train[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            params = funcopt.apply_updates(params, updates)
    seconds = time.perf_counter() - start

    with torch.no_grad():
        logits = funcopt.nn.apply(model, params, buffers, X_test)
    accuracy = (logits.argmax(1) == y_test).float().mean().item()

    # --- the same training with torch.optim.Adam ------------------------------------------
    opt = torch.optim.Adam(reference.parameters(), lr=args.lr)
    for epoch in range(epochs):
        for idx in orders[epoch].split(batch_size):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(X_train[idx]), y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        ref_accuracy = (reference(X_test).argmax(1) == y_test).float().mean().item()
    max_diff = max((params[k] - p).abs().max().item() for k, p in reference.named_parameters())

    print(f"funcopt.adam     test accuracy {accuracy:.4f}  ({epochs} epochs, {seconds:.1f} s)")
    print(f"torch.optim.Adam test accuracy {ref_accuracy:.4f}")
    print(f"max |param difference| funcopt vs torch.optim: {max_diff:.2e}")
    assert abs(accuracy - ref_accuracy) < 0.01, "funcopt and torch.optim should agree"
    if not args.fast:
        assert accuracy > 0.95, f"expected 95%+ test accuracy, got {accuracy:.3f}"


if __name__ == "__main__":
    main()
