"""Helpers shared by the optimizer declarations: chain assembly and kernel pieces."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from funcopt.base import FuncoptError, GradientTransformation, PyTree, chain
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


# ---------------------------------------------------------------------------------------------
# torch.optim's argument names, answered with funcopt's


class TorchArgumentNameError(FuncoptError, TypeError):
    """An optimizer factory got an argument it does not have (e.g. torch.optim's ``lr``).

    A ``TypeError`` as Python raises for any unexpected keyword, and a ``FuncoptError`` whose
    message names funcopt's equivalent (``learning_rate``; ``b1, b2`` for ``betas``).
    """


# torch.optim's constructor name -> (funcopt's names, how to write it)
_TORCH_EQUIVALENTS = {
    "lr": (("learning_rate",), "learning_rate={v}"),
    "betas": (("b1", "b2"), "b1={v}[0], b2={v}[1]"),
    "history_size": (("memory_size",), "memory_size={v}"),
}
_SWITCHES = ("foreach", "fused", "capturable", "differentiable")


def _unknown_argument(name: str, accepted: tuple[str, ...], given: dict[str, Any]) -> TorchArgumentNameError:
    hints = []
    for key in given:
        if key in accepted:
            continue
        equivalent = _TORCH_EQUIVALENTS.get(key)
        if equivalent is not None and all(n in accepted for n in equivalent[0]):
            written = equivalent[1].replace("{v}[0]", _item(given[key], 0)).replace("{v}[1]", _item(given[key], 1))
            written = written.replace("{v}", repr(given[key]))
            hints.append(f"{key!r} is torch.optim's name; funcopt writes {name}({written})")
        elif key in _SWITCHES:
            hints.append(
                f"{key!r} is a torch.optim implementation switch; funcopt picks its multi-tensor fast route "
                "itself (funcopt.fast.explain says which runs), and funcopt.as_torch_optimizer accepts the switch"
            )
        else:
            hints.append(f"{key!r} is not an argument of {name}")
    return TorchArgumentNameError(
        f"{name}() got unexpected keyword argument(s) {sorted(k for k in given if k not in accepted)}: "
        f"{'; '.join(hints)}. Its arguments are ({', '.join(accepted)})."
    )


def _item(value: Any, i: int) -> str:
    try:
        return repr(value[i])
    except (TypeError, IndexError, KeyError):
        return f"{value!r}[{i}]"


def with_torch_name_hints(factory: Callable[..., Any]) -> Callable[..., Any]:
    """``factory`` answering torch.optim's argument names (``lr=``, ``betas=``) with funcopt's.

    The wrapper keeps the factory's name, docstring, signature (``inspect.signature`` follows
    ``__wrapped__``) and attributes (``fast_route``); a call with keyword arguments the factory
    has raises :class:`TorchArgumentNameError` naming the funcopt equivalent, every other call
    goes through unchanged. Factories taking ``**kwargs`` are returned as they are.
    """
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) or hasattr(factory, "__wrapped_torch_names__"):
        return factory
    accepted = tuple(parameters)
    names = frozenset(accepted)
    name = getattr(factory, "__name__", "optimizer")

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs and not names.issuperset(kwargs):
            raise _unknown_argument(name, accepted, kwargs)
        return factory(*args, **kwargs)

    wrapper.__wrapped_torch_names__ = True  # type: ignore[attr-defined]
    return wrapper


# ---------------------------------------------------------------------------------------------
# Shared by the factories and kernels of optax's catalog


def decay_weights(weight_decay: Any, mask: Mask = None) -> GradientTransformation | None:
    """``add_decayed_weights(weight_decay, mask)``, or no block where ``weight_decay`` is a Python
    zero. Its place in the chain makes it L2 (before the scaling) or decoupled (after it)."""
    return None if is_python_zero(weight_decay) else add_decayed_weights(weight_decay, mask)


def lerp_buffer(call: Any, name: str, x: list[torch.Tensor], weight: Any) -> list[torch.Tensor]:
    """The moving average ``bufs[name] = lerp(bufs[name], x, weight)``, returned: written in place
    where ``call.in_place``, else a new list handed on as the new state buffer."""
    buf = call.bufs[name]
    if call.in_place:
        torch._foreach_lerp_(buf, x, weight)
        return buf
    new = call.bufs[name] = torch._foreach_lerp(buf, x, weight)
    return new
