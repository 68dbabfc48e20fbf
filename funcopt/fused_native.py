"""The fast path's single-pass route for pure CPU steps of Adam, AdamW and SGD (``funcopt.fused``).

Private helper of :mod:`funcopt.fused`: where :func:`funcopt.native.usable` allows, a pure
``update`` or pure training step runs :mod:`funcopt.native`'s kernels, which read the old
state and write the new state and the updates (or the new params) into fresh tensors in one
pass, instead of torch's in-place kernels on copies. Same plan, same state types, same numbers
to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from funcopt import native
from funcopt.fused_checks import _per_dtype_group, _Plan
from funcopt.transforms import ScaleByAdamState, TraceState

__all__: list[str] = []

_KINDS = ("adam", "adamw", "sgd")


def native_step(fp: Any, plan: _Plan, state: tuple, write_params: bool) -> tuple[list[torch.Tensor], tuple] | None:
    """Runs ``fp``'s step natively; returns (flat outputs, new chain state) or None.

    ``fp`` is the :class:`funcopt.fused._FastPath`. The outputs are the updates or, with
    ``write_params`` (the plan then holds the params), the new params. None, with nothing
    computed, where the native kernels do not apply (another optimizer, CUDA, a small step,
    switched off, not built here).
    """
    kind = fp.kind
    if kind not in _KINDS or plan.columns.device.type != "cpu" or not native.usable(plan.g):
        return None
    h, lr = plan.h, plan.lr
    new_counts = {k: c + 1 for k, c in plan.counts.items()}
    # SGD: whether the momentum buffer starts now; Adam: the 1-based step (CPU reads, no sync).
    first = TraceState in plan.counts and int(plan.counts[TraceState]) == 0
    step = int(plan.counts[ScaleByAdamState]) + 1 if ScaleByAdamState in plan.counts else 0

    def group_step(g, p, bufs):
        if kind == "sgd":
            has_buf = bufs["buf"] is not None
            res, buf = native.sgd(
                g, bufs["buf"], p, lr=lr, momentum=h["momentum"] if has_buf else 0.0, dampening=h["dampening"],
                nesterov=h["nesterov"], weight_decay=h["weight_decay"], maximize=h["maximize"], first=first,
                has_buf=has_buf, write_params=write_params,
            )
            return res, {"buf": buf}
        res, mu, nu, nu_max = native.adam(
            g, bufs["mu"], bufs["nu"], bufs["nu_max"], p, lr=lr, b1=h["b1"], b2=h["b2"], eps=h["eps"], step=step,
            weight_decay=h["weight_decay"], decoupled=kind == "adamw", maximize=h["maximize"],
            write_params=write_params,
        )
        return res, {"mu": mu, "nu": nu, "nu_max": nu_max}

    out, new_buffers = _per_dtype_group(plan, group_step)
    return out, fp._new_state(plan, state, new_buffers, new_counts)
