"""The adapter route under FSDP2 (CPU/gloo, 2 ranks, float64): ``fully_shard(model)``,
``loss.backward()``, ``opt.step()`` with ``funcopt.as_torch_optimizer`` (param groups included)
equals ``torch.optim`` under the same FSDP2 setup, and the functional route equals both; DCP's
``get_state_dict``/``set_state_dict`` with the adapter.

One 2-rank launch (``fork``) runs every case.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F

import funcopt
from funcopt import distributed as fd
from helpers import assert_trees_close
from test_fsdp import SAVE_AT, batches, full_params, make_model, shard_model, train

pytestmark = pytest.mark.slow
MAX_NORM = 0.05


def groups(model):
    """Weights at the default hyperparameters, biases with their own lr and no weight decay."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n.endswith("weight")]},
            {"params": [p for n, p in named if n.endswith("bias")], "lr": 3e-2, "weight_decay": 0.0}]


CASES = {  # name: (torch.optim class, its kwargs, funcopt factory, uses param groups)
    "adam": (torch.optim.Adam, dict(lr=1e-2), funcopt.adam, True),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), funcopt.adamw, True),
    "sgd_momentum": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.0), funcopt.sgd, True),
    "clip_adam": (torch.optim.Adam, dict(lr=1e-2), None, False),
}


def clip_(model):
    """torch's side of clip_by_global_norm (no 1e-6 in the denominator, as funcopt/optax)."""
    grads = [p.grad for p in model.parameters()]
    norm = torch.nn.utils.get_total_norm(grads)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    factor = MAX_NORM / torch.clamp(norm, min=MAX_NORM)
    with torch.no_grad():
        for g in grads:
            g.mul_(factor)


def loop(model, opt, batch_list, clip=False):
    for x, y in batch_list:
        x, y = fd.shard((x, y))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip:
            clip_(model)
        opt.step()


def build(name, funcopt_side):
    cls, kw, factory, grouped = CASES[name]
    model = shard_model(make_model())
    params = groups(model) if grouped else list(model.parameters())
    if not funcopt_side:
        return model, cls(params, **kw)
    if factory is None:
        tx = funcopt.chain(funcopt.clip_by_global_norm(MAX_NORM), funcopt.adam(kw["lr"]))
        return model, funcopt.as_torch_optimizer(tx, params)
    return model, funcopt.as_torch_optimizer(factory, params, **kw)


def attempt(fn):
    try:
        return fn()
    except Exception:
        return "".join(traceback.format_exc().splitlines(keepends=True)[-12:])


def dcp_round_trip(root):
    """Adapter state through get_state_dict -> DCP -> set_state_dict, continued training."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = build("adamw", True)
    loop(model, opt, batches()[:SAVE_AT])
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{root}/adapter")
    loop(model, opt, batches()[SAVE_AT:])
    model2, opt2 = build("adamw", True)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)  # no fake step on a fresh adapter: counts stay 0
    fresh_counts = [int(s[0].count) for s in opt2.funcopt_state]
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=f"{root}/adapter")
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    loop(model2, opt2, batches()[SAVE_AT:])
    entry = next(iter(optim_sd["state"].values()))
    return {"state_keys": sorted(optim_sd["state"]), "entry_keys": sorted(entry), "fresh_counts": fresh_counts,
            "sharded": type(entry["exp_avg"]).__name__, "final": full_params(model), "resumed": full_params(model2),
            "resumed_counts": [int(s[0].count) for s in opt2.funcopt_state]}


def worker(root):
    out = {}
    for name in CASES:
        clip = name == "clip_adam"
        model, opt = build(name, False)
        loop(model, opt, batches(), clip)
        out[f"torch/{name}"] = full_params(model)

        def adapter(name=name):
            model, opt = build(name, True)
            loop(model, opt, batches())
            return full_params(model)

        out[f"adapter/{name}"] = attempt(adapter)
    tx = funcopt.chain(funcopt.clip_by_global_norm(MAX_NORM), funcopt.adam(1e-2))
    model = shard_model(make_model())
    train(tx, model, tx.init(fd.module_params(model)), batches())
    out["functional/clip_adam"] = full_params(model)
    out["dcp"] = attempt(lambda: dcp_round_trip(root))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.distributed.checkpoint.state_dict  # noqa: F401  (inherited by the forked ranks)
    import torch.distributed.fsdp  # noqa: F401

    return fd.launch(worker, 2, (str(tmp_path_factory.mktemp("adapter")),), start_method="fork")


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_equals_torch_optim_under_fsdp2(results, name):
    for r in results:
        got = r[f"adapter/{name}"]
        assert not isinstance(got, str), got
        assert_trees_close(got, r[f"torch/{name}"], rtol=1e-10, atol=1e-12, msg=name)


def test_functional_route_equals_torch_optim_under_fsdp2(results):
    for r in results:
        assert_trees_close(r["functional/clip_adam"], r["torch/clip_adam"], rtol=1e-10, atol=1e-12)


def test_get_state_dict_and_dcp_round_trip_with_the_adapter(results):
    for r in results:
        got = r["dcp"]
        assert not isinstance(got, str), got
        assert got["state_keys"], "get_state_dict(model, adapter) returned no optimizer state"
        assert got["entry_keys"] == ["exp_avg", "exp_avg_sq", "step"] and got["sharded"] == "DTensor"
        assert got["fresh_counts"] == [0, 0]
        assert got["resumed_counts"] == [len(batches()), len(batches())]
        assert_trees_close(got["resumed"], got["final"], rtol=0, atol=0)


def test_adapter_takes_a_parameter_generator_for_a_chain():
    model = torch.nn.Linear(2, 2)
    tx = funcopt.chain(funcopt.clip_by_global_norm(1.0), funcopt.adam(1e-2))
    opt = funcopt.as_torch_optimizer(tx, model.parameters())
    assert len(opt.param_groups[0]["params"]) == 2
