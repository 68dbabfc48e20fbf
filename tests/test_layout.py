"""The package layout rules (issue 17): one theme per package, no private names across packages,
no import cycles, no oversized module, a short top level."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "funcopt"
MAX_MODULE_LINES = 500
MAX_TOP_LEVEL_MODULES = 15  # modules and packages (not counting __init__, __main__, py.typed)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _package_of(module: str) -> str:
    """The unit that may share private names: ``funcopt.X`` for ``funcopt.X`` and below (the
    top-level ``funcopt`` package itself is its own unit)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every funcopt import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "funcopt":
                continue
            for alias in node.names:
                found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "funcopt":
                    found.append((alias.name, None, node.lineno))
    return found


def test_no_private_name_is_imported_across_packages():
    modules = _modules()
    bad = []
    for module, path in modules.items():
        for target, name, line in _imports(module, path):
            if _package_of(target) == _package_of(module):
                continue
            full = f"{target}.{name}" if name else target
            if full in modules and name is not None:  # ``from funcopt.pkg import module``
                target, name = full, None
            rel = target.split(".")[2:] if target.startswith(_package_of(target) + ".") else []
            if any(p.startswith("_") for p in rel) or (name is not None and name.startswith("_")):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}{'.' + name if name else ''}")
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_no_import_cycles_between_packages():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        src = _package_of(module)
        for target, _name, _ in _imports(module, path):
            dst = _package_of(target)
            if dst != src and src != "funcopt" and dst != "funcopt":
                graph.setdefault(src, set()).add(dst)
    # depth-first search for a cycle
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            cycle = visit(node)
            assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_no_module_is_oversized():
    big = {
        str(p.relative_to(ROOT.parent)): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_top_level_is_short():
    entries = sorted(
        p.name for p in ROOT.iterdir()
        if p.name not in ("__init__.py", "__main__.py", "py.typed", "__pycache__")
        and (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
    )
    assert len(entries) <= MAX_TOP_LEVEL_MODULES, entries


@pytest.mark.parametrize("module", ["funcopt.base", "funcopt.tree"])
def test_the_core_imports_nothing_but_the_core(module):
    """``apply_updates`` and the base types never reach the fast routes or the native backend
    (a backend plugs in by registering itself; see ``funcopt.base.register_tree_adder``)."""
    modules = _modules()
    targets = {t for t, _, _ in _imports(module, modules[module])}
    targets |= {f"{t}.{n}" for t, n, _ in _imports(module, modules[module]) if n and f"{t}.{n}" in modules}
    assert targets <= {"funcopt", "funcopt.base", "funcopt.tree"}, targets


def test_removing_the_native_backend_leaves_funcopt_working(tmp_path):
    """The native backend is one folder and one registration line: without them every route
    runs on the declarations' own kernels."""
    import shutil

    if not (ROOT / "fast" / "native").exists():
        pytest.skip("the native backend is not installed here (this run already is the check)")
    copy = tmp_path / "funcopt"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(copy / "fast" / "native")
    init = copy / "fast" / "__init__.py"
    lines = init.read_text().splitlines(keepends=True)
    registration = [line for line in lines if line.startswith("from funcopt.fast import native")]
    assert len(registration) == 1, "expected exactly one registration line for the native backend"
    init.write_text("".join(line for line in lines if line not in registration))
    code = (
        "import torch, funcopt\n"
        "p = {'w': torch.randn(300, 300)}\n"
        "tx = funcopt.adam(1e-3)\n"
        "s = tx.init(p)\n"
        "r = funcopt.fast.explain(tx, p, s, p)\n"
        "assert (r.route, r.backend, r.reasons) == ('fast', 'torch', ()), r\n"
        "u, s = tx.update(p, s, p)\n"
        "print(funcopt.__file__, len(funcopt.fast.backends()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(copy / "__init__.py"), "0"]


def test_a_donated_step_goes_down_through_four_modules_without_coming_back_up():
    """The hot path of ``apply_gradients(donate=True)``: the step, the dispatcher, the remembered
    checks, the plan, then the optimizer's own kernel; no call goes back to a module above."""
    import torch

    import funcopt

    order = ["funcopt.fast._step", "funcopt.fast._route", "funcopt.fast._memo", "funcopt.fast._plan"]
    params = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    grads = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    tx = funcopt.adam(1e-3)
    params, state = funcopt.apply_gradients(tx, grads, tx.init(params), params, donate=True)
    edges: set[tuple[str, str]] = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_back is not None:
            callee, caller = frame.f_globals.get("__name__", ""), frame.f_back.f_globals.get("__name__", "")
            if callee.startswith("funcopt") and caller.startswith("funcopt") and callee != caller:
                edges.add((caller, callee))

    sys.setprofile(profile)
    try:
        funcopt.apply_gradients(tx, grads, state, params, donate=True)
    finally:
        sys.setprofile(None)
    rank = {m: i for i, m in enumerate(order)}
    for caller, callee in edges:
        assert caller in rank, f"{caller} called {callee}: unexpected on the hot path"
        assert rank.get(callee, len(order)) > rank[caller], f"{caller} -> {callee} goes back up"
    kernels = {callee for _, callee in edges if callee not in rank}
    assert kernels == {"funcopt.optimizers._adam"}, kernels
