"""optax.contrib's elementwise optimizers: ADOPT, AdEMAMix and MADGRAD, each with its fast route.

Defaults and argument names follow optax 0.2.8 (``optax.contrib.adopt`` ...), which these match
to float64 rounding (``tests/test_optax_parity.py``).
"""

from __future__ import annotations

from typing import Callable

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.fast import FastRoute, KernelCall, declare
from funcopt.optimizers._common import Mask, build, decay_weights, finish, fold_l2, l2, lerp_buffer
from funcopt.transforms import (
    check_learning_rate,
    scale_by_ademamix,
    scale_by_adopt,
    scale_by_learning_rate,
    scale_by_madgrad,
)

__all__ = ["adopt", "ademamix", "madgrad"]


def _store(call: KernelCall, name: str, old: list[torch.Tensor], new: list[torch.Tensor]) -> None:
    """The new state buffer ``name``: written into ``old`` in place, else handed on fresh."""
    if call.in_place:
        torch._foreach_copy_(old, new)
    else:
        call.bufs[name] = new


def _adopt_kernel(call: KernelCall) -> list[torch.Tensor]:
    """ADOPT with ``torch._foreach_*`` ops (the moment updates are lerps, as in the reference block)."""
    h, g, bufs = call.h, call.g, call.bufs
    mu, nu = bufs["mu"], bufs["nu"]
    if call.first:  # nu = g**2; mu and the params stay
        _store(call, "nu", nu, torch._foreach_mul(g, g))
        if call.in_place:
            return call.p
        bufs["mu"] = [m.clone() for m in mu]
        return [torch.zeros_like(x) for x in g]
    denom = torch._foreach_sqrt(nu)
    torch._foreach_clamp_min_(denom, h["eps"])
    n = torch._foreach_div(g, denom)
    del denom
    if h["use_clipping"]:
        bound = ((call.step - 1).to(torch.float64) ** 0.25).to(g[0].dtype)
        for x in n:
            torch.minimum(torch.maximum(x, -bound), bound, out=x)
    lerp_buffer(call, "nu", torch._foreach_mul(g, g), 1 - h["b2"])
    new_mu = lerp_buffer(call, "mu", n, 1 - h["b1"])
    if h["nesterov"]:
        return finish(call, torch._foreach_lerp(new_mu, n, 1 - h["b1"]), owned=True)
    return finish(call, new_mu)


@declare(
    FastRoute(
        _adopt_kernel,
        hyperparams=("b1", "b2", "eps"),
        flags=("nesterov", "use_clipping"),
        buffers=("mu", "nu"),
        unsupported=("clip_value_fn",),
        needs_first_step=True,
    )
)
def adopt(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GradientTransformation:
    """ADOPT (``optax.contrib.adopt``): Adam that normalizes each gradient by the *previous*
    second moment, so it converges for any ``b2``.

    ``clip_value_fn(t)`` bounds the normalized gradient at the 0-based step ``t`` (a float64
    0-dim tensor); ``None`` is ADOPT's ``t ** 0.25`` (optax's default) and keeps the fast route.
    The first step only records ``g**2`` (its update is zero). As in optax, ``learning_rate``
    has no default (the paper uses 1e-3).

    Example:
        >>> tx = funcopt.adopt(1e-3)
        >>> updates, state = tx.update(grads, tx.init(params), params)

    References: Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the
    Optimal Rate", NeurIPS 2024, arXiv 2411.02853.
    """
    check_learning_rate(learning_rate)
    return build(
        scale_by_adopt(b1, b2, eps, nesterov=nesterov, use_clipping=use_clipping, clip_value_fn=clip_value_fn),
        scale_by_learning_rate(learning_rate),
    )


def _ademamix_kernel(call: KernelCall) -> list[torch.Tensor]:
    """AdEMAMix with ``torch._foreach_*`` ops; the bias corrections are 0-dim tensors (no device sync)."""
    h, g = call.h, call.g
    g2 = torch._foreach_mul(g, g)
    m1 = lerp_buffer(call, "m1", g, 1 - h["b1"])
    m2 = lerp_buffer(call, "m2", g, 1 - h["b3"])
    nu = lerp_buffer(call, "nu", g2, 1 - h["b2"])
    step = call.step.to(torch.float64)
    dtype = g[0].dtype
    bc1, bc2 = (1 - h["b1"] ** step).to(dtype), (1 - h["b2"] ** step).to(dtype)
    num = torch._foreach_div(m1, bc1)
    scaled = torch._foreach_mul(m2, h["alpha"])
    torch._foreach_add_(num, scaled)
    den = g2  # reuse the scratch
    for d, v in zip(den, nu):
        torch.div(v, bc2, out=d)
    if h["eps_root"]:
        torch._foreach_add_(den, h["eps_root"])
    torch._foreach_sqrt_(den)
    torch._foreach_add_(den, h["eps"])
    torch._foreach_div_(num, den)
    if h["weight_decay"]:
        torch._foreach_add_(num, torch._foreach_mul(call.p, h["weight_decay"]))
    return finish(call, num, owned=True)


@declare(
    FastRoute(
        _ademamix_kernel,
        hyperparams=("b1", "b2", "b3", "alpha", "eps", "eps_root", "weight_decay"),
        buffers=("m1", "m2", "nu"),
        unsupported=("mask",),
    )
)
def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> GradientTransformation:
    """AdEMAMix (``optax.contrib.ademamix``): Adam plus ``alpha`` times a slow moving average
    of the gradients (decay ``b3``), which keeps old gradients useful for much longer.

    ``b3`` and ``alpha`` may be schedules (the paper warms them up; a schedule keeps the
    reference path). ``weight_decay`` is decoupled (AdamW's), limited to ``mask``. As in
    optax, ``learning_rate`` has no default.

    References: Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
    2024, arXiv 2409.03137.
    """
    check_learning_rate(learning_rate)
    return build(
        scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root),
        decay_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def _madgrad_kernel(call: KernelCall) -> list[torch.Tensor]:
    """MADGRAD with ``torch._foreach_*`` ops (``lam`` a 0-dim tensor: no device sync)."""
    h, p, bufs = call.h, call.p, call.bufs
    momentum, eps = h["momentum"], h["eps"]
    g = fold_l2(call.g, p, h["weight_decay"], False) if h["weight_decay"] else call.g
    gss, s, x0 = bufs["grad_sum_sq"], bufs["s"], bufs["x0"]
    lam = ((call.lr + eps) * torch.sqrt(call.step.to(torch.float64))).to(g[0].dtype)
    g2 = torch._foreach_mul(g, g)
    torch._foreach_mul_(g2, lam)
    lg = torch._foreach_mul(g, lam)
    if call.in_place:
        torch._foreach_add_(gss, g2)
        torch._foreach_add_(s, lg)
    else:
        gss = bufs["grad_sum_sq"] = torch._foreach_add(gss, g2)
        s = bufs["s"] = torch._foreach_add(s, lg)
        bufs["x0"] = [x.clone() for x in x0]  # the new state owns its tensors (x0 does not change)
    sigma = torch._foreach_pow(gss, 1 / 3)
    torch._foreach_add_(sigma, eps)
    z = torch._foreach_div(s, sigma)
    del sigma
    z = torch._foreach_sub(x0, z)
    if call.in_place:  # x = (1 - momentum) z + momentum x
        torch._foreach_mul_(z, 1 - momentum)
        torch._foreach_add_(z, torch._foreach_mul(p, momentum))
        torch._foreach_copy_(p, z)
        return p
    torch._foreach_mul_(z, 1 - momentum)
    torch._foreach_add_(z, torch._foreach_mul(p, momentum))
    torch._foreach_sub_(z, p)
    return z


@declare(
    FastRoute(
        _madgrad_kernel,
        hyperparams=("momentum", "eps", "weight_decay"),
        buffers=("grad_sum_sq", "s", "x0"),
        constants={"reads_params": True},  # the update is an interpolation towards the params
        needs_params=("reads_params",),
    )
)
def madgrad(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float = 1e-6,
) -> GradientTransformation:
    """MADGRAD (``optax.contrib.madgrad``): dual averaging with a cube-root AdaGrad scaling and
    momentum by averaging the iterates.

    ``weight_decay`` is L2 added to the gradient. As in optax, ``learning_rate`` has no
    default (the paper uses 1e-2).

    References: Defazio & Jelassi, "Adaptivity without Compromise: A Momentumized, Adaptive,
    Dual Averaged Gradient Method for Stochastic Optimization", 2021, arXiv 2101.11075.
    """
    check_learning_rate(learning_rate)
    return build(l2(weight_decay), scale_by_madgrad(learning_rate, momentum, eps))
