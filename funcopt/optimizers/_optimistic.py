"""Optimistic gradient descent and optimistic Adam (``optax.optimistic_gradient_descent``,
``optax.optimistic_adam_v2``), with their elementwise fast routes."""

from __future__ import annotations

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.fast import FastRoute, KernelCall, declare
from funcopt.optimizers._common import build, finish
from funcopt.optimizers._optax_adam import bias_corrections
from funcopt.transforms import (
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_nesterov_adam,
    scale_by_optimistic_gradient,
)

__all__ = ["optimistic_gradient_descent", "optimistic_adam_v2"]


def _optimistic_(call: KernelCall, x: list[torch.Tensor], owned: bool) -> list[torch.Tensor]:
    """``(alpha + beta) * x - beta * prev`` (``prev = x`` at the first step); stores a copy of
    ``x`` as the new ``previous_gradient``."""
    alpha, beta = call.h["alpha"], call.h["beta"]
    prev = x if call.first else call.bufs["previous_gradient"]
    out = torch._foreach_mul(x, alpha + beta)
    torch._foreach_sub_(out, torch._foreach_mul(prev, beta))
    if call.in_place:
        torch._foreach_copy_(call.bufs["previous_gradient"], x)
    else:
        call.bufs["previous_gradient"] = x if owned else [t.clone() for t in x]
    return out


def _ogd_kernel(call: KernelCall) -> list[torch.Tensor]:
    return finish(call, _optimistic_(call, call.g, owned=False), owned=True)


@declare(FastRoute(_ogd_kernel, hyperparams=("alpha", "beta"), buffers=("previous_gradient",), needs_first_step=True))
def optimistic_gradient_descent(
    learning_rate: ScalarOrSchedule, alpha: float = 1.0, beta: float = 1.0
) -> GradientTransformation:
    """Optimistic gradient descent, as ``optax.optimistic_gradient_descent``: the step is
    ``-learning_rate * ((alpha + beta) * g_t - beta * g_{t-1})`` (``g_0 = g_1``). For min-max
    games: descend on one player, ascend on the other (negate its gradients).

    References: Mokhtari et al., "A Unified Analysis of Extra-gradient and Optimistic Gradient
    Methods for Saddle Point Problems", AISTATS 2020, arXiv 1901.08511.
    """
    return build(scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(learning_rate))


def _optimistic_adam_kernel(call: KernelCall) -> list[torch.Tensor]:
    h, g, bufs = call.h, call.g, call.bufs
    b1, b2 = h["b1"], h["b2"]
    if call.in_place:
        mu, nu = bufs["mu"], bufs["nu"]
        torch._foreach_lerp_(mu, g, 1 - b1)
        torch._foreach_lerp_(nu, torch._foreach_mul(g, g), 1 - b2)
    else:
        mu = bufs["mu"] = torch._foreach_lerp(bufs["mu"], g, 1 - b1)
        nu = bufs["nu"] = torch._foreach_lerp(bufs["nu"], torch._foreach_mul(g, g), 1 - b2)
    bc1, bc2 = bias_corrections(call, b1, b2)
    if h["nesterov"]:
        num = torch._foreach_div(mu, bias_corrections(call, b1, offset=1)[0])
        torch._foreach_mul_(num, b1)
        scaled = torch._foreach_div(g, bc1)
        torch._foreach_mul_(scaled, 1 - b1)
        torch._foreach_add_(num, scaled)
    else:
        num = torch._foreach_div(mu, bc1)
    denom = torch._foreach_div(nu, bc2)
    torch._foreach_add_(denom, h["eps_root"])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, h["eps"])
    torch._foreach_div_(num, denom)
    return finish(call, _optimistic_(call, num, owned=True), owned=True)


@declare(
    FastRoute(
        _optimistic_adam_kernel,
        hyperparams=("alpha", "beta", "b1", "b2", "eps", "eps_root"),
        flags=("nesterov",),
        buffers=("mu", "nu", "previous_gradient"),
        needs_first_step=True,
        unsupported=("mu_dtype",),
    )
)
def optimistic_adam_v2(
    learning_rate: ScalarOrSchedule,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    nesterov: bool = True,
) -> GradientTransformation:
    """Optimistic Adam, as ``optax.optimistic_adam_v2``: the optimistic step
    (:func:`funcopt.transforms.scale_by_optimistic_gradient`) applied to Adam's direction, with
    optax's Nesterov momentum by default (``nesterov=False``: plain Adam's direction).
    ``mu_dtype`` (optax's option, e.g. ``torch.bfloat16``) stores the first moment in that dtype
    (updated with optax's arithmetic, in the wider of the two dtypes); the fast route then does not apply.

    References: Daskalakis et al., "Training GANs with Optimism", ICLR 2018, arXiv 1711.00141.
    """
    adam = scale_by_nesterov_adam if nesterov else scale_by_adam
    direction = adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype)
    return build(direction, scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(learning_rate))

