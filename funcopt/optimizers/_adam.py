"""Adam and its relatives: Adam and AdamW (with their fast routes), Adamax, NAdam, RAdam, LAMB."""

from __future__ import annotations

import torch

from funcopt.base import FuncoptError, GradientTransformation, ScalarOrSchedule
from funcopt.fast import FastRoute, KernelCall, declare
from funcopt.optimizers._common import Mask, build, decay_weights, fold_l2, l2, sign
from funcopt.transforms import (
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_nadam,
    scale_by_radam,
    scale_by_trust_ratio,
)

__all__ = ["adam", "adamw", "adamax", "nadam", "radam", "lamb"]


def _adam_kernel(call: KernelCall) -> list[torch.Tensor]:
    """torch's ``_fused_adam_``/``_fused_adamw_`` (the kernels of ``torch.optim.Adam(fused=True)``).

    In place it updates the params and moments; for a pure update it runs on a zeroed update
    buffer (the dispatcher passes copies of the moments), with L2 decay folded into the
    gradient first and decoupled decay added after.
    """
    h, lr, p, g, bufs = call.h, call.lr, call.p, call.g, call.bufs
    mu, nu, nu_max = bufs["mu"], bufs["nu"], bufs["nu_max"]
    wd, maximize, decoupled = h["weight_decay"], h["maximize"], h["decoupled_weight_decay"]
    steps = [call.step] * len(g)
    common = dict(beta1=h["b1"], beta2=h["b2"], eps=h["eps"], amsgrad=nu_max is not None)
    if call.in_place:
        fn = torch._fused_adamw_ if decoupled else torch._fused_adam_
        fn(p, g, mu, nu, nu_max or [], steps, lr=lr, weight_decay=wd, maximize=maximize, **common)
        return p
    if wd and not decoupled:
        g, maximize = fold_l2(g, p, wd, maximize), False
    out = [torch.zeros_like(x) for x in g]
    torch._fused_adam_(out, g, mu, nu, nu_max or [], steps, lr=lr, weight_decay=0.0, maximize=maximize, **common)
    if wd and decoupled:
        torch._foreach_add_(out, p, alpha=-lr * wd)
    return out


@declare(
    FastRoute(
        _adam_kernel,
        hyperparams=("b1", "b2", "eps", "weight_decay"),
        flags=("amsgrad", "maximize", "decoupled_weight_decay"),
        buffers=("mu", "nu", "nu_max"),
        unsupported=("mu_dtype",),
        writes_state=True,
        family="adam",
    )
)
def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adam, like ``torch.optim.Adam``.

    ``weight_decay`` is L2 added to the gradient, or, with ``decoupled_weight_decay=True``
    (torch 2.13's switch of the same name), decoupled as in :func:`adamw`, which this then
    equals (same numbers, same state).
    ``mu_dtype`` (optax's option, e.g. ``torch.bfloat16``) stores the first moment in that dtype
    (updated with optax's arithmetic, in the wider of the two dtypes); the fast route then does not apply.

    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015, arXiv 1412.6980.
    """
    if not isinstance(decoupled_weight_decay, bool):
        raise FuncoptError(
            f"adam: decoupled_weight_decay must be True or False, got {decoupled_weight_decay!r}. "
            "Pass a Python bool (it decides the chain's structure)."
        )
    decay = l2(weight_decay)
    return build(
        sign(maximize),
        None if decoupled_weight_decay else decay,
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad, mu_dtype=mu_dtype),
        decay if decoupled_weight_decay else None,
        scale_by_learning_rate(learning_rate),
    )


@declare(
    FastRoute(
        _adam_kernel,
        hyperparams=("b1", "b2", "eps", "weight_decay"),
        flags=("amsgrad", "maximize"),
        buffers=("mu", "nu", "nu_max"),
        constants={"decoupled_weight_decay": True},
        unsupported=("mask", "mu_dtype"),
        writes_state=True,
        family="adam",
    )
)
def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: Mask = None,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """AdamW: Adam with decoupled weight decay, like ``torch.optim.AdamW``.

    ``mask`` (pytree of bools or function of params) limits the decay to some leaves.
    ``mu_dtype`` (optax's option, e.g. ``torch.bfloat16``) stores the first moment in that dtype
    (updated with optax's arithmetic, in the wider of the two dtypes); the fast route then does not apply.

    References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019,
    arXiv 1711.05101.
    """
    return build(
        sign(maximize),
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad, mu_dtype=mu_dtype),
        decay_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def adamax(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """Adamax, like ``torch.optim.Adamax``.

    References: Kingma & Ba, 2015, arXiv 1412.6980, section 7.
    """
    return build(
        sign(maximize),
        l2(weight_decay),
        scale_by_adamax(b1, b2, eps),
        scale_by_learning_rate(learning_rate),
    )


def nadam(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """NAdam, like ``torch.optim.NAdam`` (with its ``momentum_decay`` schedule).

    References: Dozat, "Incorporating Nesterov Momentum into Adam", 2016.
    """
    decay = decay_weights(weight_decay)
    return build(
        sign(maximize),
        None if decoupled_weight_decay else decay,
        scale_by_nadam(b1, b2, eps, momentum_decay),
        decay if decoupled_weight_decay else None,
        scale_by_learning_rate(learning_rate),
    )


def radam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """RAdam, like ``torch.optim.RAdam``.

    References: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", 2020,
    arXiv 1908.03265.
    """
    decay = decay_weights(weight_decay)
    return build(
        sign(maximize),
        None if decoupled_weight_decay else decay,
        scale_by_radam(b1, b2, eps),
        decay if decoupled_weight_decay else None,
        scale_by_learning_rate(learning_rate),
    )


def lamb(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> GradientTransformation:
    """LAMB: Adam's direction plus decoupled decay, scaled per leaf by ``||p|| / ||u||`` (``optax.lamb``).

    References: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", 2020, arXiv 1904.00962.
    """
    return build(
        scale_by_adam(b1, b2, eps),
        decay_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )
