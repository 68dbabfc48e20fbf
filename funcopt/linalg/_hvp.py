"""Hessian-vector products over pytrees: :func:`hvp`, the reusable :class:`HVPOperator`
built by :func:`hvp_operator` (``"rev"``: vjp of grad, linearized once; ``"fwd"``: jvp of grad),
and the mixed second derivative :func:`mixed_vjp`."""

from __future__ import annotations

from typing import Any, Callable

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree
from funcopt.linalg._common import _non_negative

__all__ = ["HVP_MODES", "HVPOperator", "hvp", "hvp_operator", "mixed_vjp"]

HVP_MODES = ("rev", "fwd")
"""The Hessian-vector product modes: reverse-over-reverse (default) and forward-over-reverse."""


# ------------------------------------------------------------------ Hessian-vector products


def _check_mode(mode: str) -> None:
    if mode not in HVP_MODES:
        raise FuncoptError(
            f"unknown HVP mode {mode!r}; use 'rev' (vjp of grad, linearized once and reused) "
            "or 'fwd' (jvp of grad)."
        )


class HVPOperator:
    """The linear map ``v -> H v + damping * v`` with ``H`` the Hessian of ``f`` at ``params``.

    Built by :func:`hvp_operator`; call it like a function (``op(v)``). In ``"rev"`` mode the
    gradient is linearized once at construction and every call reuses the pullback (one
    backward pass per product); in ``"fwd"`` mode each call runs ``jvp`` of ``grad``.

    Attributes:
        mode: ``"rev"`` or ``"fwd"``.
        params: the point the Hessian is taken at.
        damping: the multiple of the identity added to ``H``.
        num_matvecs: how many products have been computed (a Python counter).
        grad: the gradient of ``f`` at ``params`` (computed by ``"rev"`` mode for free,
            ``None`` in ``"fwd"`` mode).
    """

    def __init__(
        self, f: Callable[..., torch.Tensor], params: PyTree, args: tuple, mode: str, damping: float
    ):
        _check_mode(mode)
        _non_negative("damping", damping, "hvp_operator")
        self.mode = mode
        self.params = params
        self.damping = damping
        self.num_matvecs = 0
        self._spec = _tree.structure(params)

        def grad_at(p):
            return torch.func.grad(f)(p, *args)

        self._grad_fn = grad_at
        if mode == "rev":
            self.grad, self._pullback = torch.func.vjp(grad_at, params)
        else:
            self.grad, self._pullback = None, None

    def __call__(self, v: PyTree) -> PyTree:
        if _tree.structure(v) != self._spec:
            _tree.check_same_structure(v, self.params, ("v", "params"))
        self.num_matvecs += 1
        if self.mode == "rev":
            (out,) = self._pullback(v)
        else:
            _, out = torch.func.jvp(self._grad_fn, (self.params,), (v,))
        if not (isinstance(self.damping, (int, float)) and self.damping == 0):
            out = _tree.add_scaled(out, self.damping, v)
        return out

    def __repr__(self) -> str:
        return f"HVPOperator(mode={self.mode!r}, damping={self.damping!r}, num_matvecs={self.num_matvecs})"


def hvp_operator(
    f: Callable[..., torch.Tensor], params: PyTree, *args: Any, mode: str = "rev", damping: float = 0.0
) -> HVPOperator:
    """Returns the Hessian of ``f`` at ``params`` as a reusable matrix-free operator.

    Like :func:`hvp`, but linearizes once: ``op = hvp_operator(f, params, X, y)`` then
    ``op(v1)``, ``op(v2)``, ... each cost about one backward pass in ``"rev"`` mode. Pass the
    operator as ``matvec`` to any solver of this module.

    Args:
        f: scalar function ``f(params, *args)``; differentiated with respect to ``params``.
        params: pytree of floating-point tensors, the point the Hessian is taken at.
        *args: further arguments of ``f``, held fixed (data, hyperparameters).
        mode: ``"rev"`` (default; vjp of grad, linearized once) or ``"fwd"`` (jvp of grad).
        damping: adds ``damping * v`` to every product (solves ``(H + damping I) x = b``);
            makes an almost singular or slightly indefinite Hessian invertible.

    Returns:
        An :class:`HVPOperator`; ``op(v)`` has the structure and shapes of ``params``.
    """
    return HVPOperator(f, params, args, mode, damping)


def hvp(f: Callable[..., torch.Tensor], params: PyTree, v: PyTree, *args: Any, mode: str = "rev") -> PyTree:
    """Returns the Hessian-vector product ``H v`` of a scalar ``f(params, *args)`` at ``params``.

    Like ``torch.autograd.functional.hvp``, but over pytrees and built from ``torch.func``
    (composes with ``grad``/``vmap``). For several products at the same point use
    :func:`hvp_operator`, which linearizes once.

    Args:
        f: scalar function ``f(params, *args)``.
        params: pytree of tensors.
        v: pytree shaped like ``params``.
        *args: further arguments of ``f``, held fixed.
        mode: ``"rev"`` (vjp of grad) or ``"fwd"`` (jvp of grad); the results agree to rounding.

    Returns:
        A pytree shaped like ``params``.
    """
    return hvp_operator(f, params, *args, mode=mode)(v)


def mixed_vjp(f: Callable[..., torch.Tensor], params: PyTree, hparams: PyTree, v: PyTree) -> PyTree:
    """Returns ``(d^2 f / d hparams d params) v``: the mixed second derivative applied to ``v``.

    Computes ``grad_hparams <grad_params f(params, hparams), v>`` with one ``torch.func.vjp``
    of the parameter gradient taken as a function of ``hparams``. In the implicit hypergradient
    this is the product ``(d^2 L_T / d lambda d w) H^{-1} dL_V/dw``.

    Args:
        f: scalar function ``f(params, hparams)``.
        params: pytree of tensors (the point, held fixed).
        hparams: pytree of tensors, the variables of the outer derivative.
        v: pytree shaped like ``params``.

    Returns:
        A pytree shaped like ``hparams``.
    """
    if _tree.structure(v) != _tree.structure(params):
        _tree.check_same_structure(v, params, ("v", "params"))

    def grad_params(h):
        return torch.func.grad(f, argnums=0)(params, h)

    _, pullback = torch.func.vjp(grad_params, hparams)
    (out,) = pullback(v)
    return out
