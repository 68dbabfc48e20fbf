"""Use ``torch.nn.Module`` models functionally: parameters and buffers as pytrees.

``params, buffers = funcopt.nn.extract(model)`` gives detached copies as dicts keyed by the
module's own names; ``funcopt.nn.apply(model, params, buffers, x)`` calls the module with them
(``torch.func.functional_call``) without touching the module's own tensors, so it works under
``torch.func.grad`` and ``vmap``. ``funcopt.nn.load(model, params)`` writes trained values back.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from funcopt.base import FuncoptError, PyTree

__all__ = ["extract", "apply", "as_function", "load"]


def extract(module: nn.Module, *, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Returns ``(params, buffers)``: dicts from qualified names to tensors.

    With ``copy=True`` (default) the tensors are detached clones, so functional training never
    changes the module; with ``copy=False`` they are detached views sharing its storage.
    """
    if not isinstance(module, nn.Module):
        raise FuncoptError(f"extract expects a torch.nn.Module, got {type(module).__name__}.")
    take = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    params = {k: take(v) for k, v in module.named_parameters()}
    buffers = {k: take(v) for k, v in module.named_buffers()}
    return params, buffers


def apply(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor] | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Calls ``module(*args, **kwargs)`` with ``params`` and ``buffers`` in place of its own
    tensors (``torch.func.functional_call``, strict about names)."""
    tensors = dict(params)
    if buffers:
        tensors.update(buffers)
    return torch.func.functional_call(module, tensors, args, kwargs, strict=True)


def as_function(module: nn.Module) -> Callable[..., Any]:
    """Returns ``f(params, buffers, *args, **kwargs)`` calling ``module`` functionally."""

    def f(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor] | None, *args: Any, **kwargs: Any) -> Any:
        return apply(module, params, buffers, *args, **kwargs)

    return f


def load(module: nn.Module, params: PyTree, buffers: PyTree | None = None, *, strict: bool = True) -> nn.Module:
    """Copies ``params`` (and ``buffers``) into ``module`` in place and returns it.

    Names must be those of ``module.named_parameters()`` (and ``named_buffers()``). With
    ``strict=True`` every parameter must be given; an unknown name, a missing one, or a shape
    mismatch raises ``FuncoptError`` naming it.
    """
    own_params = dict(module.named_parameters())
    own_buffers = dict(module.named_buffers())
    checks = [(dict(params), own_params, "parameter")]
    if buffers is not None:
        checks.append((dict(buffers), own_buffers, "buffer"))
    for given, own, kind in checks:
        extra = sorted(set(given) - set(own))
        missing = sorted(set(own) - set(given)) if strict else []
        if extra or missing:
            raise FuncoptError(
                f"load: {kind} names do not match the module: missing {missing}, unexpected {extra}. "
                "Use the names of module.named_parameters() (as funcopt.nn.extract returns them)."
            )
        for k, v in given.items():
            if own[k].shape != v.shape:
                raise FuncoptError(
                    f"load: {kind} [{k!r}] has shape {tuple(v.shape)} but the module's is {tuple(own[k].shape)}."
                )
    with torch.no_grad():
        for given, own, _ in checks:
            for k, v in given.items():
                own[k].copy_(v)
    return module
