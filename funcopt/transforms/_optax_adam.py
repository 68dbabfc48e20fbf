"""optax's Adam variants: AMSGrad (max of the bias-corrected second moment), Adam with
Nesterov momentum (optax's ``nesterov=True``, used by NAdamW and optimistic Adam) and Yogi.

Part of ``funcopt.transforms``. The numerics follow optax 0.2.8 (``scale_by_amsgrad``,
``scale_by_adam(nesterov=True)``, ``scale_by_yogi``), which differ from ``torch.optim``'s
``Adam(amsgrad=True)`` and ``NAdam``: see each docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import GradientTransformation, PyTree, stable_name
from funcopt.transforms._adaptive import ScaleByAdamState, _adam_init
from funcopt.transforms._common import init_count
from funcopt.transforms._moments import _bias_corrections, _check_moment_args, _ema, _moments, _moment_block

__all__ = [
    "ScaleByAmsgradState",
    "ScaleByYogiState",
    "scale_by_amsgrad",
    "scale_by_nesterov_adam",
    "scale_by_yogi",
]


@stable_name("funcopt.ScaleByAmsgradState")
class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_amsgrad`: the 0-dim int64 ``count``, the moments ``mu`` and
    ``nu`` and ``nu_max``, the running maximum of the (bias-corrected) ``nu``, all params-shaped."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree
    nu_max: PyTree


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
) -> GradientTransformation:
    """AMSGrad as ``optax.scale_by_amsgrad`` (Reddi et al., "On the Convergence of Adam and
    Beyond", ICLR 2018).

    ``nu_max = max(nu_max, nu / (1 - b2**t))`` (the maximum of the *bias-corrected* second
    moment; ``torch.optim.Adam(amsgrad=True)`` keeps the maximum of the raw one); returns
    ``(mu / (1 - b1**t)) / (sqrt(nu_max + eps_root) + eps)``. The ``bias_correction_*`` flags
    switch either correction off. ``mu_dtype`` stores ``mu`` in that dtype (optax's option).
    """
    _check_moment_args(b1, b2, eps, eps_root)

    def advance(updates, state):
        mu, nu = _moments(updates, state, b1, b2)
        bc1, bc2 = _bias_corrections(state.count, b1, b2)
        bc1 = bc1 if bias_correction_mu else 1.0
        bc2 = bc2 if bias_correction_nu else 1.0
        # (a 0-dim leaf divided by the 0-dim float64 correction would become float64: keep its dtype)
        nu_max = _tree.map(lambda vm, v: torch.maximum(vm, (v / bc2).to(vm.dtype)), state.nu_max, nu)
        out = _tree.map(lambda m, vm: (m / bc1) / (torch.sqrt(vm + eps_root) + eps), mu, nu_max)
        return out, (mu, nu, nu_max)

    return _moment_block("scale_by_amsgrad", ScaleByAmsgradState, 3, advance, mu_dtype=mu_dtype)


def scale_by_nesterov_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """Adam with Nesterov momentum as ``optax.scale_by_adam(nesterov=True)`` (Dozat, "Incorporating
    Nesterov Momentum into Adam", 2016), the direction of ``optax.nadam``/``nadamw``.

    The first moment estimate is ``b1 * mu / (1 - b1**(t+1)) + (1 - b1) * g / (1 - b1**t)``;
    returns it over ``sqrt(nu / (1 - b2**t) + eps_root) + eps``. (``torch.optim.NAdam``, i.e.
    :func:`scale_by_nadam`, uses a momentum-decay schedule instead.) State: ``ScaleByAdamState``;
    ``mu_dtype`` stores ``mu`` in that dtype (optax's option).
    """
    _check_moment_args(b1, b2, eps, eps_root)

    def advance(updates, state):
        mu, nu = _moments(updates, state, b1, b2)
        bc1, bc2 = _bias_corrections(state.count, b1, b2)
        (bc1_next,) = _bias_corrections(state.count + 1, b1)

        def direction(m, v, g):
            m_hat = b1 * (m / bc1_next) + (1 - b1) * (g / bc1)
            return m_hat / (torch.sqrt(v / bc2 + eps_root) + eps)

        return _tree.map(direction, mu, nu, updates), (mu, nu, ())

    return _moment_block("scale_by_nesterov_adam", ScaleByAdamState, _adam_init, advance, mu_dtype=mu_dtype)


@stable_name("funcopt.ScaleByYogiState")
class ScaleByYogiState(NamedTuple):
    """State of :func:`scale_by_yogi`: the 0-dim int64 ``count`` and the params-shaped moments
    ``mu`` and ``nu``."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def scale_by_yogi(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    eps_root: float = 0.0,
    initial_accumulator_value: float = 1e-6,
) -> GradientTransformation:
    """Yogi as ``optax.scale_by_yogi`` (Zaheer et al., "Adaptive Methods for Nonconvex
    Optimization", NeurIPS 2018).

    Both moments start at ``initial_accumulator_value``; the second moment moves additively,
    ``nu = nu - (1 - b2) * sign(nu - g**2) * g**2``; returns
    ``(mu / (1 - b1**t)) / (sqrt(nu / (1 - b2**t) + eps_root) + eps)``.
    """
    _check_moment_args(b1, b2, eps, eps_root)

    def init(params):
        full = _tree.full_like(params, initial_accumulator_value)
        return ScaleByYogiState(init_count(params), full, _tree.full_like(params, initial_accumulator_value))

    def advance(updates, state):
        mu = _ema(state.mu, updates, b1, names=("mu", "updates"))

        def second(v, g):
            g2 = g * g
            return v - (1 - b2) * torch.sign(v - g2) * g2

        nu = _tree.map(second, state.nu, updates)
        bc1, bc2 = _bias_corrections(state.count, b1, b2)
        out = _tree.map(lambda m, v: (m / bc1) / (torch.sqrt(v / bc2 + eps_root) + eps), mu, nu)
        return out, (mu, nu)

    return _moment_block("scale_by_yogi", ScaleByYogiState, init, advance)
