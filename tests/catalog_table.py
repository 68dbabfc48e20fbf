"""The optimizer catalog table of docs/optimizers.md: every optimizer, its source, the measured
largest relative difference to that source, and whether it has a fast route.

    python -m tests.catalog_table            # print the table
    python -m tests.catalog_table --write    # and write it into docs/optimizers.md

The differences are measured by the same runs the parity tests make: 50 float64 steps of each
registry row against torch.optim (tests/test_parity.py) or optax (tests/test_optax_parity.py);
the largest over an optimizer's rows is reported. tests/test_docs.py checks that the table in
the docs lists every optimizer and the right fast-route column.
"""

from __future__ import annotations

import inspect

import argparse
import datetime
import re
from pathlib import Path

import torch

import funcopt
from tests import registry

DOC = Path(__file__).resolve().parent.parent / "docs" / "optimizers.md"
START, END = "<!-- catalog-table:start -->", "<!-- catalog-table:end -->"
# Optimizers checked against an oracle that is neither torch.optim nor optax (the test file that does it).
OTHER_ORACLES = {
    "lion": "the paper's equations, element by element (tests/test_parity.py)",
    "lamb": "the paper's equations, element by element (tests/test_parity.py)",
    "muon_with_adamw": "torch.optim.Muon + torch.optim.AdamW (tests/test_muon.py)",
    "sparse_adam": "torch.optim.SparseAdam (tests/test_sparse_adam.py)",
    "dpsgd": "optax.contrib.dpsgd with the noise off, and the noise's law (tests/test_dpsgd.py)",
}
# Why an optimizer's figure is what it is, where the oracle cell alone would mislead.
NOTES = {
    "muon": "on the 2-D leaves, the only ones it takes",
    "noisy_sgd": "with the noise off; the noise's law in tests/test_catalog_aliases.py",
    "schedule_free_adamw": "optax evaluates its warmup in float32 (1e-9 with a float64 warmup on both sides); "
    "also against the schedulefree package",
    "schedule_free_sgd": "as schedule_free_adamw",
    "madgrad": "optax computes its step size lambda in float32",
}


def optimizer_names() -> list[str]:
    """The factories funcopt.optimizers exports, in their ``__all__`` order."""
    return [n for n in funcopt.optimizers.__all__ if inspect.isfunction(getattr(funcopt.optimizers, n))]


def rows_of(name: str) -> list[registry.Row]:
    factory = getattr(funcopt.optimizers, name)
    return [r for r in registry.ROWS.values() if r.factory is factory]


def has_fast_route(name: str) -> bool:
    return getattr(getattr(funcopt.optimizers, name), "fast_route", None) is not None


def _torch_difference(row_name: str) -> float:
    from tests.test_parity import _run_both

    ours, theirs = _run_both(row_name, torch.float64, foreach=False)
    torch.set_default_dtype(torch.float32)
    worst = 0.0
    for key, p in theirs.items():
        ref = p.detach()
        worst = max(worst, float(((ours[key] - ref).abs() / ref.abs().clamp_min(1e-3)).max()))
    return worst


def _optax_difference(row_name: str) -> float:
    from tests.test_optax_parity import max_relative_difference

    return max_relative_difference(row_name)


def measure(name: str) -> tuple[str, float | None]:
    """(source, largest relative difference over the optimizer's rows or None)."""
    rows = rows_of(name)
    torch_rows = [r for r in rows if r.torch]
    optax_rows = [r for r in rows if r.optax]
    note = f" ({NOTES[name]})" if name in NOTES else ""
    if torch_rows:
        cls = torch_rows[0].torch_class.__name__
        cls = cls if hasattr(torch.optim, cls) else name.capitalize()
        return f"torch.optim.{cls}{note}", max(_torch_difference(r.name) for r in torch_rows)
    if optax_rows:
        return f"optax.{optax_rows[0].optax_name}{note}", max(_optax_difference(r.name) for r in optax_rows)
    return OTHER_ORACLES.get(name, "no oracle"), None


def table() -> str:
    lines = [
        "| optimizer | oracle | max. relative difference (float64, 50 steps) | fast route |",
        "| --- | --- | ---: | :---: |",
    ]
    for name in optimizer_names():
        source, diff = measure(name)
        shown = "see the test" if diff is None else ("0 (bitwise)" if diff == 0 else f"{diff:.1e}")
        lines.append(f"| `{name}` | {source} | {shown} | {'yes' if has_fast_route(name) else 'no'} |")
    return "\n".join(lines)


def documented_rows(text: str) -> dict[str, str]:
    """{optimizer: fast-route column} of the table in ``text``."""
    inside = text.split(START, 1)[1].split(END, 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|.*\| (yes|no) \|$", inside, re.M)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the table into docs/optimizers.md")
    args = parser.parse_args()
    body = table()
    stamp = (
        f"Measured {datetime.date.today().isoformat()} with torch {torch.__version__.split('+')[0]} "
        "by `python -m tests.catalog_table --write`."
    )
    block = f"{START}\n{body}\n\n{stamp}\n{END}"
    print(block)
    if args.write:
        text = DOC.read_text()
        if START in text:
            text = text.split(START, 1)[0] + block + text.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        DOC.write_text(text)


if __name__ == "__main__":
    main()
