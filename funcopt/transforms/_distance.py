"""DoG and DoWG: step sizes from the distance travelled over the gradients seen (parameter-free SGD).

Part of ``funcopt.transforms`` (import the blocks from there or from ``funcopt``). The numerics
follow ``optax.contrib.scale_by_dog`` and ``scale_by_dowg`` (optax 0.2.8). The step size is a
global reduction (norms over every leaf), so these blocks have no elementwise fast route; their
scalars are 0-dim float64 tensors, never read with ``.item()``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, check_state, require_params, stable_name
from funcopt.transforms._common import _check_range, _scalar_dtype, _scalar_state, check_non_negative, init_count

__all__ = ["ScaleByDogState", "ScaleByDowgState", "scale_by_dog", "scale_by_dowg"]

_INIT_STEPS = ("distance", "learning_rate", "heuristic")


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose derivative at ``x = 0`` (the first step's distance) is 0, not NaN."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


@stable_name("funcopt.ScaleByDogState")
class ScaleByDogState(NamedTuple):
    """State of :func:`scale_by_dog`: ``count`` (0-dim int64; 0 marks the first step),
    ``init_params`` (a copy), ``max_dist`` (the largest ``||x - x0||`` so far) and
    ``sum_sq_norm_grads`` (the running sum of ``||g||**2``), both 0-dim float64."""

    count: torch.Tensor
    init_params: PyTree
    max_dist: torch.Tensor
    sum_sq_norm_grads: torch.Tensor


def scale_by_dog(init_step: tuple[str, float] = ("heuristic", 1e-6), eps: float = 1e-8) -> GradientTransformation:
    """Scales updates by DoG's step size ``max_k ||x_k - x_0|| / sqrt(sum_k ||g_k||**2 + eps)``
    (``optax.contrib.scale_by_dog``), unsigned (chain a learning-rate block after it).

    ``init_step`` sets the first step: ``("distance", r)`` starts the distance at ``r``;
    ``("heuristic", a)`` at ``a * (1 + ||x_0||)``; ``("learning_rate", lr)`` makes the first
    step size ``lr`` itself. Needs params.

    References: Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step
    Size Schedule", ICML 2023, arXiv 2302.12022.
    """
    if not (isinstance(init_step, tuple) and len(init_step) == 2 and init_step[0] in _INIT_STEPS):
        raise FuncoptError(
            f"scale_by_dog: init_step must be a pair (kind, value) with kind one of {_INIT_STEPS}, "
            f"got {init_step!r}. E.g. init_step=('heuristic', 1e-6)."
        )
    kind, value = init_step
    check_non_negative("init_step value", value)
    check_non_negative("eps", eps)

    def init(params):
        count = init_count(params)
        if kind == "distance":
            r = _scalar_state(value, count)
        elif kind == "heuristic":
            r = (value * (1 + _tree.norm(params))).to(_scalar_dtype(count))
        else:
            r = _scalar_state(0.0, count)
        return ScaleByDogState(count, _tree.map(torch.clone, params), r, _scalar_state(0.0, count))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByDogState, "scale_by_dog")
        require_params(params, "scale_by_dog")
        diff = _tree.map(lambda a, b: a - b, state.init_params, params, names=("init_params", "params"))
        dist = _safe_sqrt(_tree.sum_squares(diff))
        max_dist = torch.maximum(state.max_dist, dist)
        sum_sq = state.sum_sq_norm_grads + _tree.sum_squares(updates)
        step_size = max_dist / torch.sqrt(sum_sq + eps)
        if kind == "learning_rate":
            step_size = torch.where(state.count == 0, value, step_size)
        out = _tree.map(lambda g: (step_size * g).to(g.dtype), updates)
        return out, ScaleByDogState(state.count + 1, state.init_params, max_dist, sum_sq)

    return GradientTransformation(init, update)


@stable_name("funcopt.ScaleByDowgState")
class ScaleByDowgState(NamedTuple):
    """State of :func:`scale_by_dowg`: ``count`` (0-dim int64), ``init_params`` (a copy),
    ``weighted_sq_norm_grads`` and ``estim_sq_dist`` (0-dim float64)."""

    count: torch.Tensor
    init_params: PyTree
    weighted_sq_norm_grads: torch.Tensor
    estim_sq_dist: torch.Tensor


def scale_by_dowg(init_estim_sq_dist: float | None = None, eps: float = 1e-4) -> GradientTransformation:
    """Scales updates by DoWG's step size ``r**2 / (sqrt(sum_k r_k**2 ||g_k||**2) + eps)``
    (``optax.contrib.scale_by_dowg``), unsigned (chain a learning-rate block after it).

    ``r**2`` is the largest squared distance ``||x_k - x_0||**2`` so far, starting at
    ``init_estim_sq_dist`` (default ``eps``). Needs params.

    References: Khaled, Mishchenko & Jin, "DoWG Unleashed: An Efficient Universal Parameter-Free
    Gradient Descent Method", NeurIPS 2023, arXiv 2305.16284.
    """
    check_non_negative("eps", eps)
    start = eps if init_estim_sq_dist is None else init_estim_sq_dist
    _check_range("init_estim_sq_dist", start, 0.0)

    def init(params):
        count = init_count(params)
        init_params = _tree.map(torch.clone, params)
        return ScaleByDowgState(count, init_params, _scalar_state(0.0, count), _scalar_state(start, count))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByDowgState, "scale_by_dowg")
        require_params(params, "scale_by_dowg")
        diff = _tree.map(lambda a, b: a - b, state.init_params, params, names=("init_params", "params"))
        estim = torch.maximum(state.estim_sq_dist, _tree.sum_squares(diff))
        weighted = estim * _tree.sum_squares(updates) + state.weighted_sq_norm_grads
        step_size = estim / (torch.sqrt(weighted) + eps)
        out = _tree.map(lambda g: (step_size * g).to(g.dtype), updates)
        return out, ScaleByDowgState(state.count + 1, state.init_params, weighted, estim)

    return GradientTransformation(init, update)
