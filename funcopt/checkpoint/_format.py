"""The on-disk format of funcopt checkpoints: dtype tables, header writing, the validating reader.

Used by :mod:`funcopt.checkpoint`; users normally need only :class:`CheckpointError` and the
:class:`CheckpointInfo` that ``funcopt.checkpoint.inspect`` returns. The header carries a CRC-32
of itself and one per tensor; the validating reader is :mod:`funcopt.checkpoint._reader`.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

import torch

from funcopt.base import FuncoptError

__all__ = ["CheckpointError", "CheckpointInfo", "LeafInfo", "child_path", "dtype_name", "dtype_from_name"]

FORMAT = "funcopt.checkpoint"
FORMAT_VERSION = 1
_CRC_KEY = "funcopt.crc32"
_CRC_ZERO = "00000000"


class CheckpointError(FuncoptError):
    """A checkpoint could not be written or read; the message names the file, the pytree path and a fix.

    Attributes:
        file: the checkpoint file concerned, when known.
    """

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


# torch dtype -> (name in the funcopt record, safetensors code of the stored data)
_DTYPES: dict[torch.dtype, tuple[str, str]] = {
    torch.bool: ("bool", "BOOL"),
    torch.uint8: ("uint8", "U8"),
    torch.int8: ("int8", "I8"),
    torch.int16: ("int16", "I16"),
    torch.int32: ("int32", "I32"),
    torch.int64: ("int64", "I64"),
    torch.float16: ("float16", "F16"),
    torch.bfloat16: ("bfloat16", "BF16"),
    torch.float32: ("float32", "F32"),
    torch.float64: ("float64", "F64"),
    torch.complex64: ("complex64", "F32"),
    torch.complex128: ("complex128", "F64"),
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                     ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = (_name, _code)
_BY_NAME = {name: dt for dt, (name, _) in _DTYPES.items()}
_BY_CODE = {code: dt for dt, (_, code) in _DTYPES.items() if not dt.is_complex}


def dtype_name(dtype: torch.dtype) -> str:
    """The name recorded for ``dtype`` (``"float32"``)."""
    return _DTYPES[dtype][0]


def storage_code(dtype: torch.dtype, key: str) -> str:
    """The safetensors dtype code the data of a ``dtype`` tensor is stored as."""
    if dtype not in _DTYPES:
        raise CheckpointError(
            f"cannot save the tensor at {key}: dtype {dtype} is not supported. Supported: "
            f"{', '.join(sorted(_BY_NAME))}."
        )
    return _DTYPES[dtype][1]


def dtype_from_name(name: Any) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises :class:`CheckpointError` on an unknown name."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint header (corrupted or from a newer version).")
    return _BY_NAME[name]


def child_path(path: str, key: Any) -> str:
    """The path of dict entry ``key`` under ``path``: ``['a']`` for str keys, ``[3]`` for ints."""
    return f"{path}[{key!r}]"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class LeafInfo:
    """One leaf of a checkpoint as described by its header."""

    path: str
    kind: str
    """``"tensor"`` or the Python type of a scalar (``"int"``, ``"float"``, ``"bool"``, ``"str"``)."""
    dtype: str
    shape: tuple[int, ...] | None
    nbytes: int
    device: str | None
    """The device the tensor was on when saved."""
    value: Any = None
    """The value of a Python scalar leaf."""


@dataclass
class CheckpointInfo:
    """What ``funcopt.checkpoint.inspect`` reads from a header; ``str(info)`` is a readable table."""

    path: str
    file_size: int
    funcopt: bool
    version: int | None
    torch_version: str | None
    step: int | None
    metadata: dict[str, Any]
    leaves: list[LeafInfo] = field(default_factory=list)

    @property
    def num_tensors(self) -> int:
        return sum(1 for leaf in self.leaves if leaf.kind == "tensor")

    @property
    def tensor_bytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    def lines(self) -> Iterator[str]:
        """The lines of ``str(self)``, one at a time (a table of many leaves is never built whole)."""
        kind = f"funcopt checkpoint v{self.version}" if self.funcopt else "plain safetensors file"
        yield (f"{self.path}: {kind}, {_human(self.file_size)}"
               + (f", torch {self.torch_version}" if self.torch_version else ""))
        yield f"step: {self.step if self.step is not None else '-'}"
        yield f"metadata: {json.dumps(self.metadata, sort_keys=True)}"
        width = min(max([len(leaf.path) for leaf in self.leaves] + [4]), 120)
        yield f"{'path':<{width}}  {'dtype':<10} {'shape':<18} {'size':>9}  device"
        for leaf in self.leaves:
            if leaf.kind == "tensor":
                shape = str(tuple(leaf.shape)) if leaf.shape is not None else ""
                yield f"{leaf.path:<{width}}  {leaf.dtype:<10} {shape:<18} {_human(leaf.nbytes):>9}  {leaf.device}"
            else:
                yield f"{leaf.path:<{width}}  {leaf.dtype:<10} = {leaf.value!r}"
        yield f"total: {self.num_tensors} tensors, {_human(self.tensor_bytes)}"

    def json_lines(self) -> Iterator[str]:
        """A JSON document of every field, streamed: one line per leaf (what ``inspect --json`` prints)."""
        head = {name: getattr(self, name) for name in
                ("path", "file_size", "funcopt", "version", "torch_version", "step", "metadata")}
        yield json.dumps(head, default=str)[:-1] + ', "leaves": ['
        last = len(self.leaves) - 1
        for i, leaf in enumerate(self.leaves):
            fields = {"path": leaf.path, "kind": leaf.kind, "dtype": leaf.dtype,
                      "shape": None if leaf.shape is None else list(leaf.shape), "nbytes": leaf.nbytes,
                      "device": leaf.device, "value": leaf.value}
            yield "  " + json.dumps(fields, default=str) + ("," if i < last else "")
        yield "]}"

    def __str__(self) -> str:
        return "\n".join(self.lines())


# ---------------------------------------------------------------------------------------------
# Writing


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
