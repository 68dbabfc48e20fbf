"""Save/load time and file size of funcopt.checkpoint vs torch.save/torch.load and raw safetensors.

The state is an Adam training state: params + first and second moments (3 x numel/3 float32
elements, 100M elements = 400 MB by default) split over a few leaves, plus the step count. Each
round runs every method once, in an interleaved order, after one warm-up round that is not
counted; the table reports medians and ratios to ``torch.save``/``torch.load`` measured in the
same process. funcopt's save includes its fsync (durability) and CRC-32 checks on load; torch.save
and safetensors do not fsync (a variant "torch.save+fsync" is shown for a like-for-like view).

Run:
    python benchmarks/bench_checkpoint.py                 # 100M elements, 3 rounds
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
    parser.add_argument("--numel", type=float, default=100e6, help="total elements (params + 2 moments)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="directory for the files (default: a temp dir)")
    parser.add_argument("--fast", action="store_true", help="1M elements, 2 rounds")
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

    def torch_save():
        torch.save(tree, files["torch.pt"])

    def torch_save_fsync():
        torch.save(tree, files["torch.pt"])
        fsync_file(files["torch.pt"])

    def st_save():
        save_file(flat_tree, files["raw.safetensors"])

    def funcopt_load():
        return ck.load(files["funcopt.safetensors"], like=like)

    def funcopt_load_nolike():
        return ck.load(files["funcopt.safetensors"])

    # weights_only=True refuses funcopt's NamedTuple states unless they are allow-listed
    state_classes = sorted({type(s) for s in tree["opt_state"]}, key=str)

    def torch_load():
        with torch.serialization.safe_globals(state_classes):
            return torch.load(files["torch.pt"], weights_only=True)

    def st_load():
        # load_file maps the file lazily; touch every tensor so the data is really read
        out = load_file(files["raw.safetensors"])
        for t in out.values():
            t.sum()
        return out

    saves = {"funcopt.save": funcopt_save, "torch.save": torch_save, "torch.save+fsync": torch_save_fsync,
             "safetensors.save_file": st_save}
    loads = {"funcopt.load(like=)": funcopt_load, "funcopt.load": funcopt_load_nolike,
             "torch.load(weights_only)": torch_load, "safetensors.load_file": st_load}
    times: dict[str, list[float]] = {k: [] for k in (*saves, *loads)}
    try:
        for r in range(rounds + 1):
            order = list(saves.items()) + list(loads.items())
            if r % 2:
                order = list(reversed(list(saves.items()))) + list(reversed(list(loads.items())))
            for name, fn in order:
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
                del out
                if r > 0:
                    times[name].append(dt)
        sizes = {"funcopt.save": os.path.getsize(files["funcopt.safetensors"]),
                 "torch.save": os.path.getsize(files["torch.pt"]),
                 "safetensors.save_file": os.path.getsize(files["raw.safetensors"])}
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    gb = numel * 4 / 1e9
    print(f"state: {numel / 1e6:.0f}M float32 elements ({gb * 1000:.0f} MB), {rounds} rounds, medians; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':<26} {'seconds':>8} {'GB/s':>6} {'vs torch':>9} {'file MB':>9}")
    for group, ref in ((saves, "torch.save"), (loads, "torch.load(weights_only)")):
        ref_t = statistics.median(times[ref])
        for name in group:
            t = statistics.median(times[name])
            size = sizes.get(name)
            size_s = f"{size / 1e6:9.1f}" if size else f"{'':>9}"
            print(f"{name:<26} {t:8.3f} {gb / t:6.2f} {t / ref_t:8.2f}x {size_s}")


if __name__ == "__main__":
    main()
