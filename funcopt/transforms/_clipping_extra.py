"""Rescalings of the updates that optax users expect: unit-wise adaptive clipping (NFNets),
per-leaf RMS clipping, normalization by the global norm, gradient centralization, and
per-example global-norm clipping of a batch of per-example gradients.

Part of ``funcopt.transforms``; each follows optax 0.2.8's numerics and argument names. All are
stateless, pure and branch-free on tensor values (``vmap``/``grad`` friendly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree, require_params
from funcopt.transforms._common import _check_range, _init_empty

__all__ = [
    "adaptive_grad_clip",
    "clip_by_block_rms",
    "normalize_by_update_norm",
    "normalize",
    "centralize",
    "unitwise_norm",
    "per_example_global_norm_clip",
]


def _abs_sq(x: torch.Tensor) -> torch.Tensor:
    return (x.conj() * x).real if x.is_complex() else x * x


def unitwise_norm(x: torch.Tensor, axis: int | Sequence[int] | None = None) -> torch.Tensor:
    """The L2 norm of each unit of ``x``, broadcast back to ``x``'s shape.

    With ``axis`` given, the norm is taken over those dimensions. By default, the units follow
    PyTorch's layouts: a scalar or vector (also after squeezing size-1 dimensions) is one unit;
    a weight of two or more dimensions, ``(out, in, ...)`` as ``nn.Linear`` and ``nn.Conv*``
    store them, has one unit per output row (the norm runs over every dimension but the first).
    optax's default assumes JAX's ``(in, out)`` and ``HWIO`` layouts and reduces over the
    leading dimensions instead; the two agree on transposed weights.
    """
    if axis is not None:
        dims = (axis,) if isinstance(axis, int) else tuple(axis)
        sq = _abs_sq(x).sum(dim=dims, keepdim=True)
    elif x.squeeze().dim() <= 1:
        sq = _abs_sq(x).sum().reshape([1] * x.dim())
    else:
        sq = _abs_sq(x).sum(dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.sqrt(sq).expand(x.shape)


def adaptive_grad_clip(
    clipping: float | torch.Tensor, eps: float | torch.Tensor = 1e-3, axis: int | Sequence[int] | None = None
) -> GradientTransformation:
    """Clips each unit's update to at most ``clipping * max(||param unit||, eps)`` (``optax.adaptive_grad_clip``).

    Unit-wise norms as :func:`unitwise_norm` computes them (one unit per output row of a torch
    weight by default; ``axis`` to choose). A unit whose update norm is below the limit passes
    unchanged; a larger one is rescaled to the limit (its norm floored at 1e-6 in the division).

    Args:
        clipping: the largest allowed ratio of update norm to parameter norm (> 0).
        eps: floor of the parameter norm, so that zero-initialized units can move (default 1e-3).
        axis: dimension(s) of each unit's norm; None for the layout-based default.

    References:
        Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization",
        2021 (arXiv 2102.06171).
    """
    _check_range("clipping", clipping, 0.0)
    _check_range("eps", eps, 0.0)

    def update(updates, state, params=None, **extra_args):
        require_params(params, "adaptive_grad_clip")

        def clip_unit(u, p):
            u_norm, p_norm = unitwise_norm(u, axis), unitwise_norm(p, axis)
            limit = clipping * torch.clamp(p_norm, min=eps)
            clipped = u * (limit / torch.clamp(u_norm, min=1e-6))
            return torch.where(u_norm < limit, u, clipped)

        return _tree.map(clip_unit, updates, params, names=("updates", "params")), state

    return GradientTransformation(_init_empty, update)


def clip_by_block_rms(threshold: float | torch.Tensor) -> GradientTransformation:
    """Rescales each leaf so that its root-mean-square is at most ``threshold`` (``optax.clip_by_block_rms``).

    ``u / max(1, rms(u) / threshold)`` per leaf (a "block": one weight or bias tensor).
    """
    _check_range("threshold", threshold, 0.0, low_open=True)

    def update(updates, state, params=None, **extra_args):
        def clip_block(u):
            rms = torch.sqrt(torch.mean(_abs_sq(u)))
            return u / torch.clamp(rms / threshold, min=1.0)

        return _tree.map(clip_block, updates), state

    return GradientTransformation(_init_empty, update)


def normalize_by_update_norm(
    scale_factor: float | torch.Tensor = 1.0, eps: float | torch.Tensor = 1e-6
) -> GradientTransformation:
    """Divides the updates by their global L2 norm: ``u * scale_factor / (||u|| + eps)``
    (``optax.normalize_by_update_norm``; pass ``scale_factor=-lr`` to descend with it alone)."""
    _check_range("eps", eps, 0.0)

    def update(updates, state, params=None, **extra_args):
        denominator = (_tree.norm(updates) + eps) / scale_factor
        return _tree.map(lambda u: u / denominator, updates), state

    return GradientTransformation(_init_empty, update)


def normalize() -> GradientTransformation:
    """Divides the updates by their global L2 norm, with no epsilon (``optax.contrib.normalize``,
    the adversarial direction of :func:`funcopt.sam`). A zero update gives NaNs."""

    def update(updates, state, params=None, **extra_args):
        norm = _tree.norm(updates)
        return _tree.map(lambda u: u / norm, updates), state

    return GradientTransformation(_init_empty, update)


def centralize() -> GradientTransformation:
    """Gradient centralization (``optax.centralize``): subtracts from each leaf of two or more
    dimensions its mean over every dimension but the first; vectors and scalars pass unchanged.

    The first dimension is the output dimension of torch's ``nn.Linear``/``nn.Conv*`` weights,
    so each output unit's weight gradient is centred, as in the paper.

    References:
        Yong et al., "Gradient Centralization: A New Optimization Technique for Deep Neural
        Networks", 2020 (arXiv 2004.01461).
    """

    def update(updates, state, params=None, **extra_args):
        def centre(u):
            if u.dim() <= 1:
                return u
            return u - u.mean(dim=tuple(range(1, u.dim())), keepdim=True)

        return _tree.map(centre, updates), state

    return GradientTransformation(_init_empty, update)


def per_example_global_norm_clip(grads: PyTree, l2_norm_clip: float | torch.Tensor) -> tuple[PyTree, torch.Tensor]:
    """Clips each example's gradient to global norm ``l2_norm_clip`` and sums over the examples.

    Like ``optax.per_example_global_norm_clip``. Every leaf of ``grads`` carries the examples on
    its first dimension, shape ``(batch, *param_shape)``, as ``torch.func.vmap(torch.func.grad(
    loss))(params, x, y)`` returns them (with ``in_dims=(None, 0, 0)``). Example ``i`` is scaled
    by ``min(1, l2_norm_clip / ||g_i||)`` (``||g_i||`` over all its leaves; 1 for a zero
    gradient).

    Returns:
        ``(clipped_sum, num_clipped)``: the sum over examples (shaped like the params) and the
        0-dim int64 count of examples whose gradient was scaled down.

    References:
        Abadi et al., "Deep Learning with Differential Privacy", 2016 (arXiv 1607.00133).
    """
    flat = _tree.leaves(grads)
    if not flat:
        raise FuncoptError("per_example_global_norm_clip: `grads` has no tensor leaves.")
    batch = flat[0].shape[0] if flat[0].dim() >= 1 else None
    for path, g in zip(_tree.paths(grads), flat):
        if g.dim() < 1 or g.shape[0] != batch:
            raise FuncoptError(
                f"per_example_global_norm_clip: the leaf at {path} has shape {tuple(g.shape)}, but every "
                f"leaf must hold per-example gradients with the same batch size on its first dimension "
                f"({batch}); compute them with torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))."
            )
    sq = None
    for g in flat:
        term = _abs_sq(g).reshape(batch, -1).sum(dim=1)
        sq = term if sq is None else sq + term
    norms = torch.sqrt(sq)
    multipliers = torch.nan_to_num(torch.clamp(l2_norm_clip / norms, max=1.0), nan=1.0)
    num_clipped = (multipliers < 1.0).sum()
    clipped = _tree.map(lambda g: torch.tensordot(multipliers.to(g.dtype), g, dims=1), grads)
    return clipped, num_clipped
