"""Adan (``optax.adan``): its reference chain and its elementwise fast route."""

from __future__ import annotations

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.fast import FastRoute, KernelCall, declare
from funcopt.optimizers._common import Mask, build, decay_weights, finish
from funcopt.optimizers._optax_adam import bias_corrections
from funcopt.transforms import scale_by_adan, scale_by_learning_rate

__all__ = ["adan"]


def _adan_kernel(call: KernelCall) -> list[torch.Tensor]:
    """Adan with ``torch._foreach_*`` ops (new state lists where pure)."""
    h, g, bufs = call.h, call.g, call.bufs
    b1, b2, b3 = h["b1"], h["b2"], h["b3"]
    diff = [torch.zeros_like(x) for x in g] if call.first else torch._foreach_sub(g, bufs["prev_grad"])
    sq = torch._foreach_add(g, diff, alpha=1 - b2)
    torch._foreach_mul_(sq, sq)
    if call.in_place:
        mu, v, n = bufs["mu"], bufs["diff_ema"], bufs["nu"]
        torch._foreach_lerp_(mu, g, 1 - b1)
        torch._foreach_lerp_(v, diff, 1 - b2)
        torch._foreach_lerp_(n, sq, 1 - b3)
        torch._foreach_copy_(bufs["prev_grad"], g)
    else:
        mu = bufs["mu"] = torch._foreach_lerp(bufs["mu"], g, 1 - b1)
        v = bufs["diff_ema"] = torch._foreach_lerp(bufs["diff_ema"], diff, 1 - b2)
        n = bufs["nu"] = torch._foreach_lerp(bufs["nu"], sq, 1 - b3)
        bufs["prev_grad"] = [x.clone() for x in g]
    bc1, bc2, bc3 = bias_corrections(call, b1, b2, b3)
    num = torch._foreach_div(mu, bc1)
    v_hat = diff  # scratch
    torch._foreach_copy_(v_hat, v)
    torch._foreach_div_(v_hat, bc2)
    torch._foreach_add_(num, v_hat, alpha=1 - b2)
    denom = sq  # scratch
    torch._foreach_copy_(denom, n)
    torch._foreach_div_(denom, bc3)
    torch._foreach_add_(denom, h["eps_root"])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, h["eps"])
    torch._foreach_div_(num, denom)
    if h["weight_decay"]:
        torch._foreach_add_(num, call.p, alpha=h["weight_decay"])
    return finish(call, num, owned=True)


@declare(
    FastRoute(
        _adan_kernel,
        hyperparams=("b1", "b2", "b3", "eps", "eps_root", "weight_decay"),
        buffers=("mu", "diff_ema", "nu", "prev_grad"),
        unsupported=("mask",),
        needs_first_step=True,
    )
)
def adan(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    eps_root: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> GradientTransformation:
    """Adan, as ``optax.adan``: :func:`funcopt.transforms.scale_by_adan`, then decoupled weight
    decay (``mask`` limits it), then the learning rate.

    References: Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
    Deep Models", 2022, arXiv 2208.06677.
    """
    return build(
        scale_by_adan(b1, b2, b3, eps, eps_root),
        decay_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
