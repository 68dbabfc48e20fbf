"""The fast path's kernels: torch's fused and foreach multi-tensor ops (``funcopt.fused``).

Private helpers of :mod:`funcopt.fused`. Adam, AdamW, SGD and Adagrad run torch's fused
kernels (``torch._fused_adam_`` and friends, the kernels behind ``torch.optim``'s
``fused=True``); RMSprop and Lion run ``torch._foreach_*`` ops.
"""

from __future__ import annotations

import torch

__all__: list[str] = []


# ---------------------------------------------------------------------------------------------
# Kernels. Each takes flat leaf lists for one dtype group and either returns fresh update
# tensors (pure) or writes the new params into ``p`` (donate). State buffers are written in
# place; in the pure case the caller passes fresh copies.


def _fold_l2(g: list[torch.Tensor], p: list[torch.Tensor], wd: float, maximize: bool) -> list[torch.Tensor]:
    """Fresh ``(-g if maximize else g) + wd * p`` (L2 weight decay added to the gradient)."""
    out = torch._foreach_neg(g) if maximize else [x.clone() for x in g]
    torch._foreach_add_(out, p, alpha=wd)
    return out


def _adam_kernel(h, lr, p, g, mu, nu, nu_max, step, donate, decoupled):
    wd, maximize = h["weight_decay"], h["maximize"]
    steps = [step] * len(g)
    common = dict(beta1=h["b1"], beta2=h["b2"], eps=h["eps"], amsgrad=nu_max is not None)
    if donate:
        fn = torch._fused_adamw_ if decoupled else torch._fused_adam_
        fn(p, g, mu, nu, nu_max or [], steps, lr=lr, weight_decay=wd, maximize=maximize, **common)
        return p
    if wd and not decoupled:
        g, maximize = _fold_l2(g, p, wd, maximize), False
    out = [torch.zeros_like(x) for x in g]
    torch._fused_adam_(out, g, mu, nu, nu_max or [], steps, lr=lr, weight_decay=0.0, maximize=maximize, **common)
    if wd and decoupled:
        torch._foreach_add_(out, p, alpha=-lr * wd)
    return out


def _sgd_kernel(h, lr, p, g, buf, first, donate):
    """SGD; returns (out, momentum buffers), the buffers new lists where pure."""
    wd, maximize = h["weight_decay"], h["maximize"]
    momentum = h["momentum"] if buf is not None else 0.0
    kwargs = dict(
        momentum=momentum, lr=lr, dampening=h["dampening"], nesterov=h["nesterov"], is_first_step=first
    )
    if donate:
        torch._fused_sgd_(p, g, buf or [], weight_decay=wd, maximize=maximize, **kwargs)
        return p, buf
    if wd:
        g, maximize = _fold_l2(g, p, wd, maximize), False
    if buf is None:
        return torch._foreach_mul(g, lr if maximize else -lr), None
    if h["dampening"] == 0 and not h["nesterov"] and not maximize:
        # Two passes instead of the kernel's four (zeroed output, buffer copy, kernel, add):
        # the new buffer g + momentum * buf, then the update -lr * buffer.
        new_buf = [x.clone() for x in g] if first else torch._foreach_add(g, buf, alpha=momentum)
        return torch._foreach_mul(new_buf, -lr), new_buf
    out = [torch.zeros_like(x) for x in g]
    new_buf = [torch.empty_like(x) for x in g] if first else [x.clone() for x in buf]
    torch._fused_sgd_(out, g, new_buf, weight_decay=0.0, maximize=maximize, **kwargs)
    return out, new_buf


def _adagrad_kernel(h, lr, p, g, acc, step, donate):
    wd, maximize = h["weight_decay"], h["maximize"]
    steps = [step] * len(g)
    if donate:
        torch._fused_adagrad_(p, g, acc, steps, lr=lr, lr_decay=0.0, weight_decay=wd, eps=h["eps"], maximize=maximize)
        return p
    if wd:
        g, maximize = _fold_l2(g, p, wd, maximize), False
    out = [torch.zeros_like(x) for x in g]
    torch._fused_adagrad_(out, g, acc, steps, lr=lr, lr_decay=0.0, weight_decay=0.0, eps=h["eps"], maximize=maximize)
    return out


def _signed_grads(h, p, g):
    """The gradient after the chain's sign flip and L2 term (``g`` itself, read-only, if neither)."""
    wd, maximize = h.get("weight_decay", 0.0), h.get("maximize", False)
    if wd:
        return _fold_l2(g, p, wd, maximize)
    return torch._foreach_neg(g) if maximize else g


def _rmsprop_kernel(h, lr, p, g, nu, mu, buf, first, donate):
    """RMSprop with ``torch._foreach_*`` ops; returns (out, nu, mu, buf), new lists where pure."""
    g = _signed_grads(h, p, g)
    w = 1 - h["alpha"]
    g2 = torch._foreach_mul(g, g)
    if donate:
        torch._foreach_lerp_(nu, g2, w)
    else:
        nu = torch._foreach_lerp(nu, g2, w)
    if mu is not None:
        if donate:
            torch._foreach_lerp_(mu, g, w)
        else:
            mu = torch._foreach_lerp(mu, g, w)
        denom = g2  # reuse the scratch: denom = sqrt(nu - mu * mu)
        torch._foreach_copy_(denom, mu)
        torch._foreach_mul_(denom, mu)
        torch._foreach_sub_(denom, nu)
        torch._foreach_neg_(denom)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(nu)
        del g2
    torch._foreach_add_(denom, h["eps"])
    direction = torch._foreach_div(g, denom)
    del denom
    if buf is not None:
        if donate:
            if first:
                torch._foreach_copy_(buf, direction)
            else:
                torch._foreach_mul_(buf, h["momentum"])
                torch._foreach_add_(buf, direction)
        elif first:
            buf = direction
        else:
            buf = torch._foreach_mul(buf, h["momentum"])
            torch._foreach_add_(buf, direction)
        direction = buf
    if donate:
        torch._foreach_add_(p, direction, alpha=-lr)
        return p, nu, mu, buf
    return torch._foreach_mul(direction, -lr), nu, mu, buf


def _lion_kernel(h, lr, p, g, mu, donate):
    """Lion with ``torch._foreach_*`` ops; returns (out, mu), new lists where pure."""
    direction = torch._foreach_lerp(mu, g, 1 - h["b1"])
    torch._foreach_sign_(direction)
    if donate:
        torch._foreach_lerp_(mu, g, 1 - h["b2"])
    else:
        mu = torch._foreach_lerp(mu, g, 1 - h["b2"])
    wd = h["weight_decay"]
    if wd:
        torch._foreach_add_(direction, p, alpha=wd)
    if donate:
        torch._foreach_add_(p, direction, alpha=-lr)
        return p, mu
    torch._foreach_mul_(direction, -lr)
    return direction, mu
