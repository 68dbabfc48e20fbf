"""Factored second moments: Adafactor's scaling and its relative step size.

Part of ``funcopt.transforms`` (import the blocks from there or from ``funcopt``). The numerics
follow ``torch.optim.Adafactor`` (its single-tensor implementation), including its state layout:
the row and column factors keep the leaf's rank, with a 1 in the reduced dimension.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    FuncoptError,
    GradientTransformation,
    PyTree,
    ScalarOrSchedule,
    check_state,
    require_params,
    stable_name,
)
from funcopt.transforms._common import (
    _check_range,
    _float_step,
    _value_at,
    check_learning_rate,
    check_non_negative,
    init_count,
    is_python_zero,
)
from funcopt.transforms._scale import ScaleByScheduleState

__all__ = ["ScaleByAdafactorState", "scale_by_factored_rms", "scale_by_relative_step_size"]


@stable_name("funcopt.ScaleByAdafactorState")
class ScaleByAdafactorState(NamedTuple):
    """State of :func:`scale_by_factored_rms`.

    ``count`` is the 0-dim int64 number of updates so far. ``v_row``, ``v_col`` and ``v`` have the
    structure of the params; for each leaf only the moments it uses are real, the others are an
    empty placeholder (shape ``(0,)``, the leaf's dtype and device):

    - a leaf with 2+ dims keeps ``v_row``, the row factor (torch's ``row_var``: the leaf's shape
      with the last dim set to 1), and ``v_col``, the column factor (torch's ``col_var``: the
      shape with dim -2 set to 1);
    - a vector or 0-dim leaf keeps ``v``, the full second moment shaped like the leaf (torch's
      ``variance``).

    The placeholders are tensors rather than ``None`` because ``torch.func.vmap`` rejects
    ``None`` outputs. Which fields a leaf uses follows from its rank alone.
    """

    count: torch.Tensor
    v_row: PyTree
    v_col: PyTree
    v: PyTree


def _is_factored(leaf: torch.Tensor) -> bool:
    """Whether Adafactor factors ``leaf``'s second moment (2+ dims, as torch.optim.Adafactor)."""
    return leaf.ndim > 1


def _placeholder(p: torch.Tensor) -> torch.Tensor:
    return p.new_zeros((0,))


def _row_zeros(p: torch.Tensor) -> torch.Tensor:
    """Zeros of the row factor's shape (the last dim set to 1). Built from a slice of ``p`` so
    that a DTensor leaf's factor keeps the leaf's sharding of the other dims (FSDP2's rows)."""
    return torch.zeros_like(p[..., :1], memory_format=torch.contiguous_format)


def _col_zeros(p: torch.Tensor) -> torch.Tensor:
    """Zeros of the column factor's shape (dim -2 set to 1); replicated over a sharded dim -2."""
    return torch.zeros_like(p[..., :1, :], memory_format=torch.contiguous_format)


def _init_leaves(params: PyTree) -> tuple[PyTree, PyTree, PyTree]:
    for path, leaf in zip(_tree.paths(params), _tree.leaves(params)):
        if isinstance(leaf, torch.Tensor) and leaf.is_complex():
            raise FuncoptError(
                f"scale_by_factored_rms: the params leaf at {path} is complex; Adafactor (like "
                "torch.optim.Adafactor) supports real params only. Optimize torch.view_as_real(leaf) instead."
            )
    v_row = _tree.map(lambda p: _row_zeros(p) if _is_factored(p) else _placeholder(p), params)
    v_col = _tree.map(lambda p: _col_zeros(p) if _is_factored(p) else _placeholder(p), params)
    v = _tree.map(lambda p: _placeholder(p) if _is_factored(p) else torch.zeros_like(p), params)
    return v_row, v_col, v


_REDUCED = (torch.float16, torch.bfloat16)


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``start.lerp_(end, w)`` as torch computes it for a Python-number ``w``: with the weight in
    the op-math dtype (float32 for float16/bfloat16 leaves, rounded once at the end)."""
    if start.dtype in _REDUCED:
        return torch.lerp(start.float(), end.float(), weight.float()).to(start.dtype)
    return torch.lerp(start, end, weight.to(start.dtype))


def _check_eps(eps: Any) -> None:
    if eps is not None:
        check_non_negative("eps", eps)


def scale_by_factored_rms(beta2_decay: float = -0.8, eps: float | None = None) -> GradientTransformation:
    """Divides updates by the root of a factored second-moment estimate (Adafactor's scaling).

    As ``torch.optim.Adafactor``, at the ``t``-th step with ``w_t = t ** beta2_decay`` (so
    ``beta2_t = 1 - w_t`` rises towards 1):

    - a leaf ``g`` with 2+ dims keeps the running means of ``g**2`` over its last dim (``R``)
      and over its second-to-last dim (``C``), ``R = lerp(R, mean(g**2, -1), w_t)`` and the same
      for ``C``; its estimate is ``V = R @ C / max(mean(R, -2), eps)``, so the state is
      O(rows + cols) instead of O(rows * cols) (dims before the last two are batch dims);
    - a vector or 0-dim leaf keeps the full ``V = lerp(V, g**2, w_t)``;
    - returns ``g / max(sqrt(V), eps)``.

    Follow it with :func:`scale_by_relative_step_size` (update clipping, relative step size)
    for Adafactor itself (:func:`funcopt.adafactor`).

    Args:
        beta2_decay: the exponent of the decay schedule, <= 0 (default -0.8).
        eps: torch's ``epsilon1``, >= 0; ``None`` (default) uses each leaf's ``torch.finfo(dtype).eps``.
            (torch takes it from the first parameter's dtype for the whole param group; the two
            agree unless one group mixes dtypes.)

    References: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018, arXiv 1804.04235.
    """
    _check_range("beta2_decay", beta2_decay, None, 0.0)
    _check_eps(eps)

    def init(params):
        return ScaleByAdafactorState(init_count(params), *_init_leaves(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByAdafactorState, "scale_by_factored_rms")
        weight = _float_step(state.count) ** beta2_decay  # torch's one_minus_beta2_t

        def moments(g, v_row, v_col, v):
            eps1 = torch.finfo(g.dtype).eps if eps is None else eps
            if _is_factored(g):
                row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square() / g.shape[-1]
                col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square() / g.shape[-2]
                v_row = _lerp(v_row, row_mean, weight)
                v_col = _lerp(v_col, col_mean, weight)
                estimate = (v_row @ v_col) / v_row.mean(dim=-2, keepdim=True).clamp(min=eps1)
            else:
                v = _lerp(v, g * g, weight)
                estimate = v
            return estimate.clamp(min=eps1 * eps1).rsqrt() * g, v_row, v_col, v

        out = _tree.map(
            moments, updates, state.v_row, state.v_col, state.v, names=("updates", "v_row", "v_col", "v")
        )
        spec = _tree.structure(updates)
        parts = spec.flatten_up_to(out)
        u, v_row, v_col, v = (spec.unflatten([leaf[i] for leaf in parts]) for i in range(4))
        return u, ScaleByAdafactorState(state.count + 1, v_row, v_col, v)

    return GradientTransformation(init, update)


def scale_by_relative_step_size(
    learning_rate: ScalarOrSchedule = 1e-2,
    eps: float = 1e-3,
    clipping_threshold: float = 1.0,
    *,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Adafactor's step: update clipping, relative step size, decoupled weight decay (last in a chain).

    As ``torch.optim.Adafactor``, at the ``t``-th step each leaf's update ``u`` becomes
    ``-alpha_t * u / max(1, RMS(u) / clipping_threshold)`` with ``alpha_t = max(eps, RMS(p)) *
    min(learning_rate, 1 / sqrt(t))``, so a parameter moves by a fraction of its own scale.
    With ``weight_decay`` the params are also scaled by ``1 - learning_rate * weight_decay``
    (decoupled; the updates hold ``p * (1 - lr * wd) - p``, which keeps torch's rounding).

    The step coefficient is rounded to the leaf dtype and, for float16/bfloat16 leaves, the
    updates are float32 (the product of two low-precision numbers, exact), which
    ``apply_updates`` adds and rounds into the leaf dtype once: how torch's vectorized CPU
    ``param.add_(update, alpha=coefficient)`` computes in low precision (its scalar tail
    rounds the product first, so single elements can differ by one unit in the last place).

    Args:
        learning_rate: the cap of the relative step size and the weight-decay rate (default
            1e-2): a float, a 0-dim tensor or a schedule ``count -> value`` (the k-th update
            uses ``schedule(k - 1)``).
        eps: torch's ``epsilon2``, the smallest parameter scale, >= 0 (default 1e-3).
        clipping_threshold: torch's ``d``, the update RMS above which updates are scaled
            down, >= 1 (default 1.0).
        weight_decay: the decoupled weight-decay coefficient, >= 0 (default 0).

    References: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018, arXiv 1804.04235; Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", 2019, arXiv 1711.05101.
    """
    check_learning_rate(learning_rate)
    check_non_negative("eps", eps)
    _check_range("clipping_threshold", clipping_threshold, 1.0)
    check_non_negative("weight_decay", weight_decay)
    decay = not is_python_zero(weight_decay)

    def init(params):
        return ScaleByScheduleState(init_count(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByScheduleState, "scale_by_relative_step_size")
        require_params(params, "scale_by_relative_step_size")
        lr = _value_at(learning_rate, state.count)
        if isinstance(lr, torch.Tensor):
            lr = lr.to(torch.float64)
        else:
            lr = torch.tensor(float(lr), dtype=torch.float64, device=state.count.device)
        rho = torch.minimum(lr, 1 / _float_step(state.count) ** 0.5)

        def step(u, p):
            scale = torch.linalg.vector_norm(p).to(torch.float64) / p.numel() ** 0.5
            alpha = torch.clamp(scale, min=eps) * rho
            rms = torch.linalg.vector_norm(u).to(torch.float64) / (u.numel() ** 0.5 * clipping_threshold)
            coefficient = (-alpha / torch.clamp(rms, min=1.0)).to(u.dtype)
            if u.dtype in _REDUCED:  # float32 updates: the product is exact, apply_updates rounds once
                out = u.float() * coefficient.float()
            else:
                out = u * coefficient
            if decay:
                out = out + (p * (1 - lr * weight_decay) - p)
            return out

        out = _tree.map(step, updates, params, names=("updates", "params"))
        return out, ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)
