"""funcopt.distributed: 2-rank gloo data parallelism, DCP save/restore across world sizes, errors.

One launch of 2 CPU processes (gloo) does all multi-process checks, to keep the file fast.
"""

from __future__ import annotations

import pytest
import torch

import funcopt
from funcopt import distributed as fd
from funcopt.distributed._launch import _free_port
from helpers import assert_trees_close, assert_trees_equal

N, D_IN, HIDDEN, D_OUT = 16, 4, 6, 3
LR = 0.05


def problem():
    """Deterministic params and data for every process (float64)."""
    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(D_IN, HIDDEN, generator=g, dtype=torch.float64) * 0.5,
        "b1": torch.zeros(HIDDEN, dtype=torch.float64),
        "w2": torch.randn(HIDDEN, D_OUT, generator=g, dtype=torch.float64) * 0.5,
    }
    batches = [
        (torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.randint(0, D_OUT, (N,), generator=g))
        for _ in range(6)
    ]
    return params, batches


def loss_fn(params, batch):
    x, y = batch
    h = torch.tanh(x @ params["w1"] + params["b1"])
    return torch.nn.functional.cross_entropy(h @ params["w2"], y)


def train(tx, params, state, batches, shard_batches):
    for batch in batches:
        if shard_batches:
            batch = fd.shard(batch)
        grads = torch.func.grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
    return params, state


def make_tx(distributed):
    inner = funcopt.inject_hyperparams(funcopt.adamw)(learning_rate=LR, weight_decay=1e-2)
    return funcopt.chain(fd.average_gradients(), inner) if distributed else funcopt.chain(funcopt.identity(), inner)


def rank_rng():
    rank, _ = fd.rank_and_world_size()
    return {"seed": torch.tensor([100 + rank]), "epoch": 7 + rank}


def run_sweep(distributed):
    """K=5 AdamW configurations (3 + 2 over two ranks), with an evaluation metric."""
    from funcopt import sweep as S

    params, batches = problem()
    hp = {k: v[:5] for k, v in S.grid(learning_rate=[0.01, 0.05, 0.1], weight_decay=[0.0, 0.1]).items()}
    x0, y0 = batches[0]

    def eval_fn(p):
        logits = torch.tanh(x0 @ p["w1"] + p["b1"]) @ p["w2"]
        return {"acc": (logits.argmax(-1) == y0).double().mean()}

    kw = dict(steps=3, eval_fn=eval_fn, metric="acc", mode="max", step_mode="stacked")
    if distributed:
        res = fd.sweep(loss_fn, params, funcopt.adamw, hp, batches, **kw)
    else:
        res = S.sweep(loss_fn, params, funcopt.adamw, hp, batches, progress=False, **kw)
    if res is None:
        return None
    return {"rows": res.to_rows(), "loss": res.loss, "evals": res.evals, "params": res.params,
            "opt_state": res.opt_state, "best": res.best().index}


def torch_loop(distributed):
    """An ordinary backward()/step() loop with as_torch_optimizer (data-parallel: no DDP needed)."""
    params, batches = problem()
    module = torch.nn.Module()
    for k, v in params.items():
        module.register_parameter(k, torch.nn.Parameter(v.clone()))
    opt = funcopt.as_torch_optimizer(make_tx(distributed), module)
    for batch in batches:
        opt.zero_grad()
        loss_fn(dict(module.named_parameters()), fd.shard(batch) if distributed else batch).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def save_sharded(ckpt_dir):
    """A DTensor sharded over the 2 ranks (as FSDP2 holds params), saved shard by shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    w = distribute_tensor(torch.arange(12.0).reshape(6, 2), mesh, [Shard(0)])
    fd.save(ckpt_dir + "-sharded", {"w": w, "b": torch.ones(3)})
    return tuple(w.to_local().shape)


def worker(ckpt_dir):
    """The one multi-process job (each rank): data-parallel training with a DCP save midway, a
    2-rank restore that continues, and the checks that need a process group."""
    params, batches = problem()
    rank, world = fd.rank_and_world_size()
    params = fd.broadcast(funcopt.tree.map(lambda x: x + rank, params))  # rank 0's values win
    tx = make_tx(True)
    state = tx.init(params)
    params, state = train(tx, params, state, batches[:3], True)
    fd.save(ckpt_dir, {"params": params, "opt_state": state, "step": 3}, per_rank=rank_rng())
    final, _ = train(tx, params, state, batches[3:], True)

    # Restore with 2 ranks into a fresh template (per-rank state included) and continue.
    fresh, _ = problem()
    like = {"params": fresh, "opt_state": tx.init(fresh), "step": 0}
    tree, own = fd.load(ckpt_dir, like, per_rank_like=rank_rng())
    resumed, _ = train(tx, tree["params"], tree["opt_state"], batches[3:], True)

    # Structure mismatch across ranks: every rank gets the same clear error (no hang).
    try:
        fd.check_same_structure_across_ranks({"w": torch.zeros(2 + rank)}, "params")
        mismatch = None
    except funcopt.FuncoptError as e:
        mismatch = str(e)
    reduced = fd.all_reduce({"a": torch.tensor([1.0 + rank]), "i": torch.tensor([2 + rank])}, op="sum")
    return {
        "torch_loop": torch_loop(True),
        "sweep": run_sweep(True),
        "local_shard": save_sharded(ckpt_dir),
        "world": world,
        "final": final,
        "resumed": resumed,
        "step": tree["step"],
        "per_rank": own,
        "mismatch": mismatch,
        "reduced": reduced,
    }


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    import torch.distributed.checkpoint  # noqa: F401  (imported once here, inherited by the ranks)

    single_process_reference()  # also imports what torch.func needs before forking
    # fork: the ranks inherit the imported modules (the examples cover the default forkserver).
    return ckpt, fd.launch(worker, 2, (ckpt,), start_method="fork")


def single_process_reference():
    params, batches = problem()
    tx = make_tx(False)
    return train(tx, params, tx.init(params), batches, False)


def test_two_rank_data_parallel_equals_full_batch(two_rank_runs):
    _, first = two_rank_runs
    expected, _ = single_process_reference()
    assert [r["world"] for r in first] == [2, 2]
    assert_trees_equal(first[0]["final"], first[1]["final"])  # replicas stay identical
    assert_trees_close(first[0]["final"], expected, rtol=1e-12, atol=1e-13)


def test_as_torch_optimizer_with_average_gradients_equals_full_batch(two_rank_runs):
    _, first = two_rank_runs
    expected = torch_loop(False)
    assert_trees_equal(first[0]["torch_loop"], first[1]["torch_loop"])
    assert_trees_close(first[0]["torch_loop"], expected, rtol=1e-12, atol=1e-13)


def test_distributed_sweep_returns_the_local_table_on_rank_0(two_rank_runs):
    _, first = two_rank_runs
    expected = run_sweep(False)
    got = first[0]["sweep"]
    assert first[1]["sweep"] is None
    assert [r["config"] for r in got["rows"]] == [r["config"] for r in expected["rows"]]
    for a, e in zip(got["rows"], expected["rows"]):
        assert a.keys() == e.keys()
        for key in a:
            assert a[key] == pytest.approx(e[key], rel=1e-12, abs=1e-14), (key, a, e)
    assert got["best"] == expected["best"]
    assert_trees_close(got["loss"], expected["loss"], rtol=1e-12, atol=1e-14)
    assert_trees_close(got["evals"], expected["evals"], rtol=1e-12, atol=1e-14)
    assert_trees_close(got["params"], expected["params"], rtol=1e-12, atol=1e-14)
    assert_trees_close(got["opt_state"], expected["opt_state"], rtol=1e-12, atol=1e-14)


def test_all_reduce_sum_and_structure_check_across_ranks(two_rank_runs):
    _, first = two_rank_runs
    for r in first:
        assert torch.equal(r["reduced"]["a"], torch.tensor([3.0]))
        assert torch.equal(r["reduced"]["i"], torch.tensor([5]))
        assert "leaf ['w'] is torch.float32 (2,) on rank 0 but torch.float32 (3,) on rank 1" in r["mismatch"]


def test_checkpoint_from_two_ranks_restores_in_one_process_and_continues(two_rank_runs):
    ckpt, first = two_rank_runs
    params, batches = problem()
    tx = make_tx(False)
    info = fd.checkpoint_info(ckpt)
    assert info["world_size"] == 2 and "tree['step']" in info["paths"]
    # The 2-rank state has average_gradients' EmptyState where this one has identity's: same tree.
    like = {"params": params, "opt_state": tx.init(params), "step": 0}
    tree = fd.load(ckpt, like)
    assert tree["step"] == 3
    assert type(tree["opt_state"][1]).__name__ == "InjectHyperparamsState"
    assert tree["opt_state"][1].count.item() == 3
    final, _ = train(tx, tree["params"], tree["opt_state"], batches[3:], False)
    assert_trees_close(final, first[0]["final"], rtol=1e-12, atol=1e-13)
    # The template was not written into.
    assert_trees_equal(like["params"], problem()[0])


def test_checkpoint_from_two_ranks_restores_in_two_and_continues(two_rank_runs):
    _, first = two_rank_runs
    for rank, r in enumerate(first):
        assert r["step"] == 3
        assert torch.equal(r["per_rank"]["seed"], torch.tensor([100 + rank])) and r["per_rank"]["epoch"] == 7 + rank
        assert_trees_equal(r["resumed"], r["final"])


def test_dtensor_shards_saved_by_two_ranks_load_as_one_tensor(two_rank_runs):
    ckpt, first = two_rank_runs
    assert [r["local_shard"] for r in first] == [(3, 2), (3, 2)]
    out = fd.load(ckpt + "-sharded", {"w": torch.zeros(6, 2), "b": torch.zeros(3)})
    assert torch.equal(out["w"], torch.arange(12.0).reshape(6, 2)) and torch.equal(out["b"], torch.ones(3))


def test_load_errors_name_the_problem(two_rank_runs, tmp_path):
    ckpt, _ = two_rank_runs
    params, _ = problem()
    tx = make_tx(False)
    like = {"params": params, "opt_state": tx.init(params), "step": 0}
    with pytest.raises(funcopt.FuncoptError, match=r"saved by 2 rank\(s\) with per-rank state, but this run has 1"):
        fd.load(ckpt, like, per_rank_like=rank_rng())
    wrong_shape = dict(like, params=dict(params, w2=torch.zeros(HIDDEN, 5, dtype=torch.float64)))
    with pytest.raises(funcopt.FuncoptError, match=r"tree\['params'\]\['w2'\] is float64 of shape \(6, 3\).*\(6, 5\)"):
        fd.load(ckpt, wrong_shape)
    with pytest.raises(funcopt.FuncoptError, match=r"missing from the checkpoint: \[\"tree\['params'\]\['extra'\]\"\]"):
        fd.load(ckpt, dict(like, params=dict(params, extra=torch.zeros(1))))
    other_opt = {"params": params, "opt_state": funcopt.sgd(0.1, momentum=0.9).init(params), "step": 0}
    with pytest.raises(funcopt.FuncoptError, match="does not match the checkpoint"):
        fd.load(ckpt, other_opt)
    with pytest.raises(funcopt.FuncoptError, match="No DCP checkpoint"):
        fd.load(tmp_path / "nothing", like)


def test_single_process_save_load_roundtrip_and_overwrite(tmp_path):
    params, _ = problem()
    tx = funcopt.adam(1e-2)
    tree = {"params": params, "opt_state": tx.init(params), "note": "hello", "lr": 0.5}
    fd.save(tmp_path / "c", tree, per_rank={"x": torch.arange(3)})
    fd.save(tmp_path / "c", tree, per_rank={"x": torch.arange(3) + 1})  # replaces it whole
    out, own = fd.load(tmp_path / "c", tree, per_rank_like={"x": torch.zeros(3, dtype=torch.int64)})
    assert_trees_equal(out, tree)
    assert torch.equal(own["x"], torch.arange(3) + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "keep.txt").write_text("user data")
    with pytest.raises(funcopt.FuncoptError, match="exists and is not a DCP checkpoint"):
        fd.save(tmp_path / "results", tree)
    assert (tmp_path / "results" / "keep.txt").read_text() == "user data"


def test_helpers_without_process_group_raise_clear_errors():
    tree = {"w": torch.ones(2)}
    for call in (
        lambda: fd.all_reduce(tree),
        lambda: fd.broadcast(tree),
        lambda: fd.average_gradients().init(tree),
        lambda: fd.average_gradients().update(tree, funcopt.EmptyState()),
        lambda: fd.check_same_structure_across_ranks(tree),
        lambda: fd.shard(tree),
        lambda: fd.sweep(lambda p, b: p["w"].sum(), tree, funcopt.sgd, {"learning_rate": [0.1]}, None, steps=1),
    ):
        with pytest.raises(funcopt.FuncoptError, match="needs an initialized torch.distributed process group"):
            call()
    assert fd.rank_and_world_size() == (0, 1)


def test_shard_and_argument_errors():
    batch = (torch.arange(8).reshape(4, 2), torch.arange(4))
    x, y = fd.shard(batch, rank=1, world_size=2)
    assert torch.equal(y, torch.tensor([2, 3])) and torch.equal(x, torch.tensor([[4, 5], [6, 7]]))
    with pytest.raises(funcopt.FuncoptError, match=r"leaf \[0\] has leading size 4, not divisible by world_size=3"):
        fd.shard(batch, rank=0, world_size=3)
    with pytest.raises(funcopt.FuncoptError, match="rank must lie in"):
        fd.shard(batch, rank=2, world_size=2)
    with pytest.raises(funcopt.FuncoptError, match="op must be one of"):
        fd.all_reduce({"w": torch.ones(1)}, op="avg")
    with pytest.raises(funcopt.FuncoptError, match="world_size must be a positive int"):
        fd.launch(print, 0)


@pytest.mark.slow
def test_example_runs_under_torchrun(tmp_path):
    """The documented launch command: torchrun --nproc-per-node 2 examples/distributed_train.py."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), str(root / "examples" / "distributed_train.py"),
           "--fast", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    if (
        proc.returncode != 0
        and "terminate called without an active exception" in proc.stderr
        and "restored in 1 process" in proc.stdout
    ):
        # Seen once in several loaded full-suite runs: after training, saving, destroying the process
        # group and printing everything, a rank aborted in C++ thread teardown at interpreter
        # exit. That is torch's exit path, not this example's; run it once more.
        cmd[cmd.index("--master-port") + 1] = str(_free_port())
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ranks 2" in proc.stdout
    assert "restored in 1 process a checkpoint saved by 2 rank(s)" in proc.stdout
    assert fd.checkpoint_info(tmp_path / "distributed_ckpt")["world_size"] == 2
