"""Muon (``torch.optim.Muon``) and the standard recipe that pairs it with AdamW.

Muon is not elementwise (each step orthogonalizes whole matrices), so it has no fast route:
its reference chain is what runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

from funcopt.base import FuncoptError, GradientTransformation, PyTree, ScalarOrSchedule, chain
from funcopt.optimizers._adam import adamw
from funcopt.transforms import (
    MUON_NS_COEFFICIENTS,
    check_learning_rate,
    is_hidden_matrix,
    multi_transform,
    scale_by_muon,
    scale_by_muon_learning_rate,
)

__all__ = ["muon", "muon_with_adamw"]


def muon(
    learning_rate: ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
) -> GradientTransformation:
    """Muon: momentum orthogonalized by Newton-Schulz, like ``torch.optim.Muon`` (same defaults).

    Each step, per 2-D matrix ``p`` of shape ``A x B``: ``B = lerp(B, g, 1 - momentum)``; the
    direction ``u = lerp(g, B, momentum)`` (Nesterov) or ``B``; ``O = NS(u)``, ``ns_steps``
    quintic Newton-Schulz iterations with ``ns_coefficients``, run in bfloat16 as torch does;
    then ``p <- p * (1 - lr * weight_decay) - lr * ratio * O`` (decoupled weight decay) with
    ``ratio`` from ``adjust_lr_fn``. The chain is :func:`funcopt.scale_by_muon` then
    :func:`funcopt.scale_by_muon_learning_rate`, which computes the step in torch's arithmetic
    (``p + update`` is torch's new ``p`` bitwise for float Python hyperparameters, in float32
    and bfloat16 too, up to the rare element whose value more than doubles or halves).

    Every leaf must be a 2-D matrix: a leaf of another rank raises ``FuncoptError`` naming its
    path. Muon is meant for hidden layers; route embeddings, heads, biases and norms to AdamW
    with :func:`muon_with_adamw`. Not elementwise: no fast route (the reference chain runs).

    Args:
        learning_rate: step size ``lr`` (float, 0-dim tensor or schedule; default 1e-3).
        weight_decay: decoupled weight decay (default 0.1).
        momentum: momentum factor in [0, 1) (default 0.95).
        nesterov: Nesterov momentum (default True).
        ns_coefficients: ``(a, b, c)`` (default ``(3.4445, -4.775, 2.0315)``).
        eps: lower bound of the Frobenius norm the direction is divided by (default 1e-7).
        ns_steps: Newton-Schulz iterations, in [0, 100) (default 5).
        adjust_lr_fn: ``None`` or ``"original"`` (``sqrt(max(1, A / B))``) or
            ``"match_rms_adamw"`` (``0.2 * sqrt(max(A, B))``) (default None).

    Example:
        >>> tx = funcopt.muon(0.02)   # params: a pytree of 2-D matrices
        >>> state = tx.init(params)
        >>> updates, state = tx.update(grads, state, params)

    References: Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/; Liu et al., "Muon is Scalable for LLM
    Training", 2025, arXiv 2502.16982.
    """
    check_learning_rate(learning_rate)
    return chain(
        scale_by_muon(momentum, nesterov, ns_coefficients, eps, ns_steps),
        scale_by_muon_learning_rate(learning_rate, weight_decay, adjust_lr_fn),
    )


def _labels(is_muon_param: Callable[[str, torch.Tensor], bool]) -> Callable[[PyTree], PyTree]:
    """``params -> tree of "muon"/"adamw"`` by structural recursion (paths as ``tree.paths``)."""

    def walk(node: Any, path: str) -> Any:
        if node is None:
            return None
        if isinstance(node, Mapping):
            return {k: walk(v, f"{path}[{k!r}]") for k, v in node.items()}
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[walk(v, f"{path}.{f}") for f, v in zip(node._fields, node)])
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, f"{path}[{i}]") for i, v in enumerate(node))
        label = is_muon_param(path or "<root>", node)
        if not isinstance(label, bool):
            raise FuncoptError(
                f"muon_with_adamw: is_muon_param returned {label!r} for the leaf at {path or '<root>'}; "
                "it must return True (muon) or False (adamw)."
            )
        return "muon" if label else "adamw"

    return lambda params: walk(params, "")


def muon_with_adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    adamw_learning_rate: ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    adamw_b1: float = 0.9,
    adamw_b2: float = 0.999,
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 1e-2,
    is_muon_param: Callable[[str, torch.Tensor], bool] | None = None,
) -> GradientTransformation:
    """The standard Muon recipe: :func:`muon` for hidden matrices, :func:`funcopt.adamw` for the rest.

    A ``funcopt.multi_transform`` with two groups, ``"muon"`` and ``"adamw"``: a leaf goes to
    Muon when ``is_muon_param(path, leaf)`` is True. The default,
    :func:`funcopt.transforms.is_hidden_matrix`, takes the 2-D leaves whose path contains
    neither ``"embed"`` nor ``"head"`` (case-insensitive); embeddings, output heads, biases,
    norms and other ranks go to AdamW. This is ``torch.optim.Muon`` over those matrices and
    ``torch.optim.AdamW`` over the rest, stepped together (same defaults as those classes; the
    AdamW arguments are prefixed ``adamw_``).

    With ``inject_hyperparams``, list a custom predicate as static:
    ``funcopt.inject_hyperparams(funcopt.muon_with_adamw, static_args=("is_muon_param",))``.

    Example:
        >>> tx = funcopt.muon_with_adamw(learning_rate=0.02, adamw_learning_rate=3e-4,
        ...                              is_muon_param=lambda path, p: p.ndim == 2 and "lm_head" not in path)

    References: Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/; Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", 2019, arXiv 1711.05101.
    """
    check_learning_rate(learning_rate)
    check_learning_rate(adamw_learning_rate)
    if is_muon_param is not None and not callable(is_muon_param):
        raise FuncoptError(f"is_muon_param must be a function (path, leaf) -> bool, got {type(is_muon_param).__name__}.")
    groups = {
        "muon": muon(learning_rate, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn),
        "adamw": adamw(adamw_learning_rate, adamw_b1, adamw_b2, adamw_eps, adamw_weight_decay),
    }
    return multi_transform(groups, _labels(is_muon_param or is_hidden_matrix))
