"""Hyperparameter sets for :func:`funcopt.sweep.sweep`: the Cartesian :func:`grid`, and
:func:`random_search` over the distributions :func:`uniform`, :func:`log_uniform` and
:func:`choice`. Each returns (or samples into) a dict name -> K values."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from funcopt.base import FuncoptError

__all__ = ["grid", "uniform", "log_uniform", "choice", "random_search"]


# ---------------------------------------------------------------------------------------------
# Hyperparameter sets


def _as_values(name: str, values: Any) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise FuncoptError(f"hyperparameter {name!r} needs a list of values, got {values!r}.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise FuncoptError(f"hyperparameter {name!r} has a non-numeric value {v!r}; sweeps take numbers.")
        out.append(float(v))
    if not out:
        raise FuncoptError(f"hyperparameter {name!r} has no values.")
    return out


def grid(**axes: Sequence[float]) -> dict[str, list[float]]:
    """The Cartesian product of per-name value lists, like ``sklearn.model_selection.ParameterGrid``.

    Returns a dict of equal-length lists (the first name varies slowest), e.g.
    ``grid(learning_rate=[0.1, 0.01], momentum=[0.0, 0.9])`` gives 4 configurations.
    """
    if not axes:
        raise FuncoptError("grid needs at least one name=[values] argument.")
    lists = {k: _as_values(k, v) for k, v in axes.items()}
    out: dict[str, list[float]] = {k: [] for k in lists}
    total = math.prod(len(v) for v in lists.values())
    names = list(lists)
    for flat in range(total):
        rest = flat
        for k in reversed(names):
            n = len(lists[k])
            out[k].append(lists[k][rest % n])
            rest //= n
    return out


@dataclass(frozen=True)
class _Distribution:
    kind: str
    low: float = 0.0
    high: float = 1.0
    values: tuple[float, ...] = ()

    def sample(self, n: int, gen: torch.Generator) -> list[float]:
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        if self.kind == "uniform":
            return (self.low + (self.high - self.low) * u).tolist()
        if self.kind == "log_uniform":
            lo, hi = math.log(self.low), math.log(self.high)
            return torch.exp(lo + (hi - lo) * u).tolist()
        idx = torch.randint(len(self.values), (n,), generator=gen)
        return [self.values[i] for i in idx.tolist()]


def uniform(low: float, high: float) -> _Distribution:
    """Uniform on ``[low, high)``, for :func:`random_search`."""
    if not low < high:
        raise FuncoptError(f"uniform needs low < high, got low={low!r}, high={high!r}.")
    return _Distribution("uniform", float(low), float(high))


def log_uniform(low: float, high: float) -> _Distribution:
    """Log-uniform on ``[low, high)`` (``scipy.stats.loguniform``), for learning rates and decays."""
    if not 0 < low < high:
        raise FuncoptError(f"log_uniform needs 0 < low < high, got low={low!r}, high={high!r}.")
    return _Distribution("log_uniform", float(low), float(high))


def choice(values: Sequence[float]) -> _Distribution:
    """Uniform over a finite list of numbers, for :func:`random_search`."""
    return _Distribution("choice", values=tuple(_as_values("choice", values)))


def random_search(num: int, *, seed: int = 0, **distributions: _Distribution) -> dict[str, list[float]]:
    """``num`` random configurations, each name drawn independently from its distribution.

    Like ``sklearn.model_selection.ParameterSampler``; e.g.
    ``random_search(16, learning_rate=log_uniform(1e-4, 1e-1), b1=uniform(0.8, 0.99))``.
    Reproducible for a given ``seed``.
    """
    if not isinstance(num, int) or num < 1:
        raise FuncoptError(f"random_search needs num >= 1, got {num!r}.")
    if not distributions:
        raise FuncoptError("random_search needs at least one name=distribution argument.")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, dist in distributions.items():
        if not isinstance(dist, _Distribution):
            raise FuncoptError(
                f"random_search: {name!r} must be uniform(...), log_uniform(...) or choice([...]); "
                f"got {type(dist).__name__}. For a fixed list of values use grid()."
            )
        out[name] = dist.sample(num, gen)
    return out
