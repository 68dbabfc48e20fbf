"""Optimizer step time: funcopt's paths against torch.optim (and torchopt), side by side.

All rows run in this one process, interleaved (one step of every row per round, in a shuffled
order), on ``--threads`` threads; the first rounds are warm-up. "ratio to torch fused" is the
median over the rounds of the row's time divided by ``torch.optim.<Opt>(fused=True)``'s time
in the same round (paired, so the machine's drift between rounds cancels); "ratio of minima"
compares the fastest rounds (steadier on a loaded machine).

The in-place rows (torch.optim's for-loop, foreach and fused steps, and funcopt's donated
step) all update *one shared set of buffers* (params, gradients, state), so that they are
compared on the same memory: on this kind of virtual machine, equal buffers allocated at
different times run the same kernel up to 10-20% apart, which would otherwise decide the
comparison. The pure rows allocate their outputs anyway and keep their own inputs; they run
twice, with :mod:`funcopt.fast.native`'s single-pass kernels (the default where they build) and
with torch's in-place kernels on copies (``funcopt.fast.native.enabled(False)``). Before
every step, a 64 MB write evicts the last-level cache (32 MB here): each step starts cold, as
in training, where the forward and backward passes run between two optimizer steps (and as
the issue's reference figures, with torch fused at 0.85-0.97 of the DRAM bandwidth bound on
every size, were measured). Without it S3's 17 MB of Adam buffers would stay in cache
between back-to-back steps of one row.

The memory bandwidth is measured in the same rounds by a probe (``a.add_(b)`` on 64 MB fp32
buffers); each row's "bound" column is the bandwidth bound's time (bytes the step must move /
bandwidth) divided by the row's time.

Shapes: S1 = ResNet-18's 62 parameter tensors (11.7M elements), S2 = one 16M-element tensor,
S3 = an Iris MLP 4-1024-1024-3 (1.06M elements). All fp32.

End to end (``--e2e``): forward + backward + step on small models, the rows interleaved the
same way, ratio to ``torch.optim.Adam(fused=True)`` with ``zero_grad``/``backward``/``step``:
the S3 MLP (4-1024-1024-3, batch 64), the digits MLP of ``examples/train_step_donation.py``
(64-256-256-10, batch 64) and the quickstart's (64-128-10, batch 64; its loop is
``grad_and_value`` + ``update`` + ``apply_updates``, with ``torch.func``'s and with
``funcopt.grad_and_value``). ``--checks`` times the input checks of ``update`` in a loop that
passes each state to the next update (where ``chain`` compares only the new gradients and
params with the last step's) as a ratio to the same loop without them, and the full check
(``funcopt.base.check_update_inputs``) alone. ``--breakdown`` times the pieces of one training
step alone (gradients, update, apply, pure and donated steps) on the two small MLPs.

Run:
    python benchmarks/bench_step.py            # full run (about 3-6 minutes on 2 cores)
    python benchmarks/bench_step.py --e2e --checks --sizes none   # small-model rows only
    python benchmarks/bench_step.py --quick    # short run, fewer rounds, no torch.compile row
    python benchmarks/bench_step.py --tune-allocator   # with funcopt.fast.configure_cpu_allocator()
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from typing import Callable

import torch

import funcopt
from funcopt import apply_gradients
from funcopt import fast as fused

native = getattr(fused, "native", None)  # the optional backend of single-pass CPU kernels


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
SIZE_NAMES = {"S1": "ResNet-18 shapes", "S2": "one 16M tensor", "S3": "MLP 4-1024-1024-3"}
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
    keys = [f"p{i:02d}" for i in range(len(base))]
    params_tree = lambda: {k: t.clone() for k, t in zip(keys, base)}
    rows: list[Row] = []

    # The in-place rows share one set of buffers (see the module docstring).
    shared = [torch.nn.Parameter(t.clone()) for t in base]
    for p, g in zip(shared, grads):
        p.grad = g.clone()

    def torch_opt(**flags) -> torch.optim.Optimizer:
        if which == "adam":
            return torch.optim.Adam(shared, lr=1e-3, **flags)
        return torch.optim.SGD(shared, lr=1e-3, momentum=0.9, **flags)

    fused_opt = torch_opt(fused=True)
    fused_opt.step()  # creates the state buffers the other in-place rows take over
    for label, flags in (("torch.optim for-loop", {"foreach": False}), ("torch.optim foreach", {"foreach": True})):
        opt = torch_opt(**flags)
        for p in shared:
            opt.state[p] = fused_opt.state[p]  # the same dict: the same state tensors
        rows.append(Row(label, opt.step))
    rows.append(Row("torch.optim fused", fused_opt.step))

    make_tx = (lambda: funcopt.adam(1e-3)) if which == "adam" else (lambda: funcopt.sgd(1e-3, momentum=0.9))

    def funcopt_row(label: str, mode: str):
        tx = make_tx()
        box = {"p": params_tree()}
        box["s"] = tx.init(box["p"])
        grads_tree = {k: g.clone() for k, g in zip(keys, grads)}

        if mode in ("pure_step", "pure_step_torch"):
            use_native = mode == "pure_step"

            def step():
                with native.enabled(use_native) if native is not None else contextlib.nullcontext():
                    box["p"], box["s"] = apply_gradients(tx, grads_tree, box["s"], box["p"])
        elif mode == "donated":  # on the shared buffers, with torch's state tensors as its state
            box["p"] = {k: p.detach() for k, p in zip(keys, shared)}
            grads_tree = {k: p.grad for k, p in zip(keys, shared)}
            torch_state = [fused_opt.state[p] for p in shared]
            count = torch.tensor(int(torch_state[0].get("step", 1)))
            if which == "adam":
                mu = {k: s["exp_avg"] for k, s in zip(keys, torch_state)}
                nu = {k: s["exp_avg_sq"] for k, s in zip(keys, torch_state)}
                box["s"] = (box["s"][0]._replace(count=count, mu=mu, nu=nu),) + box["s"][1:]
            else:
                buf = {k: s["momentum_buffer"] for k, s in zip(keys, torch_state)}
                box["s"] = (box["s"][0]._replace(count=count, momentum_buffer=buf),) + box["s"][1:]

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
            enabled = mode != "reference"
            use_native = mode == "fast"

            def step():
                with fused.fast_path_enabled(enabled), (
                    native.enabled(use_native) if native is not None else contextlib.nullcontext()
                ):
                    u, box["s"] = tx.update(grads_tree, box["s"], box["p"])
                    box["p"] = funcopt.apply_updates(box["p"], u)

        rows.append(Row(label, step))

    funcopt_row("funcopt update+apply, reference path", "reference")
    funcopt_row("funcopt update+apply, fast path, torch kernels on copies", "fast_torch")
    funcopt_row("funcopt apply_gradients(donate=False), torch kernels on copies", "pure_step_torch")
    if native is not None and native.available():
        funcopt_row("funcopt update+apply, fast path (pure, native kernels)", "fast")
        funcopt_row("funcopt apply_gradients(donate=False) (pure step, native kernels)", "pure_step")
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
        g = tuple(t.clone() for t in grads)

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
    if numel < 4_000_000:
        rounds *= 4  # short steps: more rounds for the same precision
    probe = bandwidth_probe()
    evict = torch.empty(1 << 24)  # 64 MB, twice this machine's 32 MB L3
    rows = make_rows(which, shapes, compile_row)
    order = random.Random(0)
    for r in range(warmup + rounds):
        t = time.perf_counter()
        probe.step()
        if r >= warmup:
            probe.times.append(time.perf_counter() - t)
        # A new order every round: a row that allocates and frees a lot (the pure rows) slows
        # whichever row follows it, so no row may always follow the same one.
        for row in order.sample(rows, len(rows)):
            evict.fill_(float(r))  # evict the last-level cache (see the module docstring)
            t = time.perf_counter()
            row.step()
            if r >= warmup:
                row.times.append(time.perf_counter() - t)
    bandwidth = probe.bytes / statistics.median(probe.times)
    medians = {row.name: statistics.median(row.times) for row in rows}
    minima = {row.name: min(row.times) for row in rows}
    ref_row = next(row for row in rows if row.name == "torch.optim fused")
    # Paired: each round's time over torch fused's time in the same round, then the median, so
    # that the machine's drift between rounds (other tenants of the host) cancels out.
    paired = {
        row.name: statistics.median(t / f for t, f in zip(row.times, ref_row.times)) for row in rows
    }
    ref_min = minima["torch.optim fused"]
    bound = BYTES_PER_ELEMENT[which] * numel / bandwidth
    lines = [
        f"### {which}, {SIZE_NAMES[size]} ({size}: {numel / 1e6:.2f}M elements in {len(shapes)} tensors)",
        "",
        f"Memory bandwidth in these rounds: {bandwidth / 1e9:.1f} GB/s (median of the probe).",
        "",
        "| implementation | median ms | ratio to torch fused | ratio of minima | fraction of bandwidth bound |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        m = medians[row.name]
        lines.append(
            f"| {row.name} | {m * 1e3:.2f} | {paired[row.name]:.2f} | {minima[row.name] / ref_min:.2f} | {bound / m:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _paired(rows: list[Row], ref: str, rounds: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Runs the rows interleaved in a new order each round; (median seconds, median paired ratio to ``ref``)."""
    order = random.Random(0)
    for r in range(warmup + rounds):
        for row in order.sample(rows, len(rows)):
            t = time.perf_counter()
            row.step()
            if r >= warmup:
                row.times.append(time.perf_counter() - t)
    base = next(row for row in rows if row.name == ref).times
    return {
        row.name: (statistics.median(row.times), statistics.median(t / b for t, b in zip(row.times, base)))
        for row in rows
    }


def e2e_rows(sizes: tuple[int, ...], batch: int) -> list[Row]:
    """One training step per row on an MLP of ``sizes``: torch fused, make_step donated and pure,
    the quickstart loop."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1])

    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def torch_step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    rows = [Row("torch.optim.Adam(fused=True)", torch_step)]
    template = build()

    def loss_fn(params, xb, yb):
        return F.cross_entropy(funcopt.nn.apply(template, params, None, xb), yb)

    for label, donate in (("funcopt make_step (donate=True)", True), ("funcopt make_step (donate=False)", False)):
        tx = funcopt.adam(1e-3)
        box = {"p": funcopt.nn.extract(build())[0]}
        box["s"] = tx.init(box["p"])
        step_fn = funcopt.make_step(loss_fn, tx, donate=donate)

        def step(box=box, step_fn=step_fn):
            box["p"], box["s"], _ = step_fn(box["p"], box["s"], x, y)

        rows.append(Row(label, step))
    grad_fns = {"torch.func": torch.func.grad_and_value(loss_fn)}
    if hasattr(funcopt, "grad_and_value"):  # (absent before 0.2: the bench runs on older trees too)
        grad_fns["funcopt"] = funcopt.grad_and_value(loss_fn)
    for which, grad_and_loss in grad_fns.items():
        tx = funcopt.adam(1e-3)
        box = {"p": funcopt.nn.extract(build())[0]}
        box["s"] = tx.init(box["p"])

        def quickstart_step(tx=tx, box=box, grad_and_loss=grad_and_loss):
            grads, _ = grad_and_loss(box["p"], x, y)
            updates, box["s"] = tx.update(grads, box["s"], box["p"])
            box["p"] = funcopt.apply_updates(box["p"], updates)

        rows.append(Row(f"quickstart loop ({which}.grad_and_value + update + apply_updates)", quickstart_step))
    return rows


def run_e2e(rounds: int, warmup: int) -> str:
    models = {
        "MLP 4-1024-1024-3, batch 64": ((4, 1024, 1024, 3), 64),
        "digits MLP 64-256-256-10, batch 64": ((64, 256, 256, 10), 64),
        "quickstart MLP 64-128-10, batch 64": ((64, 128, 10), 64),
    }
    lines = ["### End to end: forward + backward + Adam step", ""]
    lines += ["| model | implementation | median ms | ratio to torch fused |", "| --- | --- | ---: | ---: |"]
    for name, (sizes, batch) in models.items():
        rows = e2e_rows(sizes, batch)
        res = _paired(rows, "torch.optim.Adam(fused=True)", rounds * 10, warmup * 5)
        for row in rows:
            lines.append(f"| {name} | {row.name} | {res[row.name][0] * 1e3:.3f} | {res[row.name][1]:.2f} |")
    return "\n".join(lines) + "\n"


def run_checks(rounds: int, warmup: int) -> str:
    """The input checks of ``update`` as a ratio to the same update without them."""
    import funcopt.base as base_module

    check = getattr(base_module, "check_update_inputs", None)
    lines = ["### The input checks of update (MLP 4-1024-1024-3 and the digits MLP's shapes)", ""]
    if check is None:
        return "\n".join(lines + ["(this funcopt has no update input checks)"]) + "\n"
    lines += ["| tree | route | with checks us | without us | ratio | check alone us |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    trees = {"MLP 4-1024-1024-3": SIZES["S3"], "digits MLP": [(256, 64), (256,), (256, 256), (256,), (10, 256), (10,)]}
    for tree_name, shapes in trees.items():
        gen = torch.Generator().manual_seed(0)
        params = {f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        for route, fast in (("reference (per-leaf chain)", False), ("fast route", True)):
            tx = funcopt.adam(1e-3)
            state = tx.init(params)
            box = {"s": state}

            def step(tx=tx, box=box, fast=fast):  # the training loop: each update's state is the next one's
                with fused.fast_path_enabled(fast):
                    _, box["s"] = tx.update(grads, box["s"], params)

            def unchecked(step=step):
                base_module.check_update_inputs = lambda *a, **k: None
                try:
                    step()
                finally:
                    base_module.check_update_inputs = check

            def alone(tx=tx, state=state):
                check(tx.init, grads, state, params)

            rows = [Row("with", step), Row("without", unchecked), Row("alone", alone)]
            res = _paired(rows, "without", rounds * 20, warmup * 5)
            lines.append(
                f"| {tree_name} | {route} | {res['with'][0] * 1e6:.1f} | {res['without'][0] * 1e6:.1f} | "
                f"{res['with'][1]:.3f} | {res['alone'][0] * 1e6:.1f} |"
            )
    return "\n".join(lines) + "\n"


def breakdown_rows(sizes: tuple[int, ...], batch: int) -> list[Row]:
    """The pieces of one training step on an MLP of ``sizes``, each timed alone (``--breakdown``)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, sizes[0], generator=gen), torch.randint(0, sizes[-1], (batch,), generator=gen)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1])

    template = build()

    def loss_fn(params, xb, yb):
        return F.cross_entropy(funcopt.nn.apply(template, params, None, xb), yb)

    m1, m2 = build(), build()
    o1, o2 = (torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in (m1, m2))
    F.cross_entropy(m2(x), y).backward()
    rows = [
        Row("torch: zero_grad + forward + backward + fused step", lambda: (o1.zero_grad(), F.cross_entropy(m1(x), y).backward(), o1.step())),
        Row("torch: fused step alone", o2.step),
    ]
    p0 = funcopt.nn.extract(build())[0]
    grad_fns = {"torch.func.grad_and_value": torch.func.grad_and_value(loss_fn)}
    if hasattr(funcopt, "grad_and_value"):
        grad_fns["funcopt.grad_and_value"] = funcopt.grad_and_value(loss_fn)
    for name, fn in grad_fns.items():
        rows.append(Row(f"gradients: {name}", lambda fn=fn: fn(p0, x, y)))
    g0 = torch.func.grad_and_value(loss_fn)(p0, x, y)[0]
    for label, kind in (("tx.update (state passed on)", "update"), ("apply_updates", "apply"),
                        ("apply_gradients(donate=False)", "pure"), ("apply_gradients(donate=True)", "donated")):
        tx = funcopt.adam(1e-3)
        box = {"p": funcopt.nn.extract(build())[0]}
        box["s"] = tx.init(box["p"])
        box["u"] = tx.update(g0, box["s"], box["p"])[0]

        def step(tx=tx, box=box, kind=kind):
            if kind == "update":
                box["u"], box["s"] = tx.update(g0, box["s"], box["p"])
            elif kind == "apply":
                funcopt.apply_updates(box["p"], box["u"])
            else:
                box["p"], box["s"] = apply_gradients(tx, g0, box["s"], box["p"], donate=kind == "donated")

        rows.append(Row(f"funcopt: {label}", step))
    return rows


def run_breakdown(rounds: int, warmup: int) -> str:
    lines = ["### Where one training step's time goes (Adam, batch 64)", "",
             "| model | piece | median us | ratio to torch's whole step |", "| --- | --- | ---: | ---: |"]
    for name, sizes in (("MLP 4-1024-1024-3", (4, 1024, 1024, 3)), ("digits MLP 64-256-256-10", (64, 256, 256, 10))):
        rows = breakdown_rows(sizes, 64)
        res = _paired(rows, rows[0].name, rounds * 10, warmup * 5)
        for row in rows:
            lines.append(f"| {name} | {row.name} | {res[row.name][0] * 1e6:.0f} | {res[row.name][1]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, no torch.compile row")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="S1,S2,S3")
    parser.add_argument("--optimizers", default="adam,sgd_momentum")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--e2e", action="store_true", help="also the end-to-end rows (forward + backward + step)")
    parser.add_argument("--checks", action="store_true", help="also the cost of update's input checks")
    parser.add_argument("--breakdown", action="store_true", help="also the pieces of one training step, timed alone")
    parser.add_argument("--tune-allocator", action="store_true", help="call funcopt.fast.configure_cpu_allocator() first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tune_allocator:
        print(f"configure_cpu_allocator() -> {fused.configure_cpu_allocator()}")
    rounds = args.rounds or (6 if args.quick else 25)
    warmup = 2 if args.quick else 3
    compile_row = not (args.quick or args.no_compile)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds after {warmup} warm-up")
    status = "not installed" if native is None else "built" if native.available() else native.unavailable_reason()
    print(f"funcopt.fast.native kernels: {status}\n")
    sizes = [] if args.sizes == "none" else args.sizes.split(",")
    for which in args.optimizers.split(","):
        for size in sizes:
            print(run(which, size, rounds, warmup, compile_row), flush=True)
    if args.e2e:
        print(run_e2e(rounds, warmup), flush=True)
    if args.checks:
        print(run_checks(rounds, warmup), flush=True)
    if args.breakdown:
        print(run_breakdown(rounds, warmup), flush=True)


if __name__ == "__main__":
    main()
