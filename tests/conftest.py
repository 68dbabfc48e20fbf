import os
import sys

import pytest
import torch

# Both `from tests.helpers import ...` and `from helpers import ...` work.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("MPLBACKEND", "Agg")
# Two threads at most; one per process when pytest-xdist runs several workers (-n), so that
# the workers do not oversubscribe the cores (OpenMP's spin-waits make that very slow).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test starts from the same seed and float32 default dtype."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    yield
    torch.set_default_dtype(old)
