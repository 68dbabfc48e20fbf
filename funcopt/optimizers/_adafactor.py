"""Adafactor: factored second moments and a relative step size (reference chain only).

No fast route: the row/column factors are not shaped like the params (the multi-tensor
dispatcher handles params-shaped buffers only), and torch's own ``foreach`` Adafactor is
still a loop of per-tensor norms and ``.item()`` calls around a few ``_foreach_*`` ops, which
torch itself leaves off by default.
"""

from __future__ import annotations

from collections.abc import Sequence

from funcopt.base import FuncoptError, GradientTransformation, ScalarOrSchedule
from funcopt.optimizers._common import build, sign
from funcopt.transforms import check_non_negative, scale_by_factored_rms, scale_by_relative_step_size

__all__ = ["adafactor"]


def _split_eps(eps: Sequence[float | None]) -> tuple[float | None, float]:
    if isinstance(eps, (str, bytes)) or not isinstance(eps, Sequence) or len(eps) != 2:
        raise FuncoptError(
            f"adafactor: eps must be a pair (eps1, eps2) as in torch.optim.Adafactor, e.g. (None, 1e-3); got {eps!r}."
        )
    if eps[0] is not None:
        check_non_negative("eps[0] (eps1)", eps[0])
    check_non_negative("eps[1] (eps2)", eps[1])
    return eps[0], eps[1]


def adafactor(
    learning_rate: ScalarOrSchedule = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """Adafactor, like ``torch.optim.Adafactor`` (same arguments and defaults, ``lr`` named ``learning_rate``).

    Leaves with 2+ dims keep row and column factors of the second moment instead of a full
    one (memory O(rows + cols)); vectors and 0-dim leaves keep the full moment. Each step
    moves a leaf by ``min(learning_rate, 1 / sqrt(t)) * max(eps2, RMS(p))`` times its
    normalized (:func:`funcopt.transforms.scale_by_factored_rms`), RMS-clipped update
    (:func:`funcopt.transforms.scale_by_relative_step_size`). float16/bfloat16 params keep
    their state in their own dtype, as torch does, and get float32 updates that
    ``apply_updates`` rounds into the param dtype once (torch's own rounding).

    Args:
        learning_rate: caps the relative step size ``rho_t = min(learning_rate, 1 / sqrt(t))``
            and scales the weight decay (default 1e-2, the paper's constant); a float, 0-dim
            tensor or schedule ``count -> value``.
        beta2_decay: ``beta2_t = 1 - t ** beta2_decay``, <= 0 (default -0.8).
        eps: ``(eps1, eps2)`` (default ``(None, 1e-3)``): ``eps1`` floors the second-moment
            estimate (``None``: ``torch.finfo(dtype).eps`` of each leaf; torch takes the first
            parameter's dtype for a whole param group, the same unless the group mixes dtypes);
            ``eps2`` floors the parameter scale ``RMS(p)``.
        d: the update clipping threshold, >= 1 (default 1.0).
        weight_decay: decoupled weight decay: params are scaled by ``1 - learning_rate *
            weight_decay`` each step (default 0).
        maximize: ascend the objective instead (default False).

    The state is a :class:`funcopt.transforms.ScaleByAdafactorState` (its row/column factors
    use torch's ``row_var``/``col_var`` shapes, so :mod:`funcopt.interop` converts
    ``torch.optim.Adafactor`` state_dicts both ways) and a step count for the relative step.

    References: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018, arXiv 1804.04235.
    """
    eps1, eps2 = _split_eps(eps)
    return build(
        sign(maximize),
        scale_by_factored_rms(beta2_decay, eps1),
        scale_by_relative_step_size(learning_rate, eps2, d, weight_decay=weight_decay),
    )
