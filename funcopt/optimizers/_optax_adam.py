"""optax's Adam-family aliases: AdaBelief, AMSGrad, AdamaxW, NAdamW and Yogi, each with its
reference chain and its elementwise fast route (``torch._foreach_*`` kernels).

Defaults and numerics are optax 0.2.8's (``optax.adabelief``...): the trajectories match
optax's to float64 rounding (tests/test_optax_parity.py).
"""

from __future__ import annotations

from typing import Any

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.fast import FastRoute, KernelCall, declare
from funcopt.optimizers._common import Mask, build, decay_weights, finish, lerp_buffer
from funcopt.transforms import (
    scale_by_adamax,
    scale_by_amsgrad,
    scale_by_belief,
    scale_by_learning_rate,
    scale_by_nesterov_adam,
    scale_by_yogi,
)

__all__ = ["adabelief", "amsgrad", "adamaxw", "nadamw", "yogi"]


SCALAR_STEP_DEVICES = {"cpu"}  # devices whose step count the kernels read as a Python float


def bias_corrections(call: KernelCall, *betas: float, offset: int = 0) -> list[float] | list[torch.Tensor]:
    """``1 - b**(t + offset)`` for each ``b``, ``t`` the new step count: Python floats where the
    count lives on the CPU (reading it is free), else 0-dim tensors of the gradients' dtype on
    its device, computed in float64 there, so a CUDA step never waits for the device (the
    ``torch._foreach_*`` ops take a tensor scalar)."""
    if call.step.device.type in SCALAR_STEP_DEVICES:
        step = float(call.step) + offset
        return [1 - b**step for b in betas]
    step = call.step.to(torch.float64) + offset
    return [(1 - torch.pow(b, step)).to(call.g[0].dtype) for b in betas]


def _nesterov_numerator(call: KernelCall, mu: list[torch.Tensor], g: list[torch.Tensor], b1: float, bc1: Any):
    """Fresh ``b1 * mu / (1 - b1**(t+1)) + (1 - b1) * g / (1 - b1**t)`` (optax's Nesterov estimate)."""
    (bc1_next,) = bias_corrections(call, b1, offset=1)
    num = torch._foreach_div(mu, bc1_next)
    torch._foreach_mul_(num, b1)
    scaled_g = torch._foreach_div(g, bc1)
    torch._foreach_mul_(scaled_g, 1 - b1)
    torch._foreach_add_(num, scaled_g)
    return num


def _decay_and_finish(call: KernelCall, direction: list[torch.Tensor]) -> list[torch.Tensor]:
    if call.h.get("weight_decay"):
        torch._foreach_add_(direction, call.p, alpha=call.h["weight_decay"])
    return finish(call, direction, owned=True)


def _belief_kernel(call: KernelCall) -> list[torch.Tensor]:
    h, g = call.h, call.g
    b1, b2 = h["b1"], h["b2"]
    mu = lerp_buffer(call, "mu", g, 1 - b1)
    dev = torch._foreach_sub(g, mu)
    torch._foreach_mul_(dev, dev)
    nu = lerp_buffer(call, "nu", dev, 1 - b2)
    torch._foreach_add_(nu, h["eps_root"])
    bc1, bc2 = bias_corrections(call, b1, b2)
    num = _nesterov_numerator(call, mu, g, b1, bc1) if h["nesterov"] else torch._foreach_div(mu, bc1)
    denom = dev  # scratch
    torch._foreach_copy_(denom, nu)
    torch._foreach_div_(denom, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, h["eps"])
    torch._foreach_div_(num, denom)
    return finish(call, num, owned=True)


@declare(
    FastRoute(
        _belief_kernel,
        hyperparams=("b1", "b2", "eps", "eps_root"),
        flags=("nesterov",),
        buffers=("mu", "nu"),
    )
)
def adabelief(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """AdaBelief, as ``optax.adabelief``: Adam whose second moment is the EMA of ``(g - mu)**2``.

    References: Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
    Observed Gradients", NeurIPS 2020, arXiv 2010.07468.
    """
    return build(
        scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov),
        scale_by_learning_rate(learning_rate),
    )


def _amsgrad_kernel(call: KernelCall) -> list[torch.Tensor]:
    h, g = call.h, call.g
    b1, b2 = h["b1"], h["b2"]
    mu = lerp_buffer(call, "mu", g, 1 - b1)
    nu = lerp_buffer(call, "nu", torch._foreach_mul(g, g), 1 - b2)
    bc1, bc2 = bias_corrections(call, b1, b2)
    bc1 = bc1 if h["bias_correction_mu"] else 1.0
    bc2 = bc2 if h["bias_correction_nu"] else 1.0
    nu_hat = torch._foreach_div(nu, bc2)
    if call.in_place:
        torch._foreach_maximum_(call.bufs["nu_max"], nu_hat)
        nu_max = call.bufs["nu_max"]
    else:
        nu_max = call.bufs["nu_max"] = torch._foreach_maximum(call.bufs["nu_max"], nu_hat)
    denom = nu_hat  # scratch
    torch._foreach_copy_(denom, nu_max)
    torch._foreach_add_(denom, h["eps_root"])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, h["eps"])
    num = torch._foreach_div(mu, bc1)
    torch._foreach_div_(num, denom)
    return finish(call, num, owned=True)


@declare(
    FastRoute(
        _amsgrad_kernel,
        hyperparams=("b1", "b2", "eps", "eps_root"),
        flags=("bias_correction_mu", "bias_correction_nu"),
        buffers=("mu", "nu", "nu_max"),
        unsupported=("mu_dtype",),
    )
)
def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
) -> GradientTransformation:
    """AMSGrad, as ``optax.amsgrad``: the maximum of the bias-corrected second moment (see
    :func:`funcopt.transforms.scale_by_amsgrad`; ``adam(amsgrad=True)`` is torch's variant).
    ``mu_dtype`` (optax's option, e.g. ``torch.bfloat16``) stores the first moment in that dtype
    (updated with optax's arithmetic, in the wider of the two dtypes); the fast route then does not apply.

    References: Reddi et al., "On the Convergence of Adam and Beyond", ICLR 2018.
    """
    return build(
        scale_by_amsgrad(
            b1, b2, eps, eps_root, mu_dtype,
            bias_correction_mu=bias_correction_mu, bias_correction_nu=bias_correction_nu,
        ),
        scale_by_learning_rate(learning_rate),
    )


def _adamaxw_kernel(call: KernelCall) -> list[torch.Tensor]:
    h, g = call.h, call.g
    b1, b2 = h["b1"], h["b2"]
    mu = lerp_buffer(call, "mu", g, 1 - b1)
    abs_g = torch._foreach_abs(g)
    torch._foreach_add_(abs_g, h["eps"])
    decayed = torch._foreach_mul(call.bufs["nu"], b2)
    if call.in_place:
        torch._foreach_maximum_(decayed, abs_g)
        torch._foreach_copy_(call.bufs["nu"], decayed)
        nu = call.bufs["nu"]
    else:
        torch._foreach_maximum_(decayed, abs_g)
        nu = call.bufs["nu"] = decayed
    (bc1,) = bias_corrections(call, b1)
    num = torch._foreach_div(mu, bc1)
    torch._foreach_div_(num, nu)
    return _decay_and_finish(call, num)


@declare(
    FastRoute(
        _adamaxw_kernel,
        hyperparams=("b1", "b2", "eps", "weight_decay"),
        buffers=("mu", "nu"),
        unsupported=("mask",),
    )
)
def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Mask = None,
) -> GradientTransformation:
    """AdamaxW, as ``optax.adamaxw``: Adamax with decoupled weight decay (``mask`` limits it).

    References: Kingma & Ba, 2015, arXiv 1412.6980, section 7; Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization", 2019, arXiv 1711.05101.
    """
    return build(
        scale_by_adamax(b1, b2, eps),
        decay_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def _nadamw_kernel(call: KernelCall) -> list[torch.Tensor]:
    h, g = call.h, call.g
    b1, b2 = h["b1"], h["b2"]
    mu = lerp_buffer(call, "mu", g, 1 - b1)
    nu = lerp_buffer(call, "nu", torch._foreach_mul(g, g), 1 - b2)
    bc1, bc2 = bias_corrections(call, b1, b2)
    num = _nesterov_numerator(call, mu, g, b1, bc1)
    denom = torch._foreach_div(nu, bc2)
    torch._foreach_add_(denom, h["eps_root"])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, h["eps"])
    torch._foreach_div_(num, denom)
    return _decay_and_finish(call, num)


@declare(
    FastRoute(
        _nadamw_kernel,
        hyperparams=("b1", "b2", "eps", "eps_root", "weight_decay"),
        buffers=("mu", "nu"),
        unsupported=("mask", "mu_dtype"),
    )
)
def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: Mask = None,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """NAdamW, as ``optax.nadamw``: AdamW with optax's Nesterov momentum
    (:func:`funcopt.transforms.scale_by_nesterov_adam`; ``nadam`` is torch's NAdam).
    ``mu_dtype`` (optax's option, e.g. ``torch.bfloat16``) stores the first moment in that dtype
    (updated with optax's arithmetic, in the wider of the two dtypes); the fast route then does not apply.

    References: Dozat, "Incorporating Nesterov Momentum into Adam", 2016; Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization", 2019, arXiv 1711.05101.
    """
    return build(
        scale_by_nesterov_adam(b1, b2, eps, eps_root, mu_dtype),
        decay_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def _yogi_kernel(call: KernelCall) -> list[torch.Tensor]:
    h, g = call.h, call.g
    b1, b2 = h["b1"], h["b2"]
    mu = lerp_buffer(call, "mu", g, 1 - b1)
    g2 = torch._foreach_mul(g, g)
    nu_old = call.bufs["nu"]
    step = torch._foreach_sub(nu_old, g2)
    torch._foreach_sign_(step)
    torch._foreach_mul_(step, g2)
    torch._foreach_mul_(step, 1 - b2)
    if call.in_place:
        torch._foreach_sub_(nu_old, step)
        nu = nu_old
    else:
        nu = call.bufs["nu"] = torch._foreach_sub(nu_old, step)
    bc1, bc2 = bias_corrections(call, b1, b2)
    denom = g2  # scratch
    torch._foreach_copy_(denom, nu)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, h["eps_root"])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, h["eps"])
    num = torch._foreach_div(mu, bc1)
    torch._foreach_div_(num, denom)
    return finish(call, num, owned=True)


@declare(FastRoute(_yogi_kernel, hyperparams=("b1", "b2", "eps"), constants={"eps_root": 0.0}, buffers=("mu", "nu")))
def yogi(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3
) -> GradientTransformation:
    """Yogi, as ``optax.yogi``: Adam whose second moment moves additively (both moments start
    at 1e-6; see :func:`funcopt.transforms.scale_by_yogi`).

    References: Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
    """
    return build(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(learning_rate))
