"""How ``torch.optim`` state_dicts map to funcopt: the supported optimizers, the per-optimizer
field table, torch's parameter order, and the param group's hyperparameters as a funcopt
optimizer (private helpers of :func:`from_torch` and :func:`to_torch`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import funcopt.optimizers as _opt
from funcopt.base import FuncoptError, GradientTransformation, PyTree
from funcopt.transforms import (
    ScaleByAdafactorState,
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByNadamState,
    ScaleByRmsState,
    ScaleByRssState,
    TraceState,
)
from funcopt.transforms import ScaleByAdadeltaState, ScaleByAsgdState, ScaleByRpropState
from funcopt.transforms import ScaleByMuonState

__all__ = ["param_paths", "SUPPORTED"]

SUPPORTED = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adamax", "nadam", "radam", "lbfgs", "sparseadam", "adafactor",
             "adadelta", "rprop", "asgd", "muon")
"""Lower-case names of the torch.optim classes that can be converted."""

# funcopt state type -> {field: torch state key} for the per-parameter tensors it holds
_FIELDS: dict[type, dict[str, str]] = {
    ScaleByAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    ScaleByAdamaxState: {"mu": "exp_avg", "nu": "exp_inf"},
    ScaleByNadamState: {"mu": "exp_avg", "nu": "exp_avg_sq"},
    ScaleByRmsState: {"nu": "square_avg", "mu": "grad_avg"},
    ScaleByRssState: {"sum_of_squares": "sum"},
    TraceState: {"momentum_buffer": "momentum_buffer"},
    ScaleByMuonState: {"momentum_buffer": "momentum_buffer"},
    ScaleByAdadeltaState: {"square_avg": "square_avg", "acc_delta": "acc_delta"},
    ScaleByRpropState: {"prev": "prev", "step_size": "step_size"},
    ScaleByAsgdState: {"ax": "ax"},  # eta, mu: one value for all params (see _state_dict)
    ScaleByAdafactorState: {"v_row": "row_var", "v_col": "col_var", "v": "variance"},
}


def _factored(p: torch.Tensor) -> bool:
    return p.ndim > 1


# state type -> {field: does a param leaf hold it} where a field holds a tensor for some leaves
# only (an empty placeholder for the others), by torch's rule; other fields are held by every leaf
_HELD: dict[type, dict[str, Callable[[torch.Tensor], bool]]] = {
    ScaleByAdafactorState: {"v_row": _factored, "v_col": _factored, "v": lambda p: not _factored(p)},
}
_IGNORED_GROUP_KEYS = {"params", "foreach", "fused", "capturable", "differentiable", "initial_lr"}


# ---------------------------------------------------------------------------------------------
# Parameter order


def _walk(node: Any, path: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(node, torch.Tensor):
        out.append((path or "<root>", node))
    elif isinstance(node, Mapping):
        for k, v in node.items():
            _walk(v, f"{path}[{k!r}]", out)
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
        items = [(k, _rebuild(v, f"{path}[{k!r}]", values)) for k, v in node.items()]
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
    wanted = [o if o.startswith("[") or o.startswith(".") else f"[{o!r}]" for o in order]
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


# A param group's keys that tell which torch.optim class wrote a state_dict, checked in order.
_SIGNATURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("history_size",), "lbfgs"),
    (("ns_coefficients",), "muon"),
    (("dampening",), "sgd"),
    (("centered",), "rmsprop"),
    (("lr_decay",), "adagrad"),
    (("momentum_decay",), "nadam"),
    (("beta2_decay",), "adafactor"),
    (("rho",), "adadelta"),
    (("etas", "step_sizes"), "rprop"),
    (("lambd", "t0"), "asgd"),
    (("betas", "amsgrad"), "adam"),
)


def _kind(optimizer: Any, sd: Mapping[str, Any], kind: str | None) -> str:
    if kind is None and isinstance(optimizer, torch.optim.Optimizer):
        kind = type(optimizer).__name__
    if kind is None:
        g = sd["param_groups"][0] if sd["param_groups"] else {}
        kind = next((name for keys, name in _SIGNATURES if all(k in g for k in keys)), None)
        if kind == "adam" and g.get("decoupled_weight_decay"):
            kind = "adamw"
        elif kind is None and "betas" in g and "weight_decay" not in g:
            kind = "sparseadam"
        if kind is None:
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
    if kind == "muon":
        return _opt.muon(n["lr"], n.get("weight_decay", 0), n["momentum"], bool(g.get("nesterov", True)),
                         tuple(_num(c) for c in g["ns_coefficients"]), n["eps"], int(g["ns_steps"]),
                         g.get("adjust_lr_fn"))
    if kind == "sgd":
        return _opt.sgd(n["lr"], n.get("momentum", 0), n.get("dampening", 0), bool(g.get("nesterov", False)),
                        n.get("weight_decay", 0), bool(g.get("maximize", False)))
    if kind in ("adam", "adamw"):
        b1, b2 = (_num(b) for b in g["betas"])
        factory = _opt.adamw if kind == "adamw" or g.get("decoupled_weight_decay") else _opt.adam
        return factory(n["lr"], b1, b2, n["eps"], weight_decay=n.get("weight_decay", 0),
                       amsgrad=bool(g.get("amsgrad", False)), maximize=bool(g.get("maximize", False)))
    if kind == "sparseadam":
        b1, b2 = (_num(b) for b in g["betas"])
        return _opt.sparse_adam(n["lr"], b1, b2, n["eps"], bool(g.get("maximize", False)))
    if kind == "adafactor":
        return _opt.adafactor(n["lr"], n["beta2_decay"], tuple(_num(e) for e in g["eps"]), n["d"],
                              n.get("weight_decay", 0), bool(g.get("maximize", False)))
    if kind == "adadelta":
        return _opt.adadelta(n["lr"], n["rho"], n["eps"], n.get("weight_decay", 0), bool(g.get("maximize", False)))
    if kind == "rprop":
        return _opt.rprop(n["lr"], tuple(float(e) for e in g["etas"]), tuple(float(s) for s in g["step_sizes"]),
                          bool(g.get("maximize", False)))
    if kind == "asgd":
        return _opt.asgd(n["lr"], float(g["lambd"]), float(g["alpha"]), float(g["t0"]), n.get("weight_decay", 0),
                         bool(g.get("maximize", False)))
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
