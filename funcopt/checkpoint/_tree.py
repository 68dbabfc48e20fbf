"""How a pytree is written into and rebuilt from a checkpoint header (used by :mod:`funcopt.checkpoint`).

The structure is a JSON tree of nodes (``dict``/``odict`` with their keys in order, ``list``,
``tuple``, ``namedtuple`` with its recorded type name and fields, ``none``, Python scalars, and
``tensor`` nodes naming the tensor's key in the file). A funcopt state type is recorded under its
stable name (``"funcopt.ScaleByAdamState"``), a user class under its :func:`register` name or
``"module:QualName"`` (see :mod:`funcopt.checkpoint._names`). Rebuilding never imports a module
and never unpickles: a type name is only looked up in the registry of user classes, funcopt's
stable names and the table of names older funcopt versions recorded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Union

import torch

from funcopt.checkpoint._format import CheckpointError, child_path, dtype_from_name
from funcopt.checkpoint._names import is_namedtuple_class as _is_namedtuple_class
from funcopt.checkpoint._names import names_match, resolve_type_name, short_name, type_name
from funcopt.checkpoint._reader import Reader
from funcopt.checkpoint._validate import MAX_DEPTH

__all__ = ["DeviceSpec"]

DeviceSpec = Union[
    str,
    torch.device,
    Mapping[Any, Any],
    Callable[[str, torch.Tensor], Any],
    None,
]
"""Where tensors go: a device, a string, a dict ``{source device: target device}``, or a callable
``(path, tensor) -> device`` (like ``torch.load``'s ``map_location``)."""

# ---------------------------------------------------------------------------------------------
# NamedTuple types (names: see funcopt.checkpoint._names)


def _resolve_class(name: str, fields: list[str], path: str, file: str) -> type:
    if not isinstance(name, str):
        raise CheckpointError(f"{file}: the NamedTuple at {path} has no type name (damaged header).", file)
    cls = resolve_type_name(name)
    if cls is None:
        if name.startswith("funcopt.") and ":" not in name:
            hint = (
                "It is not a state type of this funcopt version (was the file written by a newer "
                "funcopt?). Upgrade funcopt, or pass like= (a template tree with the right types)."
            )
        elif name.startswith("funcopt"):
            hint = "No funcopt version had a state type of that name; pass like= (a template tree with the right types)."
        else:
            hint = (
                "Call funcopt.checkpoint.register(YourClass) before loading (with name= if the class "
                "was saved under another name), or pass like= (a template tree with the right types)."
            )
        raise CheckpointError(
            f"{file}: the node at {path} is a NamedTuple {name!r}, which is neither a funcopt "
            f"state type nor registered. {hint}",
            file,
        )
    if tuple(cls._fields) != tuple(fields):
        raise CheckpointError(
            f"{file}: the NamedTuple at {path} was saved as {name} with fields {tuple(fields)}, but "
            f"that class now has fields {tuple(cls._fields)}. Pass like= with the new structure "
            "and convert the state by hand.",
            file,
        )
    return cls


# ---------------------------------------------------------------------------------------------
# Encoding


class _Encoder:
    """Walks a pytree once: builds the JSON structure and collects tensors keyed by path."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.keys: set[str] = set()

    def encode(self, node: Any, path: str, depth: int = 0) -> dict[str, Any]:
        if depth >= MAX_DEPTH and isinstance(node, (dict, list, tuple)):
            raise CheckpointError(
                f"cannot save the tree: it is nested deeper than {MAX_DEPTH} levels (at {path}). Flatten it "
                "(e.g. a dict keyed by path strings)."
            )
        if node is None:
            return {"t": "none"}
        if isinstance(node, torch.Tensor):
            key = path or "<root>"
            if key in self.keys or key == "__metadata__":
                raise CheckpointError(f"two leaves share the path {key}; use distinct dict keys.")
            self.keys.add(key)
            self.tensors.append((key, node))
            return {"t": "tensor", "key": key}
        if isinstance(node, bool):
            return {"t": "bool", "v": node}
        if isinstance(node, int):
            return {"t": "int", "v": node}
        if isinstance(node, float):
            return {"t": "float", "v": repr(node)}
        if isinstance(node, str):
            return {"t": "str", "v": node}
        if isinstance(node, dict):
            if type(node) not in (dict, OrderedDict):
                raise CheckpointError(
                    f"cannot save the {type(node).__name__} at {path or '<root>'}: only dict and "
                    "OrderedDict mappings are supported. Convert it with dict(...)."
                )
            keys = list(node)
            for k in keys:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise CheckpointError(
                        f"cannot save the dict at {path or '<root>'}: its key {k!r} is a "
                        f"{type(k).__name__}; only str and int keys can be saved."
                    )
            out: dict[str, Any] = {
                "t": "odict" if type(node) is OrderedDict else "dict",
                "k": keys,
                "c": [self.encode(node[k], child_path(path, k), depth + 1) for k in keys],
            }
            return out
        if isinstance(node, tuple) and _is_namedtuple_class(type(node)):
            cls = type(node)
            return {
                "t": "namedtuple",
                "cls": type_name(cls),
                "f": list(cls._fields),
                "c": [self.encode(v, f"{path}.{f}", depth + 1) for f, v in zip(cls._fields, node)],
            }
        if type(node) in (list, tuple):
            return {
                "t": type(node).__name__,
                "c": [self.encode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node)],
            }
        raise CheckpointError(
            f"cannot save the leaf at {path or '<root>'}: a {type(node).__name__}. Leaves must be "
            "tensors, int, float, bool, str or None inside dict/list/tuple/NamedTuple nodes."
        )


# ---------------------------------------------------------------------------------------------
# Rebuilding


def _normalize_path(p: str) -> str:
    p = p.strip()
    if p in ("", "<root>"):
        return ""
    if p[0] in "[.":
        return p
    return child_path("", p)


def _matches(src: Any, saved: str) -> bool:
    """Whether a ``{source: target}`` key names the saved device (``"cuda"`` matches ``"cuda:1"``)."""
    try:
        a, b = torch.device(src), torch.device(saved)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"device mapping key {src!r} is not a device.") from None
    return a.type == b.type and (a.index is None or a.index == b.index)


def _target_device(device: DeviceSpec, source: str, default: torch.device) -> Any:
    if device is None or callable(device) and not isinstance(device, Mapping):
        return default
    if isinstance(device, Mapping):
        for src, dst in device.items():
            if _matches(src, source):
                return torch.device(dst)
        return default
    return torch.device(device)


def _cast(t: torch.Tensor, dtype: Any) -> torch.Tensor:
    if dtype is None:
        return t
    if isinstance(dtype, Mapping):
        target = dtype.get(t.dtype)
        return t if target is None else t.to(target)
    if isinstance(dtype, torch.dtype):
        return t.to(dtype) if t.is_floating_point() else t
    raise TypeError(f"dtype must be a torch.dtype or a dict {{source dtype: target dtype}}, got {dtype!r}.")


def _cast_dtype(saved: torch.dtype, dtype: Any) -> torch.dtype:
    if dtype is None:
        return saved
    if isinstance(dtype, Mapping):
        return dtype.get(saved, saved)
    return dtype if saved.is_floating_point else saved


class _Loader:
    def __init__(self, reader: Reader, device: DeviceSpec, dtype: Any) -> None:
        self.reader = reader
        self.device = device
        self.dtype = dtype
        if dtype is not None and not isinstance(dtype, (torch.dtype, Mapping)):
            raise TypeError(f"dtype must be a torch.dtype or a dict {{source dtype: target dtype}}, got {dtype!r}.")
        if device is not None and not callable(device) and not isinstance(device, Mapping):
            try:
                torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise CheckpointError(f"device={device!r} is not a device: {e}") from None

    def tensor(self, key: str, path: str, template: torch.Tensor | None) -> torch.Tensor:
        rec = self.reader.record(key, path)
        saved = dtype_from_name(rec["dtype"])
        shape = tuple(rec["shape"])
        if template is not None:
            want = _cast_dtype(saved, self.dtype)
            if tuple(template.shape) != shape:
                raise CheckpointError(
                    f"{self.reader.file}: leaf at {path} has shape {tuple(template.shape)} in like but "
                    f"{shape} on disk. Pass a template built for the saved model, or load without like=.",
                    self.reader.file,
                )
            if template.dtype != want:
                raise CheckpointError(
                    f"{self.reader.file}: leaf at {path} has dtype {template.dtype} in like but {saved} on "
                    f"disk{f' ({want} after dtype=)' if want != saved else ''}. Pass dtype={template.dtype} "
                    f"(or a dict {{{saved}: {template.dtype}}}) to convert.",
                    self.reader.file,
                )
        default = template.device if template is not None else torch.device("cpu")
        target = _target_device(self.device, rec.get("device", "cpu"), default)
        if not callable(self.device) and torch.device(target).type == "meta":
            return torch.empty(shape, dtype=_cast_dtype(saved, self.dtype), device="meta")
        t = _cast(self.reader.tensor(key, path), self.dtype)
        if callable(self.device) and not isinstance(self.device, Mapping):
            target = self.device(path or "<root>", t)
        try:
            return t.to(target)
        except (RuntimeError, AssertionError) as e:
            raise CheckpointError(f"{self.reader.file}: cannot move the leaf at {path} to {target}: {e}") from None

    def rebuild(self, node: dict[str, Any], path: str) -> Any:
        kind = node.get("t")
        if kind == "none":
            return None
        if kind == "tensor":
            return self.tensor(node["key"], path, None)
        if kind in ("int", "bool", "str"):
            return node["v"]
        if kind == "float":
            return float(node["v"])
        if kind in ("dict", "odict"):
            items = [(k, self.rebuild(c, child_path(path, k))) for k, c in zip(node["k"], node["c"])]
            return OrderedDict(items) if kind == "odict" else dict(items)
        if kind in ("list", "tuple"):
            children = [self.rebuild(c, f"{path}[{i}]") for i, c in enumerate(node["c"])]
            return children if kind == "list" else tuple(children)
        if kind == "namedtuple":
            cls = _resolve_class(node["cls"], node["f"], path or "<root>", self.reader.file)
            return cls(*[self.rebuild(c, f"{path}.{f}") for f, c in zip(node["f"], node["c"])])
        raise CheckpointError(f"{self.reader.file}: unknown node type {kind!r} at {path or '<root>'}.", self.reader.file)

    def _mismatch(self, path: str, on_disk: str, in_like: str) -> CheckpointError:
        return CheckpointError(
            f"{self.reader.file}: structure mismatch at {path or '<root>'}: {in_like} in like but "
            f"{on_disk} on disk. Pass a template with the saved structure (see "
            f"`python -m funcopt inspect {self.reader.file}`), or load without like=.",
            self.reader.file,
        )

    def restore(self, node: dict[str, Any], like: Any, path: str) -> Any:
        kind = node.get("t")
        where = path or "<root>"
        if isinstance(like, torch.Tensor):
            if kind != "tensor":
                raise self._mismatch(path, _describe_node(node), f"a tensor of shape {tuple(like.shape)}")
            return self.tensor(node["key"], path, like)
        if like is None:
            if kind != "none":
                raise self._mismatch(path, _describe_node(node), "None")
            return None
        if isinstance(like, (bool, int, float, str)):
            want = type(like).__name__
            if kind != want:
                raise self._mismatch(path, _describe_node(node), f"a Python {want}")
            return self.rebuild(node, path)
        if isinstance(like, dict):
            if kind not in ("dict", "odict"):
                raise self._mismatch(path, _describe_node(node), f"a dict with keys {sorted(map(str, like))}")
            saved = dict(zip(node["k"], node["c"]))
            if set(saved) != set(like):
                only_like = sorted(str(k) for k in set(like) - set(saved))
                only_disk = sorted(str(k) for k in set(saved) - set(like))
                raise CheckpointError(
                    f"{self.reader.file}: the dict at {where} has keys {only_like} only in like and "
                    f"{only_disk} only on disk. Fix the template, or use paths= to load a sub-tree.",
                    self.reader.file,
                )
            items = [(k, self.restore(saved[k], v, child_path(path, k))) for k, v in like.items()]
            return type(like)(items) if type(like) is OrderedDict else dict(items)
        if isinstance(like, tuple) and _is_namedtuple_class(type(like)):
            cls = type(like)
            if kind != "namedtuple" or list(node["f"]) != list(cls._fields):
                raise self._mismatch(path, _describe_node(node), f"{cls.__name__}{tuple(cls._fields)}")
            if not names_match(node["cls"], cls):
                raise self._mismatch(path, _describe_node(node), f"{cls.__name__}{tuple(cls._fields)}")
            return cls(*[self.restore(c, v, f"{path}.{f}") for f, c, v in zip(cls._fields, node["c"], like)])
        if type(like) in (list, tuple):
            if kind != type(like).__name__ or len(node["c"]) != len(like):
                raise self._mismatch(path, _describe_node(node), f"a {type(like).__name__} of length {len(like)}")
            children = [self.restore(c, v, f"{path}[{i}]") for i, (c, v) in enumerate(zip(node["c"], like))]
            return children if isinstance(like, list) else tuple(children)
        raise CheckpointError(
            f"like= has a {type(like).__name__} at {where}; templates may only hold tensors, Python "
            "scalars, None, dicts, lists, tuples and NamedTuples."
        )


def _describe_node(node: dict[str, Any]) -> str:
    kind = node.get("t")
    if kind == "tensor":
        return "a tensor"
    if kind in ("dict", "odict"):
        return f"a dict with keys {sorted(map(str, node['k']))}"
    if kind in ("list", "tuple"):
        return f"a {kind} of length {len(node['c'])}"
    if kind == "namedtuple":
        return f"{short_name(node['cls'])}{tuple(node['f'])}"
    if kind == "none":
        return "None"
    return f"a Python {kind}"


def _find(node: dict[str, Any], target: str, path: str = "") -> dict[str, Any] | None:
    if path == target:
        return node
    kind = node.get("t")
    if kind in ("dict", "odict"):
        steps = [child_path(path, k) for k in node["k"]]
    elif kind in ("list", "tuple"):
        steps = [f"{path}[{i}]" for i in range(len(node["c"]))]
    elif kind == "namedtuple":
        steps = [f"{path}.{f}" for f in node["f"]]
    else:
        return None
    for step, child in zip(steps, node["c"]):
        if target.startswith(step):
            found = _find(child, target, step)
            if found is not None:
                return found
    return None
