"""Data-parallel functional training on torch.distributed, with a DCP checkpoint.

Each rank holds the same params and optimizer state, computes gradients on its share of every
batch, and `funcopt.distributed.average_gradients()` averages them (all_reduce) before AdamW.
The run is saved with torch.distributed.checkpoint and restored in a single process at the end
(a checkpoint saved by N ranks loads with any number of ranks).

    torchrun --nproc-per-node 2 examples/distributed_train.py     # torchrun starts the ranks
    python examples/distributed_train.py --nproc 2                 # starts 2 local gloo ranks itself
    python examples/distributed_train.py --fast                    # a few seconds (CI)
    torchrun --nproc-per-node 2 examples/distributed_train.py --sweep   # 8-config sweep split over ranks

Data: scikit-learn's bundled digits (8x8 images, 10 classes); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import funcopt
from funcopt import distributed as fd


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return (X[:1400], y[:1400]), (X[1400:], y[1400:])


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def make_tx(steps: int, distributed: bool) -> funcopt.GradientTransformation:
    schedule = lambda count: 3e-3 * (1 - 0.9 * count / steps)  # linear decay to 10%
    adamw = funcopt.adamw(learning_rate=schedule, weight_decay=1e-4)
    return funcopt.chain(fd.average_gradients() if distributed else funcopt.identity(), adamw)


def accuracy(model, params, X, y) -> float:
    with torch.no_grad():
        return (funcopt.nn.apply(model, params, None, X).argmax(-1) == y).float().mean().item()


def train(data, epochs: int, batch_size: int, ckpt_dir: str) -> dict:
    """Runs on every rank (or alone in one process). Returns this rank's summary."""
    rank, world = fd.rank_and_world_size()
    distributed = fd.is_initialized()
    torch.manual_seed(0)
    (X, y), (X_test, y_test) = data
    model = make_model()
    params, _ = funcopt.nn.extract(model)
    if distributed:
        params = fd.broadcast(params)  # every rank starts from rank 0's initialization
    steps_per_epoch = len(X) // batch_size
    tx = make_tx(epochs * steps_per_epoch, distributed)
    state = tx.init(params)

    def loss_fn(p, xb, yb):
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(model, p, None, xb), yb)

    grad_fn = torch.func.grad_and_value(loss_fn)
    order = torch.Generator().manual_seed(1)  # the same shuffle on every rank
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(X), generator=order)
        total = torch.zeros(())
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = fd.shard((X[idx], y[idx]), rank, world) if distributed else (X[idx], y[idx])
            grads, loss = grad_fn(params, xb, yb)
            updates, state = tx.update(grads, state, params)
            params = funcopt.apply_updates(params, updates)
            total += loss.detach()
        mean_loss = fd.all_reduce(total / steps_per_epoch) if distributed else total / steps_per_epoch
        if rank == 0:
            print(f"epoch {epoch + 1}/{epochs}  loss {mean_loss.item():.4f}  ranks {world}", flush=True)
    seconds = time.perf_counter() - start
    fd.save(ckpt_dir, {"params": params, "opt_state": state, "epoch": epochs})
    return {"world_size": world, "seconds": seconds, "test_accuracy": accuracy(model, params, X_test, y_test)}


def rank_main(data, epochs: int, batch_size: int, ckpt_dir: str) -> dict:
    """What `funcopt.distributed.launch` runs in each local process (data loaded once by the parent)."""
    return train(data, epochs, batch_size, ckpt_dir)


def restore_in_one_process(data, ckpt_dir: str) -> float:
    """Loads the (possibly multi-rank) checkpoint here, without a process group."""
    (_, _), (X_test, y_test) = data
    model = make_model()
    params, _ = funcopt.nn.extract(model)
    like = {"params": params, "opt_state": make_tx(1, False).init(params), "epoch": 0}
    info = fd.checkpoint_info(ckpt_dir)
    restored = fd.load(ckpt_dir, like)
    acc = accuracy(model, restored["params"], X_test, y_test)
    print(
        f"restored in 1 process a checkpoint saved by {info['world_size']} rank(s) "
        f"(epoch {restored['epoch']}): test accuracy {acc:.3f}"
    )
    return acc


def sweep_rank(data, steps: int) -> str | None:
    """A learning-rate x weight-decay grid split over the ranks; the table comes back on rank 0."""
    from funcopt import sweep as S

    (X, y), (X_test, y_test) = data
    torch.manual_seed(0)  # the same initial params on every rank
    model = make_model()
    params, _ = funcopt.nn.extract(model)

    def loss_fn(p, batch):
        xb, yb = batch
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(model, p, None, xb), yb)

    def eval_fn(p):
        return {"test_acc": (funcopt.nn.apply(model, p, None, X_test).argmax(-1) == y_test).float().mean()}

    batches = [(X[i : i + 100], y[i : i + 100]) for i in range(0, len(X), 100)]
    hp = S.grid(learning_rate=[1e-3, 3e-3, 1e-2, 3e-2], weight_decay=[0.0, 1e-2])
    res = fd.sweep(loss_fn, params, funcopt.adamw, hp, batches, steps=steps, eval_fn=eval_fn,
                   metric="test_acc", mode="max")
    return None if res is None else res.table()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a short run (CI)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100, help="global batch size (split over ranks)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks to start without torchrun (1: no group)")
    parser.add_argument("--out", default=".", help="directory for the checkpoint")
    parser.add_argument("--sweep", action="store_true", help="run an 8-configuration sweep split over the ranks instead")
    args = parser.parse_args()
    epochs = 2 if args.fast else args.epochs
    ckpt_dir = os.path.join(args.out, "distributed_ckpt")
    os.makedirs(args.out, exist_ok=True)

    sweep_steps = 30 if args.fast else 14 * args.epochs
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        try:
            if args.sweep:
                table = sweep_rank(load_data(), sweep_steps)
                if table is not None:
                    print(table)
                return
            summary = train(load_data(), epochs, args.batch_size, ckpt_dir)
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) == 0:
            print(f"test accuracy {summary['test_accuracy']:.3f} after {summary['seconds']:.1f} s of training")
            restore_in_one_process(load_data(), ckpt_dir)
        return

    data = load_data()
    if args.sweep:
        print(fd.launch(sweep_rank, max(args.nproc, 1), (data, sweep_steps))[0])
        return
    if args.nproc > 1:
        results = fd.launch(rank_main, args.nproc, (data, epochs, args.batch_size, ckpt_dir))
        summary = results[0]
        assert all(r["test_accuracy"] == summary["test_accuracy"] for r in results), "replicas diverged"
    else:
        summary = train(data, epochs, args.batch_size, ckpt_dir)
    print(
        f"{summary['world_size']} rank(s): test accuracy {summary['test_accuracy']:.3f} after "
        f"{summary['seconds']:.1f} s of training"
    )
    acc = restore_in_one_process(data, ckpt_dir)
    assert abs(acc - summary["test_accuracy"]) < 1e-6, "the restored params differ from the trained ones"


if __name__ == "__main__":
    main()
