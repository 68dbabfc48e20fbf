"""Orthogonalized updates: Muon's momentum + Newton-Schulz direction (``scale_by_muon``), its
step in torch's arithmetic (``scale_by_muon_learning_rate``) and the default Muon/AdamW split
(``is_hidden_matrix``).

Part of ``funcopt.transforms`` (import the blocks from there or from ``funcopt``). The numerics
follow ``torch.optim.Muon`` (torch 2.13): the Newton-Schulz iteration runs in bfloat16 whatever
the parameter dtype, with torch's operations in torch's order, so that its output is bitwise
torch's for the same input.

The iteration's three non-elementwise operations (the Frobenius norm, the Gram product and the
two ``addmm``) go through small ``torch.autograd.Function`` wrappers whose rule under
``torch.func.vmap`` runs the operation once per member instead of batching it: a batched
bfloat16 ``addmm`` rounds its ``beta * C + alpha * A @ B`` in two steps where the unbatched one
rounds once, so a vmapped ensemble would otherwise drift from K separate runs by bfloat16
noise amplified over the iterations. With the per-member rule K vmapped members equal K
separate steps bitwise. The wrappers' derivatives use the plain operations' formulas (reverse
and forward mode).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, NamedTuple

import torch

from funcopt import tree as _tree
from funcopt.base import (
    EmptyState,
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
    _is_number,
    _lerp,
    check_beta,
    check_learning_rate,
    check_non_negative,
    init_count,
)
from funcopt.transforms._moments import _ema
from funcopt.transforms._scale import ScaleByScheduleState

__all__ = ["ScaleByMuonState", "scale_by_muon", "scale_by_muon_learning_rate", "is_hidden_matrix", "MUON_NS_COEFFICIENTS"]

MUON_NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
"""torch.optim.Muon's default quintic Newton-Schulz coefficients ``(a, b, c)`` (Keller Jordan's)."""

_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
_MAX_NS_STEPS = 100  # torch.optim.Muon rejects ns_steps >= 100


# ---------------------------------------------------------------------------------------------
# Per-member operations under vmap


def _vmap_by_member(apply: Callable[..., torch.Tensor], info: Any, in_dims: tuple, *args: Any):
    """A ``vmap`` rule: ``apply`` on each member's slice (``stack``ed), never one batched call."""
    moved = [a.movedim(d, 0) if d is not None else a for a, d in zip(args, in_dims)]
    outs = [
        apply(*[a[i] if d is not None else a for a, d in zip(moved, in_dims)]) for i in range(info.batch_size)
    ]
    return torch.stack(outs), 0


def _product_tangent(a, b, da, db):
    """``da @ b + a @ db`` with ``None`` for a zero tangent (``None`` if both are)."""
    terms = [t for t in (None if da is None else da @ b, None if db is None else a @ db) if t is not None]
    return None if not terms else terms[0] if len(terms) == 1 else terms[0] + terms[1]


class _Norm(torch.autograd.Function):
    """``x.norm()`` (Frobenius) computed member by member under vmap."""

    @staticmethod
    def forward(x):
        return x.norm()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad):
        x, n = ctx.saved_tensors
        return (x * (grad / n)).masked_fill(n == 0, 0)

    @staticmethod
    def jvp(ctx, dx):
        x, n = ctx.saved_tensors
        return ((x * dx).sum() / n).masked_fill(n == 0, 0)

    @staticmethod
    def vmap(info, in_dims, x):
        return _vmap_by_member(_Norm.apply, info, in_dims, x)


class _MatMul(torch.autograd.Function):
    """``a @ b`` of two matrices computed member by member under vmap."""

    @staticmethod
    def forward(a, b):
        return a @ b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad @ b.mT, a.mT @ grad

    @staticmethod
    def jvp(ctx, da, db):
        a, b = ctx.saved_tensors
        return _product_tangent(a, b, da, db)

    @staticmethod
    def vmap(info, in_dims, a, b):
        return _vmap_by_member(_MatMul.apply, info, in_dims, a, b)


class _AddMM(torch.autograd.Function):
    """``torch.addmm(c, a, b, beta=beta, alpha=alpha)`` computed member by member under vmap."""

    @staticmethod
    def forward(c, a, b, beta, alpha):
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):
        c, a, b, ctx.beta, ctx.alpha = inputs
        ctx.save_for_backward(a, b)
        ctx.save_for_forward(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * ctx.beta, (grad @ b.mT) * ctx.alpha, (a.mT @ grad) * ctx.alpha, None, None

    @staticmethod
    def jvp(ctx, dc, da, db, _beta, _alpha):
        a, b = ctx.saved_tensors
        prod = _product_tangent(a, b, da, db)
        terms = [t for t in (None if dc is None else dc * ctx.beta, None if prod is None else prod * ctx.alpha) if t is not None]
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    @staticmethod
    def vmap(info, in_dims, c, a, b, beta, alpha):
        return _vmap_by_member(lambda c, a, b: _AddMM.apply(c, a, b, beta, alpha), info, in_dims[:3], c, a, b)


def _newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: Any) -> torch.Tensor:
    """torch.optim.Muon's ``_zeropower_via_newtonschulz``: ``steps`` quintic iterations in bfloat16.

    Out of place: torch 2.13 normalizes its input in place, which for a bfloat16 momentum
    buffer without Nesterov is the buffer itself (pytorch/pytorch#194664); here the input is
    never written.
    """
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.mT
    norm = _Norm.apply(x)
    x = x / norm.clamp(min=eps.to(norm.dtype) if isinstance(eps, torch.Tensor) else eps)
    for _ in range(steps):
        gram = _MatMul.apply(x, x.mT)
        gram_update = _AddMM.apply(gram, gram, gram, b, c)
        x = _AddMM.apply(x, gram_update, x, a, 1.0)
    return x.mT if tall else x


def _whole_matrix(u: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(u)`` on the whole matrix. For a DTensor ``u`` (an FSDP2 shard) every rank all-gathers
    the matrix (``full_tensor``), computes ``fn`` on it (the same bits on every rank: the
    unsharded result) and keeps its own shard, without further communication."""
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless loaded
    if module is None or not isinstance(u, module.DTensor):
        return fn(u)
    placements = [module.Replicate() if p.is_partial() else p for p in u.placements]
    return module.distribute_tensor(fn(u.full_tensor()), u.device_mesh, placements, src_data_rank=None)


def _lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch's ``_adjust_lr`` factor for a matrix of ``shape``."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


# ---------------------------------------------------------------------------------------------
# The block


@stable_name("funcopt.ScaleByMuonState")
class ScaleByMuonState(NamedTuple):
    """State of :func:`scale_by_muon`: the 0-dim int64 step count and the momentum buffer
    (``torch.optim.Muon``'s ``momentum_buffer``), shaped like the params."""

    count: torch.Tensor
    momentum_buffer: PyTree


def _check_matrices(tree: PyTree, what: str) -> None:
    for path, x in zip(_tree.paths(tree), _tree.leaves(tree)):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            continue  # empty leaves are the placeholders of masked / multi_transform
        if x.ndim != 2 or not torch.is_floating_point(x):
            kind = f"a {x.ndim}-D tensor of shape {tuple(x.shape)}" if x.ndim != 2 else f"a {x.dtype} tensor"
            raise FuncoptError(
                f"muon orthogonalizes real 2-D matrices only; the {what} leaf at {path} is {kind}. "
                "Route such leaves (biases, norms, embeddings, heads, convolution kernels) to adamw: "
                "funcopt.muon_with_adamw(...) does it, or funcopt.multi_transform({'muon': "
                "funcopt.muon(...), 'adamw': funcopt.adamw(...)}, labels) with your own labels."
            )


def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
) -> GradientTransformation:
    """Muon's direction: momentum, then the Newton-Schulz orthogonalization (``optax.scale_by_muon``'s role).

    Per 2-D leaf, as ``torch.optim.Muon``: ``B = lerp(B, g, 1 - momentum)`` (``B`` starts at
    zero), ``u = lerp(g, B, momentum)`` with ``nesterov=True`` else ``u = B``; returns ``O``,
    ``ns_steps`` iterations of ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` from ``X =
    u / max(||u||_F, eps)`` (on the transpose of a tall matrix), computed in bfloat16 as torch
    does (bitwise torch's), then cast to the leaf's dtype. The learning rate, its adjustment to
    the matrix shape and the decoupled weight decay are :func:`scale_by_muon_learning_rate`'s.

    Leaves must be real 2-D matrices (``FuncoptError`` naming the path otherwise); empty leaves
    (the placeholders ``masked``/``multi_transform`` put for other groups' leaves) pass through.
    Not elementwise: no fast route. A DTensor leaf (FSDP2) is all-gathered for the iteration
    (one ``A x B`` all-gather per matrix per step, the iteration repeated on every rank) and
    each rank keeps its shard: the same numbers as unsharded.

    Args:
        momentum: momentum factor in [0, 1) (default 0.95).
        nesterov: Nesterov momentum (default True).
        ns_coefficients: ``(a, b, c)`` of the quintic iteration (default ``MUON_NS_COEFFICIENTS``).
        eps: lower bound of the norm ``u`` is divided by (default 1e-7).
        ns_steps: Newton-Schulz iterations, an int in [0, 100) (default 5).

    References: Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/.
    """
    check_beta("momentum", momentum)
    check_non_negative("eps", eps)
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 0 <= ns_steps < _MAX_NS_STEPS:
        raise FuncoptError(f"ns_steps must be an int in [0, {_MAX_NS_STEPS}) (as in torch.optim.Muon), got {ns_steps!r}.")
    if not isinstance(ns_coefficients, (tuple, list)) or len(ns_coefficients) != 3:
        raise FuncoptError(f"ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}.")
    for name, value in zip("abc", ns_coefficients):
        if isinstance(value, torch.Tensor):
            raise FuncoptError(f"ns_coefficients must be Python numbers, got a tensor for {name}.")
        _check_range(f"ns_coefficients {name}", value)
    if not isinstance(nesterov, bool):
        raise FuncoptError(f"nesterov must be True or False, got {nesterov!r}.")
    coefficients = tuple(float(v) for v in ns_coefficients)

    def orthogonalize(u: torch.Tensor) -> torch.Tensor:
        return _newton_schulz(u, coefficients, ns_steps, eps).to(u.dtype)

    def direction(u: torch.Tensor) -> torch.Tensor:
        return u if u.numel() == 0 else _whole_matrix(u, orthogonalize)

    def init(params):
        _check_matrices(params, "params")
        return ScaleByMuonState(init_count(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        check_state(state, ScaleByMuonState, "scale_by_muon")
        _check_matrices(updates, "updates")
        buf = _ema(state.momentum_buffer, updates, momentum, names=("momentum_buffer", "updates"))
        u = _tree.map(lambda g, b: _lerp(g, b, momentum), updates, buf) if nesterov else buf
        return _tree.map(direction, u), ScaleByMuonState(state.count + 1, buf)

    return GradientTransformation(init, update)


def scale_by_muon_learning_rate(
    learning_rate: ScalarOrSchedule, weight_decay: float = 0.0, adjust_lr_fn: str | None = None
) -> GradientTransformation:
    """Muon's step from its direction ``O``: decoupled weight decay and the shape-adjusted learning rate.

    Returns the update that takes ``p`` to ``p * (1 - lr * weight_decay) - lr * ratio * O``,
    computed in ``torch.optim.Muon``'s arithmetic (``torch.add(p * (1 - lr * wd), O,
    alpha=-lr * ratio)``, then minus ``p``): ``p + update`` is then torch's new ``p`` bitwise
    wherever the new value is within a factor 2 of the old (Sterbenz), in every dtype. This
    matters for Muon more than for other optimizers: its bfloat16 Newton-Schulz turns a
    one-ulp difference in a float32 gradient into a bfloat16-ulp (``2**-8``) difference in the
    step, so a trajectory computed as ``-lr * (ratio * O + wd * p)`` (mathematically the same)
    drifts from torch's by percents within tens of steps.

    ``ratio`` is torch's learning-rate adjustment for an ``A x B`` matrix:
    ``sqrt(max(1, A / B))`` for ``adjust_lr_fn=None`` or ``"original"`` (Keller Jordan's),
    ``0.2 * sqrt(max(A, B))`` for ``"match_rms_adamw"`` (Moonshot's, to reuse AdamW's learning
    rate and weight decay). The weight decay uses the unadjusted ``lr``, as torch does.
    ``learning_rate`` is a float, a 0-dim tensor or a schedule ``count -> value`` (as in
    :func:`scale_by_learning_rate`); ``weight_decay`` a float or a 0-dim tensor.

    References: Liu et al., "Muon is Scalable for LLM Training", 2025, arXiv 2502.16982.
    """
    check_learning_rate(learning_rate)
    check_non_negative("weight_decay", weight_decay)
    if adjust_lr_fn not in _ADJUST_LR_FNS:
        raise FuncoptError(f"adjust_lr_fn must be one of {_ADJUST_LR_FNS}, got {adjust_lr_fn!r}.")
    scheduled = callable(learning_rate)

    def step(d: torch.Tensor, p: torch.Tensor, lr: Any) -> torch.Tensor:
        if d.numel() == 0:
            return d
        ratio = _lr_ratio(d.shape, adjust_lr_fn)
        if _is_number(lr) and _is_number(weight_decay):
            decayed = p if weight_decay == 0 else p * (1 - lr * weight_decay)
            return torch.add(decayed, d, alpha=-(lr * ratio)) - p
        decay = 1 - lr * weight_decay
        alpha = -(lr * ratio)
        if isinstance(alpha, torch.Tensor) and alpha.dtype != p.dtype:
            alpha = alpha.to(p.dtype)
        return torch.addcmul(p * decay, d, alpha) - p

    def init(params):
        return ScaleByScheduleState(count=init_count(params)) if scheduled else EmptyState()

    def update(updates, state, params=None, **extra_args):
        require_params(params, "scale_by_muon_learning_rate")
        if scheduled:
            check_state(state, ScaleByScheduleState, "scale_by_muon_learning_rate")
            lr = learning_rate(state.count)
            state = ScaleByScheduleState(count=state.count + 1)
        else:
            lr = learning_rate
        out = _tree.map(lambda d, p: step(d, p, lr), updates, params, names=("updates", "params"))
        return out, state

    return GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# The standard Muon/AdamW split


def is_hidden_matrix(path: str, leaf: torch.Tensor) -> bool:
    """The default split of :func:`funcopt.muon_with_adamw`: True for a leaf Muon should take.

    True when ``leaf`` is 2-D and its path (``funcopt.tree.paths`` style, e.g.
    ``"['encoder']['w']"`` or ``"['lm_head.weight']"``), lower-cased, contains neither
    ``"embed"`` nor ``"head"``; embeddings, output heads, biases, norms, scalars and tensors of
    other ranks (convolution kernels) go to AdamW. Write your own ``(path, leaf) -> bool``
    for other naming schemes.
    """
    name = path.lower()
    return leaf.ndim == 2 and "embed" not in name and "head" not in name
