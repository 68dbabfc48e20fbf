"""Pieces of :meth:`FuncoptOptimizer.step` (private): gradients with torch.optim's ``None``
rule, the state of skipped parameters kept, state tensors unaliased from params and grads."""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree


def unalias(state: Any, given: list[torch.Tensor]) -> Any:
    """Clones the state tensors that are (or view) one of the tensors ``given`` to ``update``.

    The parameters are written in place after each step and ``.grad`` is zeroed or accumulated
    into; a state leaf kept by reference would silently change with them. Tensors are matched
    by identity (``x is t`` or ``x._base is t``), never by storage pointer, so that the check
    works for tensor subclasses without storage (FSDP2's ``DTensor``).
    """
    ids = {id(t) for t in given}

    def fix(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and (id(x) in ids or id(getattr(x, "_base", None)) in ids):
            return x.clone()
        return x

    return _tree.map(fix, state)


def keep_skipped(old: Any, new: Any, spec: Any, skipped: list[bool]) -> Any:
    """``new`` with the entries of skipped parameters taken from ``old``.

    Every node of the state shaped like the params tree (``spec``: moments, momentum buffers,
    accumulators) is merged leaf by leaf; the rest (step counts, hyperparameters) is ``new``'s.
    """

    def go(o: Any, n: Any) -> Any:
        if isinstance(n, torch.Tensor) or n is None:
            return n
        if _tree.structure(n) == spec and _tree.structure(o) == spec:
            leaves = [a if s else b for a, b, s in zip(_tree.leaves(o), _tree.leaves(n), skipped)]
            return optree.tree_unflatten(spec, leaves)
        if isinstance(n, tuple) and hasattr(n, "_fields") and type(o) is type(n):
            return type(n)(*(go(a, b) for a, b in zip(o, n)))
        if isinstance(n, (tuple, list)) and type(o) is type(n) and len(o) == len(n):
            return type(n)(go(a, b) for a, b in zip(o, n))
        if isinstance(n, dict) and isinstance(o, dict) and set(o) == set(n):
            return {k: go(o[k], v) for k, v in n.items()}
        return n

    return go(old, new)


def gather_grads(paths: list[str], leaves: list[torch.Tensor], where: str, zeros: bool) -> tuple[list, list[bool]]:
    """Each parameter's ``.grad`` (detached) and whether it has one; ``zeros``: a ``None`` is a
    zero gradient (as ``torch.optim.LBFGS`` reads it), else it stays ``None`` (skipped)."""
    grads: list[Any] = []
    have: list[bool] = []
    for path, p in zip(paths, leaves):
        g = p.grad
        if g is None:
            grads.append(torch.zeros_like(p) if zeros else None)
            have.append(zeros)
            continue
        if g.is_sparse:
            raise TypeError(f"FuncoptOptimizer: the gradient of {where}{path} is sparse; funcopt needs dense gradients.")
        grads.append(g.detach())
        have.append(True)
    return grads, have


def evaluator(closure: Callable[[], Any], leaves: list[torch.Tensor], spec: Any, paths: list[str],
              where: str) -> Callable[[PyTree], tuple]:
    """``value_and_grad_fn`` for line searches: the closure evaluated at trial params."""

    def value_and_grad(trial: PyTree) -> tuple[torch.Tensor, PyTree]:
        with torch.no_grad():
            for p, t in zip(leaves, _tree.leaves(trial)):
                p.copy_(t)
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, torch.Tensor):
            raise FuncoptError(f"the closure passed to step() must return the loss tensor, got {type(loss).__name__}.")
        grads, _ = gather_grads(paths, leaves, where, zeros=True)
        return loss.detach(), optree.tree_unflatten(spec, [g.clone() for g in grads])

    return value_and_grad


def groups_transformation(txs: list[GradientTransformation]) -> GradientTransformation:
    def init(params):
        return tuple(tx.init(p) for tx, p in zip(txs, params))

    def update(updates, state, params=None, **extra):
        ps = params if params is not None else (None,) * len(txs)
        out = [tx.update(u, s, p, **extra) for tx, u, s, p in zip(txs, updates, state, ps)]
        return tuple(u for u, _ in out), tuple(s for _, s in out)

    return GradientTransformation(init, update)
