"""Optimizer step time: funcopt's paths against torch.optim (and torchopt), side by side.

Every row runs in this one process on its own copy of the same parameters, interleaved
(one step of every row per round), on ``--threads`` threads; the first rounds are warm-up and
the table shows medians of the rest as a ratio to ``torch.optim.<Opt>(fused=True)`` measured
in the same rounds, and the ratio of the fastest rounds (steadier on a loaded machine). The
memory bandwidth is measured in the same rounds by a probe (``a.add_(b)`` on 64 MB fp32
buffers); each row's "bound" column is the bandwidth bound's time (bytes the step
must move / bandwidth) divided by the row's time.

Shapes: S1 = ResNet-18's 62 parameter tensors (11.7M elements), S2 = one 16M-element tensor,
S3 = an Iris MLP 4-1024-1024-3 (1.06M elements). All fp32.

Run:
    python benchmarks/bench_step.py            # full run (about 3-6 minutes on 2 cores)
    python benchmarks/bench_step.py --quick    # short run, fewer rounds, no torch.compile row
    python benchmarks/bench_step.py --tune-allocator   # with funcopt.fused.configure_cpu_allocator()
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import funcopt
from funcopt import fused
from funcopt.train_step import apply_gradients


def resnet18_shapes() -> list[tuple[int, ...]]:
    """The 62 parameter shapes of torchvision's ResNet-18 (11,689,512 elements)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = in_ch if block == 0 else out_ch
            shapes += [(out_ch, first_in, 3, 3), (out_ch,), (out_ch,), (out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]
            if block == 0 and (stride != 1 or in_ch != out_ch):
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
        in_ch = out_ch
    shapes += [(1000, 512), (1000,)]
    return shapes


SIZES = {
    "S1": resnet18_shapes(),
    "S2": [(1 << 24,)],
    "S3": [(1024, 4), (1024,), (1024, 1024), (1024,), (3, 1024), (3,)],
}
BYTES_PER_ELEMENT = {"adam": 28, "sgd_momentum": 20}  # fp32: adam reads p,g,m,v writes p,m,v


class Row:
    """One implementation: ``step()`` runs one optimizer step on its own tensors."""

    def __init__(self, name: str, step: Callable[[], None]):
        self.name, self.step, self.times = name, step, []
        self.bytes = 0


def make_rows(which: str, shapes: list[tuple[int, ...]], compile_row: bool) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
    params_tree = lambda: {f"p{i:02d}": t.clone() for i, t in enumerate(base)}
    grads_tree = {f"p{i:02d}": g for i, g in enumerate(grads)}
    rows: list[Row] = []

    def torch_row(label: str, **flags):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if which == "adam":
            opt = torch.optim.Adam(params, lr=1e-3, **flags)
        else:
            opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, **flags)
        rows.append(Row(label, opt.step))

    torch_row("torch.optim for-loop", foreach=False)
    torch_row("torch.optim foreach", foreach=True)
    torch_row("torch.optim fused", fused=True)

    make_tx = (lambda: funcopt.adam(1e-3)) if which == "adam" else (lambda: funcopt.sgd(1e-3, momentum=0.9))

    def funcopt_row(label: str, mode: str):
        tx = make_tx()
        box = {"p": params_tree()}
        box["s"] = tx.init(box["p"])

        if mode == "donated":
            def step():
                box["p"], box["s"] = apply_gradients(tx, grads_tree, box["s"], box["p"], donate=True)
        elif mode == "compiled":
            def pure(g, s, p):
                u, s = tx.update(g, s, p)
                return funcopt.apply_updates(p, u), s

            compiled = torch.compile(pure)

            def step():
                box["p"], box["s"] = compiled(grads_tree, box["s"], box["p"])
        else:
            enabled = mode == "fast"

            def step():
                with fused.fast_path_enabled(enabled):
                    u, box["s"] = tx.update(grads_tree, box["s"], box["p"])
                    box["p"] = funcopt.apply_updates(box["p"], u)

        rows.append(Row(label, step))

    funcopt_row("funcopt update+apply, reference path", "reference")
    funcopt_row("funcopt update+apply, fast path (pure)", "fast")
    funcopt_row("funcopt apply_gradients(donate=True)", "donated")
    if compile_row:
        funcopt_row("torch.compile(funcopt update+apply)", "compiled")
    try:
        import torchopt
    except Exception:  # torchopt is optional; any import failure just drops the row
        torchopt = None
    if torchopt is not None:
        opt = torchopt.adam(1e-3) if which == "adam" else torchopt.sgd(1e-3, momentum=0.9)
        box = {"p": tuple(t.clone() for t in base)}
        box["s"] = opt.init(box["p"])
        g = tuple(grads)

        def step():
            u, box["s"] = opt.update(g, box["s"], params=box["p"], inplace=False)
            box["p"] = torchopt.apply_updates(box["p"], u, inplace=False)

        rows.append(Row(f"torchopt {torchopt.__version__} (inplace=False)", step))
    return rows


def bandwidth_probe() -> Row:
    """A row timing ``a.add_(b)`` on 64 MB fp32 buffers: 12 bytes per element, in place like the
    optimizer kernels (an ``out=`` tensor would add a read-for-ownership of the output)."""
    n = 1 << 24
    a, b = torch.randn(n), torch.randn(n) * 1e-6
    row = Row("bandwidth probe", lambda: a.add_(b))
    row.bytes = 12 * n
    return row


def run(which: str, size: str, rounds: int, warmup: int, compile_row: bool) -> str:
    shapes = SIZES[size]
    numel = sum(torch.Size(s).numel() for s in shapes)
    inner = 5 if numel < 4_000_000 else 1
    probe = bandwidth_probe()
    rows = make_rows(which, shapes, compile_row)
    for r in range(warmup + rounds):
        t = time.perf_counter()
        probe.step()
        if r >= warmup:
            probe.times.append(time.perf_counter() - t)
        for row in rows:
            t = time.perf_counter()
            for _ in range(inner):
                row.step()
            if r >= warmup:
                row.times.append((time.perf_counter() - t) / inner)
    bandwidth = probe.bytes / statistics.median(probe.times)
    medians = {row.name: statistics.median(row.times) for row in rows}
    minima = {row.name: min(row.times) for row in rows}
    ref, ref_min = medians["torch.optim fused"], minima["torch.optim fused"]
    bound = BYTES_PER_ELEMENT[which] * numel / bandwidth
    lines = [
        f"### {which}, {size} ({numel / 1e6:.2f}M elements in {len(shapes)} tensors)",
        "",
        f"Memory bandwidth in these rounds: {bandwidth / 1e9:.1f} GB/s (median of the probe).",
        "",
        "| implementation | median ms | ratio to torch fused | ratio of minima | fraction of bandwidth bound |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        m = medians[row.name]
        lines.append(
            f"| {row.name} | {m * 1e3:.2f} | {m / ref:.2f} | {minima[row.name] / ref_min:.2f} | {bound / m:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, no torch.compile row")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="S1,S2,S3")
    parser.add_argument("--optimizers", default="adam,sgd_momentum")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--tune-allocator", action="store_true", help="call funcopt.fused.configure_cpu_allocator() first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tune_allocator:
        print(f"configure_cpu_allocator() -> {fused.configure_cpu_allocator()}")
    rounds = args.rounds or (6 if args.quick else 25)
    warmup = 2 if args.quick else 3
    compile_row = not (args.quick or args.no_compile)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds after {warmup} warm-up\n")
    for which in args.optimizers.split(","):
        for size in args.sizes.split(","):
            print(run(which, size, rounds, warmup, compile_row), flush=True)


if __name__ == "__main__":
    main()
