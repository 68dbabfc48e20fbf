"""Param groups of :class:`FuncoptOptimizer`: the params of each group, torch.optim's argument
names, and how each group's transformation is built from its hyperparameters (private)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch

import funcopt.optimizers as _opt
from funcopt import tree as _tree
from funcopt.base import FuncoptError, GradientTransformation, PyTree
from funcopt.fast import fast_path_of
from funcopt.transforms import injected_states, set_hyperparams

# torch.optim's implementation switches: accepted in the constructor and in each group.
SWITCHES = ("foreach", "fused", "capturable", "differentiable")
# funcopt's name of a hyperparameter -> the key torch.optim's param groups use for it.
TORCH_KEY = {"learning_rate": "lr", "memory_size": "history_size"}
FUNCOPT_NAME = {v: k for k, v in TORCH_KEY.items()}


def as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def same(a: Any, b: Any) -> bool:
    if a is b:  # the common case at each step: nothing wrote the entry
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except (TypeError, RuntimeError, ValueError):
        return a is b


def translate(given: Mapping[str, Any], accepted: Iterable[str], where: str) -> dict[str, Any]:
    """``given`` with torch.optim's names (``lr``, ``betas``, ``history_size``) in funcopt's."""
    accepted = set(accepted)
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key == "betas" and "b1" in accepted and "b2" in accepted:
            try:
                b1, b2 = value
            except (TypeError, ValueError):
                raise FuncoptError(f"{where}: betas must be a pair (b1, b2), got {value!r}.") from None
            out["b1"], out["b2"] = b1, b2
        elif key in FUNCOPT_NAME and FUNCOPT_NAME[key] in accepted:
            out[FUNCOPT_NAME[key]] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The params of one group


def _check_leaf(path: str, p: Any) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"as_torch_optimizer: leaf {path} is a {type(p).__name__}, not a tensor parameter.")
    if not p.is_leaf or not p.requires_grad:
        raise FuncoptError(
            f"as_torch_optimizer: leaf {path} must be a leaf tensor with requires_grad=True "
            "(an nn.Parameter). Leave frozen parameters out ([p for p in model.parameters() "
            "if p.requires_grad], or pass the module, which does this), or keep them in the "
            "tree and freeze them in the transformation with a mask."
        )


def group_tree(params: Any, where: str) -> PyTree:
    """The params pytree of one group: a module's trainable parameters by name, a dict (any
    pytree) as given, ``(name, tensor)`` pairs as a dict, other iterables as a list."""
    if isinstance(params, torch.nn.Module):
        tree = {k: p for k, p in params.named_parameters() if p.requires_grad}
        if not tree:
            raise FuncoptError(
                f"as_torch_optimizer: the {type(params).__name__} has no parameters with "
                "requires_grad=True; there is nothing to optimize."
            )
        return tree
    if isinstance(params, torch.Tensor):
        if where:
            return [params]
        raise TypeError(
            "as_torch_optimizer expects a module, a dict/list (pytree) of parameters or an iterable "
            "of them, got a single tensor. Wrap it: as_torch_optimizer(tx, [weight])."
        )
    tree = params
    if not isinstance(tree, (dict, list, tuple)) and isinstance(tree, Iterable):
        tree = list(tree)
    if isinstance(tree, (list, tuple)) and tree and all(
        isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in tree
    ):
        tree = dict(tree)  # model.named_parameters()
    leaves = _tree.leaves(tree)
    if not leaves:
        raise FuncoptError(
            f"as_torch_optimizer got an empty parameter list{' in ' + where if where else ''}; "
            "pass model or model.parameters()."
        )
    for path, p in zip(_tree.paths(tree), leaves):
        _check_leaf(f"{where}{path}", p)
    return tree


def once(params: Any) -> Any:
    """``params`` as a list where it is an iterator (``model.parameters()``), which could be
    read only once; anything else (a module, a dict, a list, a tensor) as it is."""
    if isinstance(params, Iterator):
        return list(params)
    return params


def is_group_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(g, Mapping) for g in x) and any(
        "params" in g for g in x
    )


# ---------------------------------------------------------------------------------------------
# How a group's transformation is built


def provenance(tx: GradientTransformation) -> tuple[Callable[..., GradientTransformation], dict[str, Any]] | None:
    """(factory, arguments) of a transformation built by one of ``funcopt.optimizers``' factories
    with a fast route (read from its route declaration), else None."""
    fp = fast_path_of(tx)
    if fp is None:
        return None
    factory = getattr(_opt, fp.name, None)
    if factory is None or getattr(factory, "fast_route", None) is not fp.route:
        return None
    return factory, dict(fp.arguments)


class FactorySource:
    """A group's transformation built as ``factory(**static, **hyperparams)``: every float
    argument (``learning_rate``, ``b1``, ``weight_decay``...) is a hyperparameter shown in the
    param group; the transformation is rebuilt when one changes (see :meth:`build`)."""

    def __init__(self, factory: Callable[..., GradientTransformation], arguments: dict[str, Any], where: str):
        self.factory = factory
        self.name = getattr(factory, "__name__", "optimizer")
        signature = inspect.signature(factory)
        try:
            bound = signature.bind(**arguments)
        except TypeError as e:
            raise FuncoptError(
                f"as_torch_optimizer({self.name}){where}: {e}. Its arguments are "
                f"({', '.join(signature.parameters)}); torch.optim's lr and betas are accepted too."
            ) from None
        bound.apply_defaults()
        self.hyper: dict[str, float] = {}
        self.static: dict[str, Any] = {}
        for k, v in bound.arguments.items():
            default = signature.parameters[k].default
            if k != "mask" and (isinstance(v, float) or (
                    isinstance(v, (int, torch.Tensor)) and not isinstance(v, bool) and isinstance(default, float))):
                self.hyper[k] = as_float(v)
            else:
                self.static[k] = v
        self.zero = {k for k, v in self.hyper.items() if v == 0}
        self.current = dict(self.hyper)
        self._cache: tuple[tuple[float, ...], GradientTransformation] | None = None
        # For steps where values change, the fast route's transformation holds each
        # hyperparameter that is not 0 at the build in a 0-dim float64 CPU tensor (a "cell"): it
        # is built once, a new value is written into its cell (see fast()).
        self.cells = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.hyper.items() if k not in self.zero}
        self._in_cells = {k: self.hyper[k] for k in self.cells}
        self._fast: tuple[tuple[float, ...], GradientTransformation] | None = None
        self._last: dict[str, float] = dict(self.hyper)  # the values of the previous step
        self.build(self.hyper)  # range checks now, with the values given

    def keys(self, values: Mapping[str, float] | None = None) -> dict[str, Any]:
        """The param-group entries: hyperparameters under torch's keys, plain static ones as they are."""
        values = self.hyper if values is None else values
        betas = "b1" in values and "b2" in values  # shown as torch's 'betas' only
        out: dict[str, Any] = {TORCH_KEY.get(k, k): v for k, v in values.items() if not (betas and k in ("b1", "b2"))}
        if betas:
            out["betas"] = (values["b1"], values["b2"])
        for k, v in self.static.items():
            if k != "mask" and (v is None or isinstance(v, (bool, int, str))):
                out[TORCH_KEY.get(k, k)] = v
            elif callable(v) and k in TORCH_KEY:  # a funcopt schedule: shown as None, as torch readers expect the key
                out[TORCH_KEY[k]] = None
        return out

    def read(self, group: Mapping[str, Any], written: Mapping[str, Any], where: str) -> dict[str, float]:
        """The hyperparameters the group holds now (a scheduler or the user may have written them
        since ``written`` was published); :meth:`commit` makes them the current values."""
        values = dict(self.current)
        for k in self.hyper:
            key = TORCH_KEY.get(k, k)
            if key in group and not same(group[key], written.get(key)):
                values[k] = self._number(group[key], key, where)
        if "betas" in written and not same(group.get("betas"), written["betas"]):
            try:
                b1, b2 = group["betas"]
            except (KeyError, TypeError, ValueError):
                raise FuncoptError(f"{where}['betas'] must be a pair (b1, b2), got {group.get('betas')!r}.") from None
            values["b1"] = self._number(b1, "betas", where)
            values["b2"] = self._number(b2, "betas", where)
        for k in self.static:
            key = TORCH_KEY.get(k, k)
            scheduled = callable(self.static[k]) and key == "lr" and "initial_lr" in group
            if scheduled or (key in written and key in group and not same(group[key], written[key])):
                if callable(self.static[k]):
                    raise FuncoptError(
                        f"{where}[{key!r}] is driven by a torch.optim.lr_scheduler or by hand (now {group[key]!r}), "
                        f"but {k} is a funcopt schedule, which sets it at every step. Use either the schedule or a torch.optim.lr_scheduler (then pass a "
                        "float lr)."
                    )
                raise FuncoptError(
                    f"{where}[{key!r}] was changed from {written[key]!r} to {group[key]!r}; it decides the "
                    f"structure of {self.name}'s state and is fixed when the optimizer is built. Build a new "
                    "optimizer (or a new param group with add_param_group) with the new value."
                )
        return values

    def commit(self, values: Mapping[str, float]) -> dict[str, Any]:
        """Makes ``values`` the current ones; returns the param-group entries to publish."""
        self.current = dict(values)
        return self.keys(values)

    @staticmethod
    def _number(v: Any, key: str, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise FuncoptError(f"{where}[{key!r}] must be a number, got {v!r}.")
        return as_float(v)

    def build(self, values: Mapping[str, float]) -> GradientTransformation:
        """The transformation for ``values``. Python floats, so that the fast route reads them
        once; a value that became 0 after the build is a 0-dim tensor, so that the block it
        scales stays in the chain and the state keeps its structure."""
        key = tuple(values[k] for k in self.hyper)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        args = {
            k: torch.tensor(0.0, dtype=torch.float64) if v == 0 and k not in self.zero else v
            for k, v in values.items()
        }
        tx = self.factory(**self.static, **args)
        self._cache = (key, tx)
        return tx

    def fast(self, values: Mapping[str, float]) -> GradientTransformation:
        """The transformation for the fast route of a step with ``values``.

        While the values stay the same from step to step, the one :meth:`build` makes with
        Python floats (its in-place fast route then reuses the previous step's checks). At a
        step where they changed (an LR scheduler writes ``lr``, or ``betas``, at every step), the
        one built around the cells, with the new values written into them: rebuilt only when a
        value that was 0 at the build changes (it decides the chain's blocks), so a per-step
        schedule rebuilds and re-plans nothing. Both read exactly ``values``.
        """
        steady = self._last == values
        self._last = dict(values)
        if steady or self._cache is not None and self._cache[0] == tuple(values[k] for k in self.hyper):
            return self.build(values)
        for k, cell in self.cells.items():
            v = values[k]
            if self._in_cells[k] != v:
                cell.fill_(v)
                self._in_cells[k] = v
        key = tuple(values[k] for k in self.zero)
        if self._fast is not None and self._fast[0] == key:
            return self._fast[1]
        tx = self.factory(**self.static, **self.cells, **{k: values[k] for k in self.zero})
        self._fast = (key, tx)
        return tx

    def revived(self, values: Mapping[str, float]) -> list[str]:
        """The hyperparameters that were 0 when the group was built and are not 0 in ``values``
        (their blocks may be missing from the chain: the caller compares state structures)."""
        return [k for k in self.zero if values.get(k, 0) != 0]


class BuiltSource:
    """A group running a transformation as given; its hyperparameters, if any, are the ones
    ``inject_hyperparams`` keeps in the state (``learning_rate`` shown as ``'lr'``)."""

    def __init__(self, tx: GradientTransformation):
        self.tx = tx

    @staticmethod
    def injected(state: Any) -> dict[str, Any]:
        found = injected_states(state)
        hp: dict[str, torch.Tensor] = {}
        for s in reversed(found):  # the outermost state wins, as in get_hyperparams
            hp.update(s.hyperparams)
        return hp

    def keys(self, state: Any) -> dict[str, Any]:
        hp = self.injected(state)
        if not hp:
            return {"lr": None}
        out: dict[str, Any] = {}
        for name in sorted(hp):
            v = hp[name]
            out[TORCH_KEY.get(name, name)] = float(v) if v.dim() == 0 else v.detach().clone()
        if "b1" in hp and "b2" in hp:  # shown as torch's 'betas' only
            out["betas"] = (out.pop("b1"), out.pop("b2"))
        return out

    def apply(self, state: Any, group: Mapping[str, Any], written: Mapping[str, Any], where: str) -> Any:
        """The state with the hyperparameters written into the group since the last step."""
        hp = self.injected(state)
        if not hp:
            if group.get("lr") is not None or "initial_lr" in group:
                raise FuncoptError(
                    f"{where}['lr'] is {group.get('lr')!r}: an LR scheduler (or a hand) drives it, but this "
                    "transformation keeps its learning rate inside its closures, so the change would be "
                    "ignored. Pass the factory and its arguments instead, and the adapter injects them: "
                    "funcopt.as_torch_optimizer(funcopt.adamw, model, lr=1e-3, weight_decay=0.1), or build "
                    "the transformation with funcopt.inject_hyperparams(funcopt.adamw)(learning_rate=1e-3)."
                )
            return state
        changes: dict[str, Any] = {}
        for name in hp:
            key = TORCH_KEY.get(name, name)
            if key in group and not same(group[key], written.get(key)):
                changes[name] = group[key]
        if "betas" in written and not same(group.get("betas"), written["betas"]):
            changes["b1"], changes["b2"] = group["betas"]
        if not changes:
            return state
        # Python floats go through float64 so that no precision is lost on the way in.
        changes = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, (int, float)) else v for k, v in changes.items()}
        return set_hyperparams(state, **changes)

    def overrides(self, state: Any, given: Mapping[str, Any], where: str) -> Any:
        """A new group's state with the group's own hyperparameters (torch's or funcopt's names).

        Other keys stay in the group untouched, as torch.optim keeps them (``"name"``...)."""
        hp = self.injected(state)
        values = translate(given, hp, where)
        refused = sorted(k for k in values if k not in hp and k in _COMMON)
        if refused:
            how = (
                f"it injects only {sorted(hp)}" if hp else
                "it was built without funcopt.inject_hyperparams, so its hyperparameters are fixed in its closures"
            )
            raise FuncoptError(
                f"{where} sets {refused}, which this transformation cannot take per group: {how}. Pass the "
                "factory instead: funcopt.as_torch_optimizer(funcopt.adamw, param_groups, lr=1e-3, ...), and "
                "every float argument becomes a per-group hyperparameter (torch's names accepted)."
            )
        values = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, (int, float)) else v
                  for k, v in values.items() if k in hp}
        return set_hyperparams(state, **values) if values else state


# Hyperparameter names a param group may set (funcopt's, after translation of torch's).
_COMMON = {"learning_rate", "lr", "b1", "b2", "betas", "eps", "weight_decay", "momentum", "dampening", "alpha",
           "rho", "lr_decay", "memory_size", "history_size"}


def check_switches(switches: Mapping[str, Any], where: str) -> None:
    if switches.get("differentiable"):
        raise FuncoptError(
            f"{where}: differentiable=True asks torch.optim to let autograd run through step(); this "
            "adapter writes the parameters in place under no_grad. Differentiate through optimization "
            "with funcopt's functional API instead (tx.update is pure: funcopt.implicit."
            "unrolled_hypergradient, or torch.func over your own loop)."
        )
    for k in ("foreach", "fused", "capturable"):
        v = switches.get(k)
        if v is not None and not isinstance(v, bool):
            raise FuncoptError(f"{where}: {k} must be True, False or None, got {v!r}.")
