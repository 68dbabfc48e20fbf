"""Helpers shared by the optimizer declarations: chain assembly and kernel pieces."""

from __future__ import annotations

from typing import Any, Callable

import torch

from funcopt.base import GradientTransformation, PyTree, chain
from funcopt.transforms import add_decayed_weights, is_python_zero, scale

__all__: list[str] = []

Mask = PyTree | Callable[[PyTree], PyTree] | None


def build(*parts: GradientTransformation | None) -> GradientTransformation:
    """``chain`` of the blocks that are not None."""
    return chain(*[p for p in parts if p is not None])


def sign(maximize: bool) -> GradientTransformation | None:
    return scale(-1.0) if maximize else None


def l2(weight_decay: Any) -> GradientTransformation | None:
    return None if is_python_zero(weight_decay) else add_decayed_weights(weight_decay)


# ---------------------------------------------------------------------------------------------
# Kernel pieces (flat leaf lists of one dtype group)


def fold_l2(g: list[torch.Tensor], p: list[torch.Tensor], wd: float, maximize: bool) -> list[torch.Tensor]:
    """Fresh ``(-g if maximize else g) + wd * p`` (L2 weight decay added to the gradient)."""
    out = torch._foreach_neg(g) if maximize else [x.clone() for x in g]
    torch._foreach_add_(out, p, alpha=wd)
    return out


def signed_grads(h: dict[str, Any], p: list[torch.Tensor] | None, g: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient after the chain's sign flip and L2 term (``g`` itself, read-only, if neither)."""
    wd, maximize = h.get("weight_decay", 0.0), h.get("maximize", False)
    if wd:
        return fold_l2(g, p, wd, maximize)
    return torch._foreach_neg(g) if maximize else g


def finish(call: Any, direction: list[torch.Tensor], owned: bool = False) -> list[torch.Tensor]:
    """The step ``-lr * direction``: added into the params in place, or as fresh updates.

    ``owned``: ``direction`` is the kernel's own scratch (nothing else holds it), so a pure
    step scales it in place instead of allocating the updates anew.
    """
    if call.in_place:
        torch._foreach_add_(call.p, direction, alpha=-call.lr)
        return call.p
    if owned:
        torch._foreach_mul_(direction, -call.lr)
        return direction
    return torch._foreach_mul(direction, -call.lr)
