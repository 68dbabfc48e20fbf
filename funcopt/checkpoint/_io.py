"""``save``, ``load``, ``inspect`` and ``device_put`` of one checkpoint file (see :mod:`funcopt.checkpoint`)."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import optree
import torch

from funcopt.base import PyTree
from funcopt.checkpoint._crc import crc32_async
from funcopt.checkpoint._files import drop_cached_pages, remove_stale_temporaries, temp_name
from funcopt.checkpoint._format import (
    _CRC_ZERO,
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointInfo,
    LeafInfo,
    _finish_header,
    _header_bytes,
    _tensor_bytes,
    child_path,
    dtype_from_name,
    dtype_name,
    storage_code,
)
from funcopt.checkpoint._reader import Reader
from funcopt.checkpoint._validate import MAX_DEPTH, json_depth
from funcopt.checkpoint._tree import (
    DeviceSpec,
    _cast,
    _describe_node,
    _Encoder,
    _find,
    _is_namedtuple_class,
    _Loader,
    _normalize_path,
    _target_device,
)

__all__ = ["save", "load", "inspect", "device_put"]


# ---------------------------------------------------------------------------------------------
# Saving


def _find_step(enc: _Encoder, metadata: dict[str, Any]) -> int | None:
    if isinstance(metadata.get("step"), int) and not isinstance(metadata.get("step"), bool):
        return metadata["step"]
    for key, t in enc.tensors:
        if key.endswith(".count") and t.dim() == 0 and not t.is_floating_point() and t.device.type != "meta":
            if t.dtype != torch.bool and not t.is_complex():
                try:
                    return int(t.detach().to("cpu"))
                except RuntimeError:  # a tensor inside a torch.func transform; reported by save
                    return None
    return None


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_CHUNK = 64 << 20
_IN_FLIGHT = 256 << 20
_OS_HINTS = {
    getattr(errno, name): hint
    for name, hint in (
        ("ENOSPC", "the disk is full: free space or save elsewhere"),
        ("EDQUOT", "the disk quota is exceeded: free space or save elsewhere"),
        ("EACCES", "permission denied: check the directory's permissions"),
        ("EPERM", "operation not permitted: check the directory's permissions"),
        ("EROFS", "the file system is read-only: save elsewhere"),
    )
    if hasattr(errno, name)
}


def _alignment(t: torch.Tensor) -> int:
    return t.element_size()


def _write_tensors(f: Any, tensors: list[tuple[str, torch.Tensor]], records: dict[str, Any]) -> None:
    """Writes each tensor's bytes to ``f`` while helper threads compute the CRC-32s (the CRC kernel and
    ``write`` both release the GIL); a tensor's CRC may finish while the next tensors are written
    (at most :data:`_IN_FLIGHT` bytes of pending checksums, whose buffers stay alive until then)."""
    pending: deque[tuple[str, Callable[[], int], int]] = deque()
    in_flight = 0
    for key, t in tensors:
        view = _tensor_bytes(t, key)
        pending.append((key, crc32_async(view), len(view)))
        in_flight += len(view)
        for start in range(0, len(view), _CHUNK):
            f.write(view[start:start + _CHUNK])
        del view
        while pending and (in_flight > _IN_FLIGHT or len(pending) > 8):
            done, result, size = pending.popleft()
            records[done]["crc32"] = f"{result():08x}"
            in_flight -= size
    for done, result, _ in pending:
        records[done]["crc32"] = f"{result():08x}"


def _os_error(path: str, e: OSError) -> CheckpointError:
    hint = _OS_HINTS.get(e.errno or 0, "an operating-system error")
    return CheckpointError(
        f"cannot write the checkpoint {path}: {e.strerror or e} ({hint}). Nothing was replaced: the previous "
        f"file at {path}, if any, is intact, and the temporary file was removed.", path)


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
    interrupted save never damages an existing checkpoint at ``path``. An operating-system error
    (disk full, permissions...) raises :class:`CheckpointError` naming the file, with the previous
    file intact. Temporary files that killed saves left in the directory are removed first (only
    funcopt's own, only those of dead processes or untouched for an hour). Trees nested deeper
    than 128 levels are refused. Tensors are stored in order of decreasing element size, so
    every tensor's data is aligned for memory-mapped loading.

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
    if json_depth(meta) > MAX_DEPTH:
        raise CheckpointError(f"metadata is nested deeper than {MAX_DEPTH} levels; flatten it.")
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"metadata must be JSON-serializable (str keys, plain values): {e}") from None
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise CheckpointError(f"step must be an int, got {step!r}.")
    enc = _Encoder()
    structure = enc.encode(tree, "")
    records: dict[str, Any] = {}
    entries: dict[str, Any] = {}
    offset = 0
    tensors = sorted(enc.tensors, key=lambda kt: -_alignment(kt[1]))  # every tensor's data aligned
    for key, t in tensors:
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
    remove_stale_temporaries(directory)
    drop_cached_pages(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(b"\0" * (8 + len(placeholder)))
            _write_tensors(f, tensors, records)
            header = _finish_header(_header_bytes(doc, entries, _CRC_ZERO, len(placeholder)))
            if len(header) != len(placeholder):
                raise CheckpointError("internal error: the header changed size while saving.")
            f.seek(0)
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _os_error(path, e) from None
        raise
    try:
        _fsync_dir(directory)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems without directory fsync
            raise CheckpointError(f"{path} was written, but syncing its directory failed ({e.strerror or e}): the "
                                  "rename may not survive a power loss.", path) from None
    return os.path.abspath(path)


# ---------------------------------------------------------------------------------------------
# Loading


def _is_meta(device: Any) -> bool:
    """Whether ``device`` sends every leaf to the meta device (whose data is never read)."""
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "meta"


def load(
    path: str | os.PathLike[str],
    *,
    like: PyTree = None,
    device: DeviceSpec = None,
    dtype: torch.dtype | Mapping[torch.dtype, torch.dtype] | None = None,
    paths: str | Sequence[str] | None = None,
    verify: bool = True,
    mmap: bool = True,
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
        mmap: CPU tensors share the file's pages copy-on-write, as with ``safetensors.torch.load_file``
            (fast; writing to them never changes the file). Do not overwrite the file in place with
            another tool while they live (funcopt's own saves replace files by rename, which is safe).
            ``False`` reads every tensor into fresh memory instead.

    Returns:
        The pytree. A plain safetensors file without funcopt metadata loads as a flat dict of
        tensors keyed by tensor name.

    Raises:
        CheckpointError: naming the file and the problem: a missing, truncated, corrupted or
            forged file (any header damage, a tensor failing its CRC-32, inconsistent offsets or
            records, a tree deeper than 128 levels, an oversized header), a FIFO, device or
            directory, a pickle or ``torch.save`` archive, a mismatch against ``like``, an
            unknown NamedTuple type. Whatever the file holds, never another exception and never
            other data than was saved.
    """
    with Reader(os.fspath(path), verify=verify, mmap=mmap) as reader:
        loader = _Loader(reader, device, dtype)
        root = reader.tree
        if paths is None:
            if not _is_meta(device):
                reader.check_ahead(root)
            return loader.rebuild(root, "") if like is None else loader.restore(root, like, "")
        single = isinstance(paths, str)
        wanted = [paths] if single else list(paths)
        if not single and like is not None and (not isinstance(like, (list, tuple)) or len(like) != len(wanted)):
            raise CheckpointError(f"with paths={wanted!r}, like must be a list or tuple of {len(wanted)} templates.")
        out = []
        for i, p in enumerate(wanted):
            if not isinstance(p, str):
                raise CheckpointError(f"paths entries must be strings, got {p!r}.")
            norm = _normalize_path(p)
            node = _find(root, norm)
            if node is None:
                raise CheckpointError(
                    f"{reader.file}: no sub-tree at {norm or '<root>'} (from paths={p!r}). The top level has "
                    f"{_describe_node(root)}; `python -m funcopt inspect {reader.file}` lists every path.",
                    reader.file,
                )
            sub_like = like if single else (None if like is None else like[i])
            if not _is_meta(device):
                reader.check_ahead(node)
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

