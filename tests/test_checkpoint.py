"""Tests of funcopt.checkpoint: round trips, templates, device/dtype mapping, bad input, exact resume."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import funcopt
import funcopt.checkpoint as ck
from funcopt.checkpoint import _names
from funcopt.checkpoint import CheckpointError
from funcopt.checkpoint._reader import Reader


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny: one intra-op thread avoids OpenMP synchronisation overhead,
    which dominates (100x) when the CPU is shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the resume child imports this file
from helpers import assert_trees_equal  # noqa: E402


def _mixed_tree():
    x = torch.arange(24.0).reshape(4, 6)
    params = {"w": torch.randn(3, 4), "b": torch.randn(4, dtype=torch.float64)}
    tx = funcopt.adam(1e-3, amsgrad=True)
    return {
        "params": params,
        "opt_state": tx.init(params),
        "views": [x.t(), x[:, ::2], x[1:3], x],  # non-contiguous, sharing one storage
        "half": torch.randn(2, 3).half(),
        "bf16": torch.randn(5).bfloat16(),
        "ints": (torch.tensor(7, dtype=torch.int64), torch.arange(4, dtype=torch.int32), torch.tensor([1, -2], dtype=torch.int8)),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "zero_dim": torch.tensor(2.5),
        "complex": torch.randn(3, dtype=torch.complex64),
        "scalars": {"i": 3, "big": 2**70, "f": 0.1, "nan": float("nan"), "inf": -math.inf, "s": "héllo", "t": True},
        "none": None,
        "odict": OrderedDict([("z", torch.ones(1)), ("a", 1)]),
        7: "int key",
        "empty_containers": ({}, [], ()),
    }


def _equal_with_nan(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _assert_same(actual, expected, path="<root>"):
    """Bitwise equality including container types, NaN floats and key order."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} vs {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert actual.device == expected.device, path
        assert torch.equal(actual, expected) or torch.equal(torch.view_as_real(actual) if actual.is_complex() else actual, expected), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} vs {list(expected)}"
        for k in expected:
            _assert_same(actual[k], expected[k], f"{path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{path}[{i}]")
    else:
        assert _equal_with_nan(actual, expected), f"{path}: {actual!r} vs {expected!r}"


def test_round_trip_rebuilds_types_values_and_order(tmp_path):
    tree = _mixed_tree()
    path = tmp_path / "c.safetensors"
    returned = ck.save(path, tree, metadata={"run": "r1", "seed": 0})
    assert returned == str(path.resolve())
    out = ck.load(path)
    _assert_same(out, tree)
    assert type(out["opt_state"][0]) is funcopt.ScaleByAdamState
    # with the tree itself as template the result is identical too
    _assert_same(ck.load(path, like=tree), tree)


def test_tensor_keys_are_the_pytree_paths(tmp_path):
    params = {"w": torch.zeros(2), 3: torch.ones(1)}
    tree = {"params": params, "opt_state": funcopt.inject_hyperparams(funcopt.adam)(learning_rate=0.1).init(params),
            "l": [torch.ones(1), (torch.ones(1), 2.0)]}
    ck.save(tmp_path / "p.safetensors", tree)
    saved = [leaf.path for leaf in ck.inspect(tmp_path / "p.safetensors").leaves]
    assert sorted(saved) == sorted(funcopt.tree.paths(tree))
    assert any(p.startswith("['opt_state'].inner_state[") and p.endswith(".mu[3]") for p in saved)


def test_file_is_plain_safetensors_both_ways(tmp_path):
    from safetensors.torch import load_file, save_file

    tree = {"a": torch.randn(3), "b": {"c": torch.arange(5)}}
    ck.save(tmp_path / "f.safetensors", tree)
    raw = load_file(str(tmp_path / "f.safetensors"))
    assert set(raw) == {"['a']", "['b']['c']"}
    assert torch.equal(raw["['b']['c']"], tree["b"]["c"])
    # a plain safetensors file (no funcopt metadata) loads as a flat dict
    save_file({"x": torch.ones(2), "y": torch.zeros(1, dtype=torch.int64)}, str(tmp_path / "plain.safetensors"))
    out = ck.load(tmp_path / "plain.safetensors")
    assert set(out) == {"x", "y"} and torch.equal(out["x"], torch.ones(2))
    info = ck.inspect(tmp_path / "plain.safetensors")
    assert not info.funcopt and info.num_tensors == 2


def test_like_restores_into_template_types_and_devices(tmp_path):
    params = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    tx = funcopt.sgd(0.1, momentum=0.9)
    state = tx.init(params)
    ck.save(tmp_path / "c.safetensors", {"params": params, "opt_state": state, "epoch": 4})
    template = {"params": funcopt.tree.zeros_like(params), "opt_state": tx.init(params), "epoch": 0}
    out = ck.load(tmp_path / "c.safetensors", like=template)
    assert out["epoch"] == 4 and torch.equal(out["params"]["w"], params["w"])
    assert type(out["opt_state"][0]) is funcopt.TraceState
    # templates on the meta device put every tensor there without reading data
    meta = funcopt.checkpoint.device_put(template, "meta")
    out = ck.load(tmp_path / "c.safetensors", like=meta)
    assert out["params"]["w"].device.type == "meta" and out["epoch"] == 4


def test_like_mismatches_name_the_path(tmp_path):
    params = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    tx = funcopt.adam()
    ck.save(tmp_path / "c.safetensors", {"params": params, "opt_state": tx.init(params)})
    f = tmp_path / "c.safetensors"
    good = {"params": params, "opt_state": tx.init(params)}
    with pytest.raises(CheckpointError, match=r"\['params'\]\['w'\] has shape \(3, 2\) in like but \(2, 3\) on disk"):
        ck.load(f, like={**good, "params": {"w": torch.zeros(3, 2), "b": params["b"]}})
    with pytest.raises(CheckpointError, match=r"\['params'\]\['b'\] has dtype torch.float64 in like.*dtype="):
        ck.load(f, like={**good, "params": {"w": params["w"], "b": params["b"].double()}})
    with pytest.raises(CheckpointError, match=r"mu\['w'\] has dtype torch.float32 in like but torch.float32 on disk "
                       r"\(torch.float64 after dtype=\)"):
        ck.load(f, like={**good, "params": {"w": params["w"].double(), "b": params["b"].double()}},
                dtype={torch.float32: torch.float64})
    out = ck.load(f, like=ck.device_put(good, None, dtype=torch.float64), dtype={torch.float32: torch.float64})
    assert out["params"]["b"].dtype == torch.float64 and out["opt_state"][0].mu["w"].dtype == torch.float64
    with pytest.raises(CheckpointError, match=r"dict at \['params'\] has keys \['extra'\] only in like"):
        ck.load(f, like={**good, "params": {**params, "extra": torch.zeros(1)}})
    with pytest.raises(CheckpointError, match=r"structure mismatch at \['opt_state'\]\[0\]: TraceState"):
        ck.load(f, like={**good, "opt_state": funcopt.sgd(0.1, momentum=0.9).init(params)})
    with pytest.raises(CheckpointError, match=r"structure mismatch at \['opt_state'\]: a tuple of length 3"):
        ck.load(f, like={**good, "opt_state": funcopt.adam(weight_decay=0.1).init(params)})
    with pytest.raises(CheckpointError, match=r"structure mismatch at \['params'\]\['w'\]: a Python int in like"):
        ck.load(f, like={**good, "params": {"w": 3, "b": params["b"]}})
    with pytest.raises(CheckpointError, match=r"like= has a set at \['params'\]"):
        ck.load(f, like={**good, "params": {"w": {1}, "b": params["b"]}})


def test_dtype_mapping_and_device_mapping(tmp_path):
    tree = {"w": torch.randn(4, dtype=torch.float64), "n": torch.arange(3), "h": torch.randn(2).half()}
    f = tmp_path / "c.safetensors"
    ck.save(f, tree)
    out = ck.load(f, dtype=torch.float32)
    assert out["w"].dtype == torch.float32 and out["n"].dtype == torch.int64 and out["h"].dtype == torch.float32
    assert torch.equal(out["w"], tree["w"].float())
    out = ck.load(f, dtype={torch.float16: torch.bfloat16})
    assert out["h"].dtype == torch.bfloat16 and out["w"].dtype == torch.float64
    # with like, dtype= makes a template of another dtype acceptable
    like = {"w": torch.zeros(4), "n": torch.zeros(3, dtype=torch.int64), "h": torch.zeros(2)}
    out = ck.load(f, like=like, dtype=torch.float32)
    assert out["w"].dtype == torch.float32
    # device: one device, a {source: target} dict, a callable by path
    assert ck.load(f, device="meta")["w"].device.type == "meta"
    assert ck.load(f, device={"cpu": "meta"})["n"].device.type == "meta"
    assert ck.load(f, device={torch.device("cuda:0"): "meta"})["n"].device.type == "cpu"
    assert ck.load(f, device={"cuda": "meta"})["n"].device.type == "cpu"
    with pytest.raises(CheckpointError, match="mapping key 'bogus' is not a device"):
        ck.load(f, device={"bogus": "meta"})
    seen = []

    def by_path(path, t):
        seen.append((path, t.dtype))
        return "meta" if path == "['w']" else "cpu"

    out = ck.load(f, device=by_path)
    assert out["w"].device.type == "meta" and out["n"].device.type == "cpu" and torch.equal(out["n"], tree["n"])
    assert ("['h']", torch.float16) in seen
    with pytest.raises(CheckpointError, match="is not a device"):
        ck.load(f, device="nonsense")
    with pytest.raises(TypeError, match="dtype must be"):
        ck.load(f, dtype="float32")


def test_device_put_moves_params_and_state_including_count():
    params = {"w": torch.randn(2, 2)}
    state = funcopt.adam().init(params)
    tree = {"params": params, "opt_state": state, "epoch": 1, "none": None}
    moved = ck.device_put(tree, "meta")
    assert moved["opt_state"][0].count.device.type == "meta"
    assert type(moved["opt_state"][0]) is funcopt.ScaleByAdamState and moved["epoch"] == 1
    back = ck.device_put(tree, torch.device("cpu"), dtype=torch.float64)
    assert back["params"]["w"].dtype == torch.float64 and back["opt_state"][0].count.dtype == torch.int64
    only_w = ck.device_put(tree, lambda path, t: "meta" if path.endswith("['w']") else t.device)
    assert only_w["params"]["w"].is_meta and not only_w["opt_state"][0].count.is_meta
    assert ck.device_put(tree, {"cpu": "meta"})["params"]["w"].is_meta
    assert ck.device_put(tree, {"cuda:1": "meta"})["params"]["w"].device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_and_map_back_to_cpu(tmp_path):
    params = {"w": torch.randn(3, 3, device="cuda")}
    tx = funcopt.adam(1e-2)
    state = tx.init(params)
    grads = {"w": torch.randn(3, 3, device="cuda")}
    _, state = tx.update(grads, state, params)
    f = tmp_path / "gpu.safetensors"
    ck.save(f, {"params": params, "opt_state": state})
    assert ck.inspect(f).leaves[0].device.startswith("cuda")
    cpu = ck.load(f, device={"cuda:0": "cpu"})
    assert cpu["params"]["w"].device.type == "cpu"
    gpu = ck.load(f, like={"params": params, "opt_state": tx.init(params)})
    assert gpu["opt_state"][0].mu["w"].is_cuda and torch.equal(gpu["opt_state"][0].mu["w"], state[0].mu["w"])
    moved = ck.device_put(cpu, "cuda")
    _, s2 = tx.update(grads, moved["opt_state"], moved["params"])
    assert s2[0].count.item() == 2


class _UserState(NamedTuple):
    count: torch.Tensor
    ema: dict


def test_user_namedtuples_need_register_or_like(tmp_path):
    f = tmp_path / "u.safetensors"
    value = {"s": _UserState(torch.tensor(3), {"a": torch.ones(2)})}
    ck.save(f, value)
    with pytest.raises(CheckpointError, match=r"node at \['s'\] is a NamedTuple .*_UserState.*register"):
        ck.load(f)
    out = ck.load(f, like=value)
    assert type(out["s"]) is _UserState
    funcopt.checkpoint.register(_UserState)
    try:
        out = ck.load(f)
        assert type(out["s"]) is _UserState and torch.equal(out["s"].ema["a"], torch.ones(2))
        with pytest.raises(TypeError, match="expects a NamedTuple class"):
            funcopt.checkpoint.register(dict)
    finally:
        _names._REGISTRY.pop(f"{_UserState.__module__}:{_UserState.__qualname__}")
        _names._REGISTERED_NAMES.pop(_UserState)


def test_class_names_in_a_file_never_import_foreign_modules(tmp_path):
    class Evil(NamedTuple):
        x: torch.Tensor

    Evil.__module__, Evil.__qualname__ = "funcopt_evil_module_never_imported", "Evil"
    f = tmp_path / "e.safetensors"
    ck.save(f, [Evil(torch.ones(1))])
    with pytest.raises(CheckpointError, match=r"node at \[0\] is a NamedTuple 'funcopt_evil_module_never_imported:Evil'"):
        ck.load(f)
    assert "funcopt_evil_module_never_imported" not in sys.modules
    # a funcopt module path that does not hold a NamedTuple is refused too
    class Fake(NamedTuple):
        x: torch.Tensor

    Fake.__module__, Fake.__qualname__ = "funcopt.base", "FuncoptError"
    ck.save(f, Fake(torch.ones(1)))
    with pytest.raises(CheckpointError, match="neither a funcopt state type nor registered"):
        ck.load(f)


def test_changed_fields_are_reported(tmp_path):
    class Old(NamedTuple):
        count: torch.Tensor

    Old.__module__, Old.__qualname__ = "funcopt.transforms", "TraceState"
    f = tmp_path / "o.safetensors"
    ck.save(f, Old(torch.tensor(1)))
    with pytest.raises(CheckpointError, match=r"saved as funcopt.transforms:TraceState with fields \('count',\)"):
        ck.load(f)


def test_partial_restore_with_paths(tmp_path):
    params = {"w": torch.randn(2, 3)}
    tx = funcopt.adam()
    state = tx.init(params)
    f = tmp_path / "c.safetensors"
    ck.save(f, {"params": params, "opt_state": state, "epoch": 2})
    p = ck.load(f, paths="params")
    assert torch.equal(p["w"], params["w"])
    p2, mu, epoch = ck.load(f, paths=["['params']", "['opt_state'][0].mu", "epoch"])
    assert torch.equal(p2["w"], params["w"]) and torch.equal(mu["w"], state[0].mu["w"]) and epoch == 2
    p3 = ck.load(f, paths="params", like={"w": torch.zeros(2, 3, dtype=torch.float64)}, dtype=torch.float64)
    assert p3["w"].dtype == torch.float64
    with pytest.raises(CheckpointError, match=r"no sub-tree at \['param'\].*inspect"):
        ck.load(f, paths="param")
    with pytest.raises(CheckpointError, match="like must be a list or tuple of 2"):
        ck.load(f, paths=["params", "epoch"], like={"w": params["w"]})


def test_partial_restore_reads_only_the_selected_tensors(tmp_path, monkeypatch):
    f = tmp_path / "c.safetensors"
    ck.save(f, {"params": {"w": torch.randn(3)}, "opt_state": {"m": torch.randn(3)}})
    read = []
    original = Reader.tensor

    def spy(self, key, path):
        read.append(key)
        return original(self, key, path)

    monkeypatch.setattr(Reader, "tensor", spy)
    ck.load(f, paths="params")
    assert read == ["['params']['w']"]


def test_inspect_reads_only_the_header(tmp_path, monkeypatch):
    params = {"w": torch.randn(3, 4)}
    tx = funcopt.adam()
    _, state = tx.update({"w": torch.ones(3, 4)}, tx.init(params), params)
    f = tmp_path / "c.safetensors"
    ck.save(f, {"params": params, "opt_state": state, "note": "x"}, metadata={"epoch": 3})

    def no_data(*a, **k):
        raise AssertionError("inspect must not read tensor data")

    monkeypatch.setattr(Reader, "tensor", no_data)
    info = ck.inspect(f)
    assert info.step == 1  # inferred from the optimizer's count
    assert info.metadata == {"epoch": 3} and info.num_tensors == 4 and info.tensor_bytes == 48 * 3 + 8
    text = str(info)
    assert "['opt_state'][0].mu['w']" in text and "float32" in text and "(3, 4)" in text and "= 'x'" in text
    ck.save(f, {"a": torch.ones(1)}, step=42)
    assert ck.inspect(f).step == 42
    ck.save(f, {"a": torch.ones(1)}, metadata={"step": 7})
    assert ck.inspect(f).step == 7


def test_cli_inspect_prints_the_tree(tmp_path, capsys):
    from funcopt.__main__ import main

    f = tmp_path / "c.safetensors"
    ck.save(f, {"params": {"w": torch.zeros(2, 5)}}, metadata={"note": "hello"})
    assert main(["inspect", str(f)]) == 0
    out = capsys.readouterr().out
    assert "['params']['w']" in out and "(2, 5)" in out and "hello" in out
    assert main(["inspect", "--json", str(f)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["leaves"][0]["shape"] == [2, 5]
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def good_file(tmp_path):
    f = tmp_path / "good.safetensors"
    params = {"w": torch.randn(8, 8), "b": torch.randn(8)}
    ck.save(f, {"params": params, "opt_state": funcopt.adam().init(params), "epoch": 3}, metadata={"a": 1})
    return f


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        ck.load(tmp_path)


def test_truncated_file_is_detected_at_every_length(good_file, tmp_path):
    data = good_file.read_bytes()
    bad = tmp_path / "t.safetensors"
    for n in [0, 3, 8, 20, len(data) // 3, len(data) - 100, len(data) - 1]:
        bad.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated|corrupted|header") as e:
            ck.load(bad)
        assert str(bad) in str(e.value)


def test_flipped_bytes_anywhere_are_detected(good_file, tmp_path):
    data = good_file.read_bytes()
    bad = tmp_path / "f.safetensors"
    g = torch.Generator().manual_seed(1)
    header_len = int.from_bytes(data[:8], "little")
    positions = list(range(0, 8)) + torch.randint(8, len(data), (60,), generator=g).tolist()
    positions += torch.randint(8 + header_len, len(data), (20,), generator=g).tolist()
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            ck.load(bad)
    # a flipped data byte names the leaf that is damaged
    flipped = bytearray(data)
    w_begin = json.loads(data[8:8 + header_len])["['params']['w']"]["data_offsets"][0]
    flipped[8 + header_len + w_begin + 4] ^= 0x10
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"data of the leaf at \['params'\]\['w'\] fails its checksum"):
        ck.load(bad)
    assert ck.load(bad, verify=False)["epoch"] == 3
    assert ck.load(bad, paths="epoch") == 3  # undamaged parts stay readable


def test_wrong_headers(tmp_path):
    bad = tmp_path / "w.safetensors"
    cases = {
        b"[1, 2, 3]": "does not start with",
        b"{not json}": "not valid JSON",
        b'{"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}': "malformed header entry",
        b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}': "inconsistent offsets",
        b'{"__metadata__": {"funcopt": "{}"}}': "checksum is missing",
        b'{"__metadata__": [1]}': "__metadata__ is not a JSON object",
    }
    for header, message in cases.items():
        data = b"\0" * 4 if b"data_offsets" in header else b""
        bad.write_bytes(len(header).to_bytes(8, "little") + header + data)
        with pytest.raises(CheckpointError, match=message):
            ck.load(bad)


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code from the file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_and_torch_save_files_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned.txt"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        bad = tmp_path / f"evil{protocol}.safetensors"
        bad.write_bytes(pickle.dumps({"x": _Payload(str(marker))}, protocol=protocol))
        with pytest.raises(CheckpointError, match="pickle|truncated|header"):
            ck.load(bad)
        with pytest.raises(CheckpointError):
            ck.inspect(bad)
        assert not marker.exists()
    # the payload is real: unpickling it does create the file
    control = tmp_path / "control.txt"
    pickle.loads(pickle.dumps(_Payload(str(control)))).close()
    assert control.exists()
    buf = io.BytesIO()
    torch.save({"x": torch.ones(2)}, buf)
    (tmp_path / "ts.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="zip archive .*torch.save"):
        ck.load(tmp_path / "ts.pt")


def test_save_rejects_unsupported_values(tmp_path):
    f = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError, match=r"leaf at \['a'\]: a object"):
        ck.save(f, {"a": object()})
    with pytest.raises(CheckpointError, match=r"dict at \['a'\]: its key \(1, 2\)"):
        ck.save(f, {"a": {(1, 2): torch.ones(1)}})
    with pytest.raises(CheckpointError, match=r"tensor at \['m'\]: it is on the meta device"):
        ck.save(f, {"m": torch.empty(2, device="meta")})
    with pytest.raises(CheckpointError, match="metadata must be JSON-serializable"):
        ck.save(f, {"a": 1}, metadata={"t": torch.ones(1)})
    with pytest.raises(CheckpointError, match="directory .* does not exist"):
        ck.save(tmp_path / "no" / "x.safetensors", {"a": 1})
    with pytest.raises(CheckpointError, match=r"tensor at \['x'\].*inside torch.func"):
        torch.func.grad(lambda x: (ck.save(f, {"x": x}), x.sum())[1])(torch.ones(2))
    with pytest.raises(CheckpointError, match="step must be an int"):
        ck.save(f, {"a": 1}, step=1.5)
    assert not f.exists() and os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    f = tmp_path / "c.safetensors"
    ck.save(f, {"v": torch.ones(3)})
    before = f.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(CheckpointError, match=f"cannot write the checkpoint {f}: disk full.*intact"):
        ck.save(f, {"v": torch.zeros(3)})
    monkeypatch.undo()
    assert f.read_bytes() == before and os.listdir(tmp_path) == ["c.safetensors"]


# ---------------------------------------------------------------------------------------------
# Property-based round trips

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int32,
           torch.int64, torch.uint8, torch.bool, torch.complex64]


@st.composite
def _tensors(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=3)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * 50
    t = base.to(dtype) if not dtype.is_complex else torch.complex(base.float(), -base.float())
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)
    return t


_scalars = st.one_of(st.integers(-(2**80), 2**80), st.floats(allow_nan=False), st.booleans(), st.text(max_size=5), st.none())
_leaves = st.one_of(_tensors(), _scalars)
_keys = st.one_of(st.text(min_size=1, max_size=4), st.integers(-3, 3))
_trees = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(_keys, children, max_size=3),
        st.tuples(children, children).map(lambda c: funcopt.ScaleByRmsState(*c)),
    ),
    max_leaves=8,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_trees)
def test_random_pytrees_round_trip_bitwise(tmp_path, tree):
    f = tmp_path / "h.safetensors"
    ck.save(f, tree)
    _assert_same(ck.load(f), tree)
    _assert_same(ck.load(f, like=tree), tree)


# ---------------------------------------------------------------------------------------------
# Exact resume in a fresh process

N_STEPS, M_STEPS = 4, 3


def _decay(count):
    return 0.05 * 0.9**count


def _resume_configs():
    return {
        "sgd": lambda: funcopt.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "adam": lambda: funcopt.adam(1e-2, amsgrad=True),
        "adamw": lambda: funcopt.adamw(1e-2, weight_decay=0.1),
        "adamax": lambda: funcopt.adamax(1e-2),
        "nadam": lambda: funcopt.nadam(1e-2),
        "radam": lambda: funcopt.radam(1e-2),
        "rmsprop": lambda: funcopt.rmsprop(1e-2, momentum=0.5, centered=True),
        "adagrad": lambda: funcopt.adagrad(0.1, lr_decay=0.01),
        "lion": lambda: funcopt.lion(1e-3),
        "lamb": lambda: funcopt.lamb(1e-2, weight_decay=0.01),
        "adam_schedule": lambda: funcopt.adam(_decay),
        "inject_sgd_schedule": lambda: funcopt.inject_hyperparams(funcopt.sgd)(learning_rate=_decay, momentum=0.9),
        "adamw_warmup_cosine": lambda: funcopt.adamw(funcopt.schedules.warmup_cosine_decay(0.0, 0.05, 2, 10)),
        "lbfgs": lambda: funcopt.lbfgs(0.1, linesearch=None),
        "finite_accumulate": lambda: funcopt.apply_if_finite(funcopt.accumulate(funcopt.adam(1e-2), 2), 3),
        "masked": lambda: funcopt.masked(funcopt.adam(1e-2), {"w": True, "b": False}),
    }


def _problem():
    """Least squares with closed-form gradients (fast and deterministic across processes)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}

    def grads(p):
        r = (X @ p["w"] + p["b"] - Y) / X.shape[0]
        return {"w": X.T @ r, "b": r.sum(0)}

    return params, grads


def _train(tx, params, state, grads, steps):
    for _ in range(steps):
        updates, state = tx.update(grads(params), state, params)
        params = funcopt.apply_updates(params, updates)
    return params, state


def _resume_child(directory, threads):
    """Runs in a fresh interpreter: loads every checkpoint, continues M steps, saves the result."""
    torch.set_num_threads(threads)
    params0, grads = _problem()
    for name, make in _resume_configs().items():
        tx = make()
        template = {"params": params0, "opt_state": tx.init(params0), "step": 0}
        like = ck.load(os.path.join(directory, f"{name}.safetensors"), like=template)
        free = ck.load(os.path.join(directory, f"{name}.safetensors"))
        assert_trees_equal(free["opt_state"], like["opt_state"])
        params, state = _train(tx, like["params"], like["opt_state"], grads, M_STEPS)
        ck.save(os.path.join(directory, f"{name}.resumed.safetensors"), {"params": params, "opt_state": state})


def test_resume_in_a_fresh_process_is_bitwise_exact(tmp_path):
    params0, grads = _problem()
    expected = {}
    for name, make in _resume_configs().items():
        tx = make()
        params, state = _train(tx, params0, tx.init(params0), grads, N_STEPS)
        ck.save(tmp_path / f"{name}.safetensors", {"params": params, "opt_state": state, "step": N_STEPS})
        expected[name] = _train(tx, params, state, grads, M_STEPS)
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_checkpoint as t; t._resume_child({str(tmp_path)!r}, {torch.get_num_threads()})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (params, state) in expected.items():
        got = ck.load(tmp_path / f"{name}.resumed.safetensors")
        assert_trees_equal(got["params"], params, msg=name)
        assert_trees_equal(got["opt_state"], state, msg=name)
        assert not torch.equal(got["params"]["w"], params0["w"]), name
