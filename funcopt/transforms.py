"""Small building blocks: each returns a ``GradientTransformation`` that does one thing.

The numerics follow ``torch.optim`` (where torch has the algorithm) so that the optimizers in
``funcopt.optimizers``, built as chains of these blocks, reproduce torch's trajectories. Every
block works with hyperparameters given as Python numbers or as 0-dim tensors (the latter is what
``inject_hyperparams`` passes, possibly batched under ``vmap``). Ranges are validated only for
Python numbers, at construction time.

The blocks live in ``funcopt.transforms_adaptive`` (Adam and the other adaptive scalings),
``funcopt.transforms_scale`` (scaling, learning rates, momentum, weight decay, trust ratio,
clipping) and ``funcopt.transforms_common`` (validation and scalar helpers); this module
re-exports them, and the state types keep ``funcopt.transforms`` as their module name.
"""

from __future__ import annotations

# The state types report this module as theirs, so their string annotations (``torch.Tensor``,
# ``PyTree``) are resolved here by ``typing.get_type_hints``.
import torch as torch

from funcopt.base import PyTree as PyTree
from funcopt.transforms_adaptive import (
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByLionState,
    ScaleByNadamState,
    ScaleByRmsState,
    ScaleByRssState,
    _adam_init as _adam_init,
    _moments as _moments,
    scale_by_adam,
    scale_by_adamax,
    scale_by_lion,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    scale_by_rss,
)
from funcopt.transforms_common import (  # the private helpers stay importable from here
    _check_range as _check_range,
    _first_device as _first_device,
    _float_step as _float_step,
    _init_count as _init_count,
    _is_number as _is_number,
    _is_zero as _is_zero,
    _lerp as _lerp,
    _scalar_dtype as _scalar_dtype,
    check_beta as check_beta,
    check_learning_rate as check_learning_rate,
    check_non_negative as check_non_negative,
)
from funcopt.transforms_scale import (
    ScaleByScheduleState,
    TraceState,
    _resolve_mask as _resolve_mask,
    add_decayed_weights,
    clip,
    clip_by_global_norm,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
    scale_by_trust_ratio,
    trace,
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
