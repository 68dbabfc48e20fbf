"""RMSprop, Adagrad and Lion, each with its fast route declared next to its reference chain."""

from __future__ import annotations

from typing import Any

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.fast import FastRoute, KernelCall, declare
from funcopt.optimizers._common import Mask, build, decay_weights, finish, fold_l2, l2, lerp_buffer, sign, signed_grads
from funcopt.transforms import (
    check_learning_rate,
    is_python_zero,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_rms,
    scale_by_rss,
    trace,
)

__all__ = ["rmsprop", "adagrad", "lion"]


def _rmsprop_kernel(call: KernelCall) -> list[torch.Tensor]:
    """RMSprop with ``torch._foreach_*`` ops (new state lists where pure)."""
    h, p, bufs, in_place = call.h, call.p, call.bufs, call.in_place
    mu, buf = bufs["mu"], bufs["momentum_buffer"]
    g = signed_grads(h, p, call.g)
    w = 1 - h["alpha"]
    g2 = torch._foreach_mul(g, g)
    nu = lerp_buffer(call, "nu", g2, w)
    if mu is not None:
        mu = lerp_buffer(call, "mu", g, w)
        denom = g2  # reuse the scratch: denom = sqrt(nu - mu * mu)
        torch._foreach_copy_(denom, mu)
        torch._foreach_mul_(denom, mu)
        torch._foreach_sub_(denom, nu)
        torch._foreach_neg_(denom)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(nu)
        del g2
    torch._foreach_add_(denom, h["eps"])
    direction = torch._foreach_div(g, denom)
    del denom
    if buf is not None:
        if in_place:
            if call.first:
                torch._foreach_copy_(buf, direction)
            else:
                torch._foreach_mul_(buf, h["momentum"])
                torch._foreach_add_(buf, direction)
        elif call.first:
            buf = direction
        else:
            buf = torch._foreach_mul(buf, h["momentum"])
            torch._foreach_add_(buf, direction)
        bufs["momentum_buffer"] = direction = buf
    return finish(call, direction, owned=buf is None)


def _adagrad_kernel(call: KernelCall) -> list[torch.Tensor]:
    """torch's ``_fused_adagrad_`` (``lr_decay`` is already in ``call.lr``, from the schedule)."""
    h, lr, p, g, acc = call.h, call.lr, call.p, call.g, call.bufs["sum_of_squares"]
    wd, maximize = h["weight_decay"], h["maximize"]
    steps = [call.step] * len(g)
    if call.in_place:
        torch._fused_adagrad_(p, g, acc, steps, lr=lr, lr_decay=0.0, weight_decay=wd, eps=h["eps"], maximize=maximize)
        return p
    if wd:
        g, maximize = fold_l2(g, p, wd, maximize), False
    out = [torch.zeros_like(x) for x in g]
    torch._fused_adagrad_(out, g, acc, steps, lr=lr, lr_decay=0.0, weight_decay=0.0, eps=h["eps"], maximize=maximize)
    return out


def _lion_kernel(call: KernelCall) -> list[torch.Tensor]:
    """Lion with ``torch._foreach_*`` ops (a new momentum list where pure)."""
    h, p, g, mu = call.h, call.p, call.g, call.bufs["mu"]
    direction = torch._foreach_lerp(mu, g, 1 - h["b1"])
    torch._foreach_sign_(direction)
    lerp_buffer(call, "mu", g, 1 - h["b2"])
    if h["weight_decay"]:
        torch._foreach_add_(direction, p, alpha=h["weight_decay"])
    return finish(call, direction, owned=True)


def _adagrad_learning_rate(learning_rate: ScalarOrSchedule, lr_decay: Any) -> ScalarOrSchedule:
    """Adagrad's learning rate: the k-th step uses ``lr / (1 + (k - 1) * lr_decay)``."""
    if is_python_zero(lr_decay):
        return learning_rate
    base = learning_rate

    def lr(count):
        value = base(count) if callable(base) else base
        # true division, as torch's Python-double lr / (1 + (step - 1) * lr_decay) (float / tensor
        # would compute reciprocal * float and differ in the last bit)
        return torch.div(torch.as_tensor(value, dtype=torch.float64), 1 + count.to(torch.float64) * lr_decay)

    return lr


@declare(
    FastRoute(
        _rmsprop_kernel,
        hyperparams=("alpha", "eps", "weight_decay", "momentum"),
        flags=("centered", "maximize"),
        buffers=("nu", "mu", "momentum_buffer"),
        needs_first_step=True,
        copies_for_pure_step=True,  # as in 0.1.0 (not measured the other way)
    )
)
def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """RMSprop, like ``torch.optim.RMSprop`` (``alpha`` is the decay of the mean square).

    References: Tieleman & Hinton, Lecture 6.5, COURSERA: Neural Networks for Machine Learning, 2012.
    """
    return build(
        sign(maximize),
        l2(weight_decay),
        scale_by_rms(alpha, eps, centered=centered),
        None if is_python_zero(momentum) else trace(momentum),
        scale_by_learning_rate(learning_rate),
    )


@declare(
    FastRoute(
        _adagrad_kernel,
        hyperparams=("eps", "weight_decay"),
        flags=("maximize",),
        buffers=("sum_of_squares",),
        learning_rate=lambda args: _adagrad_learning_rate(args["learning_rate"], args["lr_decay"]),
        writes_state=True,
    )
)
def adagrad(
    learning_rate: ScalarOrSchedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
) -> GradientTransformation:
    """Adagrad, like ``torch.optim.Adagrad``: the k-th step uses ``lr / (1 + (k - 1) * lr_decay)``.

    References: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011.
    """
    check_learning_rate(learning_rate)
    lr = _adagrad_learning_rate(learning_rate, lr_decay)
    return build(
        sign(maximize),
        l2(weight_decay),
        scale_by_rss(initial_accumulator_value, eps),
        scale_by_learning_rate(lr),
    )


@declare(
    FastRoute(
        _lion_kernel,
        hyperparams=("b1", "b2", "weight_decay"),
        buffers=("mu",),
        unsupported=("mask", "mu_dtype"),
        copies_for_pure_step=True,  # as in 0.1.0 (not measured the other way)
    )
)
def lion(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    mask: Mask = None,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Lion: the sign of an interpolated momentum, with decoupled weight decay (``optax.lion``).

    Use a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.
    ``mu_dtype`` (optax's option, e.g. ``torch.bfloat16``) stores the first moment in that dtype
    (updated with optax's arithmetic, in the wider of the two dtypes); the fast route then does not apply.

    References: Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023,
    arXiv 2302.06675.
    """
    return build(
        scale_by_lion(b1, b2, mu_dtype),
        decay_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
