"""``FuncoptOptimizer.load_state_dict`` of a ``torch.optim`` optimizer's ``state_dict`` (private):
each torch param group's hyperparameters go into the matching group, its per-parameter state
into the group's funcopt state (:func:`funcopt.interop.from_torch`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from funcopt.base import FuncoptError
from funcopt.interop._groups import BuiltSource, FactorySource
from funcopt.interop._mapping import SUPPORTED, _kind
from funcopt.interop._state_dict import from_torch

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
