"""SM3's scaling: memory-efficient Adagrad with one accumulator per row, column... of each leaf.

Part of ``funcopt.transforms``; numerics of optax 0.2.8's ``scale_by_sm3``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, check_state, stable_name
from funcopt.transforms._common import _check_range, check_beta, check_non_negative, init_count
from funcopt.transforms._moments import _ema

__all__ = ["ScaleBySM3State", "scale_by_sm3"]


@stable_name("funcopt.ScaleBySM3State")
class ScaleBySM3State(NamedTuple):
    """State of :func:`scale_by_sm3`: the 0-dim int64 ``count``; ``mu``, for each leaf of shape
    ``(d0, ..., dk)`` a list of k+1 vectors of shapes ``(d0,)``, ..., ``(dk,)`` (one accumulator
    per slice along each axis; a 1-D leaf has one vector, its own shape, and a 0-dim leaf one
    0-dim tensor); ``nu``, the params-shaped momentum."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def _accumulators(p: torch.Tensor) -> list[torch.Tensor]:
    if p.dim() == 0:
        return [torch.zeros_like(p)]
    return [p.new_zeros((n,)) for n in p.shape]


def scale_by_sm3(b1: float = 0.9, b2: float = 1.0, eps: float = 1e-8) -> GradientTransformation:
    """SM3 (Anil et al., "Memory-Efficient Adaptive Optimization", NeurIPS 2019, arXiv
    1901.11150), as ``optax.scale_by_sm3``.

    For a leaf with two or more dimensions, the accumulator of each element is the minimum over
    its axes of that axis' vector, plus ``g**2`` (``b2 = 1``, the paper's sum) or
    ``b2 * acc + (1 - b2) * g**2``; each axis' vector then becomes the maximum of the new
    accumulators over the other axes. Leaves of fewer dimensions keep the full accumulator.
    Returns the EMA (decay ``b1``) of ``g / sqrt(acc + eps)`` (0 where ``acc`` is 0). Memory:
    the sum of the leaf's dimensions instead of their product. Complex leaves are rejected.
    """
    check_beta("b1", b1)
    _check_range("b2", b2, 0.0, 1.0)
    check_non_negative("eps", eps)
    plain_sum = isinstance(b2, (int, float)) and b2 == 1.0

    def init(params):
        for path, p in zip(_tree.paths(params), _tree.leaves(params)):
            if torch.is_complex(p):
                raise FuncoptError(f"scale_by_sm3: the leaf at {path} is complex; SM3 takes real tensors only.")
        mu = _tree.map(_accumulators, params)
        return ScaleBySM3State(init_count(params), mu, _tree.zeros_like(params))

    def accumulate(g: torch.Tensor, vectors: list[torch.Tensor]) -> torch.Tensor:
        if g.dim() < 2:
            previous = vectors[0]
        else:
            views = [v.reshape([1] * i + [-1] + [1] * (g.dim() - i - 1)) for i, v in enumerate(vectors)]
            previous = functools.reduce(torch.minimum, views)
        g2 = g * g
        if plain_sum:
            return g2 + previous
        # b2 == 1 means the plain sum (optax's rule), also for a tensor b2 (inject_hyperparams)
        c = torch.where(torch.as_tensor(b2) == 1.0, 1.0, 1 - torch.as_tensor(b2)) if torch.is_tensor(b2) else 1 - b2
        return c * g2 + b2 * previous

    def new_vectors(acc: torch.Tensor) -> list[torch.Tensor]:
        if acc.dim() < 2:
            return [acc]
        axes = range(acc.dim())
        return [torch.amax(acc, dim=[j for j in axes if j != i]) for i in axes]

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleBySM3State, "scale_by_sm3")
        g_leaves, spec = _tree.leaves(updates), _tree.structure(updates)
        mu_leaves = spec.flatten_up_to(state.mu)
        accs = [accumulate(g, list(v)) for g, v in zip(g_leaves, mu_leaves)]
        scaled = [
            torch.where(a > 0, g * torch.rsqrt(a + eps), torch.zeros_like(g)) for g, a in zip(g_leaves, accs)
        ]
        nu = _ema(state.nu, spec.unflatten(scaled), b1, names=("nu", "updates"))
        mu = spec.unflatten([new_vectors(a) for a in accs])
        return nu, ScaleBySM3State(state.count + 1, mu, nu)

    return GradientTransformation(init, update)
