"""Every funcopt schedule next to its torch.optim.lr_scheduler twin, plotted and compared.

Run:
    python examples/schedules.py            # 1000 steps, writes docs/img/schedules.png
    python examples/schedules.py --fast     # 120 steps, writes ./schedules.png
    python examples/schedules.py --out DIR  # writes DIR/schedules.png

For each schedule the script runs torch's scheduler the usual way (``optimizer.step()`` then
``scheduler.step()``), records the learning rate each ``optimizer.step()`` used, evaluates the
funcopt schedule at counts 0..n-1 (the count the k-th ``update`` sees is k-1), prints the largest
relative difference and draws both curves. It ends with a 1cycle Adam run on the digits data
where ``inject_hyperparams`` cycles the learning rate and ``b1`` the way OneCycleLR does.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch
from torch.optim import lr_scheduler as L

import funcopt
from funcopt import schedules as S

BASE = 0.1


def torch_lrs(make, n):
    """Learning rate (and momentum) torch uses at each of ``n`` optimizer steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE, momentum=0.9)
    sched = make(opt)
    lrs, moms = [], []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    return torch.tensor(lrs, dtype=torch.float64), torch.tensor(moms, dtype=torch.float64)


def cases(n):
    """(title, funcopt expression, torch expression, funcopt schedule, torch factory)."""
    w = n // 10
    return [
        ("linear", "linear(0.01, 0.1, n/2)", "LinearLR(0.1, 1.0, n/2)",
         S.linear(0.1 * BASE, BASE, n // 2), lambda o: L.LinearLR(o, 0.1, 1.0, n // 2)),
        ("polynomial", "polynomial(0.1, 0, 2, n)", "PolynomialLR(n, 2)",
         S.polynomial(BASE, 0.0, 2.0, n), lambda o: L.PolynomialLR(o, n, 2.0)),
        ("exponential_decay", "exponential_decay(0.1, 1, g)", "ExponentialLR(g)",
         S.exponential_decay(BASE, 1, 0.01 ** (1 / n)), lambda o: L.ExponentialLR(o, 0.01 ** (1 / n))),
        ("staircase", "exponential_decay(.., n/5, 0.5, staircase)", "StepLR(n/5, 0.5)",
         S.exponential_decay(BASE, n // 5, 0.5, staircase=True), lambda o: L.StepLR(o, n // 5, 0.5)),
        ("piecewise_constant", "piecewise_constant(0.1, {..: 0.3})", "MultiStepLR([n/3, 2n/3], 0.3)",
         S.piecewise_constant(BASE, {n // 3: 0.3, 2 * n // 3: 0.3}), lambda o: L.MultiStepLR(o, [n // 3, 2 * n // 3], 0.3)),
        ("cosine_decay", "cosine_decay(0.1, n, 0.05)", "CosineAnnealingLR(n, 5e-3)",
         S.cosine_decay(BASE, n, 0.05), lambda o: L.CosineAnnealingLR(o, n, 0.05 * BASE)),
        ("warmup_cosine_decay", "warmup_cosine_decay(0, 0.1, n/10, n)", "SequentialLR(Linear, Cosine)",
         S.warmup_cosine_decay(0.01 * BASE, BASE, w, n),
         lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.01, 1.0, w), L.CosineAnnealingLR(o, n - w)], [w])),
        ("warmup_exponential_decay", "warmup_exponential_decay(..)", "SequentialLR(Linear, Exponential)",
         S.warmup_exponential_decay(0.01 * BASE, BASE, w, 1, 0.995),
         lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.01, 1.0, w), L.ExponentialLR(o, 0.995)], [w])),
        ("sgdr", "sgdr(0.1, n/15, 2, 1e-3)", "CosineAnnealingWarmRestarts(n/15, 2)",
         S.sgdr(BASE, n // 15, 2, 1e-3), lambda o: L.CosineAnnealingWarmRestarts(o, n // 15, 2, 1e-3)),
        ("one_cycle cos", "one_cycle(n, 0.1)", "OneCycleLR(0.1, n)",
         S.one_cycle(n, BASE), lambda o: L.OneCycleLR(o, BASE, total_steps=n)),
        ("one_cycle linear", "one_cycle(n, 0.1, anneal_strategy='linear')", "OneCycleLR(.., 'linear')",
         S.one_cycle(n, BASE, anneal_strategy="linear"), lambda o: L.OneCycleLR(o, BASE, total_steps=n, anneal_strategy="linear")),
        ("one_cycle three_phase", "one_cycle(n, 0.1, three_phase=True)", "OneCycleLR(.., three_phase=True)",
         S.one_cycle(n, BASE, three_phase=True), lambda o: L.OneCycleLR(o, BASE, total_steps=n, three_phase=True)),
    ]


def compare(n):
    rows = []
    for title, ours_expr, torch_expr, schedule, make in cases(n):
        expected, _ = torch_lrs(make, n)
        ours = torch.func.vmap(schedule)(torch.arange(n))
        rel = ((ours - expected).abs() / expected.abs().clamp(min=1e-300)).max().item()
        rows.append((title, ours_expr, torch_expr, ours, expected, rel))
    _, moms = torch_lrs(lambda o: L.OneCycleLR(o, BASE, total_steps=n), n)
    ours_m = torch.func.vmap(S.one_cycle_momentum(n))(torch.arange(n))
    rel_m = ((ours_m - moms).abs() / moms).max().item()
    rows.append(("one_cycle momentum", "one_cycle_momentum(n)", "OneCycleLR(cycle_momentum=True)", ours_m, moms, rel_m))
    return rows


def plot(rows, n, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(13, 2.4 * nrows), sharex=True)
    steps = range(n)
    for ax, (title, _, torch_expr, ours, expected, rel) in zip(axes.flat, rows):
        ax.plot(steps, expected.numpy(), color="0.75", lw=4, label="torch")
        ax.plot(steps, ours.numpy(), color="C0", lw=1.2, label="funcopt")
        ax.set_title(f"{title}\nvs {torch_expr}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.text(0.98, 0.95, f"max rel diff {rel:.0e}", transform=ax.transAxes, ha="right", va="top", fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"funcopt schedules (blue) over torch.optim.lr_scheduler (grey), {n} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def one_cycle_adam_digits(steps, samples=None):
    """A digits MLP trained with Adam under 1cycle lr and b1, funcopt vs torch.optim."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:samples] / 16.0, dtype=torch.float64)
    y = torch.tensor(y[:samples])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    params, _ = funcopt.nn.extract(model)

    def loss_fn(p):
        return torch.nn.functional.cross_entropy(funcopt.nn.apply(model, p, None, x), y)

    tx = funcopt.inject_hyperparams(funcopt.adam)(
        learning_rate=S.one_cycle(steps, 3e-2), b1=S.one_cycle_momentum(steps)
    )
    state = tx.init(params)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    sched = L.OneCycleLR(opt, 3e-2, total_steps=steps)
    for _ in range(steps):
        grads, loss = torch.func.grad_and_value(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        params = funcopt.apply_updates(params, updates)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    diff = max((params[k] - v).abs().max().item() for k, v in model.named_parameters())
    return loss_fn(params).item(), diff, funcopt.get_hyperparams(state)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="120 steps, write into the current directory")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="directory for schedules.png")
    args = parser.parse_args()
    n = 120 if args.fast else 1000
    if args.out is not None:
        out = args.out
    elif args.fast:
        out = pathlib.Path.cwd()
    else:
        out = pathlib.Path(__file__).resolve().parents[1] / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    rows = compare(n)
    print(f"{'schedule':26s} {'torch equivalent':38s} max rel diff over {n} steps")
    for title, _, torch_expr, _, _, rel in rows:
        print(f"{title:26s} {torch_expr:38s} {rel:.1e}")
    worst = max(r[-1] for r in rows)
    assert worst < 1e-6, f"a schedule differs from torch by {worst:.1e}"
    path = out / "schedules.png"
    plot(rows, n, path)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")

    steps = 20 if args.fast else 300
    loss, diff, hparams = one_cycle_adam_digits(steps, samples=200 if args.fast else None)
    print(
        f"1cycle Adam on digits, {steps} steps: final loss {loss:.4f}, max |param - torch| {diff:.1e}, "
        f"last lr {hparams['learning_rate'].item():.2e}, last b1 {hparams['b1'].item():.3f}"
    )
    assert diff < 1e-8
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
