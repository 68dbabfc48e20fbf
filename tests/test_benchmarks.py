"""Runs every script in benchmarks/ with its smallest settings, so that none of them rots.

Only that each script runs to the end and prints its table is checked; the timings a smoke
run prints mean nothing (speed is measured by running the scripts themselves, see README).
"""

import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SMALLEST = {
    "bench_step.py": ["--quick", "--rounds", "1", "--sizes", "S3"],
    "bench_catalog.py": ["--quick", "--rounds", "1", "--sizes", "S3"],
    "bench_checkpoint.py": ["--fast", "--dir", "{tmp}"],
    "bench_fsdp.py": ["--width", "64", "--depth", "2", "--rounds", "1", "--steps", "1", "--worlds", "1", "2"],
    "bench_hypergrad.py": ["--skip-accuracy", "--rounds", "1", "--warmup", "0"],
    "bench_lbfgs.py": ["--fast", "--repeats", "1"],
    "bench_lr_finder.py": ["--quick"],
    "bench_sweep.py": ["--steps", "3", "--repeats", "1", "--ks", "2"],
    "bench_torch_integration.py": ["--hidden", "16", "--rounds", "1", "--steps", "2"],
    "bench_wrappers.py": ["--fast"],
}


def test_every_benchmark_has_a_smoke_setting():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(SMALLEST)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_benchmark_runs_with_its_smallest_settings(script, tmp_path):
    args = [a.format(tmp=tmp_path) for a in SMALLEST[script]]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(BENCHMARKS.parent))
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "|" in proc.stdout or "=" in proc.stdout, f"{script} printed no table:\n{proc.stdout[-2000:]}"
