"""Convert ``torch.optim`` state_dicts to funcopt optimizer states and back.

A running ``torch.optim`` training can be continued with funcopt (:func:`from_torch`) and a
funcopt training with ``torch.optim`` (:func:`to_torch`): the trajectories continue as if no
switch had happened (float tolerance; bitwise for most optimizers in float64). Supported:
``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``Adamax``, ``NAdam``, ``RAdam`` and
``LBFGS`` (its curvature history; see :func:`from_torch` for when trajectories coincide).

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
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch

from funcopt import optimizers as _opt
from funcopt.base import EmptyState, FuncoptError, GradientTransformation, OptState, PyTree
from funcopt.checkpoint_format import child_path
from funcopt.inject import InjectHyperparamsState
from funcopt.transforms import (
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByNadamState,
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByScheduleState,
    TraceState,
)

__all__ = ["from_torch", "to_torch", "param_paths", "SUPPORTED"]

SUPPORTED = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adamax", "nadam", "radam", "lbfgs")
"""Lower-case names of the torch.optim classes that can be converted."""

# funcopt state type -> {field: torch state key} for the per-parameter tensors it holds
_FIELDS: dict[type, dict[str, str]] = {
    ScaleByAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    ScaleByAdamaxState: {"mu": "exp_avg", "nu": "exp_inf"},
    ScaleByNadamState: {"mu": "exp_avg", "nu": "exp_avg_sq"},
    ScaleByRmsState: {"nu": "square_avg", "mu": "grad_avg"},
    ScaleByRssState: {"sum_of_squares": "sum"},
    TraceState: {"momentum_buffer": "momentum_buffer"},
}
_IGNORED_GROUP_KEYS = {"params", "foreach", "fused", "capturable", "differentiable", "initial_lr"}


# ---------------------------------------------------------------------------------------------
# Parameter order


def _walk(node: Any, path: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(node, torch.Tensor):
        out.append((path or "<root>", node))
    elif isinstance(node, Mapping):
        for k, v in node.items():
            _walk(v, child_path(path, k), out)
    elif isinstance(node, tuple) and hasattr(node, "_fields"):
        for f, v in zip(node._fields, node):
            _walk(v, f"{path}.{f}", out)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _walk(v, f"{path}[{i}]", out)
    elif node is not None:
        raise FuncoptError(f"params leaf at {path or '<root>'} is a {type(node).__name__}; params must be tensors.")


def _rebuild(node: Any, path: str, values: Mapping[str, Any]) -> Any:
    if isinstance(node, torch.Tensor):
        return values[path or "<root>"]
    if isinstance(node, Mapping):
        items = [(k, _rebuild(v, child_path(path, k), values)) for k, v in node.items()]
        return OrderedDict(items) if type(node) is OrderedDict else dict(items)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*[_rebuild(v, f"{path}.{f}", values) for f, v in zip(node._fields, node)])
    if isinstance(node, (list, tuple)):
        return type(node)(_rebuild(v, f"{path}[{i}]", values) for i, v in enumerate(node))
    return node


def param_paths(params: PyTree, order: Sequence[str] | None = None) -> list[str]:
    """The paths of ``params``' leaves in torch.optim's parameter order.

    Without ``order``: dict insertion order and list order (``funcopt.nn.extract`` dicts follow
    ``model.named_parameters()``). ``order`` lists every leaf once, as a path (``"['fc.weight']"``)
    or, for a flat dict, a key (``"fc.weight"``).
    """
    leaves: list[tuple[str, torch.Tensor]] = []
    _walk(params, "", leaves)
    natural = [p for p, _ in leaves]
    if order is None:
        return natural
    wanted = [o if o.startswith("[") or o.startswith(".") else child_path("", o) for o in order]
    if sorted(wanted) != sorted(natural):
        missing = sorted(set(natural) - set(wanted))
        extra = sorted(set(wanted) - set(natural))
        repeated = extra or sorted({w for w in wanted if wanted.count(w) > 1})
        raise FuncoptError(
            f"order must list every params leaf exactly once; missing: {', '.join(missing) or '-'}; "
            f"unknown or repeated: {', '.join(repeated) or '-'}."
        )
    return wanted


# ---------------------------------------------------------------------------------------------
# Reading torch's state_dict


def _state_dict(optimizer: Any) -> dict[str, Any]:
    sd = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        raise FuncoptError(
            "expected a torch.optim.Optimizer or its state_dict() (a dict with 'state' and "
            f"'param_groups'), got {type(optimizer).__name__}."
        )
    return sd  # type: ignore[return-value]


def _kind(optimizer: Any, sd: Mapping[str, Any], kind: str | None) -> str:
    if kind is None and isinstance(optimizer, torch.optim.Optimizer):
        kind = type(optimizer).__name__
    if kind is None:
        g = sd["param_groups"][0] if sd["param_groups"] else {}
        if "history_size" in g:
            kind = "lbfgs"
        elif "dampening" in g:
            kind = "sgd"
        elif "centered" in g:
            kind = "rmsprop"
        elif "lr_decay" in g:
            kind = "adagrad"
        elif "momentum_decay" in g:
            kind = "nadam"
        elif "betas" in g and "amsgrad" in g:
            kind = "adamw" if g.get("decoupled_weight_decay") else "adam"
        else:
            raise FuncoptError("cannot tell which torch.optim optimizer wrote this state_dict; pass kind='adam' (etc.).")
    kind = kind.lower()
    if kind not in SUPPORTED:
        raise FuncoptError(f"torch.optim.{kind} is not supported by funcopt.interop; supported: {', '.join(SUPPORTED)}.")
    return kind


def _hyperparams(sd: Mapping[str, Any]) -> dict[str, Any]:
    groups = sd["param_groups"]
    if not groups:
        raise FuncoptError("the state_dict has no param_groups.")

    def clean(g: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in g.items() if k not in _IGNORED_GROUP_KEYS}

    first = clean(groups[0])
    for i, g in enumerate(groups[1:], start=1):
        if clean(g) != first:
            diff = sorted(k for k in set(first) | set(clean(g)) if first.get(k) != clean(g).get(k))
            raise FuncoptError(
                f"param group {i} differs from group 0 in {diff}. funcopt.interop converts one set of "
                "hyperparameters; convert each group's params separately (one state_dict per group)."
            )
    return first


def _num(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return float(x)
    if isinstance(x, bool):
        return x
    return float(x) if isinstance(x, (int, float)) and x != 0 else x


def _tx_from_group(kind: str, g: Mapping[str, Any]) -> GradientTransformation:
    n = {k: _num(v) for k, v in g.items()}
    if kind == "sgd":
        return _opt.sgd(n["lr"], n.get("momentum", 0), n.get("dampening", 0), bool(g.get("nesterov", False)),
                        n.get("weight_decay", 0), bool(g.get("maximize", False)))
    if kind in ("adam", "adamw"):
        b1, b2 = (_num(b) for b in g["betas"])
        factory = _opt.adamw if kind == "adamw" or g.get("decoupled_weight_decay") else _opt.adam
        return factory(n["lr"], b1, b2, n["eps"], weight_decay=n.get("weight_decay", 0),
                       amsgrad=bool(g.get("amsgrad", False)), maximize=bool(g.get("maximize", False)))
    if kind == "rmsprop":
        return _opt.rmsprop(n["lr"], n["alpha"], n["eps"], n.get("weight_decay", 0), n.get("momentum", 0),
                            bool(g.get("centered", False)), bool(g.get("maximize", False)))
    if kind == "adagrad":
        return _opt.adagrad(n["lr"], n.get("lr_decay", 0), n.get("weight_decay", 0),
                            n.get("initial_accumulator_value", 0), n["eps"], bool(g.get("maximize", False)))
    b1, b2 = (_num(b) for b in g["betas"])
    if kind == "adamax":
        return _opt.adamax(n["lr"], b1, b2, n["eps"], n.get("weight_decay", 0), bool(g.get("maximize", False)))
    if kind == "nadam":
        return _opt.nadam(n["lr"], b1, b2, n["eps"], n.get("weight_decay", 0), n.get("momentum_decay", 4e-3),
                          bool(g.get("decoupled_weight_decay", False)), bool(g.get("maximize", False)))
    return _opt.radam(n["lr"], b1, b2, n["eps"], n.get("weight_decay", 0),
                      bool(g.get("decoupled_weight_decay", False)), bool(g.get("maximize", False)))


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

    def tree(self, key: str, like: PyTree, where: str) -> PyTree:
        values = {}
        for path in self.paths:
            entry = self.by_path[path]
            value = entry.get(key)
            if value is None:
                raise FuncoptError(f"torch state for {path} lacks {key!r}, which {where} needs (a different optimizer?).")
            p = self.params[path]
            if tuple(value.shape) != tuple(p.shape):
                raise FuncoptError(f"torch state {key!r} for {path} has shape {tuple(value.shape)}, the param {tuple(p.shape)}.")
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
                out[name] = ts.tree(key, out[name], f"{type(state).__name__}.{name} at {where}")
        if "count" in out:
            out["count"] = _count_like(state.count, ts.step)
        if isinstance(state, ScaleByNadamState):
            products = {float(ts.by_path[p]["mu_product"]) for p in ts.paths}
            if len(products) != 1:
                raise FuncoptError("the torch NAdam parameters have different mu_product values; funcopt keeps one.")
            out["mu_product"] = torch.full_like(state.mu_product, products.pop())
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
    """
    sd = _state_dict(optimizer)
    name = _kind(optimizer, sd, None)
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
                for p in paths:
                    per[p][key] = values[p].detach().clone()
            if isinstance(b, ScaleByNadamState):
                for p in paths:
                    per[p]["mu_product"] = b.mu_product.detach().to("cpu", scalar).clone()
        if name == "sgd":
            for p in paths:
                if count == 0:
                    per[p].pop("momentum_buffer", None)
        else:
            for p in paths:
                per[p]["step"] = torch.tensor(float(count), dtype=scalar)
    if name in ("adam", "adamw") and group.get("amsgrad") and started and any("max_exp_avg_sq" not in per[p] for p in paths):
        raise FuncoptError("the torch optimizer uses amsgrad=True but the funcopt state has no nu_max (built without amsgrad).")
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    new_state = {pid: per[p] for pid, p in zip(ids, paths) if per[p]}
    return {"state": new_state, "param_groups": copy.deepcopy(list(sd["param_groups"]))}


# ---------------------------------------------------------------------------------------------
# L-BFGS: torch keeps its history as Python lists of flat vectors (in parameter order) under the
# first parameter; funcopt keeps ring buffers of vectors in ``tree.ravel`` (optree) order.


class _Flat:
    """Converts flat vectors between torch's parameter order and funcopt's ravel order."""

    def __init__(self, params: PyTree, paths: list[str]) -> None:
        leaves: list[tuple[str, torch.Tensor]] = []
        _walk(params, "", leaves)
        by_path = dict(leaves)
        self.torch_paths = paths
        self.sizes = {p: by_path[p].numel() for p in paths}
        labelled = _rebuild(params, "", {p: p for p in paths})
        self.ravel_paths = optree.tree_leaves(labelled, none_is_leaf=False)
        self.params = torch.cat([by_path[p].detach().reshape(-1) for p in paths]) if paths else torch.zeros(0)

    def to_funcopt(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(self.torch_paths, torch.split(v.detach().reshape(-1), [self.sizes[p] for p in self.torch_paths])))
        return torch.cat([parts[p] for p in self.ravel_paths]).to(device=like.device, dtype=like.dtype)

    def to_torch(self, v: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(self.ravel_paths, torch.split(v.detach(), [self.sizes[p] for p in self.ravel_paths])))
        return torch.cat([parts[p] for p in self.torch_paths]).to(dtype=self.params.dtype, device=self.params.device)


def _lbfgs_blocks(state: Any, fn: Any) -> Any:
    from funcopt.lbfgs import ScaleByLbfgsState

    if isinstance(state, ScaleByLbfgsState):
        return fn(state)
    if isinstance(state, InjectHyperparamsState):
        return state._replace(inner_state=_lbfgs_blocks(state.inner_state, fn))
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(_lbfgs_blocks(s, fn) for s in state)
    return state


def _lbfgs_from_torch(sd: Mapping[str, Any], group: Mapping[str, Any], params: PyTree, paths: list[str],
                      tx: GradientTransformation | None) -> tuple[GradientTransformation, OptState]:
    from funcopt.lbfgs import lbfgs

    if tx is None:
        tx = lbfgs(float(group["lr"]), memory_size=int(group["history_size"]),
                   linesearch=None if group.get("line_search_fn") is None else "zoom")
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    st = dict(sd["state"].get(ids[0], sd["state"].get(str(ids[0]), {}))) if ids else {}
    n_iter = int(st.get("n_iter", 0))
    flat = _Flat(params, paths)
    found = []

    def fill(b: Any) -> Any:
        found.append(b)
        if n_iter == 0 or st.get("prev_flat_grad") is None:
            return b
        m = b.diff_params_memory.shape[0]
        if tuple(st["prev_flat_grad"].shape) != (flat.params.numel(),):
            raise FuncoptError(
                f"torch LBFGS history vectors have {st['prev_flat_grad'].numel()} elements but params have "
                f"{flat.params.numel()}; pass the params of the same model.")
        pairs = list(zip(st.get("old_stps", []), st.get("old_dirs", []), st.get("ro", [])))[-m:]
        S = torch.zeros_like(b.diff_params_memory)
        Y = torch.zeros_like(b.diff_updates_memory)
        R = torch.zeros_like(b.weights_memory)
        for j, (s_j, y_j, r_j) in enumerate(pairs):
            S[j] = flat.to_funcopt(s_j, S)
            Y[j] = flat.to_funcopt(y_j, Y)
            R[j] = float(r_j)
        step = float(st.get("t", 1.0)) * st["d"].detach().reshape(-1)
        prev_params = flat.params.to(step.dtype) - step
        return b._replace(
            count=torch.full_like(b.count, n_iter),
            params=flat.to_funcopt(prev_params, b.params),
            updates=flat.to_funcopt(st["prev_flat_grad"], b.updates),
            diff_params_memory=S,
            diff_updates_memory=Y,
            weights_memory=R,
            head=torch.full_like(b.head, len(pairs) % m),
            num_pairs=torch.full_like(b.num_pairs, len(pairs)),
        )

    state = _lbfgs_blocks(tx.init(params), fill)
    if not found:
        raise FuncoptError("tx= has no ScaleByLbfgsState to hold the torch LBFGS history; pass a funcopt.lbfgs(...) tx.")
    return tx, state


def _lbfgs_to_torch(state: OptState, params: PyTree, paths: list[str], sd: Mapping[str, Any]) -> dict[str, Any]:
    found: list[Any] = []
    _lbfgs_blocks(state, lambda b: found.append(b) or b)
    if len(found) != 1:
        raise FuncoptError("to_torch for LBFGS needs a state holding exactly one ScaleByLbfgsState (from funcopt.lbfgs).")
    b = found[0]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    count = int(b.count)
    groups = copy.deepcopy(list(sd["param_groups"]))
    if count == 0:
        return {"state": {}, "param_groups": groups}
    flat = _Flat(params, paths)
    if b.params.numel() != flat.params.numel():
        raise FuncoptError(f"the L-BFGS state holds {b.params.numel()} elements but params have {flat.params.numel()}.")
    m = b.diff_params_memory.shape[0]
    k, head = int(b.num_pairs), int(b.head)
    slots = [(head - k + j) % m for j in range(k)]  # oldest first, as torch's lists
    old_stps = [flat.to_torch(b.diff_params_memory[i]) for i in slots]
    old_dirs = [flat.to_torch(b.diff_updates_memory[i]) for i in slots]
    ro = [b.weights_memory[i].detach().clone().to(flat.params.dtype) for i in slots]
    if k:
        h_diag = torch.dot(old_stps[-1], old_dirs[-1]) / torch.dot(old_dirs[-1], old_dirs[-1])
    else:
        h_diag = torch.ones((), dtype=flat.params.dtype)
    entry = {
        "func_evals": count,
        "n_iter": count,
        "d": flat.params - flat.to_torch(b.params),  # torch's next pair uses s = t * d
        "t": 1.0,
        "old_dirs": old_dirs,
        "old_stps": old_stps,
        "ro": ro,
        "H_diag": h_diag,
        "prev_flat_grad": flat.to_torch(b.updates),
        "prev_loss": math.nan,
    }
    return {"state": {ids[0]: entry}, "param_groups": groups}
