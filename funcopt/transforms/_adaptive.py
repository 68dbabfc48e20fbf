"""Adaptive blocks: Adam, Adamax, NAdam, RAdam, Lion, RMSprop and Adagrad scalings.

Part of ``funcopt.transforms`` (import the blocks from there or from ``funcopt``). The numerics
follow ``torch.optim``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    stable_name,
    GradientTransformation,
    PyTree,
    check_state,
)
from funcopt.transforms._common import (
    _float_step,
    init_count,
    is_python_zero,
    _scalar_state,
    check_beta,
    check_non_negative,
)
from funcopt.transforms._moments import (
    _bias_corrections,
    _decayed_sum,
    _check_moment_args,
    _ema,
    _ema_of_squares,
    _moment_block,
    _moments,
    _zeros_state,
)

__all__ = [
    "ScaleByAdamState",
    "ScaleByAdamaxState",
    "ScaleByNadamState",
    "ScaleByLionState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_lion",
    "scale_by_rms",
    "scale_by_rss",
]

# ---------------------------------------------------------------------------------------------
# Adaptive moments


@stable_name("funcopt.ScaleByAdamState")
class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam` and :func:`scale_by_radam`.

    ``count`` is the 0-dim int64 number of updates so far; ``mu``/``nu`` are the first and second
    moments shaped like the params; ``nu_max`` is the running maximum of ``nu`` (AMSGrad) or
    ``()`` when unused (not ``None``: ``torch.func.vmap`` rejects ``None`` outputs).
    """

    count: torch.Tensor
    mu: PyTree
    nu: PyTree
    nu_max: PyTree


def _adam_init(params: PyTree, amsgrad: bool = False) -> ScaleByAdamState:
    return _zeros_state(ScaleByAdamState, params, 2, _tree.zeros_like(params) if amsgrad else ())


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    amsgrad: bool = False,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescales updates by Adam's bias-corrected moments (Kingma & Ba, 2015, arXiv 1412.6980).

    Returns ``m_hat / (sqrt(v_hat) + eps)`` where ``m``/``v`` are exponential moving averages
    of the gradient and its square with decays ``b1``/``b2``, computed as in
    ``torch.optim.Adam``. With ``eps_root > 0`` the denominator is ``sqrt(v_hat + eps_root) +
    eps`` (optax's form, which keeps gradients through the step finite). With ``amsgrad=True``
    the running maximum of ``v`` is used (Reddi et al., 2018), as torch does. ``mu_dtype``
    (optax's option, e.g. ``torch.bfloat16``) stores ``m`` in that dtype, updated with optax's
    arithmetic in the wider of the two dtypes.
    """
    _check_moment_args(b1, b2, eps, eps_root)

    def advance(updates, state):
        mu, nu = _moments(updates, state, b1, b2)
        bc1, bc2 = _bias_corrections(state.count, b1, b2)
        nu_max = _tree.map(torch.maximum, state.nu_max, nu) if amsgrad else ()
        second = nu_max if amsgrad else nu
        if is_python_zero(eps_root):
            sqrt_bc2 = torch.sqrt(bc2)
            direction = _tree.map(
                lambda m, v: (m / bc1) / (torch.sqrt(v) / sqrt_bc2 + eps), mu, second
            )
        else:
            direction = _tree.map(
                lambda m, v: (m / bc1) / (torch.sqrt(v / bc2 + eps_root) + eps), mu, second
            )
        return direction, (mu, nu, nu_max)

    return _moment_block("scale_by_adam", ScaleByAdamState, lambda params: _adam_init(params, amsgrad), advance,
                         mu_dtype=mu_dtype)


@stable_name("funcopt.ScaleByAdamaxState")
class ScaleByAdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`: count, first moment ``mu``, infinity norm ``nu``."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adamax: Adam with the infinity norm (Kingma & Ba, 2015, section 7), as ``torch.optim.Adamax``.

    ``u = max(b2 * u, |g| + eps)``; returns ``m / (1 - b1**t) / u``.
    """
    _check_moment_args(b1, b2, eps)

    def advance(updates, state):
        mu = _ema(state.mu, updates, b1, names=("mu", "updates"))
        nu = _tree.map(lambda u, g: torch.maximum(u * b2, torch.abs(g) + eps), state.nu, updates)
        (bc1,) = _bias_corrections(state.count, b1)
        direction = _tree.map(lambda m, u: (m / bc1) / u, mu, nu)
        return direction, (mu, nu)

    return _moment_block("scale_by_adamax", ScaleByAdamaxState, 2, advance)


@stable_name("funcopt.ScaleByNadamState")
class ScaleByNadamState(NamedTuple):
    """State of :func:`scale_by_nadam`; ``mu_product`` is the running product of momentum
    coefficients (a 0-dim float64 tensor, 1 at init)."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree
    mu_product: torch.Tensor


def scale_by_nadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum_decay: float = 4e-3
) -> GradientTransformation:
    """NAdam: Adam with Nesterov momentum (Dozat, 2016), as ``torch.optim.NAdam``.

    Uses torch's momentum schedule ``mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))``.
    """
    _check_moment_args(b1, b2, eps)
    check_non_negative("momentum_decay", momentum_decay)

    def init(params):
        count = init_count(params)
        return ScaleByNadamState(
            count,
            _tree.zeros_like(params),
            _tree.zeros_like(params),
            _scalar_state(1.0, count),
        )

    def advance(updates, state):
        step = _float_step(state.count)
        bc2 = 1 - b2**step
        mu_t = b1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
        mu_product = state.mu_product * mu_t
        mu_product_next = mu_product * mu_next
        mu, nu = _moments(updates, state, b1, b2)
        coef_g = (1.0 - mu_t) / (1.0 - mu_product)
        coef_m = mu_next / (1.0 - mu_product_next)

        def direction(g, m, v):
            denom = torch.sqrt(v / bc2) + eps
            return g * coef_g / denom + m * coef_m / denom

        out = _tree.map(direction, updates, mu, nu)
        return out, (mu, nu, mu_product)

    return _moment_block("scale_by_nadam", ScaleByNadamState, init, advance)


def scale_by_radam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, threshold: float = 5.0
) -> GradientTransformation:
    """RAdam: rectified Adam (Liu et al., 2020, arXiv 1908.03265), as ``torch.optim.RAdam``.

    While the variance estimate is unreliable (``rho_t <= threshold``) the update is the
    bias-corrected momentum alone; afterwards it is rectified Adam.
    """
    _check_moment_args(b1, b2, eps)

    def advance(updates, state):
        step = _float_step(state.count)
        mu, nu = _moments(updates, state, b1, b2)
        bc1, bc2 = _bias_corrections(state.count, b1, b2)
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * step * (b2**step) / bc2
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rect = torch.sqrt(torch.clamp(ratio, min=0.0))
        use_adaptive = rho_t > threshold
        sqrt_bc2 = torch.sqrt(bc2)

        def direction(m, v):
            m_hat = m / bc1
            adaptive = rect * sqrt_bc2 / (torch.sqrt(v) + eps)
            return m_hat * torch.where(use_adaptive, adaptive, torch.ones_like(adaptive))

        out = _tree.map(direction, mu, nu)
        return out, (mu, nu, ())

    return _moment_block("scale_by_radam", ScaleByAdamState, _adam_init, advance)


@stable_name("funcopt.ScaleByLionState")
class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: count and the momentum ``mu``."""

    count: torch.Tensor
    mu: PyTree


def scale_by_lion(b1: float = 0.9, b2: float = 0.99, mu_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Lion's sign update (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
    arXiv 2302.06675): returns ``sign(b1 * m + (1 - b1) * g)`` and tracks
    ``m = b2 * m + (1 - b2) * g`` (stored in ``mu_dtype`` where given, as optax's option)."""
    check_beta("b1", b1)
    check_beta("b2", b2)

    def advance(updates, state):
        direction = _tree.map(lambda m, g: torch.sign(_decayed_sum(m, g, b1)), state.mu, updates)
        mu = _ema(state.mu, updates, b2)
        return direction, (mu,)

    return _moment_block("scale_by_lion", ScaleByLionState, 1, advance, mu_dtype=mu_dtype)


@stable_name("funcopt.ScaleByRmsState")
class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: ``nu`` the mean square, ``mu`` the mean (centered) or ``()``."""

    nu: PyTree
    mu: PyTree


def scale_by_rms(
    decay: float = 0.99, eps: float = 1e-8, *, centered: bool = False, initial_scale: float = 0.0
) -> GradientTransformation:
    """Divides by the root of a running mean square (Tieleman & Hinton, 2012), as ``torch.optim.RMSprop``.

    ``nu = decay * nu + (1 - decay) * g**2``; returns ``g / (sqrt(nu) + eps)``, or with
    ``centered=True`` ``g / (sqrt(nu - mu**2) + eps)`` where ``mu`` is the running mean of ``g``.
    """
    check_beta("decay", decay)
    check_non_negative("eps", eps)

    def init(params):
        nu = _tree.full_like(params, initial_scale) if initial_scale else _tree.zeros_like(params)
        return ScaleByRmsState(nu, _tree.zeros_like(params) if centered else ())

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByRmsState, "scale_by_rms")
        nu = _ema_of_squares(state.nu, updates, decay, names=("nu", "updates"))
        if centered:
            mu = _ema(state.mu, updates, decay)
            out = _tree.map(lambda g, v, m: g / (torch.sqrt(v - m * m) + eps), updates, nu, mu)
        else:
            mu = ()
            out = _tree.map(lambda g, v: g / (torch.sqrt(v) + eps), updates, nu)
        return out, ScaleByRmsState(nu, mu)

    return GradientTransformation(init, update)


@stable_name("funcopt.ScaleByRssState")
class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: the running sum of squared gradients."""

    sum_of_squares: PyTree


def scale_by_rss(initial_accumulator_value: float = 0.0, eps: float = 1e-10) -> GradientTransformation:
    """Adagrad's scaling (Duchi et al., 2011), as ``torch.optim.Adagrad``: ``g / (sqrt(sum g**2) + eps)``."""
    check_non_negative("initial_accumulator_value", initial_accumulator_value)
    check_non_negative("eps", eps)

    def init(params):
        return ScaleByRssState(_tree.full_like(params, float(initial_accumulator_value)))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByRssState, "scale_by_rss")
        acc = _tree.map(lambda s, g: s + g * g, state.sum_of_squares, updates, names=("sum_of_squares", "updates"))
        out = _tree.map(lambda g, s: g / (torch.sqrt(s) + eps), updates, acc)
        return out, ScaleByRssState(acc)

    return GradientTransformation(init, update)
