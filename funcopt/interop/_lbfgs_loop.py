"""torch.optim.LBFGS's inner loop for :func:`funcopt.as_torch_optimizer` (private).

``torch.optim.LBFGS.step(closure)`` runs up to ``max_iter`` iterations, stopping early on its
tolerances; a funcopt transformation's ``update`` is one iteration. Given any of torch's
LBFGS-only arguments (``max_iter``, ``max_eval``, ``tolerance_grad``, ``tolerance_change``,
``line_search_fn``), the adapter's ``step(closure)`` runs that loop around the
transformation's update, with torch's defaults for the ones not given.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from funcopt.base import FuncoptError, GradientTransformation
from funcopt.solvers import lbfgs

__all__: list[str] = []

OPTIONS = ("max_iter", "max_eval", "tolerance_grad", "tolerance_change")


class LbfgsLoop:
    """The stopping rules of ``torch.optim.LBFGS.step`` around one update per iteration."""

    def __init__(self, max_iter: int, max_eval: int, tolerance_grad: float, tolerance_change: float):
        self.max_iter, self.max_eval = max_iter, max_eval
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change

    @staticmethod
    def take(tx: Any, kwargs: dict[str, Any]) -> LbfgsLoop | None:
        """Pops torch's LBFGS-only arguments from ``kwargs`` (mapping ``line_search_fn`` onto
        ``funcopt.lbfgs``'s ``linesearch``); the loop they ask for, or None where none is given."""
        given = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
        has_ls = "line_search_fn" in kwargs
        line_search_fn = kwargs.pop("line_search_fn", None)
        if not given and not has_ls:
            return None
        named = sorted([*given, *(["line_search_fn"] if has_ls else [])])
        if tx is lbfgs:  # torch's arguments, torch's default for the line search too (none)
            if line_search_fn not in (None, "strong_wolfe"):
                raise FuncoptError(
                    f"as_torch_optimizer(lbfgs): line_search_fn must be None or 'strong_wolfe' (as in "
                    f"torch.optim.LBFGS), got {line_search_fn!r}."
                )
            if "linesearch" in kwargs and has_ls:
                raise FuncoptError("as_torch_optimizer(lbfgs): pass line_search_fn (torch's name) or linesearch, not both.")
            kwargs.setdefault("linesearch", None if line_search_fn is None else "zoom")
            if "lr" not in kwargs and "learning_rate" not in kwargs:
                kwargs["learning_rate"] = 1.0  # torch.optim.LBFGS's defaults
            if "history_size" not in kwargs and "memory_size" not in kwargs:
                kwargs["memory_size"] = 100
        elif has_ls:
            raise FuncoptError(
                "as_torch_optimizer: line_search_fn is torch.optim.LBFGS's; it maps onto funcopt.lbfgs's "
                "linesearch= (pass the factory funcopt.lbfgs, or build the transformation with "
                "funcopt.lbfgs(linesearch=...) yourself)."
            )
        elif not isinstance(tx, GradientTransformation):
            raise FuncoptError(
                f"as_torch_optimizer: {named} are torch.optim.LBFGS's arguments, for a transformation "
                "driven by step(closure) such as funcopt.lbfgs; "
                f"{getattr(tx, '__name__', type(tx).__name__)} takes one step per call."
            )
        max_iter = given.get("max_iter", 20)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise FuncoptError(f"as_torch_optimizer: max_iter must be a positive int, got {max_iter!r}.")
        max_eval = given.get("max_eval")
        max_eval = max_iter * 5 // 4 if max_eval is None else max_eval
        if isinstance(max_eval, bool) or not isinstance(max_eval, int) or max_eval < 1:
            raise FuncoptError(f"as_torch_optimizer: max_eval must be a positive int or None, got {max_eval!r}.")
        tolerances = {k: given.get(k, 1e-7 if k == "tolerance_grad" else 1e-9) for k in OPTIONS[2:]}
        for k, v in tolerances.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise FuncoptError(f"as_torch_optimizer: {k} must be a number >= 0, got {v!r}.")
        return LbfgsLoop(max_iter, max_eval, float(tolerances["tolerance_grad"]), float(tolerances["tolerance_change"]))

    def group_keys(self) -> dict[str, Any]:
        """The entries torch.optim.LBFGS keeps in its param group (read back at each step)."""
        return {"max_iter": self.max_iter, "max_eval": self.max_eval,
                "tolerance_grad": self.tolerance_grad, "tolerance_change": self.tolerance_change}

    def run(self, group: dict[str, Any], closure: Callable[[], Any],
            iterate: Callable[[Callable[[], Any], Any], None]) -> Any:
        """``torch.optim.LBFGS.step``'s loop over ``group``'s params, with the loop settings the
        group holds now: ``iterate(closure, loss)`` is one update in place.

        Returns the loss of the first evaluation, as torch does."""
        params = list(group["params"])
        max_iter, max_eval = int(group.get("max_iter", self.max_iter)), int(group.get("max_eval", self.max_eval))
        tolerance_grad = float(group.get("tolerance_grad", self.tolerance_grad))
        tolerance_change = float(group.get("tolerance_change", self.tolerance_change))
        calls = [0]

        def counted() -> Any:
            calls[0] += 1
            with torch.enable_grad():
                return closure()

        def grad_max() -> float:
            return max((float(p.grad.abs().max()) for p in params if p.grad is not None and p.grad.numel()), default=0.0)

        orig_loss = loss = counted()
        if grad_max() <= tolerance_grad:
            return orig_loss
        prev = float(loss)
        for n_iter in range(1, max_iter + 1):
            before = [p.detach().clone() for p in params]
            iterate(counted, loss)
            if n_iter == max_iter:
                break
            loss = counted()  # the loss and gradients at the new point, for the next iteration
            if calls[0] >= max_eval or grad_max() <= tolerance_grad:
                break
            moved = max((float((p.detach() - b).abs().max()) for p, b in zip(params, before) if b.numel()), default=0.0)
            if moved <= tolerance_change or abs(float(loss) - prev) < tolerance_change:
                break
            prev = float(loss)
        return orig_loss
