"""Overhead of the wrappers: time per ``update`` call relative to the wrapped optimizer's.

Run:
    python benchmarks/bench_wrappers.py            # ~1.2M float32 params in 8 leaves
    python benchmarks/bench_wrappers.py --fast     # a quick smoke run

Every variant is timed in the same process, interleaved round by round (warm-up rounds are
discarded), and reported as the median time per call and its ratio to plain ``funcopt.adam``.
``accumulate`` and ``apply_if_finite`` compute the inner update on every call and select with
``torch.where`` (so they vmap and compile); this measures what that costs per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import funcopt


def make_params(total: int, leaves: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    size = total // leaves
    return {f"layer{i}": {"w": torch.randn(size, generator=g)} for i in range(leaves)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args()
    total = 50_000 if args.fast else 1_200_000
    rounds, warmup, calls = (5, 1, 4) if args.fast else (21, 3, 8)

    params = make_params(total)
    half = {k: (i % 2 == 0) for i, k in enumerate(sorted(params))}
    variants = {
        "adam": funcopt.adam(1e-3),
        "inject_hyperparams(adam)": funcopt.inject_hyperparams(funcopt.adam)(learning_rate=1e-3),
        "adam(lr=one_cycle)": funcopt.adam(funcopt.schedules.one_cycle(10_000, 1e-3)),
        "masked(adam, all)": funcopt.masked(funcopt.adam(1e-3), True),
        "multi_transform(adam|adam)": funcopt.multi_transform(
            {True: funcopt.adam(1e-3), False: funcopt.adam(1e-3)}, half
        ),
        "apply_if_finite(adam)": funcopt.apply_if_finite(funcopt.adam(1e-3), 3),
        "accumulate(adam, 4)": funcopt.accumulate(funcopt.adam(1e-3), 4),
        "chain(adam, reduce_on_plateau)": funcopt.chain(funcopt.adam(1e-3), funcopt.reduce_on_plateau()),
    }
    grads = funcopt.tree.map(lambda p: torch.randn_like(p) * 1e-2, params)
    states = {name: tx.init(params) for name, tx in variants.items()}
    value = torch.tensor(1.0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, tx in variants.items():
            state = states[name]
            start = time.perf_counter()
            for _ in range(calls):
                _, state = tx.update(grads, state, params, value=value)
            elapsed = (time.perf_counter() - start) / calls
            states[name] = state
            if r >= warmup:
                times[name].append(elapsed)

    base = statistics.median(times["adam"])
    print(f"{total} float32 params in 8 leaves, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | ms per update | ratio to adam |\n| --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
