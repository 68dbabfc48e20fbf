"""Writes the funcopt 0.1.0 checkpoint fixtures in this folder (see README.md).

Run with the 0.1.0 code on the path, e.g. from a checkout of the 0.1.0 commit::

    PYTHONPATH=/path/to/funcopt-0.1.0 python3 tests/data/v0_1_0/make_fixtures.py

Uses only funcopt's public API; the configurations and the problem live in ``cases.py``
(shared with ``tests/test_checkpoint_compat.py``). Reading the raw safetensors header for
``state_types.json`` uses only ``json`` and the file layout (8-byte length, JSON header).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import optree
import torch

import funcopt
import funcopt.checkpoint as ck

HERE = Path(__file__).resolve().parent


def _load_cases():
    spec = importlib.util.spec_from_file_location("funcopt_v0_1_0_cases", HERE / "cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


C = _load_cases()


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        return t.contiguous().reshape(-1).view(torch.uint8)
    return t


def _assert_bitwise(a, b, what: str) -> None:
    pa, la, sa = optree.tree_flatten_with_path(a)
    pb, lb, sb = optree.tree_flatten_with_path(b)
    if sa != sb:
        raise AssertionError(f"{what}: structures differ: {sa} vs {sb}")
    for p, x, y in zip(pa, la, lb):
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(_bits(x), _bits(y)):
                raise AssertionError(f"{what}: leaf {p} differs")
        elif x != y:
            raise AssertionError(f"{what}: leaf {p} differs: {x!r} vs {y!r}")


def raw_header_doc(path: Path) -> dict:
    """The funcopt document inside a checkpoint's safetensors header, read without funcopt."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return json.loads(header["__metadata__"]["funcopt"])


def namedtuple_types(node: dict, path: str = "") -> list[list[str]]:
    """``[[path, "module:QualName"], ...]`` for every NamedTuple node of a header tree, in order."""
    out: list[list[str]] = []
    kind = node["t"]
    if kind in ("dict", "odict"):
        for k, c in zip(node["k"], node["c"]):
            out += namedtuple_types(c, f"{path}[{k!r}]")
    elif kind in ("list", "tuple"):
        for i, c in enumerate(node["c"]):
            out += namedtuple_types(c, f"{path}[{i}]")
    elif kind == "namedtuple":
        out.append([path, node["cls"]])
        for f, c in zip(node["f"], node["c"]):
            out += namedtuple_types(c, f"{path}.{f}")
    return out


def write_case(name: str, case) -> None:
    params, data = C.make_problem(case.dtype)
    tx = case.make_tx()
    state = tx.init(params)
    params, state = C.run(case, tx, params, state, data, 0, C.K)
    meta = {"case": name, "funcopt_version": funcopt.__version__, "K": C.K, "M": C.M}
    path = HERE / f"{name}.safetensors"
    ck.save(path, {"params": params, "opt_state": state, "step": C.K, "data": data}, metadata=meta)
    # the uninterrupted run continues from the in-memory state
    params_e, state_e = C.run(case, tx, params, state, data, C.K, C.M)
    expected = {"params": params_e, "opt_state": state_e, "step": C.K + C.M}
    ck.save(HERE / f"{name}.expected.safetensors", expected, metadata=meta)
    # sanity: a resume from the file (fresh optimizer object) gives the same bits
    p0, d0 = C.make_problem(case.dtype)
    tx2 = case.make_tx()
    tree = ck.load(path, like={"params": p0, "opt_state": tx2.init(p0), "step": 0, "data": d0})
    p, s = C.run(case, tx2, tree["params"], tree["opt_state"], tree["data"], tree["step"], C.M)
    _assert_bitwise({"params": p, "opt_state": s, "step": C.K + C.M}, expected, f"{name}: resume")
    _assert_bitwise(ck.load(HERE / f"{name}.expected.safetensors"), expected, f"{name}: expected file")


def write_manager() -> None:
    case = C.MANAGER_CASE
    folder = HERE / C.MANAGER_DIR
    if folder.exists():
        shutil.rmtree(folder)
    params, data = C.make_problem(case.dtype)
    ck.save(HERE / C.MANAGER_INIT, {"params": params, "data": data},
            metadata={"case": "manager", "funcopt_version": funcopt.__version__})
    mgr = funcopt.CheckpointManager(folder, max_to_keep=None)
    tx = case.make_tx()
    state = tx.init(params)
    x, y = data["x"].flatten(0, 1), data["y"].flatten(0, 1)
    for t in range(C.MANAGER_STEPS):
        params, state = C.step(case, tx, params, state, data, t)
        s = t + 1
        mgr.save(s, {"params": params, "opt_state": state, "step": s},
                 metrics={"loss": C.loss(params, x, y)}, metadata={"funcopt_version": funcopt.__version__})
    assert mgr.all_steps() == list(range(1, C.MANAGER_STEPS + 1)), mgr.all_steps()


def main() -> None:
    if funcopt.__version__ != "0.1.0":
        raise SystemExit(f"these fixtures must be written by funcopt 0.1.0, not {funcopt.__version__} "
                         f"({funcopt.__file__})")
    print(f"funcopt {funcopt.__version__} from {funcopt.__file__}, torch {torch.__version__}")
    types: dict[str, list[list[str]]] = {}
    for name, case in C.CASES.items():
        write_case(name, case)
        types[name] = namedtuple_types(raw_header_doc(HERE / f"{name}.safetensors")["tree"])
        print(f"  {name}: {len(types[name])} NamedTuple nodes")
    write_manager()
    latest = funcopt.CheckpointManager(HERE / C.MANAGER_DIR).latest_step()
    types["manager"] = namedtuple_types(
        raw_header_doc(HERE / C.MANAGER_DIR / f"ckpt_{latest:010d}.safetensors")["tree"])
    (HERE / "state_types.json").write_text(json.dumps(types, indent=1) + "\n")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {len(C.CASES)} cases + manager/ to {HERE} ({total / 1024:.1f} KiB in the folder)")


if __name__ == "__main__":
    main()
