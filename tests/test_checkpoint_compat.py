"""Checkpoints written by funcopt 0.1.0 (tests/data/v0_1_0/) still load and resume bitwise.

The fixtures were written by ``tests/data/v0_1_0/make_fixtures.py`` with the 0.1.0 code; the
optimizer configurations and the problem are in ``tests/data/v0_1_0/cases.py``, shared with that
script. For every case this test, with the current code:

(a) loads ``<case>.safetensors`` without ``like=`` and checks every NamedTuple state node is
    rebuilt with the class name the 0.1.0 header recorded (``state_types.json``) and that the
    tree has the structure of the current optimizer's ``init``;
(b) loads it with ``like=`` a template from the current optimizer's ``init``;
(c) resumes ``M`` steps and asserts every params/state leaf equals
    ``<case>.expected.safetensors`` bitwise;
(d) restores the ``manager/`` folder with ``CheckpointManager``.

Self-contained: imports only funcopt, torch, pytest, optree, pathlib (and importlib/json/shutil
from the standard library).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import optree
import pytest
import torch

import funcopt
import funcopt.checkpoint as ck

DATA = Path(__file__).resolve().parent / "data" / "v0_1_0"


def _load_cases():
    name = "funcopt_v0_1_0_cases"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DATA / "cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


C = _load_cases()
STATE_TYPES = json.loads((DATA / "state_types.json").read_text())
CASE_NAMES = list(C.CASES)


# ---------------------------------------------------------------------------------------------
# helpers


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and isinstance(getattr(type(x), "_fields", None), tuple)


def _namedtuple_nodes(node, path: str = "") -> list[tuple[str, str]]:
    """``[(path, class __name__)]`` for every NamedTuple node, in the order of the 0.1.0 header."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _namedtuple_nodes(v, f"{path}[{k!r}]")
    elif _is_namedtuple(node):
        out.append((path, type(node).__name__))
        for f, v in zip(type(node)._fields, node):
            out += _namedtuple_nodes(v, f"{path}.{f}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            out += _namedtuple_nodes(v, f"{path}[{i}]")
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (NaN payloads and the sign of zero count)."""
    if t.is_floating_point() or t.is_complex():
        return t.detach().contiguous().reshape(-1).view(torch.uint8)
    return t.detach()


def _leaves(node, path: str = "") -> list[tuple[str, object]]:
    """``[(path, leaf)]`` with funcopt's path syntax (``['opt_state'][0].mu['w']``); nodes too,
    as ``(path, "<node ...>")`` entries, so a difference in structure names its place."""
    if isinstance(node, dict):
        out = [(path, f"<{type(node).__name__} keys={list(node)}>")]
        for k, v in node.items():
            out += _leaves(v, f"{path}[{k!r}]")
        return out
    if _is_namedtuple(node):
        out = [(path, f"<{type(node).__name__} fields={list(type(node)._fields)}>")]
        for f, v in zip(type(node)._fields, node):
            out += _leaves(v, f"{path}.{f}")
        return out
    if isinstance(node, (list, tuple)):
        out = [(path, f"<{type(node).__name__} len={len(node)}>")]
        for i, v in enumerate(node):
            out += _leaves(v, f"{path}[{i}]")
        return out
    return [(path, node)]


def _assert_bitwise(actual, expected, what: str) -> None:
    got, want = _leaves(actual), _leaves(expected)
    got_paths, want_paths = [p for p, _ in got], [p for p, _ in want]
    assert got_paths == want_paths, (
        f"{what}: different paths; only in the result: {sorted(set(got_paths) - set(want_paths))}, "
        f"only expected: {sorted(set(want_paths) - set(got_paths))}")
    for (path, a), (_, e) in zip(got, want):
        where = f"{what} at {path or '<root>'}"
        assert type(a) is type(e), f"{where}: {type(a).__name__} vs expected {type(e).__name__}"
        if isinstance(e, torch.Tensor):
            assert a.dtype == e.dtype, f"{where}: dtype {a.dtype} vs expected {e.dtype}"
            assert a.shape == e.shape, f"{where}: shape {tuple(a.shape)} vs expected {tuple(e.shape)}"
            assert torch.equal(_bits(a), _bits(e)), f"{where}: values differ:\n{a}\nvs expected\n{e}"
        else:
            assert a == e, f"{where}: {a!r} vs expected {e!r}"


def _template(case):
    params, data = C.make_problem(case.dtype)
    tx = case.make_tx()
    return tx, {"params": params, "opt_state": tx.init(params), "step": 0, "data": data}


# ---------------------------------------------------------------------------------------------
# (a), (b), (c): every case


def test_every_fixture_has_a_case_and_expected_file():
    on_disk = sorted(p.name[: -len(".safetensors")] for p in DATA.glob("*.safetensors")
                     if not p.name.endswith(".expected.safetensors") and p.name != C.MANAGER_INIT)
    assert on_disk == sorted(CASE_NAMES)
    for name in CASE_NAMES:
        assert (DATA / f"{name}.expected.safetensors").is_file(), name
    assert sorted(STATE_TYPES) == sorted(CASE_NAMES + ["manager"])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_load_without_like_rebuilds_state_types(name):
    case = C.CASES[name]
    tree = ck.load(DATA / f"{name}.safetensors")
    assert set(tree) == {"params", "opt_state", "step", "data"}
    assert tree["step"] == C.K and type(tree["step"]) is int
    recorded = [(path, cls.partition(":")[2].rsplit(".", 1)[-1]) for path, cls in STATE_TYPES[name]]
    assert recorded, f"{name}: state_types.json lists no NamedTuple"
    assert _namedtuple_nodes(tree) == recorded
    for leaf in optree.tree_leaves(tree["params"]) + optree.tree_leaves(tree["data"]):
        assert leaf.dtype == case.dtype
    # the rebuilt tree has the structure (container and NamedTuple types) of today's init
    _, template = _template(case)
    assert optree.tree_structure(tree["opt_state"]) == optree.tree_structure(template["opt_state"])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_load_with_like_matches_load_without(name):
    case = C.CASES[name]
    _, template = _template(case)
    with_like = ck.load(DATA / f"{name}.safetensors", like=template)
    without = ck.load(DATA / f"{name}.safetensors")
    assert _namedtuple_nodes(with_like) == _namedtuple_nodes(template)
    _assert_bitwise(with_like, without, f"{name}: load(like=) vs load()")


@pytest.mark.parametrize("like", [True, False], ids=["like", "no_like"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_resume_matches_expected_bitwise(name, like):
    case = C.CASES[name]
    tx, template = _template(case)
    tree = ck.load(DATA / f"{name}.safetensors", like=template if like else None)
    params, state = C.run(case, tx, tree["params"], tree["opt_state"], tree["data"], tree["step"], C.M)
    expected = ck.load(DATA / f"{name}.expected.safetensors")
    assert expected["step"] == C.K + C.M
    _assert_bitwise({"params": params, "opt_state": state, "step": tree["step"] + C.M}, expected,
                    f"{name}: resumed {C.M} steps")


# ---------------------------------------------------------------------------------------------
# (d): the CheckpointManager folder


def test_checkpoint_manager_restores_latest(tmp_path):
    folder = tmp_path / C.MANAGER_DIR
    shutil.copytree(DATA / C.MANAGER_DIR, folder)  # the manager may tidy its folder; keep the fixture
    mgr = funcopt.CheckpointManager(folder, max_to_keep=None)
    steps = list(range(1, C.MANAGER_STEPS + 1))
    assert mgr.all_steps() == steps
    assert mgr.latest_step() == C.MANAGER_STEPS

    # recompute the run with today's code from the stored initial params and data
    case = C.MANAGER_CASE
    init = ck.load(DATA / C.MANAGER_INIT)
    tx = case.make_tx()
    params, data = init["params"], init["data"]
    state = tx.init(params)
    x, y = data["x"].flatten(0, 1), data["y"].flatten(0, 1)
    template = {"params": params, "opt_state": tx.init(params), "step": 0}
    for t in range(C.MANAGER_STEPS):
        params, state = C.step(case, tx, params, state, data, t)
        s = t + 1
        ours = {"params": params, "opt_state": state, "step": s}
        _assert_bitwise(mgr.restore(step=s), ours, f"manager step {s}")
        assert mgr.metrics(s) == {"loss": C.loss(params, x, y).item()}

    latest = mgr.restore()
    assert [(p, c.rsplit(":", 1)[-1]) for p, c in STATE_TYPES["manager"]] == _namedtuple_nodes(latest)
    _assert_bitwise(latest, ours, "manager latest (no like)")
    _assert_bitwise(mgr.restore(like=template), ours, "manager latest (like=)")
    _assert_bitwise(latest, ck.load(folder / Path(mgr.path(C.MANAGER_STEPS)).name), "manager latest vs file")
