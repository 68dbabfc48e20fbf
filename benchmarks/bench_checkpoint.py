"""Save/load throughput of funcopt.checkpoint as a ratio to plain safetensors on the same tensors.

The state is an Adam training state: params + first and second moments (3 x numel/3 float32
elements, 75M elements = 300 MB by default) split over a few leaves, plus the step count. Each
round runs every method once, in an interleaved order (reversed every other round), after one
warm-up round that is not counted, the loads after an ``os.sync()`` that lets the saves'
writeback finish; the table reports medians and throughput ratios to
``safetensors.torch.save_file`` / ``load_file`` measured in the same process (higher is better,
1.00x = as fast as safetensors). funcopt's save includes its CRC-32s and fsync (durability),
its load every validation and the CRC-32 check of every tensor. ``save_file`` does not fsync, so
``save_file + fsync`` is shown too; ``load_file`` maps the file lazily, so every tensor is touched
(summed) to really read the data. ``torch.save``/``torch.load(weights_only=True)`` are shown for
reference.

Run:
    python benchmarks/bench_checkpoint.py                 # 75M elements (300 MB), 5 rounds
    python benchmarks/bench_checkpoint.py --numel 1e6 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

import funcopt
from funcopt import checkpoint as ck


def make_state(numel: int) -> dict:
    per = numel // 3
    shapes = {"embed": (per // 2,), "w1": (per // 4,), "w2": (per - per // 2 - per // 4,)}
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    tx = funcopt.adam(1e-3)
    state = tx.init(params)
    grads = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    _, state = tx.update(grads, state, params)
    return {"params": params, "opt_state": state}


def flat(tree: dict) -> dict:
    paths = []

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            paths.append((path, node))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, tuple):
            for i, v in enumerate(node):
                walk(v, f"{path}.{i}")

    walk(tree, "")
    return {p.lstrip("."): t.contiguous() for p, t in paths}


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=75e6, help="total elements (params + 2 moments)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="directory for the files (default: a temp dir)")
    parser.add_argument("--fast", action="store_true", help="1M elements, 2 rounds")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.save/torch.load")
    args = parser.parse_args()
    numel = int(1e6 if args.fast else args.numel)
    rounds = 2 if args.fast else args.rounds
    directory = args.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    tree = make_state(numel)
    flat_tree = flat(tree)
    like = {"params": tree["params"], "opt_state": funcopt.adam(1e-3).init(tree["params"])}
    files = {name: os.path.join(directory, name) for name in ("funcopt.safetensors", "torch.pt", "raw.safetensors")}

    def funcopt_save():
        ck.save(files["funcopt.safetensors"], tree)

    def st_save():
        save_file(flat_tree, files["raw.safetensors"])

    def st_save_fsync():
        save_file(flat_tree, files["raw.safetensors"])
        fsync_file(files["raw.safetensors"])

    def torch_save():
        torch.save(tree, files["torch.pt"])

    def funcopt_load():
        return ck.load(files["funcopt.safetensors"], like=like)

    def funcopt_load_nolike():
        return ck.load(files["funcopt.safetensors"])

    def st_load():
        # load_file maps the file lazily; touch every tensor so the data is really read
        out = load_file(files["raw.safetensors"])
        for t in out.values():
            t.sum()
        return out

    # weights_only=True refuses funcopt's NamedTuple states unless they are allow-listed
    state_classes = sorted({type(s) for s in tree["opt_state"]}, key=str)

    def torch_load():
        with torch.serialization.safe_globals(state_classes):
            return torch.load(files["torch.pt"], weights_only=True)

    saves = {"safetensors.save_file": st_save, "funcopt.save": funcopt_save,
             "safetensors.save_file + fsync": st_save_fsync, "torch.save": torch_save}
    loads = {"safetensors.load_file (touched)": st_load, "funcopt.load(like=)": funcopt_load,
             "funcopt.load": funcopt_load_nolike, "torch.load(weights_only)": torch_load}
    if args.no_torch:
        del saves["torch.save"], loads["torch.load(weights_only)"]
    times: dict[str, list[float]] = {k: [] for k in (*saves, *loads)}
    try:
        for r in range(rounds + 1):
            save_order, load_order = list(saves.items()), list(loads.items())
            if r % 2:
                save_order.reverse()
                load_order.reverse()
            for phase in (save_order, load_order):
                # let the saves' writeback finish before the loads (save_file does not fsync), so
                # that it does not run on the CPUs in the background of the loads
                os.sync()
                for name, fn in phase:
                    t0 = time.perf_counter()
                    out = fn()
                    dt = time.perf_counter() - t0
                    del out
                    if r > 0:
                        times[name].append(dt)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    mb = numel * 4 / 1e6
    print(f"state: {numel / 1e6:.0f}M float32 elements ({mb:.0f} MB), {rounds} rounds, medians; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print("| method | median s | GB/s | throughput vs safetensors (ratio of medians) | median of per-round ratios |")
    print("| --- | ---: | ---: | ---: | ---: |")
    per_round = {}
    for group, ref in ((saves, "safetensors.save_file"), (loads, "safetensors.load_file (touched)")):
        ref_t = statistics.median(times[ref])
        for name in group:
            t = statistics.median(times[name])
            per_round[name] = [r / x for r, x in zip(times[ref], times[name])]
            print(f"| {name} | {t:.3f} | {mb / 1000 / t:.2f} | {ref_t / t:.2f}x | "
                  f"{statistics.median(per_round[name]):.2f}x |")
    print("per-round ratios: " + "; ".join(f"{name} = " + ", ".join(f"{x:.2f}" for x in v)
                                          for name, v in per_round.items() if name.startswith("funcopt")))


if __name__ == "__main__":
    main()
