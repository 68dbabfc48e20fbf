"""Tests of funcopt.checkpoint.CheckpointManager: numbering, pruning, keep_best, restore, temp files."""

from __future__ import annotations

import os

import pytest
import torch

import funcopt
from funcopt.checkpoint import CheckpointError, CheckpointManager


def _tree(step):
    params = {"w": torch.full((3,), float(step))}
    return {"params": params, "opt_state": funcopt.adam().init(params), "step": step}


def test_keeps_the_newest_and_restores_latest(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", max_to_keep=2)
    assert mgr.latest_step() is None and mgr.all_steps() == []
    with pytest.raises(CheckpointError, match="no checkpoints in .*run"):
        mgr.restore()
    for step in (10, 20, 30):
        path = mgr.save(step, _tree(step), metrics={"loss": 1.0 / step})
        assert os.path.basename(path) == f"ckpt_{step:010d}.safetensors"
    assert mgr.all_steps() == [20, 30] and mgr.latest_step() == 30
    out = mgr.restore()
    assert out["step"] == 30 and torch.equal(out["params"]["w"], torch.full((3,), 30.0))
    assert type(out["opt_state"][0]) is funcopt.ScaleByAdamState
    assert mgr.restore(20, paths="step") == 20
    assert mgr.metrics(20) == {"loss": 0.05}
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 10 .*available: \[20, 30\]"):
        mgr.restore(10)
    # a new manager on the same directory sees the same checkpoints and metrics
    again = CheckpointManager(tmp_path / "run", max_to_keep=2)
    assert again.latest_step() == 30 and again.metrics(30) == {"loss": pytest.approx(1 / 30)}
    like = _tree(0)
    assert again.restore(like=like)["step"] == 30
    assert funcopt.checkpoint.inspect(again.path(30)).step == 30


def test_keep_best_keeps_best_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=2, keep_best="loss")
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.1, 5: 0.7}
    for step, loss in losses.items():
        mgr.save(step, _tree(step), metrics={"loss": torch.tensor(loss)})
    # best two (4: 0.1, 2: 0.2) plus the latest (5)
    assert mgr.all_steps() == [2, 4, 5]
    assert mgr.best_step() == 4
    maxi = CheckpointManager(tmp_path / "acc", max_to_keep=1, keep_best=lambda m: m["acc"], best_mode="max")
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]:
        maxi.save(step, _tree(step), metrics={"acc": acc})
    assert maxi.all_steps() == [2, 3] and maxi.best_step() == 2
    no_metric = CheckpointManager(tmp_path / "nm", max_to_keep=1, keep_best="loss")
    no_metric.save(1, _tree(1), metrics={"loss": 0.3})
    no_metric.save(2, _tree(2))  # ranks last, kept only as the latest
    no_metric.save(3, _tree(3), metrics={"loss": float("nan")})
    assert no_metric.all_steps() == [1, 3]


def test_max_to_keep_none_keeps_everything_and_overwrite(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=None)
    for step in range(5):
        mgr.save(step, {"v": torch.tensor(step)})
    mgr.save(2, {"v": torch.tensor(-2)})
    assert mgr.all_steps() == [0, 1, 2, 3, 4]
    assert mgr.restore(2)["v"].item() == -2


def test_half_written_files_are_never_latest_and_stale_temps_are_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=3)
    mgr.save(5, _tree(5))
    # what a process killed mid-save leaves behind: a temp file of a later step
    dead_pid = 2**22 + 12345
    stale = tmp_path / f".ckpt_{6:010d}.safetensors.tmp-{dead_pid}-deadbeef"
    stale.write_bytes(b"\0" * 100)
    live = tmp_path / f".ckpt_{7:010d}.safetensors.tmp-{os.getpid()}-cafebabe"
    live.write_bytes(b"\0" * 10)
    other = tmp_path / "notes.txt"
    other.write_text("kept")
    assert mgr.latest_step() == 5 and mgr.restore()["step"] == 5
    CheckpointManager(tmp_path)
    assert not stale.exists() and live.exists() and other.exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="max_to_keep must be a positive int"):
        CheckpointManager(tmp_path, max_to_keep=0)
    with pytest.raises(CheckpointError, match="best_mode must be"):
        CheckpointManager(tmp_path, best_mode="lowest")
    with pytest.raises(CheckpointError, match="keep_best must be"):
        CheckpointManager(tmp_path, keep_best=3)
    with pytest.raises(CheckpointError, match="prefix must be"):
        CheckpointManager(tmp_path, prefix="a/b")
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="step must be a non-negative int"):
        mgr.save(-1, {})
    with pytest.raises(CheckpointError, match="metric 'x' must be a number"):
        mgr.save(1, {}, metrics={"x": torch.ones(2)})
    with pytest.raises(CheckpointError, match="may not use the key 'metrics'"):
        mgr.save(1, {}, metadata={"metrics": 1})
    with pytest.raises(CheckpointError, match="best_step needs keep_best"):
        mgr.best_step()
    assert "max_to_keep=3" in repr(mgr)
