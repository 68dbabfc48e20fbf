"""Every Python code block of the docs and the README runs, page by page, as a reader would run it.

The ```python blocks of one page run in order in one namespace, in a temporary directory. A
block that cannot run here (a GPU, several processes, a long download-free but slow job) is
preceded by ``<!-- not-runnable: <reason> -->``; the reason is required. Stand-in data that a
reader does not need to see goes in a hidden ``<!-- setup: ... -->`` comment before the block
(executed, not rendered). The whole set also must build with ``mkdocs build --strict`` (CI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
_MARK = re.compile(r"<!--\s*not-runnable:(?P<reason>.*?)-->\s*$", re.S)
_SETUP = re.compile(r"<!--\s*setup:\s*\n(?P<code>.*?)-->", re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str
    runnable: bool
    reason: str = ""


def blocks(page: Path) -> list[Block]:
    """The Python blocks of ``page`` (hidden setup comments become runnable blocks of their own)."""
    text = page.read_text()
    found: list[Block] = []
    events = [(m.start(), "setup", m) for m in _SETUP.finditer(text)]
    events += [(m.start(), "fence", m) for m in _FENCE.finditer(text) if m.group("lang") in ("python", "py")]
    for start, kind, m in sorted(events, key=lambda e: e[0]):
        line = text.count("\n", 0, start) + 1
        if kind == "setup":
            found.append(Block(page, line, m.group("code"), True))
            continue
        indent = len(m.group("indent"))
        code = "\n".join(row[indent:] for row in m.group("body").splitlines())
        before = text[:start].rstrip()
        mark = _MARK.search(before[-400:]) if before.endswith("-->") else None
        if mark is not None:
            found.append(Block(page, line, code, False, mark.group("reason").strip()))
        else:
            found.append(Block(page, line, code, True))
    return found


def _pages_with_code() -> list[Path]:
    return [p for p in PAGES if any(True for _ in blocks(p))]


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_skipped_block_says_why():
    for page in PAGES:
        for b in blocks(page):
            if not b.runnable:
                assert len(b.reason) >= 10, f"{_id(page)}:{b.line}: 'not-runnable:' needs a reason a reader understands"


def test_the_docs_execute_many_blocks():
    """A guard against the extractor silently finding nothing (e.g. after a fence style change)."""
    runnable = sum(b.runnable for p in PAGES for b in blocks(p))
    assert runnable >= 40, f"only {runnable} runnable code blocks were found in README.md and docs/"


@pytest.mark.parametrize("page", _pages_with_code(), ids=_id)
def test_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    torch.manual_seed(0)
    for b in blocks(page):
        if not b.runnable:
            continue
        try:
            exec(compile(b.code, f"{_id(page)}:{b.line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{_id(page)}, the block at line {b.line} failed: {err!r}") from err


def test_the_catalog_table_lists_every_optimizer_and_its_fast_route():
    from tests import catalog_table

    documented = catalog_table.documented_rows(catalog_table.DOC.read_text())
    expected = {n: "yes" if catalog_table.has_fast_route(n) else "no" for n in catalog_table.optimizer_names()}
    missing = sorted(set(expected) - set(documented))
    assert not missing, f"docs/optimizers.md lacks {missing}: run `python -m tests.catalog_table --write`"
    wrong = {n: documented[n] for n in expected if documented[n] != expected[n]}
    assert not wrong, f"the fast-route column is wrong for {wrong}: run `python -m tests.catalog_table --write`"


API_PACKAGES = (
    "base", "optimizers", "transforms", "schedules", "checkpoint", "solvers", "linalg", "implicit",
    "lr_finder", "sweep", "fast", "interop", "distributed", "tree", "nn",
)


@pytest.mark.slow
def test_the_api_reference_documents_every_public_name(tmp_path):
    """Builds the site and finds an entry for every name of ``funcopt.__all__`` and of each
    package's ``__all__`` (mkdocstrings gives each documented object an anchor with its path)."""
    import importlib
    import types

    config = pytest.importorskip("mkdocs.config", reason="the docs extra is not installed: pip install -e '.[docs]'")
    from mkdocs.commands.build import build

    import funcopt

    cfg = config.load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=False)
    build(cfg)
    html = "".join(p.read_text() for p in (tmp_path / "site" / "api").rglob("*.html"))
    anchors = set(re.findall(r'id="(funcopt\.[\w.]+)"', html))
    missing = []
    homes: dict[int, str] = {}
    for package in API_PACKAGES:
        module = importlib.import_module(f"funcopt.{package}")
        for name in module.__all__:
            if f"funcopt.{package}.{name}" not in anchors:
                missing.append(f"funcopt.{package}.{name}")
            homes.setdefault(id(getattr(module, name)), f"funcopt.{package}.{name}")
    assert not missing, f"the API reference lacks {missing}: give them docstrings or add their package to docs/api/"
    top = [n for n in funcopt.__all__ if not isinstance(getattr(funcopt, n), types.ModuleType)]
    homeless = [n for n in top if id(getattr(funcopt, n)) not in homes]
    assert not homeless, f"funcopt.{homeless} are exported by no package whose reference page is built"
    assert len(top) > 150
