"""SGD: its reference chain and its fast route, declared together."""

from __future__ import annotations

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule
from funcopt.fast import FastRoute, KernelCall, declare
from funcopt.optimizers._common import build, fold_l2, l2, sign
from funcopt.transforms import check_learning_rate, is_python_zero, scale_by_learning_rate, trace

__all__ = ["sgd"]


def _sgd_kernel(call: KernelCall) -> list[torch.Tensor]:
    """torch's ``_fused_sgd_`` in place; for pure updates two foreach ops where they suffice."""
    h, lr, p, g, bufs = call.h, call.lr, call.p, call.g, call.bufs
    buf = bufs["momentum_buffer"]
    wd, maximize = h["weight_decay"], h["maximize"]
    momentum = h["momentum"] if buf is not None else 0.0
    first = buf is not None and call.first
    kwargs = dict(momentum=momentum, lr=lr, dampening=h["dampening"], nesterov=h["nesterov"], is_first_step=first)
    if call.in_place:
        if buf is not None and momentum == 0.0:
            # a momentum injected as a tensor keeps its buffer even at 0, which torch's kernel
            # refuses: the pure path computes the step, written into the caller's buffers
            fresh = dict(bufs)
            out = _sgd_kernel(call._replace(in_place=False, write_params=False, bufs=fresh))
            torch._foreach_copy_(buf, fresh["momentum_buffer"])
            torch._foreach_add_(p, out)
            return p
        torch._fused_sgd_(p, g, buf or [], weight_decay=wd, maximize=maximize, **kwargs)
        return p
    if wd:
        g, maximize = fold_l2(g, p, wd, maximize), False
    if buf is None:
        return torch._foreach_mul(g, lr if maximize else -lr)
    if momentum == 0.0:
        # an injected momentum of 0 (torch's kernel takes no buffer then): the buffer is the
        # (damped after the first step) gradient, and the update follows it
        d = torch._foreach_neg(g) if maximize else g
        damp = h["dampening"]
        new_buf = [x.clone() for x in d] if first or damp == 0 else torch._foreach_mul(d, 1.0 - damp)
        bufs["momentum_buffer"] = new_buf
        return torch._foreach_mul(d if h["nesterov"] else new_buf, -lr)
    if h["dampening"] == 0 and not h["nesterov"] and not maximize:
        # Two passes instead of the kernel's four (zeroed output, buffer copy, kernel, add):
        # the new buffer g + momentum * buf, then the update -lr * buffer.
        new_buf = [x.clone() for x in g] if first else torch._foreach_add(g, buf, alpha=momentum)
        bufs["momentum_buffer"] = new_buf
        return torch._foreach_mul(new_buf, -lr)
    out = [torch.zeros_like(x) for x in g]
    new_buf = [torch.empty_like(x) for x in g] if first else [x.clone() for x in buf]
    torch._fused_sgd_(out, g, new_buf, weight_decay=0.0, maximize=maximize, **kwargs)
    bufs["momentum_buffer"] = new_buf
    return out


@declare(
    FastRoute(
        _sgd_kernel,
        hyperparams=("momentum", "dampening", "weight_decay"),
        flags=("nesterov", "maximize"),
        buffers=("momentum_buffer",),
        needs_first_step=True,
        copies_for_pure_step=True,  # measured: 2.35x torch fused on copies, 2.65x as update + add (S1)
    )
)
def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent with optional momentum, like ``torch.optim.SGD``.

    ``g += weight_decay * p``; with momentum ``b = g`` at the first step, then
    ``b = momentum * b + (1 - dampening) * g``; the step is ``-lr * b`` (or
    ``-lr * (g + momentum * b)`` with ``nesterov=True``).

    Example:
        >>> tx = funcopt.sgd(0.1, momentum=0.9)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(grads, state, params)
        >>> params = funcopt.apply_updates(params, updates)

    References: Sutskever et al., "On the importance of initialization and momentum in deep
    learning", 2013.
    """
    check_learning_rate(learning_rate)
    return build(
        sign(maximize),
        l2(weight_decay),
        None if is_python_zero(momentum) and not nesterov else trace(momentum, dampening=dampening, nesterov=nesterov),
        scale_by_learning_rate(learning_rate),
    )
