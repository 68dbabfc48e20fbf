"""Train, checkpoint, resume exactly, move to another device, and hand over to torch.optim.

1. Trains a small MLP on scikit-learn's digits with AdamW under `inject_hyperparams` (the
   learning rate lives in the optimizer state, so it is checkpointed too), saving with a
   `CheckpointManager` that keeps the 2 newest checkpoints and the best one by validation loss.
2. "Crashes" half way, then resumes in a fresh template from the latest checkpoint and checks
   that the final parameters are bitwise equal to an uninterrupted run.
3. Inspects a checkpoint without loading it (`python -m funcopt inspect PATH` prints the same).
4. Loads the checkpoint onto another device: CUDA if available, else the `meta` device (shapes
   only), and converts dtypes on the way (`dtype=torch.float64`).
5. Continues the run with `torch.optim.AdamW` via `funcopt.interop.to_torch`.

    python examples/checkpoint_resume.py            # 600 steps
    python examples/checkpoint_resume.py --fast     # a few seconds (CI)
    python examples/checkpoint_resume.py --out DIR  # where checkpoints go (default ./checkpoint_resume_out)

Data: scikit-learn's bundled digits (8x8 images, 10 classes); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil

import torch

import funcopt
from funcopt import checkpoint as ck


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return (X[:1400], y[:1400]), (X[1400:], y[1400:])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def make_tx() -> funcopt.GradientTransformation:
    return funcopt.inject_hyperparams(funcopt.adamw)(learning_rate=3e-3, weight_decay=1e-4)


def train(model, tx, params, state, data, start: int, stop: int, mgr=None, every: int = 50, val=None):
    """Steps `start..stop-1` over fixed minibatches (batch i depends only on i, so runs are reproducible)."""
    X, y = data

    def loss_fn(p, xb, yb):
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(model, p, None, xb), yb)

    grad_fn = torch.func.grad(loss_fn)
    for step in range(start, stop):
        idx = torch.randint(0, len(X), (64,), generator=torch.Generator().manual_seed(step))
        updates, state = tx.update(grad_fn(params, X[idx], y[idx]), state, params)
        params = funcopt.apply_updates(params, updates)
        if mgr is not None and (step + 1) % every == 0:
            with torch.no_grad():
                val_loss = loss_fn(params, *val)
            mgr.save(step + 1, {"params": params, "opt_state": state, "step": step + 1}, metrics={"val_loss": val_loss})
    return params, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="few steps, for CI")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="checkpoint_resume_out", help="checkpoint directory")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: more intra-op threads only add synchronisation
    steps = 40 if args.fast else args.steps
    every = 10 if args.fast else 50
    crash_at = (steps // 2) // every * every + every // 2  # mid-way between two checkpoints
    shutil.rmtree(args.out, ignore_errors=True)

    train_data, val = load_data()
    model = make_model()
    params0, _ = funcopt.nn.extract(model)
    tx = make_tx()

    # 1. the uninterrupted reference run
    ref_params, _ = train(model, tx, params0, tx.init(params0), train_data, 0, steps)

    # 2. a run that "crashes" at crash_at, then resumes from the latest complete checkpoint
    mgr = ck.CheckpointManager(args.out, max_to_keep=2, keep_best="val_loss")
    train(model, tx, params0, tx.init(params0), train_data, 0, crash_at, mgr, every, val)
    print(f"crashed at step {crash_at}; checkpoints on disk: {mgr.all_steps()} (best: {mgr.best_step()})")

    # what a restarted process does: build the template (fresh params and state), then restore
    template = {"params": params0, "opt_state": tx.init(params0), "step": 0}
    resumed = ck.CheckpointManager(args.out, max_to_keep=2, keep_best="val_loss")
    restored = resumed.restore(like=template)
    start = restored["step"]
    print(f"resuming from step {start} with lr={float(funcopt.get_hyperparams(restored['opt_state'])['learning_rate']):g}")
    params, state = train(model, tx, restored["params"], restored["opt_state"], train_data, start, steps,
                          resumed, every, val)
    same = all(torch.equal(params[k], ref_params[k]) for k in params)
    print(f"resumed run equals the uninterrupted run bitwise: {same}")
    if not same:
        raise SystemExit("resume was not exact")

    # 3. what is in a checkpoint, from its header alone
    latest = resumed.path(resumed.latest_step())
    print(ck.inspect(latest))

    # 4. onto another device (and dtype) in one call; device_put does the same for in-memory trees
    target = "cuda" if torch.cuda.is_available() else "meta"
    moved = ck.load(latest, device=target, dtype=torch.float64)
    w = moved["params"]["0.weight"]
    print(f"loaded onto {w.device} as {w.dtype}; step count on {moved['opt_state'].count.device}")
    back = ck.device_put(moved, "cpu") if target == "cuda" else None
    if back is not None:
        print(f"and back to {back['params']['0.weight'].device}")

    # 5. continue with torch.optim: same hyperparameters, same moments, same step count
    funcopt.nn.load(model, params)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    opt.load_state_dict(funcopt.interop.to_torch(state, params, opt))
    print(f"torch.optim.AdamW continues at step {int(opt.state_dict()['state'][0]['step'])}")
    X, y = train_data
    for step in range(steps, steps + 5):
        opt.zero_grad()
        idx = torch.randint(0, len(X), (64,), generator=torch.Generator().manual_seed(step))
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(val[0]).argmax(1) == val[1]).float().mean().item()
    print(f"validation accuracy after {steps + 5} steps: {acc:.3f}")


if __name__ == "__main__":
    main()
