"""A funcopt optimizer inside PyTorch Lightning, through `funcopt.as_torch_optimizer`.

`configure_optimizers` is the torch.optim one with one line changed: `as_torch_optimizer(funcopt.adamw,
param_groups, lr=..., weight_decay=...)` instead of `torch.optim.AdamW(param_groups, ...)`, with
torch-style param groups (weight decay on the weight matrices only) and a warmup LambdaLR
stepped every batch. Gradient clipping is Lightning's own (`gradient_clip_val`). Lightning saves
the optimizer's state in the checkpoint and restores it on resume like any torch optimizer.

    pip install lightning            # optional: without it this script says so and exits 0
    python examples/lightning_module.py
    python examples/lightning_module.py --fast     # a few steps (CI)

Data: scikit-learn's bundled digits; nothing is downloaded. Writes only `lightning_demo.ckpt`
in the current directory (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import funcopt

try:
    import lightning as L
except ImportError:  # the optional extra is not installed
    L = None


def load_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return torch.utils.data.TensorDataset(X[:1400], y[:1400]), torch.utils.data.TensorDataset(X[1400:], y[1400:])


if L is not None:

    class DigitsClassifier(L.LightningModule):
        """An MLP trained with a funcopt optimizer; everything else is plain Lightning."""

        def __init__(self, learning_rate: float = 3e-3, weight_decay: float = 1e-4):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            acc = (self.net(x).argmax(-1) == y).float().mean()
            self.log("val_acc", acc, prog_bar=True)

        def configure_optimizers(self):
            decay = [p for p in self.parameters() if p.dim() >= 2]
            no_decay = [p for p in self.parameters() if p.dim() < 2]
            groups = [{"params": decay, "weight_decay": self.hparams.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            # was: torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=(0.9, 0.95))
            optimizer = funcopt.as_torch_optimizer(funcopt.adamw, groups, lr=self.hparams.learning_rate, betas=(0.9, 0.95))
            warmup = lambda step: min(1.0, (step + 1) / 20) * 0.999**step  # linear warmup, then slow decay
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_trainer(max_epochs: int, fast: bool, out: str) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not fast,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        limit_train_batches=5 if fast else 1.0,
        limit_val_batches=2 if fast else 1.0,
        default_root_dir=out,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a few steps (CI)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default=".", help="directory for the checkpoint")
    args = parser.parse_args()
    if L is None:
        print("lightning is not installed (pip install lightning); skipping this example.")
        return 0
    os.makedirs(args.out, exist_ok=True)
    epochs = 2 if args.fast else args.epochs
    torch.manual_seed(0)
    train_set, val_set = load_data()
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=50, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=200)

    model = DigitsClassifier()
    trainer = make_trainer(epochs, args.fast, args.out)
    trainer.fit(model, train_loader, val_loader)
    ckpt = os.path.join(args.out, "lightning_demo.ckpt")
    trainer.save_checkpoint(ckpt)
    optimizer = trainer.optimizers[0]
    steps = int(optimizer.funcopt_state[0][0].count)  # group 0's ScaleByAdamState
    print(
        f"trained {epochs} epochs ({steps} funcopt steps): val_acc {trainer.callback_metrics['val_acc']:.3f}, "
        f"lr now {optimizer.param_groups[0]['lr']:.2e}"
    )

    # Resume from the checkpoint for one more epoch: Lightning calls load_state_dict on our optimizer.
    resumed = DigitsClassifier()
    trainer2 = make_trainer(epochs + 1, args.fast, args.out)
    trainer2.fit(resumed, train_loader, val_loader, ckpt_path=ckpt)
    restored = trainer2.optimizers[0]
    more = int(restored.funcopt_state[0][0].count)
    print(f"resumed for 1 epoch: the funcopt step count went {steps} -> {more}, lr {restored.param_groups[0]['lr']:.2e}")
    if more <= steps:
        print("error: the optimizer state was not restored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
