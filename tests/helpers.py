"""Shared test helpers: path-aware tree comparison and small test problems."""

from __future__ import annotations

import torch

import funcopt
from funcopt import tree


def assert_trees_close(actual, expected, *, rtol=1e-6, atol=0.0, equal_nan=False, msg=""):
    """Asserts two pytrees have the same structure and leaf-wise close values; names the path."""
    tree.check_same_structure(actual, expected, ("actual", "expected"))
    for path, a, e in zip(tree.paths(expected), tree.leaves(actual), tree.leaves(expected)):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"{msg} leaf {path}: expected a tensor, got {type(a)}"
            assert a.shape == e.shape, f"{msg} leaf {path}: shape {tuple(a.shape)} != {tuple(e.shape)}"
            assert a.dtype == e.dtype, f"{msg} leaf {path}: dtype {a.dtype} != {e.dtype}"
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m: f"{msg} leaf {path}: {m}")
        else:
            assert a == e, f"{msg} leaf {path}: {a!r} != {e!r}"


def assert_trees_equal(actual, expected, msg=""):
    """Bitwise equality of two pytrees (NaNs equal), naming the first differing path."""
    tree.check_same_structure(actual, expected, ("actual", "expected"))
    for path, a, e in zip(tree.paths(expected), tree.leaves(actual), tree.leaves(expected)):
        if isinstance(e, torch.Tensor):
            assert a.dtype == e.dtype and a.shape == e.shape, f"{msg} leaf {path}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
            assert torch.equal(a, e) or (torch.isnan(a) == torch.isnan(e)).all() and torch.equal(
                torch.nan_to_num(a), torch.nan_to_num(e)
            ), f"{msg} leaf {path} differs"
        else:
            assert a == e, f"{msg} leaf {path}: {a!r} != {e!r}"


def snapshot(t):
    """Deep copies of every tensor leaf (for purity checks)."""
    return tree.map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, t)


def mlp_problem(dtype=torch.float64, seed=0, n=32, d_in=4, hidden=8, d_out=3):
    """A tiny tanh MLP classification problem: returns (module, params dict, loss_fn(params), (X, Y))."""
    g = torch.Generator().manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    module = module.to(dtype)
    X = torch.randn(n, d_in, generator=g).to(dtype)
    Y = torch.randint(0, d_out, (n,), generator=g)
    params, _ = funcopt.nn.extract(module)

    def loss_fn(p, X=X, Y=Y):
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(module, p, None, X), Y)

    return module, params, loss_fn, (X, Y)


def nested_params(dtype=torch.float64, seed=0):
    """Nested dict/list/tuple params of several shapes, for structure-heavy tests."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return {"encoder": {"w": r(3, 4), "b": r(4)}, "heads": [r(2, 2), (r(5), r(()))]}
