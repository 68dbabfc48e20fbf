"""optax.contrib's schedule-free and learning-rate-free optimizers.

Schedule-free AdamW and SGD; Prodigy, D-Adaptation AdamW, COCOB, DoG, DoWG and MoMo. Defaults
and argument names follow optax 0.2.8 (``optax.contrib.prodigy`` ...), which these match to
float64 rounding (``tests/test_optax_parity.py``). Their step sizes are global reductions over
every leaf (or, for the schedule-free wrapper, a nested base optimizer), so they run the
reference chain only, except COCOB, which is elementwise and declares a fast route.
"""

from __future__ import annotations

from typing import Any

import torch

from funcopt import schedules
from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.fast import FastRoute, KernelCall, declare
from funcopt.optimizers._common import Mask, build, decay_weights
from funcopt.transforms import (
    add_decayed_weights,
    check_learning_rate,
    scale_by_bias_corrected_rms,
    scale_by_cocob,
    scale_by_dadapt_adam,
    scale_by_dog,
    scale_by_dowg,
    scale_by_learning_rate,
    scale_by_momo,
    scale_by_prodigy,
    schedule_free,
)

__all__ = ["schedule_free_adamw", "schedule_free_sgd", "prodigy", "dadapt_adamw", "cocob", "dog", "dowg", "momo"]


def _schedule_free_of(
    learning_rate: Any, warmup_steps: int | None, b1: float, weight_lr_power: float, *blocks: GradientTransformation | None
) -> GradientTransformation:
    """``schedule_free`` around the chain of ``blocks`` and the learning rate, which ramps up
    from 0 over ``warmup_steps`` (optax's ``warmup_constant_schedule``) where that is not None."""
    check_learning_rate(learning_rate)
    lr = learning_rate if warmup_steps is None else schedules.linear(0.0, learning_rate, warmup_steps)
    return schedule_free(build(*blocks, scale_by_learning_rate(lr)), lr, b1, weight_lr_power)


def _l2_unless_none(weight_decay: Any, mask: Mask = None) -> GradientTransformation | None:
    """L2 weight decay as optax's DoG, DoWG and schedule-free SGD take it: no block for None
    (0.0 keeps one, as in optax)."""
    return None if weight_decay is None else add_decayed_weights(weight_decay, mask)


def _scaled_sgd(
    learning_rate: Any, weight_decay: Any, mask: Mask, step_size: GradientTransformation
) -> GradientTransformation:
    """DoG's and DoWG's chain: L2 weight decay, the ``step_size`` block, the learning rate."""
    check_learning_rate(learning_rate)
    return build(_l2_unless_none(weight_decay, mask), step_size, scale_by_learning_rate(learning_rate))


def schedule_free_adamw(
    learning_rate: float = 0.0025,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-free AdamW (``optax.contrib.schedule_free_adamw``; Meta's
    ``schedulefree.AdamWScheduleFree``): no learning-rate decay, no momentum buffer.

    The params trained are the gradient points ``y``; evaluate the model at
    :func:`funcopt.schedule_free_eval_params` ``(state, params)`` (what ``optimizer.eval()``
    does in ``schedulefree``). ``warmup_steps`` ramps the learning rate linearly from 0.
    ``weight_decay`` is decoupled and taken at ``y``. See :func:`funcopt.schedule_free`.

    Example:
        >>> tx = funcopt.schedule_free_adamw(2.5e-3)
        >>> updates, state = tx.update(grads, tx.init(params), params)
        >>> eval_params = funcopt.schedule_free_eval_params(state, funcopt.apply_updates(params, updates))

    References: Defazio et al., "The Road Less Scheduled", 2024, arXiv 2405.15682.
    """
    return _schedule_free_of(
        learning_rate, warmup_steps, b1, weight_lr_power, scale_by_bias_corrected_rms(b2, eps), decay_weights(weight_decay)
    )


def schedule_free_sgd(
    learning_rate: float = 1.0,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    weight_decay: float | None = None,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-free SGD (``optax.contrib.schedule_free_sgd``; Meta's ``schedulefree.SGDScheduleFree``).

    ``b1`` plays momentum's part (``SGDScheduleFree(momentum=)``); ``weight_decay`` is L2
    added to the gradient at ``y``. Evaluate at :func:`funcopt.schedule_free_eval_params`.

    References: Defazio et al., "The Road Less Scheduled", 2024, arXiv 2405.15682.
    """
    return _schedule_free_of(learning_rate, warmup_steps, b1, weight_lr_power, _l2_unless_none(weight_decay))


def prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
) -> GradientTransformation:
    """Prodigy (``optax.contrib.prodigy``): Adam whose step size is an estimate of the distance
    to the solution, so ``learning_rate`` stays 1.0 (a multiplier, e.g. for a schedule).

    The estimate ``d`` grows from ``estim_lr0``; ``safeguard_warmup=True`` helps with a warmup
    schedule. See :func:`funcopt.scale_by_prodigy`; ``state[0].estim_lr`` is ``d``.

    References: Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner", 2023, arXiv 2306.06101.
    """
    return build(
        scale_by_prodigy(learning_rate, betas, beta3, eps, estim_lr0, estim_lr_coef, weight_decay, safeguard_warmup)
    )


def dadapt_adamw(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """D-Adaptation AdamW (``optax.contrib.dadapt_adamw``): AdamW with its step size set by a
    growing estimate of the distance to the solution (``learning_rate`` stays 1.0).

    See :func:`funcopt.scale_by_dadapt_adam`; ``state[0].estim_lr`` is the estimate.

    References: Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
    arXiv 2301.07733.
    """
    return build(scale_by_dadapt_adam(learning_rate, betas, eps, estim_lr0, weight_decay))


def _cocob_kernel(call: KernelCall) -> list[torch.Tensor]:
    """COCOB-Backprop over flat leaf lists: the gradient with L2 decay, scaled by the learning
    rate, feeds the bettor's four sums; the new params are ``x0 + C (L + R) / (L max(G + L, alpha L))``."""
    h, p, g, bufs, lr = call.h, call.p, call.g, call.bufs, call.lr
    alpha, wd = h["alpha"], h["weight_decay"]
    if wd:  # as add_decayed_weights, then scale_by_learning_rate(flip_sign=False)
        ge = torch._foreach_add(g, torch._foreach_mul(p, wd))
        if lr != 1.0:
            torch._foreach_mul_(ge, lr)
    else:
        ge = g if lr == 1.0 else torch._foreach_mul(g, lr)  # only read below
    tmp = torch._foreach_abs(ge)
    p0 = bufs["init_particles"]
    moved = torch._foreach_sub(p, p0)
    torch._foreach_mul_(moved, ge)
    if call.in_place:
        scale, sub, reward, cum = bufs["scale"], bufs["subgradients"], bufs["reward"], bufs["cumulative_gradients"]
        torch._foreach_maximum_(scale, tmp)
        torch._foreach_add_(sub, tmp)
        torch._foreach_sub_(reward, moved)
        torch._foreach_sub_(cum, ge)
    else:  # a pure step hands on fresh buffers only (the initial params too: its result never aliases its inputs)
        bufs["init_particles"] = [x.clone() for x in p0]
        scale = bufs["scale"] = torch._foreach_maximum(bufs["scale"], tmp)
        sub = bufs["subgradients"] = torch._foreach_add(bufs["subgradients"], tmp)
        reward = bufs["reward"] = torch._foreach_sub(bufs["reward"], moved)
        cum = bufs["cumulative_gradients"] = torch._foreach_sub(bufs["cumulative_gradients"], ge)
    torch._foreach_clamp_min_(reward, 0.0)
    denom = torch._foreach_add(sub, scale)
    torch._foreach_copy_(moved, scale)  # reused: alpha * L
    torch._foreach_mul_(moved, alpha)
    torch._foreach_maximum_(denom, moved)
    torch._foreach_mul_(denom, scale)
    new = torch._foreach_div(cum, denom)
    torch._foreach_copy_(tmp, scale)  # reused: L + R
    torch._foreach_add_(tmp, reward)
    torch._foreach_mul_(new, tmp)
    torch._foreach_add_(new, p0)
    if call.in_place:
        torch._foreach_copy_(p, new)
        return p
    torch._foreach_sub_(new, p)  # the update: new params - params
    return new


@declare(
    FastRoute(
        _cocob_kernel,
        hyperparams=("alpha", "weight_decay"),
        buffers=("init_particles", "cumulative_gradients", "scale", "subgradients", "reward"),
        needs_params=("alpha",),  # alpha > 0 always: every step reads the params
        unsupported=("mask",),
    )
)
def cocob(
    learning_rate: ScalarOrSchedule = 1.0,
    alpha: float = 100.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> GradientTransformation:
    """COCOB-Backprop (``optax.contrib.cocob``): per-element steps by coin betting, no learning rate.

    ``learning_rate`` scales the gradients fed to the bettor (1.0: the method as published);
    ``weight_decay`` is L2 added to the gradient, limited to ``mask``.

    References: Orabona & Tommasi, "Training Deep Networks without Learning Rates Through Coin
    Betting", NeurIPS 2017, arXiv 1705.07795.
    """
    return build(
        decay_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate, flip_sign=False),
        scale_by_cocob(alpha, eps),
    )


def dog(
    learning_rate: ScalarOrSchedule = 1.0,
    init_step: tuple[str, float] = ("heuristic", 1e-6),
    eps: float = 1e-8,
    weight_decay: float | None = None,
    mask: Mask = None,
) -> GradientTransformation:
    """DoG, "distance over gradients" (``optax.contrib.dog``): SGD with the step size
    ``max_k ||x_k - x_0|| / sqrt(sum_k ||g_k||**2)``; ``learning_rate`` stays 1.0.

    ``init_step`` sets the first step (see :func:`funcopt.scale_by_dog`); ``weight_decay`` is
    L2 added to the gradient, limited to ``mask``.

    References: Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step
    Size Schedule", ICML 2023, arXiv 2302.12022.
    """
    return _scaled_sgd(learning_rate, weight_decay, mask, scale_by_dog(init_step, eps))


def dowg(
    learning_rate: ScalarOrSchedule = 1.0,
    init_estim_sq_dist: float | None = None,
    eps: float = 1e-4,
    weight_decay: float | None = None,
    mask: Mask = None,
) -> GradientTransformation:
    """DoWG, "distance over weighted gradients" (``optax.contrib.dowg``): DoG with the gradients
    weighted by the squared distance; ``learning_rate`` stays 1.0.

    See :func:`funcopt.scale_by_dowg`; ``weight_decay`` is L2 added to the gradient.

    References: Khaled, Mishchenko & Jin, "DoWG Unleashed: An Efficient Universal Parameter-Free
    Gradient Descent Method", NeurIPS 2023, arXiv 2305.16284.
    """
    return _scaled_sgd(learning_rate, weight_decay, mask, scale_by_dowg(init_estim_sq_dist, eps))


def momo(
    learning_rate: ScalarOrSchedule = 1.0,
    beta: float = 0.9,
    lower_bound: float = 0.0,
    weight_decay: float = 0.0,
    adapt_lower_bound: bool = False,
) -> GradientTransformation:
    """MoMo (``optax.contrib.momo``): momentum SGD with a Polyak-type step size from the loss.

    Its update reads the loss: ``tx.update(grads, state, params, value=loss)`` (a missing
    ``value`` raises :class:`funcopt.FuncoptError`). ``learning_rate`` caps the step size;
    ``lower_bound`` is a lower bound of the loss (0 for most losses). See
    :func:`funcopt.scale_by_momo`.

    Example:
        >>> grads, loss = torch.func.grad_and_value(loss_fn)(params)
        >>> updates, state = tx.update(grads, state, params, value=loss)

    References: Schaipp et al., "MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024,
    arXiv 2305.07583.
    """
    return build(scale_by_momo(learning_rate, beta, lower_bound, weight_decay, adapt_lower_bound))
