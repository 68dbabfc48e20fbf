"""L-BFGS history conversion: torch keeps its history as Python lists of flat vectors (in
parameter order) under the first parameter; funcopt keeps ring buffers of vectors in
``tree.ravel`` (optree) order. Private helpers of :func:`from_torch` and :func:`to_torch`."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import optree
import torch

from funcopt.base import FuncoptError, GradientTransformation, OptState, PyTree
from funcopt.interop._mapping import _rebuild, _walk
from funcopt.transforms import InjectHyperparamsState



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
    from funcopt.solvers import ScaleByLbfgsState

    if isinstance(state, ScaleByLbfgsState):
        return fn(state)
    if isinstance(state, InjectHyperparamsState):
        return state._replace(inner_state=_lbfgs_blocks(state.inner_state, fn))
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(_lbfgs_blocks(s, fn) for s in state)
    return state


def _lbfgs_from_torch(sd: Mapping[str, Any], group: Mapping[str, Any], params: PyTree, paths: list[str],
                      tx: GradientTransformation | None) -> tuple[GradientTransformation, OptState]:
    from funcopt.solvers import lbfgs

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
