"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`) and funcopt's functional route.

`fully_shard` splits every parameter, gradient and (here) optimizer-state tensor over the ranks
as DTensor shards. `funcopt.distributed.module_step(tx, state, model)` runs `tx.update` on the
sharded gradients and parameters and adds the updates in place: the elementwise AdamW step
runs on each rank's local shards (the fast route; `funcopt.fast.explain` says so) and the
global-norm clipping reduces over the whole model (one scalar all-reduce). The run is saved
with torch.distributed.checkpoint midway, resumed from it, and finally loaded into one process.

    torchrun --nproc-per-node 2 examples/fsdp_train.py    # torchrun starts the ranks (CPU: gloo)
    python examples/fsdp_train.py --nproc 4               # starts 4 local gloo ranks itself
    python examples/fsdp_train.py --fast                  # a few seconds (CI)

Data: scikit-learn's bundled digits (8x8 images, 10 classes); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import funcopt
from funcopt import distributed as fd


def load_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], torch.tensor(y)[perm]
    return (X[:1400], y[:1400]), (X[1400:], y[1400:])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initialization on every rank
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_tx() -> funcopt.GradientTransformation:
    return funcopt.chain(funcopt.clip_by_global_norm(1.0), funcopt.adamw(3e-3, weight_decay=1e-4))


def run_epochs(model, tx, state, data, epochs, batch_size, first_epoch=0):
    (X, y), _ = data
    rank, world = fd.rank_and_world_size()
    for epoch in range(first_epoch, epochs):
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))  # same on every rank
        total = torch.zeros(())
        for i in range(len(X) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = fd.shard((X[idx], y[idx]))  # this rank's share; FSDP2 averages the gradients
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            state = fd.module_step(tx, state, model)
            model.zero_grad()
            total += loss.detach()
        mean = fd.all_reduce(total / (len(X) // batch_size))
        if rank == 0:
            print(f"epoch {epoch + 1}/{epochs}  loss {mean.item():.4f}  ranks {world}", flush=True)
    return state


def accuracy(model, data) -> float:
    _, (X_test, y_test) = data
    with torch.no_grad():
        return (model(X_test).argmax(-1) == y_test).float().mean().item()


def train(data, epochs: int, batch_size: int, ckpt_dir: str) -> dict:
    """Runs on every rank, after init_process_group."""
    rank, world = fd.rank_and_world_size()
    model = shard(make_model())
    tx = make_tx()
    state = tx.init(fd.module_params(model))  # DTensors: each rank holds its shard of mu and nu
    whole = fd.local_nbytes(tx.init(fd.module_params(make_model())))  # the same state, unsharded
    if rank == 0:
        print(f"AdamW state per rank: {fd.local_nbytes(state):,} bytes (unsharded {whole:,})")
    half = epochs // 2
    state = run_epochs(model, tx, state, data, half, batch_size)
    fd.save(ckpt_dir, {"params": fd.module_params(model), "opt_state": state, "epoch": half})

    # Resume from the checkpoint into a fresh sharded model (any number of ranks could load it).
    model = shard(make_model())
    like = {"params": fd.module_params(model), "opt_state": tx.init(fd.module_params(model)), "epoch": 0}
    restored = fd.load(ckpt_dir, like)
    funcopt.nn.load(model, restored["params"])
    state = restored["opt_state"]
    F.cross_entropy(model(fd.shard(data[0][0][:8])), fd.shard(data[0][1][:8])).backward()  # every rank: FSDP
    adamw = funcopt.adamw(3e-3, weight_decay=1e-4)
    g, p = fd.module_grads(model), fd.module_params(model)
    route = funcopt.fast.explain(adamw, g, adamw.init(p), p)  # nothing runs, no communication
    model.zero_grad()
    if rank == 0:
        print(f"resumed at epoch {restored['epoch']}; AdamW's route: {route}")
    state = run_epochs(model, tx, state, data, epochs, batch_size, first_epoch=half)
    fd.save(ckpt_dir, {"params": fd.module_params(model), "opt_state": state, "epoch": epochs})
    return {"world_size": world, "test_accuracy": accuracy(model, data)}


def restore_in_one_process(data, ckpt_dir: str) -> float:
    model = make_model()
    params = fd.module_params(model)
    restored = fd.load(ckpt_dir, {"params": params, "opt_state": make_tx().init(params), "epoch": 0})
    funcopt.nn.load(model, restored["params"])
    acc = accuracy(model, data)
    info = fd.checkpoint_info(ckpt_dir)
    print(f"restored in 1 process a checkpoint saved by {info['world_size']} rank(s): test accuracy {acc:.3f}")
    return acc


def rank_main(data, epochs: int, batch_size: int, ckpt_dir: str) -> dict:
    """What `funcopt.distributed.launch` runs in each local process."""
    return train(data, epochs, batch_size, ckpt_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a short run (CI)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100, help="global batch size (split over ranks)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks to start without torchrun")
    parser.add_argument("--out", default=".", help="directory for the checkpoint")
    args = parser.parse_args()
    epochs = 2 if args.fast else args.epochs
    ckpt_dir = os.path.join(args.out, "fsdp_ckpt")
    os.makedirs(args.out, exist_ok=True)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")  # CPU; on GPUs: "nccl", the model and batches on cuda
        try:
            summary = train(load_data(), epochs, args.batch_size, ckpt_dir)
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) == 0:
            print(f"test accuracy {summary['test_accuracy']:.3f}")
            restore_in_one_process(load_data(), ckpt_dir)
        return
    data = load_data()
    results = fd.launch(rank_main, max(args.nproc, 2), (data, epochs, args.batch_size, ckpt_dir))
    summary = results[0]
    print(f"{summary['world_size']} ranks: test accuracy {summary['test_accuracy']:.3f}")
    acc = restore_in_one_process(data, ckpt_dir)
    assert abs(acc - summary["test_accuracy"]) < 1e-6, "the restored params differ from the trained ones"


if __name__ == "__main__":
    main()
