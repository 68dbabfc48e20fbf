"""FSDP2 (``fully_shard``, DTensor) on CPU/gloo, float64, with 2 and 4 ranks.

- the functional route (``funcopt.distributed.module_step``) equals the same training unsharded;
- the optimizer state is sharded like its parameter (bytes per rank);
- norms reduce over whole tensors: LAMB, clip_by_global_norm, Adafactor's factored moments and
  Muon's Newton-Schulz on DTensor shards equal the unsharded single-process run;
- elementwise fast routes run on the local shards, and ``funcopt.fast.explain`` says so;
- DCP checkpoints reshard 2 -> 4 -> 2 ranks (and into one process and a funcopt.checkpoint
  file) with bitwise the same continued training.

One launch per world size does every multi-process check, plus one short 2-rank launch that
resumes the 4-rank checkpoint. The ranks use ``fork`` (they inherit the imported modules).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import funcopt
from funcopt import distributed as fd
from helpers import assert_trees_close, assert_trees_equal

pytestmark = pytest.mark.slow

N = 8  # batch rows, divisible by 4 ranks
STEPS, SAVE_AT = 4, 2


def make_model() -> torch.nn.Module:
    """Rows 7, 6, 3: uneven shards over 2 ranks, an empty shard over 4."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)]
    return torch.nn.Sequential(*layers).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))
            for _ in range(STEPS)]


TXS = {
    "adam": lambda: funcopt.adam(1e-2),
    "adamw": lambda: funcopt.adamw(1e-2, weight_decay=0.1),
    "sgd_momentum": lambda: funcopt.sgd(1e-2, momentum=0.9, nesterov=True),
    "clip_adam": lambda: funcopt.chain(funcopt.clip_by_global_norm(0.05), funcopt.adam(1e-2)),
}


def shard_model(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (fd.rank_and_world_size()[1],))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(tx, model, state, batch_list, exact=False):
    """backward() then funcopt.distributed.module_step, on every rank (or in one process).

    ``exact``: rank 0 takes ``world * loss`` on the whole batch and the other ranks ``0 * loss``,
    so FSDP's averaged gradient (a sum with zeros, divided by a power of two) is bitwise the
    whole-batch gradient for any world size: continued training can be compared bitwise. It
    takes the reference route: torch's fused CPU Adam kernel rounds an element differently in
    its SIMD body and its scalar tail (FMA), so the fast route's bits depend on where a shard
    boundary falls (it agrees across world sizes to rounding, as the non-exact runs check)."""
    if exact and funcopt.fast.is_fast_path_enabled():
        with funcopt.fast.fast_path_enabled(False):
            return train(tx, model, state, batch_list, exact=True)
    rank, world = fd.rank_and_world_size()
    for x, y in batch_list:
        scale = 1.0
        if exact:
            scale = float(world) if rank == 0 else 0.0
        elif world > 1:
            x, y = fd.shard((x, y))
        (F.cross_entropy(model(x), y) * scale).backward()
        state = fd.module_step(tx, state, model)
        model.zero_grad()
    return state


def full_params(model):
    return fd.full_tensors(fd.module_params(model))


def fresh(tx_name, sharded):
    model = make_model()
    if sharded:
        shard_model(model)
    tx = TXS[tx_name]()
    return tx, model, tx.init(fd.module_params(model))


def sharded_like(state, params):
    """Paths of params-shaped state leaves whose placement differs from their parameter's."""
    bad = []
    for path, leaf in zip(funcopt.tree.paths(state), funcopt.tree.leaves(state)):
        key = re.search(r"\['([\w.]+)'\]$", path)
        if key is None or not isinstance(leaf, torch.Tensor) or leaf.shape != params[key.group(1)].shape:
            continue
        p = params[key.group(1)]
        if getattr(leaf, "placements", None) != p.placements or leaf.to_local().shape != p.to_local().shape:
            bad.append(path)
    return bad


# ---------------------------------------------------------------------------------------------
# Transformations on DTensor shards made with distribute_tensor (the same gradients as unsharded)


def shard_problem():
    g = torch.Generator().manual_seed(3)
    shapes = {"w": (7, 5), "v": (3, 6), "b": (7,), "t": (2, 3, 4)}
    params = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()} for _ in range(3)]
    return params, grads


def transforms():
    out = {
        "lamb": lambda: funcopt.lamb(1e-2, weight_decay=0.1),
        "clip_by_global_norm": lambda: funcopt.chain(funcopt.clip_by_global_norm(1.0), funcopt.sgd(0.1)),
        "adafactor": lambda: funcopt.adafactor(1e-2),
        "adafactor_dim1": lambda: funcopt.adafactor(1e-2),
        "muon": lambda: funcopt.muon_with_adamw(0.02, 1e-2),
    }
    if hasattr(funcopt, "lars"):
        out["lars"] = lambda: funcopt.lars(0.1)
    return out


def run_transform(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = funcopt.apply_updates(params, updates)
    return params, state


def transforms_on_shards():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (fd.rank_and_world_size()[1],))
    params, grads = shard_problem()
    out = {}
    for name, make in transforms().items():
        dim = 1 if name.endswith("_dim1") else 0  # FSDP2's shard_placement_fn may shard dim 1

        def put(tree):
            return {k: distribute_tensor(x, mesh, [Shard(min(dim, x.ndim - 1))]) for k, x in tree.items()}

        p, state = run_transform(make(), put(params), [put(g) for g in grads])
        out[name] = {
            "params": fd.full_tensors(p),
            "state": fd.full_tensors(state),
            "misplaced": sharded_like(state, p),
            "state_bytes": fd.local_nbytes(state),
        }
        if name.startswith("adafactor"):
            factors = state[0]
            out[name]["row_placement"] = str(factors.v_row["w"].placements)
            out[name]["col_placement"] = str(factors.v_col["w"].placements)
    return out


# ---------------------------------------------------------------------------------------------
# The fast route on local shards


def fast_route_on_shards():
    from torch.distributed.tensor import Replicate

    model = shard_model(make_model())
    x, y = fd.shard(batches()[0])
    F.cross_entropy(model(x), y).backward()
    params, grads = fd.module_params(model), fd.module_grads(model)
    local = lambda tree: funcopt.tree.map(lambda t: t.to_local() if hasattr(t, "to_local") else t, tree)  # noqa: E731
    out = {}
    for name in ("adam", "adamw", "sgd_momentum"):
        tx = TXS[name]()
        state = tx.init(params)
        _, state = tx.update(grads, state, params)  # a second step: momentum buffers in use
        fp = funcopt.fast.fast_path_of(tx)
        calls = []
        for method in ("run", "run_backend"):
            original = getattr(fp, method)
            setattr(fp, method, lambda *a, _f=original, _m=method, **k: calls.append(_m) or _f(*a, **k))
        route = str(funcopt.fast.explain(tx, grads, state, params))
        updates, new_state = tx.update(grads, state, params)
        kernel_calls = len(calls)  # the sharded update's: a backend's kernel, else the declaration's
        plain_updates, plain_state = tx.update(local(grads), local(state), local(params))
        with funcopt.fast.fast_path_enabled(False):
            ref_updates, ref_state = tx.update(grads, state, params)
        bad_state = tx.init({k: v.redistribute(placements=[Replicate()]) for k, v in params.items()})
        out[name] = {
            "route": route,
            "calls": kernel_calls,
            "local_equal": all(torch.equal(a, b) for a, b in zip(funcopt.tree.leaves(local((updates, new_state))),
                                                                 funcopt.tree.leaves((plain_updates, plain_state)))),
            "updates": fd.full_tensors(updates),
            "reference": fd.full_tensors(ref_updates),
            "state": fd.full_tensors(new_state),
            "reference_state": fd.full_tensors(ref_state),
            "misplaced": sharded_like((updates, new_state), params),
            "not_alike": str(funcopt.fast.explain(tx, grads, bad_state, params)),
        }
    lamb = funcopt.lamb(1e-2)
    out["lamb_route"] = str(funcopt.fast.explain(lamb, grads, lamb.init(params), params))
    return out


# ---------------------------------------------------------------------------------------------
# The launches


def resume(path, sharded, steps_done, from_file=False):
    """A fresh model and adamw state loaded from a checkpoint, trained to STEPS (exact grads)."""
    tx, model, template = fresh("adamw", sharded)
    like = {"params": fd.module_params(model), "opt_state": template, "step": 0}
    if from_file:  # a single-process funcopt.checkpoint file, placed on this run's shards
        whole = {"params": fd.full_tensors(like["params"]), "opt_state": fd.full_tensors(template), "step": 0}
        tree = fd.distribute_like(funcopt.checkpoint.load(path, like=whole), like)
    else:
        tree = fd.load(path, like)
    assert tree["step"] == steps_done
    funcopt.nn.load(model, tree["params"])
    train(tx, model, tree["opt_state"], batches()[steps_done:], exact=True)
    return full_params(model)


def worker(root, phase):
    torch.manual_seed(0)
    rank, world = fd.rank_and_world_size()
    if phase == "resume4":  # 4 -> 2 ranks
        return {"resumed": resume(f"{root}/w4", True, SAVE_AT)}
    out = {"world": world, "trained": {}, "state_bytes": {}, "misplaced": {}}
    for name in TXS:
        tx, model, state = fresh(name, True)
        state = train(tx, model, state, batches())
        out["trained"][name] = full_params(model)
        out["state_bytes"][name] = fd.local_nbytes(state)
        out["misplaced"][name] = sharded_like(state, fd.module_params(model))
    out["transforms"] = transforms_on_shards()
    out["fast"] = fast_route_on_shards()

    # Exact-gradient adamw: saved midway by this world size, and trained through.
    tx, model, state = fresh("adamw", True)
    state = train(tx, model, state, batches()[:SAVE_AT], exact=True)
    fd.save(f"{root}/w{world}", {"params": fd.module_params(model), "opt_state": state, "step": SAVE_AT})
    train(tx, model, state, batches()[SAVE_AT:], exact=True)
    out["exact"] = full_params(model)
    if phase == "first4":  # 2 -> 4 ranks, from the DCP checkpoint and from a funcopt.checkpoint file
        out["resumed"] = resume(f"{root}/w2", True, SAVE_AT)
        out["resumed_file"] = resume(f"{root}/single.safetensors", True, SAVE_AT, from_file=True)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fsdp"))
    import torch.distributed.checkpoint  # noqa: F401  (imported once, inherited by the forked ranks)
    import torch.distributed.fsdp  # noqa: F401

    two = fd.launch(worker, 2, (root, "first2"), start_method="fork")
    # The 2-rank DCP checkpoint, read in one process, rewritten as a single-process file.
    tx, model, state = fresh("adamw", False)
    tree = fd.load(f"{root}/w2", {"params": fd.module_params(model), "opt_state": state, "step": 0})
    funcopt.checkpoint.save(f"{root}/single.safetensors", tree)
    four = fd.launch(worker, 4, (root, "first4"), start_method="fork")
    back = fd.launch(worker, 2, (root, "resume4"), start_method="fork")
    return root, {2: two, 4: four}, back


def unsharded(name):
    tx, model, state = fresh(name, False)
    train(tx, model, state, batches())
    return full_params(model)


@pytest.mark.parametrize("name", list(TXS))
def test_functional_route_equals_unsharded_training(runs, name):
    _, by_world, _ = runs
    expected = unsharded(name)
    for world, results in by_world.items():
        assert [r["world"] for r in results] == [world] * world
        for r in results:
            assert_trees_close(r["trained"][name], expected, rtol=1e-10, atol=1e-12, msg=f"{name} {world} ranks")
        assert all(not r["misplaced"][name] for r in results), [r["misplaced"][name] for r in results]


def test_clip_chain_really_clips():
    model = make_model()
    x, y = batches()[0]
    F.cross_entropy(model(x), y).backward()
    assert funcopt.tree.norm(fd.module_grads(model)) > 0.05 * 4


def test_optimizer_state_is_sharded_one_nth_per_rank(runs):
    _, by_world, _ = runs
    _, _, state = fresh("adam", False)
    whole = fd.local_nbytes(state)
    count_bytes = 8
    for world, results in by_world.items():
        per_rank = [r["state_bytes"]["adam"] for r in results]
        # mu and nu are split over the ranks (uneven rows included); each rank keeps its own count
        assert sum(b - count_bytes for b in per_rank) == whole - count_bytes
        assert max(per_rank) - count_bytes <= (whole - count_bytes) / world * 1.5


@pytest.mark.parametrize("name", list(transforms()))
def test_norms_and_matrices_reduce_over_whole_tensors(runs, name):
    _, by_world, _ = runs
    params, grads = shard_problem()
    expected_params, expected_state = run_transform(transforms()[name](), params, grads)
    for world, results in by_world.items():
        for r in results:
            got = r["transforms"][name]
            if name == "muon":  # the gathered Newton-Schulz input is bitwise the unsharded one
                assert_trees_equal(got["params"], expected_params)
            assert_trees_close(got["params"], expected_params, rtol=1e-10, atol=1e-12, msg=f"{name} {world}")
            assert_trees_close(got["state"], expected_state, rtol=1e-10, atol=1e-12, msg=f"{name} {world}")
            assert got["misplaced"] == [], (name, world, got["misplaced"])
        if name.startswith("adafactor"):  # row factors sharded with the rows, column factors whole
            dim1 = name.endswith("_dim1")
            assert results[0]["transforms"][name]["row_placement"] == ("(Replicate(),)" if dim1 else "(Shard(dim=0),)")
            assert results[0]["transforms"][name]["col_placement"] == ("(Shard(dim=1),)" if dim1 else "(Replicate(),)")


def test_fast_route_runs_on_local_shards(runs):
    _, by_world, _ = runs
    for results in by_world.values():
        for r in results:
            for name in ("adam", "adamw", "sgd_momentum"):
                got = r["fast"][name]
                assert got["route"].startswith("fast") and "on local DTensor shards" in got["route"], got["route"]
                assert got["calls"] >= 1 and got["local_equal"], (name, got["calls"])
                assert got["misplaced"] == []
                assert_trees_close(got["updates"], got["reference"], rtol=1e-12, atol=1e-15)
                assert_trees_close(got["state"], got["reference_state"], rtol=1e-12, atol=1e-15)
                assert got["not_alike"].startswith("reference") and "not sharded alike" in got["not_alike"]
            assert "no declared fast route" in r["fast"]["lamb_route"]


def test_dcp_checkpoint_reshards_with_bitwise_equal_continuation(runs):
    root, by_world, back = runs
    two, four = by_world[2], by_world[4]
    reference = two[0]["exact"]
    for r in two + four:  # the exact-gradient training itself does not depend on the world size
        assert_trees_equal(r["exact"], reference)
    for r in four:  # 2 -> 4 ranks: from the DCP checkpoint and from a single-process file
        assert_trees_equal(r["resumed"], reference)
        assert_trees_equal(r["resumed_file"], reference)
    for r in back:  # 4 -> 2 ranks
        assert_trees_equal(r["resumed"], reference)
    assert fd.checkpoint_info(f"{root}/w4")["world_size"] == 4
    # 4 ranks -> one process (no process group), continued unsharded
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' own setting, for the same float64 matmul rounding
    try:
        alone = resume(f"{root}/w4", False, SAVE_AT)
    finally:
        torch.set_num_threads(threads)
    assert_trees_close(alone, reference, rtol=1e-12, atol=1e-14)
