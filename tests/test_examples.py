"""Runs every script in examples/ in its --fast mode, in a temporary working directory."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_fast(script, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(script.parents[1]))
    proc = subprocess.run(
        [sys.executable, str(script), "--fast"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
