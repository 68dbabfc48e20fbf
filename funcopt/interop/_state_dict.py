"""Convert ``torch.optim`` state_dicts to funcopt optimizer states and back.

A running ``torch.optim`` training can be continued with funcopt (:func:`from_torch`) and a
funcopt training with ``torch.optim`` (:func:`to_torch`): the trajectories continue as if no
switch had happened (float tolerance; bitwise for most optimizers in float64). Supported:
``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``Adamax``, ``NAdam``, ``RAdam`` and
``LBFGS`` (its curvature history; see :func:`from_torch` for when trajectories coincide).
``Adafactor``'s row/column factors (``row_var``/``col_var``, not shaped like the params) map to
``ScaleByAdafactorState.v_row``/``v_col`` and its ``variance`` to ``v``.
``Adadelta``, ``Rprop`` and ``ASGD`` map field by field under torch's names; ASGD's
per-parameter ``eta``/``mu`` (equal across parameters) map to the one ``ScaleByAsgdState.eta``/``mu``.
``Muon``'s ``momentum_buffer`` maps to ``ScaleByMuonState.momentum_buffer``; torch keeps no step
for Muon (none is written; a converted state's count is 1, which Muon's numerics do not use).

torch indexes its per-parameter state by position (0, 1, ... in the order the parameters were
given to the optimizer); funcopt keys it by pytree path. The two are matched by the order of the
params pytree: a dict's insertion order (what ``funcopt.nn.extract(model)`` returns, which is
``model.named_parameters()`` order), a list's index order, or an explicit ``order=`` list of
paths.

Example:
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)   # ... trained for a while
    >>> params, buffers = funcopt.nn.extract(model)
    >>> tx, state = funcopt.interop.from_torch(opt, params)
    >>> # ... continue with tx.update(grads, state, params)
    >>> opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> opt2.load_state_dict(funcopt.interop.to_torch(state, params, opt2))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from funcopt.base import EmptyState, FuncoptError, GradientTransformation, OptState, PyTree
from funcopt.interop._lbfgs_history import _lbfgs_from_torch, _lbfgs_to_torch
from funcopt.interop._mapping import (
    _FIELDS,
    _HELD,
    SUPPORTED,
    _hyperparams,
    _kind,
    _rebuild,
    _state_dict,
    _tx_from_group,
    _walk,
    param_paths,
)
from funcopt.transforms import InjectHyperparamsState, ScaleByNadamState, ScaleByScheduleState
from funcopt.transforms import ScaleByAsgdState

__all__ = ["from_torch", "to_torch"]

# ---------------------------------------------------------------------------------------------
# torch -> funcopt


class _TorchState:
    """torch's per-parameter state, validated against the params and keyed by path."""

    def __init__(self, sd: Mapping[str, Any], params: PyTree, paths: list[str]) -> None:
        leaves: list[tuple[str, torch.Tensor]] = []
        _walk(params, "", leaves)
        self.params = dict(leaves)
        n_torch = sum(len(g["params"]) for g in sd["param_groups"])
        if n_torch != len(paths):
            raise FuncoptError(
                f"the torch optimizer has {n_torch} parameters but params has {len(paths)} tensor leaves; "
                "pass the params of the same model (funcopt.nn.extract(model)[0])."
            )
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        self.by_path: dict[str, dict[str, Any]] = {}
        for path, pid in zip(paths, ids):
            entry = sd["state"].get(pid, sd["state"].get(str(pid), {}))
            self.by_path[path] = dict(entry)
        self.paths = paths
        self.started = [p for p in paths if self.by_path[p]]
        if self.started and len(self.started) != len(paths):
            raise FuncoptError(
                f"torch has state for {len(self.started)} of {len(paths)} parameters (e.g. none for "
                f"{next(p for p in paths if not self.by_path[p])}): some parameters never received a "
                "gradient. funcopt keeps one state for all leaves; train until every parameter has stepped."
            )
        steps = {float(self.by_path[p]["step"]) for p in self.started if "step" in self.by_path[p]}
        if len(steps) > 1:
            raise FuncoptError(f"the torch parameters have different step counts {sorted(steps)}; funcopt keeps one count.")
        self.step = int(steps.pop()) if steps else (1 if self.started else 0)

    def tree(self, key: str, like: PyTree, where: str, held: Callable[[torch.Tensor], bool] | None = None) -> PyTree:
        """torch's ``key`` tensors as a tree shaped like ``like``; leaves whose param does not
        ``held`` the field keep ``like``'s placeholder."""
        values = {}
        leaves: list[tuple[str, torch.Tensor]] = []
        _walk(like, "", leaves)
        templates = dict(leaves)
        shapes = {path: tuple(t.shape) for path, t in leaves}
        for path in self.paths:
            entry = self.by_path[path]
            value = entry.get(key)
            p = self.params[path]
            if held is not None and not held(p):
                values[path] = templates[path]
                continue
            if value is None:
                raise FuncoptError(f"torch state for {path} lacks {key!r}, which {where} needs (a different optimizer?).")
            if tuple(value.shape) != shapes.get(path, tuple(p.shape)):
                expects = "" if shapes.get(path) == tuple(p.shape) else f" (funcopt keeps {shapes.get(path)})"
                raise FuncoptError(
                    f"torch state {key!r} for {path} has shape {tuple(value.shape)}, the param {tuple(p.shape)}{expects}."
                )
            values[path] = value.detach().to(device=p.device, dtype=p.dtype, copy=True)
        return _rebuild(like, "", values)


def _absent(x: Any) -> bool:
    """funcopt marks an unused state field (e.g. ``nu_max`` without AMSGrad) by ``None`` or ``()``."""
    return x is None or (type(x) is tuple and len(x) == 0)


def _count_like(count: torch.Tensor, value: int) -> torch.Tensor:
    return torch.full_like(count, value)


def _fill(state: Any, ts: _TorchState, where: str) -> Any:
    if isinstance(state, InjectHyperparamsState):
        return state._replace(count=_count_like(state.count, ts.step), inner_state=_fill(state.inner_state, ts, where))
    if isinstance(state, EmptyState):
        return state
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(_fill(s, ts, f"{where}[{i}]") for i, s in enumerate(state))
    if isinstance(state, ScaleByScheduleState):
        return ScaleByScheduleState(_count_like(state.count, ts.step))
    if type(state) in _FIELDS:
        if not ts.started:
            return state
        out = state._asdict()
        for name, key in _FIELDS[type(state)].items():
            if not _absent(out[name]):
                out[name] = ts.tree(
                    key, out[name], f"{type(state).__name__}.{name} at {where}", _HELD.get(type(state), {}).get(name)
                )
        if "count" in out:
            out["count"] = _count_like(state.count, ts.step)
        if isinstance(state, ScaleByNadamState):
            products = {float(ts.by_path[p]["mu_product"]) for p in ts.paths}
            if len(products) != 1:
                raise FuncoptError("the torch NAdam parameters have different mu_product values; funcopt keeps one.")
            out["mu_product"] = torch.full_like(state.mu_product, products.pop())
        if isinstance(state, ScaleByAsgdState):
            for key in ("eta", "mu"):
                if any(key not in ts.by_path[p] for p in ts.paths):
                    raise FuncoptError(f"torch state lacks ASGD's {key!r} for some parameter (a different optimizer?).")
                values = {float(ts.by_path[p][key]) for p in ts.paths}
                if len(values) != 1:
                    raise FuncoptError(
                        f"the torch ASGD parameters have different {key} values {sorted(values)}; funcopt keeps "
                        "one (all parameters step together): train until every parameter has stepped equally."
                    )
                out[key] = torch.full_like(getattr(state, key), values.pop())
        return type(state)(**out)
    raise FuncoptError(
        f"the funcopt state at {where} is a {type(state).__name__}, which has no torch.optim counterpart. "
        f"Pass a tx built by one of funcopt.{{{', '.join(SUPPORTED)}}}."
    )


def from_torch(
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    params: PyTree,
    *,
    kind: str | None = None,
    tx: GradientTransformation | None = None,
    order: Sequence[str] | None = None,
) -> tuple[GradientTransformation, OptState]:
    """Builds the funcopt optimizer and state equivalent to a ``torch.optim`` optimizer's; like ``load_state_dict``.

    Args:
        optimizer: a ``torch.optim`` optimizer or its ``state_dict()`` (one set of
            hyperparameters; param groups that differ only in their params are merged).
        params: the params pytree, with leaves in the optimizer's parameter order (see
            :func:`param_paths`); the state tensors get each leaf's device and dtype.
        kind: ``"adam"``, ``"sgd"``, ... (needed for a state_dict whose kind cannot be inferred).
        tx: a funcopt transformation to fill instead of the one built from the hyperparameters
            (e.g. an ``inject_hyperparams`` version or one with a schedule).
        order: the params' paths in torch's order, when not the natural order.

    Returns:
        ``(tx, state)``: continuing with ``tx.update(grads, state, params)`` follows the
        trajectory torch.optim would have taken. Learning-rate schedulers are not converted:
        the param group's current ``lr`` becomes a constant (pass ``tx=`` with a schedule).

    For ``torch.optim.LBFGS`` the curvature history (the ``s``/``y`` pairs, ``rho``, the last
    gradient and step) is converted into ``funcopt.lbfgs``'s ring buffers, reordered from
    torch's flat parameter order to funcopt's ``tree.ravel`` order. The trajectories coincide
    for ``LBFGS(lr, max_iter=1, line_search_fn=None)`` and ``funcopt.lbfgs(lr,
    linesearch=None)`` (the tx built here); torch's ``max_iter > 1`` inner loop and its
    strong-Wolfe search differ from funcopt's zoom line search, so there the history carries
    over but later steps differ.
    """
    sd = _state_dict(optimizer)
    name = _kind(optimizer, sd, kind)
    group = _hyperparams(sd)
    paths = param_paths(params, order)
    if name == "lbfgs":
        return _lbfgs_from_torch(sd, group, params, paths, tx)
    ts = _TorchState(sd, params, paths)
    if tx is None:
        tx = _tx_from_group(name, group)
    state = _fill(tx.init(params), ts, "<root>")
    return tx, state


# ---------------------------------------------------------------------------------------------
# funcopt -> torch


def _find_count(state: Any) -> int | None:
    if isinstance(state, InjectHyperparamsState):
        found = _find_count(state.inner_state)
        return found if found is not None else int(state.count)
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        counts = [c for c in (_find_count(s) for s in state) if c is not None]
        return counts[0] if counts else None
    count = getattr(state, "count", None)
    return int(count) if isinstance(count, torch.Tensor) else None


def _blocks(state: Any) -> list[Any]:
    if isinstance(state, InjectHyperparamsState):
        return _blocks(state.inner_state)
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return [b for s in state for b in _blocks(s)]
    return [state]


def to_torch(
    state: OptState,
    params: PyTree,
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    *,
    order: Sequence[str] | None = None,
    step: int | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """A ``state_dict`` for ``optimizer`` holding the funcopt ``state``; pass it to ``optimizer.load_state_dict``.

    Args:
        state: the funcopt optimizer state (from one of :data:`SUPPORTED`'s funcopt optimizers,
            possibly inside ``inject_hyperparams``).
        params: the params pytree the state belongs to, in the optimizer's parameter order.
        optimizer: the torch optimizer to continue with (or its ``state_dict()``); its param
            groups (hyperparameters) are kept as they are.
        order: the params' paths in torch's order, when not the natural order.
        step: the ``step`` to record where the funcopt state keeps no count (RMSprop without
            momentum, Adagrad without ``lr_decay``; torch does not use it there).
        kind: ``"adamw"``, ``"adamax"``... (needed for a state_dict whose kind cannot be inferred
            from its param group keys).
    """
    sd = _state_dict(optimizer)
    name = _kind(optimizer, sd, kind)
    group = _hyperparams(sd)
    paths = param_paths(params, order)
    n_torch = sum(len(g["params"]) for g in sd["param_groups"])
    if n_torch != len(paths):
        raise FuncoptError(f"the torch optimizer has {n_torch} parameters but params has {len(paths)} tensor leaves.")
    if name == "lbfgs":
        return _lbfgs_to_torch(state, params, paths, sd)
    count = _find_count(state)
    if count is None:
        count = step if step is not None else 0
    blocks = [b for b in _blocks(state) if not isinstance(b, (EmptyState, ScaleByScheduleState))]
    for b in blocks:
        if type(b) not in _FIELDS:
            raise FuncoptError(f"the funcopt state holds a {type(b).__name__}, which has no torch.optim counterpart.")
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    per: dict[str, dict[str, Any]] = {p: {} for p in paths}
    param_list: list[tuple[str, torch.Tensor]] = []
    _walk(params, "", param_list)
    param_leaves = dict(param_list)
    started = count > 0 or name in ("adagrad", "rmsprop")
    if started:
        for b in blocks:
            for field, key in _FIELDS[type(b)].items():
                tree = getattr(b, field)
                if _absent(tree):
                    continue
                leaves: list[tuple[str, torch.Tensor]] = []
                _walk(tree, "", leaves)
                values = dict(leaves)
                if set(values) != set(paths):
                    raise FuncoptError(f"{type(b).__name__}.{field} does not have the leaves of params ({sorted(values)[:3]}...).")
                held = _HELD.get(type(b), {}).get(field)
                for p in paths:
                    if held is None or held(param_leaves[p]):
                        per[p][key] = values[p].detach().clone()
            if isinstance(b, ScaleByNadamState):
                for p in paths:
                    per[p]["mu_product"] = b.mu_product.detach().to("cpu", scalar).clone()
            if isinstance(b, ScaleByAsgdState):  # one eta and mu, copied into each parameter's state
                for p in paths:
                    per[p]["eta"] = b.eta.detach().to("cpu", scalar).clone()
                    per[p]["mu"] = b.mu.detach().to("cpu", scalar).clone()
        if name == "sgd":
            for p in paths:
                if count == 0:
                    per[p].pop("momentum_buffer", None)
        elif name == "muon":
            pass  # torch.optim.Muon keeps no step
        else:
            for p in paths:
                # SparseAdam keeps a Python int; the others a 0-dim tensor
                per[p]["step"] = count if name == "sparseadam" else torch.tensor(float(count), dtype=scalar)
    if name in ("adam", "adamw") and group.get("amsgrad") and started and any("max_exp_avg_sq" not in per[p] for p in paths):
        raise FuncoptError("the torch optimizer uses amsgrad=True but the funcopt state has no nu_max (built without amsgrad).")
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    new_state = {pid: per[p] for pid, p in zip(ids, paths) if per[p]}
    return {"state": new_state, "param_groups": copy.deepcopy(list(sd["param_groups"]))}
