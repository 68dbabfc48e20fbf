"""A ``torch.optim`` optimizer's ``state_dict`` into :class:`FuncoptOptimizer` and back (private).

``load_state_dict``: each torch param group's hyperparameters go into the matching group, its
per-parameter state into the group's funcopt state (:func:`funcopt.interop.from_torch`).
``torch_state_dict``: each group's funcopt state as the torch optimizer's per-parameter state
(:func:`funcopt.interop.to_torch`), with torch's param group keys.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from funcopt.base import FuncoptError
from funcopt.interop._groups import SWITCHES, BuiltSource, FactorySource
from funcopt.interop._mapping import SUPPORTED, _kind
from funcopt.interop._state_dict import from_torch, to_torch

_KIND_OF_FACTORY = {"sparse_adam": "sparseadam"}
_SAME_KIND = [{"adam", "adamw"}]


def _kinds(opt: Any, sd: Mapping[str, Any]) -> str:
    ours = None
    factory = getattr(opt, "_factory", None)
    if factory is not None:
        name = getattr(factory, "__name__", "")
        name = _KIND_OF_FACTORY.get(name, name)
        ours = name if name in SUPPORTED else None
    try:
        theirs = _kind(None, sd, None)
    except FuncoptError:
        if ours is None:
            raise
        return ours
    if ours is not None and ours != theirs and {ours, theirs} not in _SAME_KIND:
        raise FuncoptError(
            f"load_state_dict got the state_dict of torch.optim's {theirs} (read from its param group keys), "
            f"but this optimizer runs funcopt.{factory.__name__}; build the adapter with the optimizer the "
            f"state_dict comes from (as_torch_optimizer(funcopt.{theirs}, ...))."
        )
    return theirs


def load_torch_state_dict(opt: Any, sd: Mapping[str, Any]) -> None:
    """Continues a torch.optim run: ``opt`` must have the torch optimizer's param groups, with
    the same parameters in the same order."""
    groups = list(sd["param_groups"])
    if len(groups) != len(opt.param_groups):
        raise FuncoptError(
            f"load_state_dict: the torch state_dict has {len(groups)} param groups, this optimizer "
            f"{len(opt.param_groups)}; build it with the same groups as the torch optimizer."
        )
    kind = _kinds(opt, sd)
    for i, (saved, g, group) in enumerate(zip(groups, opt._groups, opt.param_groups)):
        label = g.where or "param_groups[0]"
        if len(saved["params"]) != len(g.paths):
            raise FuncoptError(
                f"load_state_dict: torch's param group {i} has {len(saved['params'])} parameters, {label} "
                f"here has {len(g.paths)}; build the optimizer over the same parameters, in the same order."
            )
        restore = dict(group)
        try:
            if isinstance(g.source, FactorySource):
                for k, v in saved.items():
                    if k not in ("params", "param_names"):
                        group[k] = v
                tx = g.source.build(g.source.read(group, g.written, label))
            else:
                hp = BuiltSource.injected(g.state)
                if hp:
                    keys = {k for k in saved if k in g.written and k not in ("params", "param_names")}
                    for k in keys:
                        group[k] = saved[k]
                    g.state = g.source.apply(g.state, group, g.written, label)
                tx = g.source.tx
            _, state = from_torch({"state": sd["state"], "param_groups": [saved]}, g.view(list(group["params"])),
                                  kind=kind, tx=tx)
        except Exception:  # leave the group as it was
            group.clear()
            group.update(restore)
            raise
        g.state = state
        if isinstance(g.source, FactorySource):
            opt._publish(i, g.source.commit(g.source.read(group, g.written, label)))
        else:
            opt._publish(i, g.source.keys(g.state))


def _torch_class(opt: Any) -> type | None:
    factory = getattr(opt, "_factory", None)
    if factory is None:
        return None
    name = getattr(factory, "__name__", "")
    name = _KIND_OF_FACTORY.get(name, name)
    if name not in SUPPORTED:
        return None
    classes = {n.lower(): c for n, c in vars(torch.optim).items()
               if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)}
    return classes.get(name)


def _torch_group(cls: type, group: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The param group ``cls`` builds from ``group``'s settings (torch's own keys and defaults)."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in group.items() if k in accepted and k != "params" and v is not None}
    try:
        dummy = cls([torch.zeros(2, 2, requires_grad=True)], **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise FuncoptError(f"torch_state_dict: torch.optim.{cls.__name__} refuses {where}'s settings: {e}") from None
    return {k: v for k, v in dummy.param_groups[0].items() if k != "params"}


def torch_state_dict(opt: Any, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """``opt``'s state as the state_dict of the torch.optim optimizer it replaces (see
    :meth:`FuncoptOptimizer.torch_state_dict`)."""
    torch_groups = None
    if optimizer is not None:
        torch_groups = optimizer.state_dict()["param_groups"]
        if len(torch_groups) != len(opt.param_groups):
            raise FuncoptError(
                f"torch_state_dict: the torch optimizer has {len(torch_groups)} param groups, this one "
                f"{len(opt.param_groups)}; build it with the same groups."
            )
    cls = _torch_class(opt)
    if torch_groups is None and cls is None:
        what = getattr(opt._factory, "__name__", None) if opt._factory is not None else None
        raise FuncoptError(
            f"torch_state_dict: torch.optim has no counterpart of funcopt.{what}; the state can be converted for "
            f"torch.optim's {', '.join(SUPPORTED)}." if what else
            "torch_state_dict: this optimizer runs a transformation built by hand, so which torch.optim optimizer "
            "to write for cannot be told; pass it: opt.torch_state_dict(torch.optim.AdamW(same_groups))."
        )
    kind = type(optimizer).__name__ if optimizer is not None else cls.__name__  # type: ignore[union-attr]
    state: dict[int, dict[str, Any]] = {}
    groups, start = [], 0
    for i, (g, group) in enumerate(zip(opt._groups, opt.param_groups)):
        where = g.where or "param_groups[0]"
        leaves = list(group["params"])
        if torch_groups is not None:
            if len(torch_groups[i]["params"]) != len(leaves):
                raise FuncoptError(
                    f"torch_state_dict: torch's param group {i} has {len(torch_groups[i]['params'])} parameters, "
                    f"{where} here {len(leaves)}."
                )
            base = {k: v for k, v in torch_groups[i].items() if k != "params"}
        else:
            base = _torch_group(cls, group, where)
        for k, v in group.items():  # this optimizer's current values (what a scheduler wrote)
            if k != "params" and (k in base or k == "initial_lr") and v is not None and not callable(v):
                if k not in SWITCHES or isinstance(v, bool):
                    base[k] = v
        base["params"] = list(range(start, start + len(leaves)))
        converted = to_torch(g.state, g.view(leaves), {"state": {}, "param_groups": [base]}, kind=kind)
        state.update(converted["state"])
        groups.append(converted["param_groups"][0])
        start += len(leaves)
    return {"state": state, "param_groups": groups}
