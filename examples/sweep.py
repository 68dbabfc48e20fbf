"""Sweep learning rate x weight decay (8 x 4 = 32 AdamW configurations) of an MLP on digits,
all trained at once as one vmapped program.

    python examples/sweep.py              # 600 steps, ~1 minute on 2 CPU cores
    python examples/sweep.py --fast       # 60 steps, a few seconds (what CI runs)
    python examples/sweep.py --halving    # successive halving: drop the worse half per rung

Every configuration sees the same minibatches and starts from the same initialization. The
configurations are ranked by validation accuracy; the best one's test accuracy is reported, the
table printed and the plot saved to ``sweep.png`` (in ``--out``, default: the current directory).
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import funcopt
from funcopt import sweep as S


def load_data(seed: int = 0):
    X, y = load_digits(return_X_y=True)
    X_tmp, X_test, y_tmp, y_test = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    X_train, X_val, y_train, y_val = train_test_split(X_tmp, y_tmp, test_size=0.2, random_state=seed, stratify=y_tmp)
    mean, std = X_train.mean(0), X_train.std(0) + 1e-6
    to_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return [(to_x(a), torch.tensor(b)) for a, b in ((X_train, y_train), (X_val, y_val), (X_test, y_test))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer steps (for CI)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--halving", action="store_true", help="use successive halving (3 rungs, keep 1/2)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."), help="directory for sweep.png")
    args = parser.parse_args()
    steps = 60 if args.fast else args.steps
    torch.manual_seed(0)

    (X_train, y_train), (X_val, y_val), (X_test, y_test) = load_data()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    params, buffers = funcopt.nn.extract(model)

    # loss_fn and eval_fn are written for ONE configuration; the sweep vmaps them over K.
    def loss_fn(p, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(model, p, buffers, x), y)

    def eval_fn(p):
        logits = funcopt.nn.apply(model, p, buffers, X_val)
        return {"val_acc": (logits.argmax(-1) == y_val).float().mean(),
                "val_loss": torch.nn.functional.cross_entropy(logits, y_val)}

    batch_size = 64
    g = torch.Generator().manual_seed(0)
    per_epoch = len(X_train) // batch_size
    orders = [torch.randperm(len(X_train), generator=g) for _ in range(steps // per_epoch + 1)]

    def batch(step):
        idx = orders[step // per_epoch][(step % per_epoch) * batch_size:][:batch_size]
        return X_train[idx], y_train[idx]

    hparams = S.grid(
        learning_rate=[1e-4 * 3.0 ** (i / 1.0) for i in range(8)],  # 1e-4 ... 0.22, log-spaced
        weight_decay=[0.0, 1e-3, 1e-2, 1e-1],
    )
    common = dict(eval_fn=eval_fn, metric="val_acc", mode="max", progress=not args.fast)
    if args.halving:
        result = S.successive_halving(loss_fn, params, funcopt.adamw, hparams, batch, steps=steps,
                                      rungs=3, keep=0.5, **common)
    else:
        result = S.sweep(loss_fn, params, funcopt.adamw, hparams, batch, steps=steps,
                         eval_every=max(1, steps // 4), **common)

    print(result.table(max_rows=12 if args.fast else None))
    best = result.best()
    with torch.no_grad():
        test_acc = (funcopt.nn.apply(model, best.params, buffers, X_test).argmax(-1) == y_test).float().mean()
    hp = ", ".join(f"{k}={v:.3g}" for k, v in best.hparams.items())
    print(f"\n{result.k} configurations x {steps} steps in {result.seconds:.1f} s (optimizer step: {result.step_mode})")
    print(f"best: config {best.index} ({hp}): val_acc {best.value:.4f}, test accuracy {float(test_acc):.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    result.plot(args.out / "sweep.png")
    print(f"plot saved to {args.out / 'sweep.png'}")


if __name__ == "__main__":
    main()
