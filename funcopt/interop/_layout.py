""":class:`FuncoptOptimizer`'s state in torch.optim's layout (private): ``opt.state[p]``,
``state_dict()`` and loading it back.

Per parameter, every params-shaped part of a group's funcopt state (moments, momentum buffers,
accumulators: a subtree with the group's params structure) under torch.optim's name where torch
has the field (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ``sum``...; the table of
:mod:`funcopt.interop`'s conversion) and its funcopt field name otherwise, plus ``step``, the
group's step count. The rest of the state (step counts, injected hyperparameters, L-BFGS's
history...) goes into the param group's ``"funcopt"`` entry as plain containers, with each
per-parameter part replaced by its name. ``torch.distributed.checkpoint``'s ``get_state_dict``
keeps exactly ``state`` and ``param_groups``, so all of it travels through DCP, the tensors as
they are (sharded DTensors under FSDP2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, Callable, NamedTuple

import optree
import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError
from funcopt.interop._mapping import _FIELDS, _HELD
from funcopt.interop._plain import state_from_plain, state_to_plain
from funcopt.transforms import InjectHyperparamsState

FORMAT = "funcopt.FuncoptOptimizer/2"
GROUP_KEY = "funcopt"
STEP = "step"


class Field(NamedTuple):
    """One params-shaped part of a state: where it is, its name, which params hold a tensor there."""

    path: tuple[Any, ...]
    name: str
    held: Callable[[torch.Tensor], bool] | None


def _path_str(path: tuple[Any, ...], kinds: tuple[str, ...]) -> str:
    return "".join(f".{p}" if k == "field" else f"[{p!r}]" for p, k in zip(path, kinds)) or "<root>"


def fields(state: Any, spec: Any) -> list[Field]:
    """The params-shaped parts of ``state`` (subtrees with the params' structure ``spec`` and
    tensor leaves), outermost first, each named as described in the module docstring."""
    found: list[tuple[tuple, tuple, str, Callable | None]] = []

    def visit(node: Any, path: tuple, kinds: tuple, owner: type | None) -> None:
        if isinstance(node, torch.Tensor) or node is None or isinstance(node, (str, int, float, bool)):
            return
        if path and _tree.structure(node) == spec and all(isinstance(x, torch.Tensor) for x in _tree.leaves(node)):
            last = path[-1]
            if owner is not None and last in _FIELDS.get(owner, {}):
                name = _FIELDS[owner][last]
            else:
                name = last if isinstance(last, str) else _path_str(path, kinds)
            held = _HELD.get(owner, {}).get(last) if owner is not None else None
            found.append((path, kinds, name, held))
            return
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            for f, v in zip(node._fields, node):
                visit(v, path + (f,), kinds + ("field",), type(node))
        elif isinstance(node, (tuple, list)):
            for i, v in enumerate(node):
                visit(v, path + (i,), kinds + ("index",), None)
        elif isinstance(node, dict):
            for k, v in node.items():
                visit(v, path + (k,), kinds + ("key",), None)

    visit(state, (), (), None)
    names = [name for _, _, name, _ in found]
    out = []
    for path, kinds, name, held in found:
        if names.count(name) > 1 or name in (STEP, GROUP_KEY):
            name = _path_str(path, kinds)
        out.append(Field(path, name, held))
    return out


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = getattr(node, p) if isinstance(node, tuple) and hasattr(node, "_fields") else node[p]
    return node


def _put(node: Any, path: tuple, value: Any) -> Any:
    """``node`` with the subtree at ``path`` replaced by ``value`` (new containers on the way)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return node._replace(**{head: _put(getattr(node, head), rest, value)})
    if isinstance(node, (tuple, list)):
        items = list(node)
        items[head] = _put(items[head], rest, value)
        return type(node)(items)
    out = dict(node)
    out[head] = _put(node[head], rest, value)
    return out


def count(state: Any) -> torch.Tensor | None:
    """The group's step count: the first ``count`` of a block holding per-parameter state (an
    ``inject_hyperparams`` state's inner count before its own), else the first count found."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        if isinstance(state, InjectHyperparamsState):
            inner = count(state.inner_state)
            return inner if inner is not None else state.count
        c = getattr(state, "count", None)
        if isinstance(c, torch.Tensor) and c.dim() == 0:
            return c
    if isinstance(state, (tuple, list)):
        for s in state:
            c = count(s)
            if c is not None:
                return c
    return None


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_of(state: Any) -> torch.Tensor:
    """``step`` as torch.optim records it: a 0-dim float tensor (0 where the state counts nothing)."""
    c = count(state)
    return torch.zeros((), dtype=_scalar_dtype()) if c is None else c.detach().to(_scalar_dtype())


def entries(state: Any, spec: Any, params: list[torch.Tensor], found: list[Field]) -> list[dict[str, Any]]:
    """Each parameter's entry: ``step`` and its tensor of every params-shaped field it holds."""
    step = step_of(state)
    out: list[dict[str, Any]] = [{STEP: step} for _ in params]
    for f in found:
        for entry, p, x in zip(out, params, _tree.leaves(_get(state, f.path))):
            if f.held is None or f.held(p):
                entry[f.name] = x
    return out


def group_entry(state: Any, found: list[Field], paths: list[str]) -> dict[str, Any]:
    """The param group's ``"funcopt"`` entry: the state without its params-shaped parts."""
    skeleton = state
    for f in found:
        skeleton = _put(skeleton, f.path, f.name)
    return {"format": FORMAT, "paths": list(paths), "state": state_to_plain(skeleton)}


def restore(template: Any, spec: Any, params: list[torch.Tensor], paths: list[str], meta: Mapping[str, Any],
            saved: list[Mapping[str, Any]], where: str) -> Any:
    """The state saved as ``meta`` (the group's entry) and ``saved`` (each parameter's entry),
    checked against ``template`` (the group's current state: structure, shapes, dtypes), each
    tensor on its template leaf's device."""
    found = fields(template, spec)
    skeleton = template
    for f in found:
        skeleton = _put(skeleton, f.path, f.name)
    state = state_from_plain(meta["state"], like=skeleton)
    for f in found:
        like = _tree.leaves(_get(template, f.path))
        leaves = []
        for path, p, entry, t in zip(paths, params, saved, like):
            if f.held is not None and not f.held(p):
                leaves.append(t)
                continue
            x = entry.get(f.name) if isinstance(entry, Mapping) else None
            if not isinstance(x, torch.Tensor):
                raise FuncoptError(
                    f"load_state_dict: the state of {where}{path} has no tensor {f.name!r} "
                    f"({sorted(entry) if isinstance(entry, Mapping) else entry!r}); the state_dict comes from "
                    "another optimizer, or a checkpoint loader dropped it (DCP: load with the same optimizer)."
                )
            if x.shape != t.shape or x.dtype != t.dtype:
                raise FuncoptError(
                    f"load_state_dict: {f.name!r} of {where}{path} was saved as {x.dtype} of shape "
                    f"{tuple(x.shape)}; this optimizer keeps {t.dtype} of shape {tuple(t.shape)}."
                )
            leaves.append(x if x.device == t.device else x.to(t.device))
        state = _put(state, f.path, optree.tree_unflatten(_tree.structure(_get(template, f.path)), leaves))
    return state


class StateView(MutableMapping):
    """``opt.state`` of a :class:`FuncoptOptimizer`: ``{param: {"step", "exp_avg", ...}}`` read
    from the funcopt state when asked (the tensors are the live state buffers, as in
    torch.optim). Every parameter has an entry from the start (``step`` 0 before the first
    step), so torch code that initializes an empty optimizer state by a fake step (DCP's
    ``get_state_dict``) leaves this one alone. Writing ``opt.state[p] = {...}`` replaces the
    named tensors (e.g. moved to another device); ``step`` is the group's count and stays."""

    def __init__(self, opt: Any):
        self._opt = opt
        self._index: tuple[tuple, dict[int, tuple[int, int]]] = ((), {})
        self._entries: dict[int, tuple[Any, list[dict[str, Any]]]] = {}

    def _groups(self) -> list[Mapping[str, Any]]:
        return self._opt.param_groups[: len(getattr(self._opt, "_groups", ()))]

    def _find(self, p: Any) -> tuple[int, int] | None:
        groups = self._groups()
        key = tuple((id(group["params"]), len(group["params"])) for group in groups)
        for fresh in (False, True):  # the cached index, then one built now (a list changed in place)
            if fresh or self._index[0] != key:
                index = {id(q): (i, j) for i, group in enumerate(groups) for j, q in enumerate(group["params"])}
                self._index = (key, index)
            at = self._index[1].get(id(p))
            if at is not None and groups[at[0]]["params"][at[1]] is p:
                return at
        return None

    def _params(self) -> Iterator[torch.Tensor]:
        for group in self._groups():
            yield from group["params"]

    def __getitem__(self, p: Any) -> dict[str, Any]:
        at = self._find(p)
        if at is None:
            raise KeyError(p)
        i, j = at
        g = self._opt._groups[i]
        cached = self._entries.get(i)
        if cached is None or cached[0] is not g.state:
            leaves = list(self._opt.param_groups[i]["params"])
            cached = (g.state, entries(g.state, g.spec, leaves, fields(g.state, g.spec)))
            self._entries[i] = cached
        return dict(cached[1][j])

    def __setitem__(self, p: Any, value: Mapping[str, Any]) -> None:
        at = self._find(p)
        if at is None:
            raise FuncoptError("opt.state[p] = ...: p is not a parameter of this optimizer.")
        i, j = at
        g = self._opt._groups[i]
        by_name = {f.name: f for f in fields(g.state, g.spec)}
        state = g.state
        for name, x in value.items():
            if name == STEP:
                continue  # the group's count: kept in the funcopt state
            if name not in by_name or not isinstance(x, torch.Tensor):
                raise FuncoptError(
                    f"opt.state[p][{name!r}]: this optimizer's state has {sorted(by_name)} per parameter (tensors)."
                )
            subtree = _get(state, by_name[name].path)
            leaves = _tree.leaves(subtree)
            leaves[j] = x
            state = _put(state, by_name[name].path, optree.tree_unflatten(_tree.structure(subtree), leaves))
        g.state = state

    def __delitem__(self, p: Any) -> None:
        raise FuncoptError("the state of one parameter cannot be deleted; its group keeps one funcopt state.")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._params()

    def __len__(self) -> int:
        return sum(1 for _ in self._params())

    def __contains__(self, p: object) -> bool:
        return self._find(p) is not None

    def __repr__(self) -> str:
        return f"StateView({len(self)} parameters)"


# ---------------------------------------------------------------------------------------------
# FuncoptOptimizer.state_dict / load_state_dict


def state_dict(opt: Any) -> dict[str, Any]:
    """``opt``'s state_dict (see :meth:`FuncoptOptimizer.state_dict`), without the hooks."""
    state: dict[int, dict[str, Any]] = {}
    groups, start = [], 0
    for g, group in zip(opt._groups, opt.param_groups):
        leaves = list(group["params"])
        found = fields(g.state, g.spec)
        for k, entry in enumerate(entries(g.state, g.spec, leaves, found)):
            state[start + k] = entry
        saved = {k: v for k, v in group.items() if k != "params" and not callable(v)}
        saved["params"] = list(range(start, start + len(leaves)))
        saved[GROUP_KEY] = group_entry(g.state, found, g.paths)
        start += len(leaves)
        groups.append(saved)
    return {"state": state, "param_groups": groups}


def _check_paths(opt: Any, saved_paths: list[str], n_groups: int) -> None:
    here = opt._all_paths()
    if saved_paths != here or n_groups != len(opt.param_groups):
        diff = next(
            (f"#{i}: saved {a}, here {b}" for i, (a, b) in enumerate(zip(saved_paths, here)) if a != b),
            f"saved {len(saved_paths)} parameters in {n_groups} groups, here {len(here)} in {len(opt.param_groups)}",
        )
        raise FuncoptError(
            f"FuncoptOptimizer.load_state_dict: the parameters differ from the saved ones ({diff}). "
            "Build the optimizer over the same model/parameter groups that were saved."
        )


def _restore_groups(opt: Any, saved_groups: list[Mapping[str, Any]]) -> None:
    # The state holds the values the last step used; the saved group may hold newer ones an
    # LR scheduler wrote after that step. Restore both, so the next step picks those up.
    for group, saved in zip(opt.param_groups, saved_groups):
        for k, v in saved.items():
            if k not in ("params", GROUP_KEY):
                group[k] = v


def load_own(opt: Any, sd: Mapping[str, Any]) -> None:
    """Loads a :func:`state_dict` (also as DCP's ``set_state_dict`` passes it: keyed by
    parameter names instead of indices). Checks everything before changing anything."""
    saved_groups = list(sd["param_groups"])
    metas = [g[GROUP_KEY] for g in saved_groups]
    for m in metas:
        if not isinstance(m, Mapping) or m.get("format") != FORMAT:
            raise FuncoptError(
                f"FuncoptOptimizer.load_state_dict: a param group's {GROUP_KEY!r} entry is not one this "
                f"version writes (format {FORMAT!r}): {m.get('format') if isinstance(m, Mapping) else m!r}."
            )
    single = opt._single and len(opt._groups) == 1
    saved_paths = [p if single else f"param_groups[{i}]{p}" for i, m in enumerate(metas) for p in m["paths"]]
    _check_paths(opt, saved_paths, len(saved_groups))
    per_param = sd.get("state", {})
    states = []
    for g, group, saved, meta in zip(opt._groups, opt.param_groups, saved_groups, metas):
        leaves = list(group["params"])
        opt._sync_devices(g, leaves)
        saved_entries = [per_param.get(k, per_param.get(str(k), {})) for k in saved["params"]]
        states.append(restore(g.state, g.spec, leaves, g.paths, meta, saved_entries, g.where))
    opt.funcopt_state = states[0] if single else tuple(states)
    _restore_groups(opt, saved_groups)


def load_v1(opt: Any, sd: Any, version: str) -> None:
    """funcopt 0.2.0's ``state_dict``: the whole state under ``funcopt_state``, ``state`` empty."""
    if not isinstance(sd, Mapping) or sd.get("format") != version:
        keys = sorted(sd) if isinstance(sd, Mapping) else type(sd).__name__
        raise FuncoptError(
            "FuncoptOptimizer.load_state_dict expects a dict from FuncoptOptimizer.state_dict() (this "
            f"version's, or funcopt 0.2.0's with format {version!r}) or a torch.optim optimizer's "
            f"state_dict(), got {keys}."
        )
    _check_paths(opt, list(sd["param_paths"]), len(sd["param_groups"]))
    for g, group in zip(opt._groups, opt.param_groups):
        opt._sync_devices(g, list(group["params"]))
    opt.funcopt_state = state_from_plain(sd["funcopt_state"], like=opt.funcopt_state)
    _restore_groups(opt, sd["param_groups"])
