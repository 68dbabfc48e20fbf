"""The names checkpoints and state_dicts record NamedTuple types under (funcopt.checkpoint._names).

funcopt's state types are recorded under stable names ("funcopt.ScaleByAdamState") that do not
depend on the defining module; the names funcopt 0.1.0 recorded ("funcopt.transforms:ScaleByAdamState")
resolve through an alias table; resolving a name never imports a module.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import json
import pkgutil
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import funcopt
import funcopt.checkpoint as ck
from funcopt.base import stable_name_of, type_of_stable_name
from funcopt.checkpoint import _names
from funcopt.interop._plain import _TAG, state_from_plain, state_to_plain

DATA = Path(__file__).resolve().parent / "data" / "v0_1_0"

# NamedTuples funcopt exports that are not optimizer states and never go into a checkpoint.
NOT_STATES = {"GradientTransformation"}
NOT_STATE_PACKAGES = ("funcopt.fast",)  # fast-path routes, plans and backends


# ---------------------------------------------------------------------------------------------
# helpers


def _public_packages() -> dict[str, object]:
    mods = {"funcopt": funcopt}
    for info in pkgutil.walk_packages(funcopt.__path__, "funcopt."):
        if info.ispkg and not any(part.startswith("_") for part in info.name.split(".")):
            mods[info.name] = importlib.import_module(info.name)
    return mods


def _exported_state_types() -> dict[type, list[str]]:
    """``{class: ["funcopt.X", "funcopt.transforms.X", ...]}`` for every exported funcopt state NamedTuple."""
    found: dict[type, list[str]] = {}
    for mod_name, mod in _public_packages().items():
        if mod_name.startswith(NOT_STATE_PACKAGES):
            continue
        for name in dir(mod):
            obj = getattr(mod, name)
            if (name.startswith("_") or name in NOT_STATES or not _names.is_namedtuple_class(obj)
                    or not obj.__module__.startswith("funcopt")
                    or obj.__module__.startswith(NOT_STATE_PACKAGES)):
                continue
            found.setdefault(obj, []).append(f"{mod_name}.{name}")
    return found


def _read_header(path) -> tuple[dict, dict, bytes]:
    """``(safetensors header without __metadata__, the funcopt document, tensor bytes)``."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    doc = json.loads(header.pop("__metadata__")["funcopt"])
    return header, doc, raw[8 + n:]


def _write_header(path, header: dict, doc: dict, data: bytes) -> None:
    """Writes a checkpoint with a hand-edited funcopt document (and a valid header CRC)."""
    full = {"__metadata__": {"funcopt": json.dumps(doc, separators=(",", ":")), "funcopt.crc32": "00000000"},
            **header}
    raw = json.dumps(full, separators=(",", ":")).encode("ascii")
    raw += b" " * ((-(8 + len(raw))) % 8)
    raw = raw.replace(b'"funcopt.crc32":"00000000"', f'"funcopt.crc32":"{zlib.crc32(raw):08x}"'.encode())
    Path(path).write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def _class_names(node) -> list[str]:
    """The recorded type names of the NamedTuple nodes of a header tree, depth first."""
    out = [node["cls"]] if node.get("t") == "namedtuple" else []
    for child in node.get("c", []):
        out += _class_names(child)
    return out


def _rename(node, mapping: dict[str, str]) -> None:
    if node.get("t") == "namedtuple" and node["cls"] in mapping:
        node["cls"] = mapping[node["cls"]]
    for child in node.get("c", []):
        _rename(child, mapping)


def _save_renamed(path, tree, mapping: dict[str, str]) -> None:
    ck.save(path, tree)
    header, doc, data = _read_header(path)
    _rename(doc["tree"], mapping)
    _write_header(path, header, doc, data)


def _adam_tree():
    params = {"w": torch.arange(3.0)}
    return {"params": params, "opt_state": funcopt.adam(1e-3).init(params)}


@contextlib.contextmanager
def _no_imports():
    """Asserts that the body imports no module: neither ``__import__`` of a module not loaded yet
    nor ``importlib.import_module`` is called, and ``sys.modules`` gains nothing."""
    before = set(sys.modules)
    calls: list[str] = []
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name not in sys.modules:
            calls.append(name)
        return real_import(name, globals, locals, fromlist, level)

    def guarded_import_module(name, package=None):
        calls.append(name)
        return real_import_module(name, package)

    builtins.__import__, importlib.import_module = guarded_import, guarded_import_module
    try:
        yield
    finally:
        builtins.__import__, importlib.import_module = real_import, real_import_module
    assert calls == [], f"imported {calls}"
    assert set(sys.modules) - before == set(), f"new modules: {set(sys.modules) - before}"


# ---------------------------------------------------------------------------------------------
# stable names


def test_every_exported_state_type_has_a_unique_stable_name():
    found = _exported_state_types()
    assert len(found) >= 21, sorted(c.__qualname__ for c in found)
    names: dict[str, type] = {}
    for cls, where in found.items():
        name = stable_name_of(cls)
        assert name is not None, f"{where[0]} has no stable name: decorate it with @funcopt.base.stable_name"
        assert name == f"funcopt.{cls.__name__}", (where, name)
        assert name not in names, f"{name} names both {names[name]} and {cls}"
        names[name] = cls
        assert type_of_stable_name(name) is cls and ck.resolve_type_name(name) is cls
        assert ck.type_name(cls) == name


def test_state_types_annotations_resolve():
    import typing

    for cls in _exported_state_types():
        assert list(typing.get_type_hints(cls)) == list(cls._fields), cls


def test_every_alias_points_to_a_stable_name_of_the_same_class_name():
    for old, new in _names.ALIASES.items():
        cls = type_of_stable_name(new)
        assert cls is not None, f"alias {old} -> {new}: no class has that stable name"
        assert ck.resolve_type_name(old) is cls
        assert _names.short_name(old) == cls.__name__ == _names.short_name(new)


def test_aliases_cover_the_names_funcopt_0_1_0_recorded():
    recorded = json.loads((DATA / "state_types.json").read_text())
    names = {cls for entries in recorded.values() for _, cls in entries}
    assert names and names <= set(_names.ALIASES)
    for name in (
        "funcopt.base:EmptyState", "funcopt.lbfgs:ScaleByLbfgsState", "funcopt.linalg_common:SolveInfo",
        "funcopt.linesearch:ScaleByBacktrackingLinesearchState", "funcopt.minimize:MinimizeResult",
        "funcopt.sweep_result:BestConfig", "funcopt.linalg:SolveInfo", "funcopt.sweep:BestConfig",
    ):
        assert name in _names.ALIASES


def test_a_file_saved_now_records_stable_names(tmp_path):
    f = tmp_path / "a.safetensors"
    tx = funcopt.chain(funcopt.clip_by_global_norm(1.0), funcopt.adam(1e-3))
    params = {"w": torch.ones(2)}
    ck.save(f, {"params": params, "opt_state": tx.init(params)})
    _, doc, _ = _read_header(f)
    names = _class_names(doc["tree"])
    assert "funcopt.ScaleByAdamState" in names and "funcopt.EmptyState" in names
    assert all(":" not in n for n in names), names
    out = ck.load(f)
    assert type(out["opt_state"][1][0]) is funcopt.ScaleByAdamState


@pytest.mark.parametrize("old", sorted(_names.ALIASES))
def test_old_names_load(tmp_path, old):
    cls = ck.resolve_type_name(old)
    f = tmp_path / "old.safetensors"
    value = {"s": cls(*[torch.tensor(float(i)) for i in range(len(cls._fields))])}
    _save_renamed(f, value, {stable_name_of(cls): old})
    _, doc, _ = _read_header(f)
    assert _class_names(doc["tree"]) == [old]
    for out in (ck.load(f), ck.load(f, like=value)):
        assert type(out["s"]) is cls
        assert [float(x) for x in out["s"]] == [float(i) for i in range(len(cls._fields))]


def test_an_old_optimizer_state_loads_without_and_with_like(tmp_path):
    f = tmp_path / "adam.safetensors"
    tree = _adam_tree()
    _save_renamed(f, tree, {"funcopt.ScaleByAdamState": "funcopt.transforms:ScaleByAdamState",
                            "funcopt.EmptyState": "funcopt.base:EmptyState"})
    for out in (ck.load(f), ck.load(f, like=tree)):
        assert type(out["opt_state"][0]) is funcopt.ScaleByAdamState
        assert type(out["opt_state"][1]) is funcopt.EmptyState
        assert torch.equal(out["params"]["w"], tree["params"]["w"])


# ---------------------------------------------------------------------------------------------
# unknown names: a clear error, and never an import


def test_unknown_funcopt_name_names_the_path_and_the_fix(tmp_path):
    f = tmp_path / "u.safetensors"
    _save_renamed(f, _adam_tree(), {"funcopt.ScaleByAdamState": "funcopt.ScaleByFutureState"})
    with pytest.raises(ck.CheckpointError, match=r"u\.safetensors: the node at \['opt_state'\]\[0\] is a "
                       r"NamedTuple 'funcopt\.ScaleByFutureState'.*newer funcopt.*like=") as info:
        ck.load(f)
    assert info.value.file == str(f)


def test_unknown_user_name_says_to_register(tmp_path):
    f = tmp_path / "u.safetensors"
    _save_renamed(f, _adam_tree(), {"funcopt.ScaleByAdamState": "myproject.states:Gone"})
    with pytest.raises(ck.CheckpointError, match=r"node at \['opt_state'\]\[0\] is a NamedTuple "
                       r"'myproject\.states:Gone'.*funcopt\.checkpoint\.register\(YourClass\).*like="):
        ck.load(f)


@pytest.mark.parametrize("name", [
    "os:system", "subprocess:Popen", "funcopt.fast:something", "funcopt.fast:fast_path_of",
    "funcopt.__main__:main", "funcopt.never_a_module:State", "funcopt.fast.native._never:X",
    "funcopt.base:FuncoptError", "funcopt.base:GradientTransformation", "funcopt.fast.Route",
])
def test_names_in_a_file_never_import_anything(tmp_path, monkeypatch, name):
    monkeypatch.delitem(sys.modules, "funcopt.__main__", raising=False)
    f = tmp_path / "evil.safetensors"
    _save_renamed(f, _adam_tree(), {"funcopt.ScaleByAdamState": name})
    plain = state_to_plain(_adam_tree()["opt_state"])
    plain["items"][0]["type"] = name
    with _no_imports():
        with pytest.raises(ck.CheckpointError, match=r"node at \['opt_state'\]\[0\].*neither a funcopt state type nor"):
            ck.load(f)
        with pytest.raises(funcopt.FuncoptError, match=r"cannot rebuild the NamedTuple .*at \[0\].*like="):
            state_from_plain(plain)
        assert ck.resolve_type_name(name) is None
    assert "funcopt.__main__" not in sys.modules


def test_no_importlib_in_name_resolution():
    import funcopt.checkpoint._names as names_module
    import funcopt.checkpoint._tree as tree_module
    import funcopt.interop._plain as plain_module

    for module in (names_module, tree_module, plain_module):
        source = Path(module.__file__).read_text()
        assert "importlib" not in source and "sys.modules" not in source, module.__name__


# ---------------------------------------------------------------------------------------------
# register


class _UserState(NamedTuple):
    count: torch.Tensor


@pytest.fixture
def clean_registry():
    saved = dict(_names._REGISTRY), dict(_names._REGISTERED_NAMES)
    yield
    _names._REGISTRY.clear()
    _names._REGISTRY.update(saved[0])
    _names._REGISTERED_NAMES.clear()
    _names._REGISTERED_NAMES.update(saved[1])


@pytest.mark.usefixtures("clean_registry")
def test_register_refuses_funcopt_names():
    for name in ("funcopt.MyState", "funcopt.ScaleByAdamState", "funcopt.transforms:ScaleByAdamState", "funcopt"):
        with pytest.raises(funcopt.FuncoptError, match=r"reserved for funcopt's own state types.*name="):
            ck.register(_UserState, name=name)
    # a class reporting a funcopt module has a reserved default name
    class Fake(NamedTuple):
        x: torch.Tensor

    Fake.__module__ = "funcopt.transforms"
    with pytest.raises(funcopt.FuncoptError, match="reserved"):
        ck.register(Fake)
    # funcopt's own types need no registration and keep their stable names
    assert ck.register(funcopt.ScaleByAdamState) is funcopt.ScaleByAdamState
    with pytest.raises(funcopt.FuncoptError, match="always saved under its stable name 'funcopt.ScaleByAdamState'"):
        ck.register(funcopt.ScaleByAdamState, name="myproject.Adam")
    assert ck.type_name(funcopt.ScaleByAdamState) == "funcopt.ScaleByAdamState"
    assert not any(name.startswith("funcopt") for name in _names._REGISTRY)


@pytest.mark.usefixtures("clean_registry")
def test_registered_user_name_is_recorded_and_resolved(tmp_path):
    f = tmp_path / "u.safetensors"
    value = {"s": _UserState(torch.tensor(4))}
    assert ck.type_name(_UserState) == f"{__name__}:_UserState"
    assert ck.resolve_type_name(ck.type_name(_UserState)) is None
    ck.register(_UserState, name="myproject.Counter")
    assert ck.type_name(_UserState) == "myproject.Counter"
    assert ck.resolve_type_name("myproject.Counter") is _UserState
    ck.save(f, value)
    _, doc, _ = _read_header(f)
    assert _class_names(doc["tree"]) == ["myproject.Counter"]
    for out in (ck.load(f), ck.load(f, like=value)):
        assert type(out["s"]) is _UserState and out["s"].count.item() == 4
    # a state_dict records and resolves the same name
    plain = state_to_plain(value)
    assert plain["values"][0][_TAG] == "namedtuple" and plain["values"][0]["type"] == "myproject.Counter"
    assert type(state_from_plain(plain)["s"]) is _UserState
    assert type(state_from_plain(plain, like=value)["s"]) is _UserState


# ---------------------------------------------------------------------------------------------
# state_dicts (funcopt.interop)


def _rename_plain(node, mapping: dict[str, str]) -> None:
    if isinstance(node, dict):
        if node.get(_TAG) == "namedtuple" and node["type"] in mapping:
            node["type"] = mapping[node["type"]]
        for v in node.values():
            _rename_plain(v, mapping)
    elif isinstance(node, list):
        for v in node:
            _rename_plain(v, mapping)


def test_state_dict_records_stable_names_and_loads_0_1_0_names():
    module = torch.nn.Linear(3, 2)
    opt = funcopt.as_torch_optimizer(funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2), module)
    module(torch.ones(1, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()

    def plain_state(sd):  # torch.optim's layout keeps the funcopt state in the param group
        return sd["funcopt_state"] if "funcopt_state" in sd else sd["param_groups"][0]["funcopt"]["state"]

    assert plain_state(sd)["type"] == "funcopt.InjectHyperparamsState"
    old = {"funcopt.InjectHyperparamsState": "funcopt.inject:InjectHyperparamsState",
           "funcopt.ScaleByAdamState": "funcopt.transforms:ScaleByAdamState",
           "funcopt.EmptyState": "funcopt.base:EmptyState"}
    _rename_plain(sd, old)
    assert plain_state(sd)["type"] == "funcopt.inject:InjectHyperparamsState"
    rebuilt = state_from_plain(plain_state(sd))
    assert type(rebuilt) is funcopt.InjectHyperparamsState
    assert [type(s) for s in rebuilt.inner_state] == [type(s) for s in opt.funcopt_state.inner_state]
    assert funcopt.ScaleByAdamState in [type(s) for s in rebuilt.inner_state]
    fresh = funcopt.as_torch_optimizer(funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-2),
                                       torch.nn.Linear(3, 2))
    fresh.load_state_dict(sd)
    assert int(fresh.funcopt_state.count) == 1
    adam_states = [
        next(s for s in o.funcopt_state.inner_state if isinstance(s, funcopt.ScaleByAdamState)) for o in (fresh, opt)
    ]
    assert torch.equal(adam_states[0].mu["weight"], adam_states[1].mu["weight"])


def test_state_from_plain_with_like_refuses_another_type():
    plain = state_to_plain(funcopt.adam(1e-3).init({"w": torch.zeros(3)}))
    _rename_plain(plain, {"funcopt.ScaleByAdamState": "funcopt.TraceState"})
    with pytest.raises(funcopt.FuncoptError, match=r"at \[0\]: saved TraceState"):
        state_from_plain(plain, like=funcopt.adam(1e-3).init({"w": torch.zeros(3)}))
