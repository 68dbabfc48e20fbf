"""funcopt.tree: structure checks with paths, arithmetic, stack/unstack, ravel."""

from typing import NamedTuple

import pytest
import torch

from funcopt import tree


class Pair(NamedTuple):
    mu: object
    nu: object


def _t():
    return {"b": torch.arange(3.0), "a": [torch.ones(2, 2), (torch.tensor(5.0), None)]}


def test_paths_are_readable_and_match_leaf_order():
    t = (Pair({"w": torch.ones(1)}, [torch.zeros(2)]),)
    assert tree.paths(t) == ["[0].mu['w']", "[0].nu[0]"]
    assert len(tree.leaves(t)) == 2


def test_map_keeps_none_and_checks_structure_with_path():
    out = tree.map(lambda x, y: x + y, _t(), _t())
    assert out["a"][1][1] is None
    torch.testing.assert_close(out["b"], torch.arange(3.0) * 2)
    bad = _t()
    bad["a"][1] = (torch.tensor(5.0), torch.ones(1))
    with pytest.raises(ValueError, match=r"at \['a'\]\[1\]\[1\]"):
        tree.map(torch.add, _t(), bad, names=("left", "right"))
    with pytest.raises(ValueError, match=r"left and right"):
        tree.map(torch.add, {"x": torch.ones(1)}, {"y": torch.ones(1)}, names=("left", "right"))


def test_map_with_path_passes_paths():
    seen = []
    tree.map_with_path(lambda p, x: seen.append(p) or x, {"k": [torch.ones(1)]})
    assert seen == ["['k'][0]"]


def test_arithmetic_and_norms_match_flattened_vectors():
    a, b = _t(), tree.map(lambda x: x * 3 + 1, _t())
    va, _ = tree.ravel(a)
    vb, _ = tree.ravel(b)
    torch.testing.assert_close(tree.vdot(a, b), va @ vb)
    torch.testing.assert_close(tree.norm(a), torch.linalg.vector_norm(va))
    torch.testing.assert_close(tree.ravel(tree.add_scaled(a, 2.0, b))[0], va + 2 * vb)
    torch.testing.assert_close(tree.ravel(tree.sub(a, b))[0], va - vb)
    torch.testing.assert_close(tree.ravel(tree.scale(0.5, a))[0], va * 0.5)
    assert tree.num_elements(a) == va.numel() == 8


def test_vdot_mixed_dtypes_and_empty_tree():
    a = {"h": torch.ones(2, dtype=torch.float64), "f": torch.ones(3)}
    assert float(tree.vdot(a, a)) == 5.0
    assert float(tree.vdot({}, {})) == 0.0


def test_like_constructors_and_cast():
    t = {"f": torch.ones(2), "i": torch.ones(2, dtype=torch.int64)}
    assert tree.zeros_like(t)["f"].sum() == 0 and tree.ones_like(t)["i"].dtype == torch.int64
    assert tree.full_like(t, 7.0)["f"][0] == 7.0
    c = tree.cast(t, torch.float64)
    assert c["f"].dtype == torch.float64 and c["i"].dtype == torch.int64
    assert tree.cast(t, None) is t


def test_where_selects_whole_trees():
    a, b = {"x": torch.ones(2)}, {"x": torch.zeros(2)}
    assert tree.where(torch.tensor(True), a, b)["x"].sum() == 2
    assert tree.where(torch.tensor(False), a, b)["x"].sum() == 0


def test_stack_unstack_round_trip_and_errors():
    trees = [tree.map(lambda x, i=i: x + i, _t()) for i in range(3)]
    stacked = tree.stack(trees)
    assert stacked["a"][0].shape == (3, 2, 2)
    for got, want in zip(tree.unstack(stacked), trees):
        for x, y in zip(tree.leaves(got), tree.leaves(want)):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="at least one"):
        tree.stack([])
    with pytest.raises(ValueError, match="tree 0 and tree 1"):
        tree.stack([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    with pytest.raises(ValueError, match="leading axis"):
        tree.unstack({"a": torch.ones(2), "b": torch.ones(3)})


def test_ravel_round_trips_mixed_dtypes_and_checks_length():
    t = {"f": torch.randn(2, 3), "d": torch.randn(4, dtype=torch.float64), "s": torch.tensor(1.5)}
    v, unravel = tree.ravel(t)
    assert v.shape == (11,) and v.dtype == torch.float64
    back = unravel(v)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])
    with pytest.raises(ValueError, match=r"shape \(11,\)"):
        unravel(torch.zeros(3))


def test_ravel_is_differentiable():
    t = {"w": torch.randn(3, dtype=torch.float64)}

    def f(p):
        v, _ = tree.ravel(p)
        return (v**2).sum()

    g = torch.func.grad(f)(t)
    torch.testing.assert_close(g["w"], 2 * t["w"])
