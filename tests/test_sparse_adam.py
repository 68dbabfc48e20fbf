"""funcopt.sparse_adam against torch.optim.SparseAdam: only the rows in the gradient move."""

from __future__ import annotations

import pytest
import torch

import funcopt
from tests.helpers import assert_trees_close, assert_trees_equal, snapshot

ROWS, DIM = 12, 3


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, ROWS, (5,), generator=gen) for _ in range(n)]


def _sparse_grad(weight, ids):
    """The sparse COO gradient of ``sum(emb(ids)^2 * w)`` with respect to the table."""
    w = weight.detach().clone().requires_grad_()
    scale = torch.arange(1, DIM + 1, dtype=weight.dtype)
    loss = (torch.nn.functional.embedding(ids, w, sparse=True) ** 2 * scale).sum()
    (g,) = torch.autograd.grad(loss, w)
    assert g.layout is torch.sparse_coo
    return g


def _torch_run(weight, batches, dtype, **kwargs):
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True).to(dtype)
    with torch.no_grad():
        emb.weight.copy_(weight)
    opt = torch.optim.SparseAdam(emb.parameters(), **kwargs)
    scale = torch.arange(1, DIM + 1, dtype=dtype)
    for ids in batches:
        opt.zero_grad()
        (emb(ids) ** 2 * scale).sum().backward()
        opt.step()
    return emb, opt


def _funcopt_run(tx, weight, batches, state=None):
    params = {"table": weight.clone()}
    state = tx.init(params) if state is None else state
    for ids in batches:
        grads = {"table": _sparse_grad(params["table"], ids)}
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
    return params, state


CASES = {
    "default": (dict(learning_rate=0.05), dict(lr=0.05)),
    "betas_eps": (dict(learning_rate=0.02, b1=0.8, b2=0.95, eps=1e-6), dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6)),
    "maximize": (dict(learning_rate=0.05, maximize=True), dict(lr=0.05, maximize=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sparse_adam_follows_torch_sparse_adam(case, dtype):
    """60 steps; float64 to 1e-9. float32 and bfloat16 keep their moments in the params' dtype
    as torch does, and differ from torch by rounding only (the step size is applied as one
    Python scalar by torch, as the learning rate times a tensor factor here): a few ulps."""
    ours, theirs = CASES[case]
    weight = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1), dtype=dtype)
    batches = _batches(60)
    emb, opt = _torch_run(weight, batches, dtype, **theirs)
    params, state = _funcopt_run(funcopt.sparse_adam(**ours), weight, batches)  # torch's gradients
    tol = {
        torch.float64: dict(rtol=1e-9, atol=1e-12),
        torch.float32: dict(rtol=2e-5, atol=2e-6),
        torch.bfloat16: dict(rtol=3e-2, atol=1e-2),  # a few bf16 ulps (maximize grows |w| to ~8)
    }[dtype]
    assert_trees_close(params["table"], emb.weight.detach(), **tol)
    torch_state = opt.state[emb.weight]
    adam_state = state[-2] if ours.get("maximize") else state[0]
    assert_trees_close(adam_state.mu["table"], torch_state["exp_avg"], **tol)
    assert_trees_close(adam_state.nu["table"], torch_state["exp_avg_sq"], **tol)
    assert int(adam_state.count) == torch_state["step"] == 60


def test_only_rows_in_the_gradient_move_and_inputs_are_untouched():
    weight = torch.randn(ROWS, DIM, dtype=torch.float64)
    tx = funcopt.sparse_adam(0.1)
    params = {"table": weight}
    state = tx.init(params)
    ids = torch.tensor([2, 5, 5])
    grads = {"table": _sparse_grad(weight, ids)}
    before = snapshot((params, state))
    versions = [t._version for t in funcopt.tree.leaves((params, state))]
    updates, new_state = tx.update(grads, state, params)
    assert_trees_equal((params, state), before)
    assert [t._version for t in funcopt.tree.leaves((params, state))] == versions
    assert updates["table"].layout is torch.sparse_coo
    moved = funcopt.apply_updates(params, updates)["table"]
    changed = (moved != weight).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2, 5]
    untouched = [r for r in range(ROWS) if r not in (2, 5)]
    assert torch.equal(new_state[0].mu["table"][untouched], torch.zeros(len(untouched), DIM, dtype=torch.float64))


def test_an_empty_gradient_moves_nothing_but_counts_the_step():
    weight = torch.randn(ROWS, DIM, dtype=torch.float64)
    tx = funcopt.sparse_adam(0.1)
    state = tx.init({"table": weight})
    empty = torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0, DIM, dtype=torch.float64), (ROWS, DIM), check_invariants=True
    )
    updates, new_state = tx.update({"table": empty}, state)
    assert torch.equal(funcopt.apply_updates({"table": weight}, updates)["table"], weight)
    assert int(new_state[0].count) == 1 and torch.equal(new_state[0].mu["table"], state[0].mu["table"])


def test_a_dense_gradient_is_refused_with_its_path():
    tx = funcopt.sparse_adam(0.1)
    params = {"emb": {"table": torch.zeros(ROWS, DIM)}}
    with pytest.raises(funcopt.FuncoptError, match=r"gradient at \['emb'\]\['table'\] is a torch.strided tensor.*funcopt.adam"):
        tx.update({"emb": {"table": torch.ones(ROWS, DIM)}}, tx.init(params))


def test_checkpoint_resume_is_bitwise(tmp_path):
    weight = torch.randn(ROWS, DIM, dtype=torch.float64)
    tx = funcopt.sparse_adam(0.05)
    batches = _batches(8, seed=3)
    straight = _funcopt_run(tx, weight, batches)
    params, state = _funcopt_run(tx, weight, batches[:4])
    funcopt.checkpoint.save(tmp_path / "s.safetensors", {"params": params, "opt_state": state})
    restored = funcopt.checkpoint.load(tmp_path / "s.safetensors", like={"params": params, "opt_state": tx.init(params)})
    resumed = _funcopt_run(tx, restored["params"]["table"], batches[4:], state=restored["opt_state"])
    assert_trees_equal(resumed, straight)


def test_state_dict_round_trip_with_torch_sparse_adam():
    """torch runs 10 steps -> funcopt continues 10 -> torch continues 10: the same path as 30 torch steps."""
    dtype = torch.float64
    weight = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(2), dtype=dtype)
    batches = _batches(30, seed=5)
    emb_all, _ = _torch_run(weight, batches, dtype, lr=0.05)
    emb, opt = _torch_run(weight, batches[:10], dtype, lr=0.05)
    params = {"table": emb.weight.detach().clone()}
    tx, state = funcopt.interop.from_torch(opt.state_dict(), params)
    assert int(state[0].count) == 10
    params, state = _funcopt_run(tx, params["table"], batches[10:20], state=state)
    with torch.no_grad():
        emb.weight.copy_(params["table"])
    opt.load_state_dict(funcopt.interop.to_torch(state, params, opt))
    assert opt.state[emb.weight]["step"] == 20
    scale = torch.arange(1, DIM + 1, dtype=dtype)
    for ids in batches[20:]:
        opt.zero_grad()
        (emb(ids) ** 2 * scale).sum().backward()
        opt.step()
    assert_trees_close(emb.weight.detach(), emb_all.weight.detach(), rtol=1e-9, atol=1e-12)
