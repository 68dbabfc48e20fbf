"""Machinery shared by :func:`~funcopt.lr_finder.lr_find` and ``lr_sweep``: optimizer
preparation (setting the injected learning rate), params checks, data cycling, gradient
accumulation and the optional progress bar (tqdm is imported only inside :func:`_bar`).

Private helpers only; the public API is in :mod:`funcopt.lr_finder`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable
from collections.abc import Iterable, Iterator

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree
from funcopt.transforms import InjectHyperparamsState, inject_hyperparams

__all__: list[str] = []


# ---------------------------------------------------------------------------------------------
# Shared machinery: optimizer preparation, data cycling, gradients, progress bar


def _map_injected(state: Any, fn: Callable[[InjectHyperparamsState], InjectHyperparamsState]) -> Any:
    """Rebuilds ``state`` with ``fn`` applied to every ``InjectHyperparamsState`` in it.

    Walks dicts, lists, tuples and NamedTuples; an injected state is visited before the states
    nested in it, so every walk meets them in the same order.
    """
    if isinstance(state, InjectHyperparamsState):
        node = fn(state)
        return node._replace(inner_state=_map_injected(node.inner_state, fn))
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_map_injected(c, fn) for c in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_map_injected(c, fn) for c in state)
    if isinstance(state, dict):
        return {k: _map_injected(c, fn) for k, c in state.items()}
    return state


def _injected_with_lr(state: Any) -> list[InjectHyperparamsState]:
    found: list[InjectHyperparamsState] = []

    def collect(node: InjectHyperparamsState) -> InjectHyperparamsState:
        if "learning_rate" in node.hyperparams:
            found.append(node)
        return node

    _map_injected(state, collect)
    return found


class _LrSetter:
    """Sets the learning rate of every ``inject_hyperparams`` state found in a state tree.

    The first state found is the reference: it gets the ladder value; every other one keeps
    its initial ratio to the reference (param groups with their own injected optimizers).
    """

    def __init__(self, state: Any) -> None:
        nodes = _injected_with_lr(state)
        if not nodes:
            raise FuncoptError(
                "The optimizer's state holds no injected 'learning_rate'. Pass a factory taking "
                "learning_rate (e.g. funcopt.adam, or lambda learning_rate: funcopt.sgd(learning_rate, "
                "momentum=0.9)) or funcopt.inject_hyperparams(factory)(learning_rate=...)."
            )
        values = [float(n.hyperparams["learning_rate"]) for n in nodes]
        if len(values) > 1 and values[0] == 0:
            raise FuncoptError(
                "The first injected learning_rate is 0, so the ratios of the other param groups to it "
                "are undefined; build the optimizer with non-zero learning rates."
            )
        self.ratios = [1.0] + [v / values[0] for v in values[1:]]

    def __call__(self, state: Any, lr: float) -> Any:
        ratios = iter(self.ratios)

        def set_lr(node: InjectHyperparamsState) -> InjectHyperparamsState:
            if "learning_rate" not in node.hyperparams:
                return node
            old = node.hyperparams["learning_rate"]
            new = torch.as_tensor(lr, dtype=old.dtype, device=old.device) * next(ratios)
            return node._replace(hyperparams=dict(node.hyperparams, learning_rate=new))

        return _map_injected(state, set_lr)

    def check(self, state: Any, lr: float | list[float]) -> None:
        """Raises if the reference learning rate after an update is not the one set (a schedule)."""
        now = _injected_with_lr(state)[0].hyperparams["learning_rate"]
        if not torch.equal(now, torch.as_tensor(lr, dtype=now.dtype, device=now.device)):
            raise FuncoptError(
                "The optimizer's injected learning_rate is a schedule, which overrides the value the "
                "range test sets each step. Build it with a constant learning_rate, or pass the factory."
            )


def _prepare(optimizer: Any, params: PyTree, opt_state: Any, first_lr: float) -> tuple[GradientTransformation, Any, _LrSetter]:
    if isinstance(optimizer, GradientTransformation):
        tx = optimizer
        state = tx.init(params) if opt_state is None else opt_state
    elif callable(optimizer):
        if opt_state is not None:
            raise FuncoptError(
                "opt_state is accepted only with an inject_hyperparams transformation (whose state it "
                "is); with a factory the state is built from params."
            )
        try:
            names = inspect.signature(optimizer).parameters
        except (TypeError, ValueError):
            names = None
        if names is not None and "learning_rate" not in names and not any(p.kind is p.VAR_KEYWORD for p in names.values()):
            raise FuncoptError(
                f"The optimizer factory {getattr(optimizer, '__name__', optimizer)!r} has no "
                f"learning_rate argument (it takes {list(names)}). Wrap it: "
                "lambda learning_rate: my_factory(lr=learning_rate)."
            )
        tx = inject_hyperparams(optimizer)(learning_rate=float(first_lr))
        state = tx.init(params)
    else:
        raise TypeError(
            f"optimizer must be an optimizer factory taking learning_rate (e.g. funcopt.adam) or an "
            f"inject_hyperparams transformation, got {type(optimizer).__name__}."
        )
    return tx, state, _LrSetter(state)


def _check_params(params: PyTree, where: str) -> None:
    leaves = _tree.leaves(params)
    if not leaves:
        raise FuncoptError(f"{where}: params has no tensor leaves; pass the parameters to train.")
    for path, leaf in zip(_tree.paths(params), leaves):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            what = f"dtype {leaf.dtype}" if isinstance(leaf, torch.Tensor) else f"type {type(leaf).__name__}"
            raise FuncoptError(
                f"{where}: params leaf {path} has {what}; every leaf is trained, so it must be a "
                "floating-point tensor (close over other values in loss_fn)."
            )


def _scalar_loss(loss_fn: Callable[..., Any]) -> Callable[[PyTree, Any], torch.Tensor]:
    def value(params: PyTree, batch: Any) -> torch.Tensor:
        out = loss_fn(params, batch)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]  # (loss, aux): aux is not used
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"loss_fn must return a 0-dim tensor or a (loss, aux) tuple, got {type(out).__name__}.")
        if out.dim() != 0:
            raise FuncoptError(
                f"loss_fn must return a 0-dim loss, got shape {tuple(out.shape)}; reduce it (e.g. .mean())."
            )
        return out

    return value


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    """Yields batches forever: re-iterates ``data``, or replays a one-shot iterator's batches."""
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches (a list, a DataLoader...), got {type(data).__name__}.")
    empty = FuncoptError("data yielded no batches; pass a non-empty iterable (e.g. [batch]).")
    if isinstance(data, Iterator):  # a generator or iterator can be read once: keep its batches
        seen = []
        for batch in data:
            seen.append(batch)
            yield batch
        if not seen:
            raise empty
        while True:
            yield from seen
    while True:
        count = 0
        for batch in data:
            count += 1
            yield batch
        if count == 0:
            raise empty


def _accumulated(grad_fn: Callable[..., Any], params: Any, batches: Iterator[Any], k: int) -> tuple[Any, torch.Tensor]:
    """The mean gradient and mean loss over the next ``k`` batches."""
    grads, loss = grad_fn(params, next(batches))
    for _ in range(k - 1):
        g, value = grad_fn(params, next(batches))
        grads, loss = _tree.add(grads, g), loss + value
    if k > 1:
        grads, loss = _tree.scale(1.0 / k, grads), loss / k
    return grads, loss


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False)
