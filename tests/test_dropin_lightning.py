"""as_torch_optimizer in PyTorch Lightning: two param groups and a per-step scheduler returned
from configure_optimizers train like torch.optim.AdamW, checkpoint and resume to the
uninterrupted result, and Tuner.lr_find runs on it."""

from __future__ import annotations

import pytest
import torch

import funcopt

L = pytest.importorskip("lightning", reason="lightning is not installed (pip install lightning)")

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one intra-op thread avoids OpenMP synchronisation, which dominates (and
    slows these tests many times over) when the CPU is shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def loader():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=DT)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=False)


class Module(L.LightningModule):
    def __init__(self, use_funcopt: bool = True, lr: float = 1e-2):
        super().__init__()
        self.use_funcopt, self.lr = use_funcopt, lr
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DT)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.parameters() if p.dim() == 2], "weight_decay": 0.1},
                  {"params": [p for p in self.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        if self.use_funcopt:
            opt = funcopt.as_torch_optimizer(funcopt.adamw, groups, lr=self.lr, betas=(0.9, 0.95))
        else:
            opt = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.9**s, lambda s: 1 / (1 + s)])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(tmp_path, epochs, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     gradient_clip_val=0.5, **kw)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.slow
def test_lightning_trains_checkpoints_and_resumes_like_torch(tmp_path):
    theirs = Module(use_funcopt=False)
    trainer(tmp_path, 3).fit(theirs, loader())
    ours = Module()
    trainer(tmp_path, 3).fit(ours, loader())
    for a, b in zip(params(ours), params(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    first = Module()
    t = trainer(tmp_path, 1)
    t.fit(first, loader())
    ckpt = tmp_path / "one.ckpt"
    t.save_checkpoint(ckpt)
    resumed = Module()
    t2 = trainer(tmp_path, 3)
    t2.fit(resumed, loader(), ckpt_path=ckpt)
    assert t2.optimizers[0].funcopt_state[0][0].count.item() == 12
    for a, b in zip(params(resumed), params(ours)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_lightning_lr_find_runs_on_the_adapter(tmp_path):
    from lightning.pytorch.tuner import Tuner

    module = Module()
    before = params(module)
    result = Tuner(trainer(tmp_path, 1)).lr_find(module, train_dataloaders=loader(), min_lr=1e-4, max_lr=1.0,
                                                 num_training=4, early_stop_threshold=None)
    lrs = result.results["lr"]
    assert len(lrs) == 4 and all(a < b for a, b in zip(lrs, lrs[1:]))
    assert all(torch.isfinite(torch.tensor(result.results["loss"])))
    for a, b in zip(params(module), before):  # the tuner restores the initial weights
        torch.testing.assert_close(a, b, rtol=0, atol=0)
