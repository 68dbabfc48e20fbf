"""funcopt.nn: module <-> (params, buffers) pytrees."""

import pytest
import torch

import funcopt


def _model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_extract_copies_and_apply_matches_module():
    m = _model().eval()
    params, buffers = funcopt.nn.extract(m)
    assert set(params) == {k for k, _ in m.named_parameters()}
    assert "1.running_mean" in buffers
    x = torch.randn(5, 3)
    torch.testing.assert_close(funcopt.nn.apply(m, params, buffers, x), m(x))
    params["0.weight"] += 1.0
    assert not torch.equal(params["0.weight"], m[0].weight), "extract must copy by default"
    views, _ = funcopt.nn.extract(m, copy=False)
    assert views["0.weight"].data_ptr() == m[0].weight.data_ptr()


def test_functional_training_leaves_module_untouched_then_load():
    m = _model().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params, buffers = funcopt.nn.extract(m)
    f = funcopt.nn.as_function(m)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    tx = funcopt.sgd(0.1)
    state = tx.init(params)
    for _ in range(3):
        grads = torch.func.grad(lambda p: ((f(p, buffers, x) - y) ** 2).mean())(params)
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    funcopt.nn.load(m, params)
    torch.testing.assert_close(m[0].weight.detach(), params["0.weight"])


def test_errors():
    m = _model()
    with pytest.raises(funcopt.FuncoptError, match="torch.nn.Module"):
        funcopt.nn.extract({"not": "a module"})
    params, _ = funcopt.nn.extract(m)
    params["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(funcopt.FuncoptError, match=r"\['0.weight'\] has shape \(2, 2\)"):
        funcopt.nn.load(m, params)
    with pytest.raises(funcopt.FuncoptError, match="unexpected"):
        funcopt.nn.load(m, {"nope": torch.zeros(1)})
