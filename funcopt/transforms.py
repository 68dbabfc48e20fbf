"""Small building blocks: each returns a ``GradientTransformation`` that does one thing.

The numerics follow ``torch.optim`` (where torch has the algorithm) so that the optimizers in
``funcopt.optimizers``, built as chains of these blocks, reproduce torch's trajectories. Every
block works with hyperparameters given as Python numbers or as 0-dim tensors (the latter is what
``inject_hyperparams`` passes, possibly batched under ``vmap``). Ranges are validated only for
Python numbers, at construction time.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    EmptyState,
    FuncoptError,
    GradientTransformation,
    PyTree,
    ScalarOrSchedule,
    check_state,
    require_params,
)

__all__ = [
    "ScaleByAdamState",
    "ScaleByAdamaxState",
    "ScaleByNadamState",
    "ScaleByLionState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "TraceState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_lion",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_trust_ratio",
    "trace",
    "add_decayed_weights",
    "clip",
    "clip_by_global_norm",
]


# ---------------------------------------------------------------------------------------------
# Validation and scalar helpers (private)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_zero(x: Any) -> bool:
    """True only for a Python number equal to 0; tensors never count as zero.

    Used for structural choices (whether a block exists at all), which must not depend on a
    tensor's value so that the state structure is the same under ``inject_hyperparams``/``vmap``.
    """
    return _is_number(x) and x == 0


def _check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or value is None:
        raise FuncoptError(f"{name} must be a number or a 0-dim tensor, got {value!r}.")
    if isinstance(value, torch.Tensor) or callable(value):
        return
    if not _is_number(value):
        raise FuncoptError(f"{name} must be a number or a 0-dim tensor, got {type(value).__name__}.")
    if value != value:
        raise FuncoptError(f"{name} must not be NaN.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise FuncoptError(f"{name} must lie in {interval}, got {value!r}.")


def check_beta(name: str, value: Any) -> None:
    """Validates a decay rate (beta) in [0, 1) when it is a Python number."""
    _check_range(name, value, 0.0, 1.0, high_open=True)


def check_non_negative(name: str, value: Any) -> None:
    _check_range(name, value, 0.0)


def check_learning_rate(value: Any) -> None:
    if _is_number(value) and value < 0:
        raise FuncoptError(
            f"learning_rate must be >= 0, got {value!r}. To ascend instead of descend, pass "
            "maximize=True (or use funcopt.scale(-1.0) in a chain)."
        )
    if not callable(value):
        _check_range("learning_rate", value, 0.0)


def _first_device(params: PyTree) -> torch.device:
    for leaf in _tree.leaves(params):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def _init_count(params: PyTree) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=_first_device(params))


def _float_step(count: torch.Tensor) -> torch.Tensor:
    """``count + 1`` as a float64 0-dim tensor (the 1-based step torch.optim uses)."""
    return (count + 1).to(torch.float64)


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: Any) -> torch.Tensor:
    """``torch.lerp`` whose tensor weight is cast to the leaf dtype (a batched float64
    hyperparameter under ``vmap`` next to float32 params would otherwise be rejected)."""
    if isinstance(weight, torch.Tensor) and weight.dtype != start.dtype:
        weight = weight.to(start.dtype)
    return torch.lerp(start, end, weight)


def _scalar_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


# ---------------------------------------------------------------------------------------------
# Scaling and learning rates


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: the 0-dim int64 step count."""

    count: torch.Tensor


def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiplies updates by a constant ``step_size`` (``optax.scale``)."""
    _check_range("step_size", step_size)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        return _tree.map(lambda u: u * step_size, updates), state

    return GradientTransformation(init, update)


def scale_by_schedule(step_size_fn: Callable[[torch.Tensor], Any]) -> GradientTransformation:
    """Multiplies updates by ``step_size_fn(count)``, the count starting at 0."""
    if not callable(step_size_fn):
        raise FuncoptError("scale_by_schedule needs a callable count -> value.")

    def init(params):
        return ScaleByScheduleState(count=_init_count(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByScheduleState, "scale_by_schedule")
        factor = step_size_fn(state.count)
        updates = _tree.map(lambda u: u * factor, updates)
        return updates, ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Multiplies updates by ``-learning_rate`` (``optax.scale_by_learning_rate``).

    ``learning_rate`` is a float, a 0-dim tensor, or a schedule ``count -> value`` evaluated at
    the 0-based count of this block's updates (the k-th update uses ``schedule(k - 1)``, the
    value ``torch.optim.lr_scheduler`` gives the k-th ``optimizer.step()``).
    """
    check_learning_rate(learning_rate)
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)


# ---------------------------------------------------------------------------------------------
# Adaptive moments


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
    return ScaleByAdamState(
        count=_init_count(params),
        mu=_tree.zeros_like(params),
        nu=_tree.zeros_like(params),
        nu_max=_tree.zeros_like(params) if amsgrad else (),
    )


def _moments(updates, state, b1, b2):
    mu = _tree.map(lambda m, g: _lerp(m, g, 1 - b1), state.mu, updates, names=("mu", "updates"))
    nu = _tree.map(lambda v, g: _lerp(v, g * g, 1 - b2), state.nu, updates, names=("nu", "updates"))
    return mu, nu


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    amsgrad: bool = False,
) -> GradientTransformation:
    """Rescales updates by Adam's bias-corrected moments (Kingma & Ba, 2015, arXiv 1412.6980).

    Returns ``m_hat / (sqrt(v_hat) + eps)`` where ``m``/``v`` are exponential moving averages
    of the gradient and its square with decays ``b1``/``b2``, computed as in
    ``torch.optim.Adam``. With ``eps_root > 0`` the denominator is ``sqrt(v_hat + eps_root) +
    eps`` (optax's form, which keeps gradients through the step finite). With ``amsgrad=True``
    the running maximum of ``v`` is used (Reddi et al., 2018), as torch does.
    """
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_non_negative("eps", eps)
    check_non_negative("eps_root", eps_root)

    def init(params):
        return _adam_init(params, amsgrad)

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByAdamState, "scale_by_adam")
        step = _float_step(state.count)
        mu, nu = _moments(updates, state, b1, b2)
        bc1 = 1 - b1**step
        bc2 = 1 - b2**step
        nu_max = _tree.map(torch.maximum, state.nu_max, nu) if amsgrad else ()
        second = nu_max if amsgrad else nu
        if _is_zero(eps_root):
            sqrt_bc2 = torch.sqrt(bc2)
            direction = _tree.map(
                lambda m, v: (m / bc1) / (torch.sqrt(v) / sqrt_bc2 + eps), mu, second
            )
        else:
            direction = _tree.map(
                lambda m, v: (m / bc1) / (torch.sqrt(v / bc2 + eps_root) + eps), mu, second
            )
        return direction, ScaleByAdamState(state.count + 1, mu, nu, nu_max)

    return GradientTransformation(init, update)


class ScaleByAdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`: count, first moment ``mu``, infinity norm ``nu``."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adamax: Adam with the infinity norm (Kingma & Ba, 2015, section 7), as ``torch.optim.Adamax``.

    ``u = max(b2 * u, |g| + eps)``; returns ``m / (1 - b1**t) / u``.
    """
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_non_negative("eps", eps)

    def init(params):
        return ScaleByAdamaxState(_init_count(params), _tree.zeros_like(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByAdamaxState, "scale_by_adamax")
        step = _float_step(state.count)
        mu = _tree.map(lambda m, g: _lerp(m, g, 1 - b1), state.mu, updates, names=("mu", "updates"))
        nu = _tree.map(lambda u, g: torch.maximum(u * b2, torch.abs(g) + eps), state.nu, updates)
        bc1 = 1 - b1**step
        direction = _tree.map(lambda m, u: (m / bc1) / u, mu, nu)
        return direction, ScaleByAdamaxState(state.count + 1, mu, nu)

    return GradientTransformation(init, update)


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
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_non_negative("eps", eps)
    check_non_negative("momentum_decay", momentum_decay)

    def init(params):
        count = _init_count(params)
        return ScaleByNadamState(
            count,
            _tree.zeros_like(params),
            _tree.zeros_like(params),
            torch.ones((), dtype=_scalar_dtype(count), device=count.device),
        )

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByNadamState, "scale_by_nadam")
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
        return out, ScaleByNadamState(state.count + 1, mu, nu, mu_product)

    return GradientTransformation(init, update)


def scale_by_radam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, threshold: float = 5.0
) -> GradientTransformation:
    """RAdam: rectified Adam (Liu et al., 2020, arXiv 1908.03265), as ``torch.optim.RAdam``.

    While the variance estimate is unreliable (``rho_t <= threshold``) the update is the
    bias-corrected momentum alone; afterwards it is rectified Adam.
    """
    check_beta("b1", b1)
    check_beta("b2", b2)
    check_non_negative("eps", eps)

    def init(params):
        return _adam_init(params)

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByAdamState, "scale_by_radam")
        step = _float_step(state.count)
        mu, nu = _moments(updates, state, b1, b2)
        bc1 = 1 - b1**step
        bc2 = 1 - b2**step
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
        return out, ScaleByAdamState(state.count + 1, mu, nu, ())

    return GradientTransformation(init, update)


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: count and the momentum ``mu``."""

    count: torch.Tensor
    mu: PyTree


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's sign update (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
    arXiv 2302.06675): returns ``sign(b1 * m + (1 - b1) * g)`` and tracks
    ``m = b2 * m + (1 - b2) * g``."""
    check_beta("b1", b1)
    check_beta("b2", b2)

    def init(params):
        return ScaleByLionState(_init_count(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByLionState, "scale_by_lion")
        direction = _tree.map(lambda m, g: torch.sign(_lerp(m, g, 1 - b1)), state.mu, updates)
        mu = _tree.map(lambda m, g: _lerp(m, g, 1 - b2), state.mu, updates)
        return direction, ScaleByLionState(state.count + 1, mu)

    return GradientTransformation(init, update)


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
        nu = _tree.map(lambda v, g: _lerp(v, g * g, 1 - decay), state.nu, updates, names=("nu", "updates"))
        if centered:
            mu = _tree.map(lambda m, g: _lerp(m, g, 1 - decay), state.mu, updates)
            out = _tree.map(lambda g, v, m: g / (torch.sqrt(v - m * m) + eps), updates, nu, mu)
        else:
            mu = ()
            out = _tree.map(lambda g, v: g / (torch.sqrt(v) + eps), updates, nu)
        return out, ScaleByRmsState(nu, mu)

    return GradientTransformation(init, update)


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


# ---------------------------------------------------------------------------------------------
# Momentum, weight decay, trust ratio, clipping


class TraceState(NamedTuple):
    """State of :func:`trace`: count and the momentum buffer shaped like the params."""

    count: torch.Tensor
    momentum_buffer: PyTree


def trace(decay: float, *, dampening: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum with torch.optim.SGD's semantics (``optax.trace`` with dampening).

    ``b = g`` on the first step, then ``b = decay * b + (1 - dampening) * g``; returns ``b``, or
    ``g + decay * b`` with ``nesterov=True`` (Sutskever et al., 2013).
    """
    _check_range("decay", decay, 0.0)
    _check_range("dampening", dampening, 0.0, 1.0)
    if nesterov and _is_number(dampening) and dampening != 0:
        raise FuncoptError("Nesterov momentum requires dampening=0 (as in torch.optim.SGD).")
    if nesterov and _is_zero(decay):
        raise FuncoptError("Nesterov momentum requires a momentum (decay) > 0.")

    def init(params):
        return TraceState(_init_count(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, TraceState, "trace")
        first = state.count == 0
        buf = _tree.map(
            lambda b, g: torch.where(first, g, b * decay + g * (1 - dampening)),
            state.momentum_buffer,
            updates,
            names=("momentum_buffer", "updates"),
        )
        out = _tree.map(lambda g, b: g + b * decay, updates, buf) if nesterov else buf
        return out, TraceState(state.count + 1, buf)

    return GradientTransformation(init, update)


def _resolve_mask(mask: Any, params: PyTree, what: str) -> PyTree:
    m = mask(params) if callable(mask) else mask
    if _tree.structure(m) != _tree.structure(params):
        _tree.check_same_structure(params, m, ("params", f"{what} mask"))
    for path, leaf in zip(_tree.paths(m), _tree.leaves(m)):
        if not isinstance(leaf, bool):
            raise FuncoptError(f"{what} mask leaf at {path} is {leaf!r}; mask leaves must be True or False.")
    return m


def add_decayed_weights(
    weight_decay: float = 0.0, mask: PyTree | Callable[[PyTree], PyTree] | None = None
) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates (``optax.add_decayed_weights``).

    Placed before an adaptive block it is L2 regularization (``torch.optim.Adam(weight_decay)``);
    placed after it, before the learning rate, it is decoupled weight decay (AdamW, Loshchilov &
    Hutter, 2019). ``mask`` (a pytree of bools shaped like params, or a function of params
    returning one) limits the decay to the leaves marked True.
    """
    _check_range("weight_decay", weight_decay, 0.0)

    def init(params):
        if mask is not None:
            _resolve_mask(mask, params, "add_decayed_weights")
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        require_params(params, "add_decayed_weights")
        if mask is None:
            out = _tree.map(lambda u, p: u + p * weight_decay, updates, params, names=("updates", "params"))
        else:
            m = _resolve_mask(mask, params, "add_decayed_weights")
            out = _tree.map(
                lambda u, p, keep: u + p * weight_decay if keep else u, updates, params, m,
                names=("updates", "params", "mask"),
            )
        return out, state

    return GradientTransformation(init, update)


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> GradientTransformation:
    """Scales each leaf's update by ``||p|| / ||u||`` (LARS/LAMB; You et al., 2019, arXiv 1904.00962).

    Norms are per leaf and floored at ``min_norm``; the ratio is 1 where either norm is zero.
    """
    check_non_negative("min_norm", min_norm)
    check_non_negative("eps", eps)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        require_params(params, "scale_by_trust_ratio")

        def _scale(u, p):
            p_norm = torch.clamp(torch.linalg.vector_norm(p), min=min_norm)
            u_norm = torch.clamp(torch.linalg.vector_norm(u), min=min_norm)
            ratio = trust_coefficient * p_norm / (u_norm + eps)
            zero = (p_norm == 0) | (u_norm == 0)
            return u * torch.where(zero, torch.ones_like(ratio), ratio)

        return _tree.map(_scale, updates, params, names=("updates", "params")), state

    return GradientTransformation(init, update)


def clip(max_delta: float) -> GradientTransformation:
    """Clamps every update element to ``[-max_delta, max_delta]`` (``optax.clip``)."""
    _check_range("max_delta", max_delta, 0.0)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        return _tree.map(lambda u: torch.clamp(u, -max_delta, max_delta), updates), state

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescales all updates together so their global L2 norm is at most ``max_norm``.

    Updates with a smaller norm pass unchanged (``optax.clip_by_global_norm``; like
    ``torch.nn.utils.clip_grad_norm_`` without its 1e-6 in the denominator).
    """
    _check_range("max_norm", max_norm, 0.0, low_open=True)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        g_norm = _tree.norm(updates)
        factor = max_norm / torch.clamp(g_norm, min=max_norm)
        return _tree.map(lambda u: u * factor, updates), state

    return GradientTransformation(init, update)
