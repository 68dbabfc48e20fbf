"""Safe, atomic checkpoints of pytrees: ``save``, ``load``, ``inspect``, ``device_put``.

A checkpoint is one file in the `safetensors <https://github.com/huggingface/safetensors>`_
layout: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes. Tensors
are keyed by their pytree path (``['params']['w']``, ``['opt_state'][1].mu['w']``). The JSON
header's ``__metadata__`` carries one more JSON document (under the key ``funcopt``) with the
tree structure, the Python scalars, the original dtypes and devices, CRC-32 checksums of every
tensor and the user's metadata; a CRC-32 of the whole header (``funcopt.crc32``) detects a
damaged header. Nothing is ever unpickled and no code named by the file is run: NamedTuple
state types are rebuilt only if they live in the ``funcopt`` package or were registered with
:func:`register`.

The file stays a valid safetensors file, so ``safetensors.torch.load_file`` reads its tensors
too; conversely :func:`load` reads a plain safetensors file as a flat dict of tensors.

Example:
    >>> tx = funcopt.adam(1e-3)
    >>> funcopt.checkpoint.save("ckpt.safetensors", {"params": params, "opt_state": state})
    >>> template = {"params": params, "opt_state": tx.init(params)}
    >>> restored = funcopt.checkpoint.load("ckpt.safetensors", like=template, device="cuda")
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import sys
import zlib
from collections import OrderedDict
from typing import Any, Callable, Union
from collections.abc import Mapping, Sequence

import optree
import torch

from funcopt.base import FuncoptError, PyTree
from funcopt.checkpoint_format import (
    CheckpointError,
    CheckpointInfo,
    LeafInfo,
    Reader,
    child_path,
    dtype_from_name,
    dtype_name,
    storage_code,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointInfo",
    "LeafInfo",
    "DeviceSpec",
    "save",
    "load",
    "inspect",
    "device_put",
    "register",
]

DeviceSpec = Union[
    str,
    torch.device,
    Mapping[Any, Any],
    Callable[[str, torch.Tensor], Any],
    None,
]
"""Where tensors go: a device, a string, a dict ``{source device: target device}``, or a callable
``(path, tensor) -> device`` (like ``torch.load``'s ``map_location``)."""

FORMAT = "funcopt.checkpoint"
FORMAT_VERSION = 1
_CRC_KEY = "funcopt.crc32"
_CRC_ZERO = "00000000"
_MODULE_RE = re.compile(r"^funcopt(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_REGISTRY: dict[str, type] = {}
_REGISTERED_NAMES: dict[type, str] = {}


# ---------------------------------------------------------------------------------------------
# NamedTuple registration


def _is_namedtuple_class(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple)


def register(cls: type, *, name: str | None = None) -> type:
    """Allows :func:`load` (without ``like``) to rebuild the user NamedTuple ``cls``.

    funcopt's own state types (every NamedTuple defined in the ``funcopt`` package) are known
    without registration. Usable as a class decorator. ``name`` defaults to
    ``"module:QualName"``; pass a stable name to keep old checkpoints loadable after moving the
    class to another module.

    Example:
        >>> @funcopt.checkpoint.register
        ... class MyState(NamedTuple):
        ...     count: torch.Tensor
        ...     ema: dict
    """
    if not _is_namedtuple_class(cls):
        raise TypeError(
            f"register expects a NamedTuple class, got {cls!r}. Only NamedTuple types can be "
            "rebuilt from a checkpoint; other containers must be dicts, lists or tuples."
        )
    key = name if name is not None else f"{cls.__module__}:{cls.__qualname__}"
    if not isinstance(key, str) or not key:
        raise TypeError(f"register: name must be a non-empty string, got {name!r}.")
    other = _REGISTRY.get(key)
    if other is not None and other is not cls and (other.__module__, other.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise FuncoptError(
            f"register: the name {key!r} is already taken by {other.__module__}.{other.__qualname__}. "
            "Pass a different name=."
        )
    _REGISTRY[key] = cls
    _REGISTERED_NAMES[cls] = key
    return cls


def _class_name(cls: type) -> str:
    return _REGISTERED_NAMES.get(cls, f"{cls.__module__}:{cls.__qualname__}")


def _resolve_class(name: str, fields: list[str], path: str, file: str) -> type:
    cls = _REGISTRY.get(name)
    if cls is None:
        module, _, qualname = name.partition(":")
        if _MODULE_RE.match(module) and qualname and "<" not in qualname:
            try:
                obj: Any = importlib.import_module(module)
                for part in qualname.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError):
                obj = None
            if _is_namedtuple_class(obj):
                cls = obj
        if cls is None:
            raise CheckpointError(
                f"{file}: the node at {path} is a NamedTuple {name!r}, which is neither a funcopt "
                "state type nor registered. Call funcopt.checkpoint.register(YourClass) before "
                "loading, or pass like= (a template tree with the right types).",
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
# Encoding a pytree


class _Encoder:
    """Walks a pytree once: builds the JSON structure and collects tensors keyed by path."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.keys: set[str] = set()

    def encode(self, node: Any, path: str) -> dict[str, Any]:
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
                "c": [self.encode(node[k], child_path(path, k)) for k in keys],
            }
            return out
        if isinstance(node, tuple) and _is_namedtuple_class(type(node)):
            cls = type(node)
            return {
                "t": "namedtuple",
                "cls": _class_name(cls),
                "f": list(cls._fields),
                "c": [self.encode(v, f"{path}.{f}") for f, v in zip(cls._fields, node)],
            }
        if type(node) in (list, tuple):
            return {
                "t": type(node).__name__,
                "c": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(node)],
            }
        raise CheckpointError(
            f"cannot save the leaf at {path or '<root>'}: a {type(node).__name__}. Leaves must be "
            "tensors, int, float, bool, str or None inside dict/list/tuple/NamedTuple nodes."
        )


def _tensor_bytes(t: torch.Tensor, key: str) -> memoryview:
    """The raw little-endian bytes of ``t``'s data (a contiguous CPU copy if needed)."""
    if t.layout != torch.strided or t.is_quantized or getattr(t, "is_nested", False):
        raise CheckpointError(f"cannot save the tensor at {key}: layout {t.layout} is not supported (dense only).")
    if t.device.type == "meta":
        raise CheckpointError(
            f"cannot save the tensor at {key}: it is on the meta device and has no data. "
            "Materialize it first (e.g. funcopt.checkpoint.device_put(tree, 'cpu') after init)."
        )
    storage_code(t.dtype, key)
    t = t.detach()
    try:
        if t.is_complex():
            t = torch.view_as_real(t.resolve_conj())
        t = t.resolve_neg().to("cpu").contiguous()
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())
    except (RuntimeError, TypeError) as e:  # functorch-wrapped tensors and other exotic tensors
        raise CheckpointError(
            f"cannot save the tensor at {key}: {e}. (Tensors inside torch.func.grad/vmap cannot be "
            "saved; save outside the transform.)"
        ) from None


def _header_bytes(doc: dict[str, Any], entries: dict[str, Any], crc: str, min_len: int = 0) -> bytes:
    header = {
        "__metadata__": {"funcopt": json.dumps(doc, separators=(",", ":")), _CRC_KEY: crc},
        **entries,
    }
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    target = max(len(raw), min_len)
    target += (-(8 + target)) % 8  # align the data section to 8 bytes, as safetensors does
    return raw + b" " * (target - len(raw))


def _finish_header(raw: bytes) -> bytes:
    crc = zlib.crc32(raw)
    marker = f'"{_CRC_KEY}":"{_CRC_ZERO}"'.encode()
    assert raw.count(marker) == 1
    return raw.replace(marker, f'"{_CRC_KEY}":"{crc:08x}"'.encode())


def _find_step(enc: _Encoder, metadata: dict[str, Any]) -> int | None:
    if isinstance(metadata.get("step"), int) and not isinstance(metadata.get("step"), bool):
        return metadata["step"]
    for key, t in enc.tensors:
        if key.endswith(".count") and t.dim() == 0 and not t.is_floating_point() and t.device.type != "meta":
            if t.dtype != torch.bool and not t.is_complex():
                return int(t.detach().to("cpu"))
    return None


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """The temporary file name :func:`save` writes before renaming it to ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def save(
    path: str | os.PathLike[str],
    tree: PyTree,
    *,
    metadata: Mapping[str, Any] | None = None,
    step: int | None = None,
) -> str:
    """Writes ``tree`` to one safetensors file at ``path``, atomically; like ``torch.save`` without pickle.

    Leaves may be tensors (any device, contiguous or not, sharing storage or not; float16,
    bfloat16, float32/64, complex, integer and bool, including 0-dim and empty) and Python
    ``int``/``float``/``bool``/``str``; nodes may be dicts (str or int keys), OrderedDicts, lists,
    tuples, NamedTuples and ``None``. The file is first written to a temporary file in the same
    directory, flushed and fsynced, then renamed over ``path`` (and the directory fsynced), so an
    interrupted save never damages an existing checkpoint at ``path``.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        tree: the pytree, e.g. ``{"params": params, "opt_state": state, "epoch": 3}``.
        metadata: JSON-serializable user data (str keys), returned by :func:`inspect`.
        step: the training step shown by :func:`inspect`; by default ``metadata["step"]`` or the
            first 0-dim integer leaf named ``count`` (an optimizer's step count).

    Returns:
        The absolute path written.
    """
    path = os.fspath(path)
    if sys.byteorder != "little":
        raise CheckpointError("funcopt checkpoints need a little-endian machine (safetensors is little-endian).")
    meta = dict(metadata or {})
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"metadata must be JSON-serializable (str keys, plain values): {e}") from None
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise CheckpointError(f"step must be an int, got {step!r}.")
    enc = _Encoder()
    structure = enc.encode(tree, "")
    records: dict[str, Any] = {}
    entries: dict[str, Any] = {}
    offset = 0
    for key, t in enc.tensors:
        shape = list(t.shape) + ([2] if t.is_complex() else [])
        nbytes = t.numel() * t.element_size()
        code = storage_code(t.dtype, key)
        records[key] = {
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "device": str(t.device),
            "crc32": _CRC_ZERO,
        }
        entries[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "torch": torch.__version__.split("+")[0],
        "step": step if step is not None else _find_step(enc, meta),
        "metadata": meta,
        "tree": structure,
        "tensors": records,
    }
    placeholder = _header_bytes(doc, entries, _CRC_ZERO)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot save to {path}: the directory {directory} does not exist.")
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(b"\0" * (8 + len(placeholder)))
            for key, t in enc.tensors:
                view = _tensor_bytes(t, key)
                records[key]["crc32"] = f"{zlib.crc32(view):08x}"
                f.write(view)
                del view
            header = _finish_header(_header_bytes(doc, entries, _CRC_ZERO, len(placeholder)))
            if len(header) != len(placeholder):
                raise CheckpointError("internal error: the header changed size while saving.")
            f.seek(0)
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return os.path.abspath(path)


# ---------------------------------------------------------------------------------------------
# Loading


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
            saved_name = node["cls"].rpartition(":")[2].rpartition(".")[2]
            if saved_name != cls.__name__:
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
        return f"{node['cls'].rpartition(':')[2]}{tuple(node['f'])}"
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


def load(
    path: str | os.PathLike[str],
    *,
    like: PyTree = None,
    device: DeviceSpec = None,
    dtype: torch.dtype | Mapping[torch.dtype, torch.dtype] | None = None,
    paths: str | Sequence[str] | None = None,
    verify: bool = True,
) -> PyTree:
    """Reads a checkpoint written by :func:`save`; like ``torch.load(weights_only=True)`` but never unpickles.

    Args:
        path: the file.
        like: a template pytree (e.g. ``{"params": p0, "opt_state": tx.init(p0)}``). Structure,
            shapes and dtypes are checked leaf by leaf (the first mismatch raises
            :class:`CheckpointError` naming its path) and the result has the template's container
            types, each tensor on its template leaf's device. Without ``like``, dicts, lists,
            tuples and NamedTuples (funcopt's own or :func:`register`-ed) are rebuilt and tensors
            go to the CPU.
        device: overrides the device: a device or string for every tensor, a dict from the
            saved device (e.g. ``"cuda:0"``) to a target, or a callable ``(path, tensor) -> device``.
            ``"meta"`` reads no data at all (shapes and dtypes only).
        dtype: a floating dtype to cast floating tensors to, or a dict ``{saved: target}``.
        paths: restore only a sub-tree: a path such as ``"params"``, ``"['params']"`` or
            ``"['opt_state'][1].mu"`` returns that sub-tree; a list of paths returns a tuple of
            sub-trees. Only their tensors are read. ``like`` then describes the sub-tree(s).
        verify: check the CRC-32 of every tensor read (fast; detects corrupted data).

    Returns:
        The pytree. A plain safetensors file without funcopt metadata loads as a flat dict of
        tensors keyed by tensor name.

    Raises:
        CheckpointError: missing, truncated or corrupted file, a pickle or ``torch.save``
            archive, a mismatch against ``like``, an unknown NamedTuple type.
    """
    with Reader(os.fspath(path), verify=verify) as reader:
        loader = _Loader(reader, device, dtype)
        root = reader.tree
        if paths is None:
            return loader.rebuild(root, "") if like is None else loader.restore(root, like, "")
        single = isinstance(paths, str)
        wanted = [paths] if single else list(paths)
        if not single and like is not None and (not isinstance(like, (list, tuple)) or len(like) != len(wanted)):
            raise CheckpointError(f"with paths={wanted!r}, like must be a list or tuple of {len(wanted)} templates.")
        out = []
        for i, p in enumerate(wanted):
            if not isinstance(p, str):
                raise TypeError(f"paths entries must be strings, got {p!r}.")
            norm = _normalize_path(p)
            node = _find(root, norm)
            if node is None:
                raise CheckpointError(
                    f"{reader.file}: no sub-tree at {norm or '<root>'} (from paths={p!r}). The top level has "
                    f"{_describe_node(root)}; `python -m funcopt inspect {reader.file}` lists every path.",
                    reader.file,
                )
            sub_like = like if single else (None if like is None else like[i])
            out.append(loader.rebuild(node, norm) if sub_like is None else loader.restore(node, sub_like, norm))
        return out[0] if single else tuple(out)


def inspect(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Describes a checkpoint from its header alone, without reading tensor data.

    Returns a :class:`CheckpointInfo` (paths, dtypes, shapes, sizes, saved devices, Python
    scalars, the step and the user metadata); ``print(info)`` shows it as a table, which is what
    ``python -m funcopt inspect PATH`` prints.
    """
    with Reader(os.fspath(path), verify=False) as reader:
        leaves: list[LeafInfo] = []

        def visit(node: dict[str, Any], p: str) -> None:
            kind = node.get("t")
            if kind == "tensor":
                rec = reader.record(node["key"], p)
                dt = dtype_from_name(rec["dtype"])
                numel = 1
                for s in rec["shape"]:
                    numel *= s
                leaves.append(LeafInfo(p or "<root>", "tensor", rec["dtype"], tuple(rec["shape"]),
                                       numel * dt.itemsize, rec.get("device", "cpu"), None))
            elif kind in ("int", "float", "bool", "str"):
                value = float(node["v"]) if kind == "float" else node["v"]
                leaves.append(LeafInfo(p or "<root>", kind, kind, None, 0, None, value))
            elif kind in ("dict", "odict"):
                for k, c in zip(node["k"], node["c"]):
                    visit(c, child_path(p, k))
            elif kind in ("list", "tuple"):
                for i, c in enumerate(node["c"]):
                    visit(c, f"{p}[{i}]")
            elif kind == "namedtuple":
                for f, c in zip(node["f"], node["c"]):
                    visit(c, f"{p}.{f}")

        visit(reader.tree, "")
        return CheckpointInfo(
            path=reader.file,
            file_size=reader.file_size,
            funcopt=reader.doc is not None,
            version=(reader.doc or {}).get("version"),
            torch_version=(reader.doc or {}).get("torch"),
            step=(reader.doc or {}).get("step"),
            metadata=dict((reader.doc or {}).get("metadata", {})),
            leaves=leaves,
        )


# ---------------------------------------------------------------------------------------------
# Moving trees


def _map_tensors(fn: Callable[[str, torch.Tensor], torch.Tensor], node: Any, path: str) -> Any:
    if isinstance(node, torch.Tensor):
        return fn(path or "<root>", node)
    if isinstance(node, dict):
        items = [(k, _map_tensors(fn, v, child_path(path, k))) for k, v in node.items()]
        return OrderedDict(items) if type(node) is OrderedDict else dict(items)
    if isinstance(node, tuple) and _is_namedtuple_class(type(node)):
        return type(node)(*[_map_tensors(fn, v, f"{path}.{f}") for f, v in zip(node._fields, node)])
    if type(node) in (list, tuple):
        return type(node)(_map_tensors(fn, v, f"{path}[{i}]") for i, v in enumerate(node))
    if node is None or isinstance(node, (int, float, str)):
        return node
    if optree.treespec_is_leaf(optree.tree_structure(node, none_is_leaf=False)):
        return node
    return optree.tree_map(lambda x: _map_tensors(fn, x, path), node, none_is_leaf=False)


def device_put(
    tree: PyTree,
    device: DeviceSpec,
    *,
    dtype: torch.dtype | Mapping[torch.dtype, torch.dtype] | None = None,
    non_blocking: bool = False,
) -> PyTree:
    """Returns ``tree`` with every tensor leaf moved to ``device``, like ``jax.device_put``.

    Works on params, optimizer states (step counts included) and whole checkpoints. ``device``
    takes the same forms as in :func:`load`: a device or string, a dict ``{source: target}``
    (tensors on other devices stay put), or a callable ``(path, tensor) -> device``. ``dtype``
    optionally casts floating leaves (or maps dtypes with a dict). Non-tensor leaves are kept.
    """
    if device is not None and not callable(device) and not isinstance(device, Mapping):
        device = torch.device(device)

    def move(path: str, t: torch.Tensor) -> torch.Tensor:
        t = _cast(t, dtype)
        if device is None:
            return t
        if isinstance(device, Mapping):
            target = _target_device(device, str(t.device), t.device)
        elif callable(device):
            target = device(path, t)
        else:
            target = device
        return t.to(target, non_blocking=non_blocking)

    return _map_tensors(move, tree, "")


from funcopt.checkpoint_manager import CheckpointManager  # noqa: E402  (it builds on save/load above)
