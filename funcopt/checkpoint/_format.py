"""The on-disk format of funcopt checkpoints: dtype tables, header writing, the validating reader.

Used by :mod:`funcopt.checkpoint`; users normally need only :class:`CheckpointError` and the
:class:`CheckpointInfo` that ``funcopt.checkpoint.inspect`` returns. The reader trusts nothing in
the file: every length, offset, dtype and shape is validated before use, the header carries a
CRC-32 of itself and one per tensor, and a file that is a pickle or a ``torch.save`` archive is
recognised from its first bytes and rejected without being parsed.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from funcopt.base import FuncoptError

__all__ = ["CheckpointError", "CheckpointInfo", "LeafInfo", "Reader", "child_path", "dtype_name", "dtype_from_name"]

MAX_HEADER = 100 * 1024 * 1024
"""Largest header accepted (safetensors' own limit)."""


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

    def __str__(self) -> str:
        kind = f"funcopt checkpoint v{self.version}" if self.funcopt else "plain safetensors file"
        lines = [f"{self.path}: {kind}, {_human(self.file_size)}"
                 + (f", torch {self.torch_version}" if self.torch_version else "")]
        lines.append(f"step: {self.step if self.step is not None else '-'}")
        lines.append(f"metadata: {json.dumps(self.metadata, sort_keys=True)}")
        width = max([len(leaf.path) for leaf in self.leaves] + [4])
        lines.append(f"{'path':<{width}}  {'dtype':<10} {'shape':<18} {'size':>9}  device")
        for leaf in self.leaves:
            if leaf.kind == "tensor":
                shape = str(tuple(leaf.shape)) if leaf.shape is not None else ""
                lines.append(f"{leaf.path:<{width}}  {leaf.dtype:<10} {shape:<18} "
                             f"{_human(leaf.nbytes):>9}  {leaf.device}")
            else:
                lines.append(f"{leaf.path:<{width}}  {leaf.dtype:<10} = {leaf.value!r}")
        lines.append(f"total: {self.num_tensors} tensors, {_human(self.tensor_bytes)}")
        return "\n".join(lines)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Reader:
    """Opens and validates a checkpoint file; reads single tensors by key on demand."""

    def __init__(self, file: str, *, verify: bool = True) -> None:
        self.file = file
        self.verify = verify
        try:
            self._f = open(file, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {file}: the file does not exist.", file) from None
        except IsADirectoryError:
            raise CheckpointError(
                f"{file} is a directory, not a checkpoint file (for a CheckpointManager directory "
                "use CheckpointManager(directory).restore()).", file) from None
        except OSError as e:
            raise CheckpointError(f"cannot open {file}: {e}", file) from None
        try:
            self._parse()
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: {what}", self.file)

    def _parse(self) -> None:
        self.file_size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        first = self._f.read(1) if 0 < n <= min(MAX_HEADER, self.file_size - 8) else b""
        if first != b"{":
            if head[:4] == b"PK\x03\x04":
                raise self._fail(
                    "this is a zip archive (what torch.save writes), not a funcopt/safetensors checkpoint. "
                    "funcopt never unpickles; load it with torch.load(weights_only=True) in a trusted "
                    "environment and re-save it with funcopt.checkpoint.save.")
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                raise self._fail(
                    "this is a pickle file, not a funcopt/safetensors checkpoint; it was not unpickled "
                    "(unpickling can run arbitrary code). Re-save trusted data with funcopt.checkpoint.save.")
        if len(head) < 8:
            raise self._fail(f"file is truncated or empty ({self.file_size} bytes; a checkpoint has at least 8).")
        if n > MAX_HEADER or n > self.file_size - 8:
            hint = " It looks like a protocol-0/1 pickle, which is never unpickled." if head[:1] in b"(c]}" else ""
            raise self._fail(
                f"the header length field says {n} bytes but the file has {self.file_size} bytes: the file "
                f"is truncated, corrupted, or not a safetensors checkpoint.{hint}")
        self._f.seek(8)
        raw = self._f.read(n)
        if not raw.lstrip(b" ").startswith(b"{"):
            raise self._fail("the header does not start with '{': not a safetensors/funcopt checkpoint (wrong header).")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"the header is not valid JSON ({e}): the file is corrupted.") from None
        if not isinstance(header, dict):
            raise self._fail("the header is not a JSON object: not a safetensors checkpoint (wrong header).")
        self.data_start = 8 + n
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise self._fail("the header's __metadata__ is not a JSON object (wrong header).")
        self.entries: dict[str, dict[str, Any]] = {}
        end = 0
        for key, e in header.items():
            if (not isinstance(e, dict) or e.get("dtype") not in _BY_CODE or not isinstance(e.get("shape"), list)
                    or not all(_is_int(s) and s >= 0 for s in e["shape"])
                    or not isinstance(e.get("data_offsets"), list) or len(e["data_offsets"]) != 2
                    or not all(_is_int(o) for o in e["data_offsets"])):
                raise self._fail(f"malformed header entry for tensor {key!r} (wrong header or corruption).")
            b, f = e["data_offsets"]
            numel = 1
            for s in e["shape"]:
                numel *= s
            if not 0 <= b <= f or f - b != numel * _BY_CODE[e["dtype"]].itemsize:
                raise self._fail(f"header entry for tensor {key!r} has inconsistent offsets {e['data_offsets']} "
                                 f"for shape {e['shape']} and dtype {e['dtype']}: the file is corrupted.")
            self.entries[key] = e
            end = max(end, f)
        if self.data_start + end != self.file_size:
            raise self._fail(
                f"the header describes {end} bytes of tensor data but the file holds "
                f"{self.file_size - self.data_start}: the file is truncated or has trailing bytes.")
        self.doc: dict[str, Any] | None = None
        if "funcopt" in meta:
            self._check_header_crc(raw, meta)
            try:
                doc = json.loads(meta["funcopt"])
            except (TypeError, json.JSONDecodeError):
                raise self._fail("the funcopt metadata is not valid JSON: the header is corrupted.") from None
            if not isinstance(doc, dict) or doc.get("format") != "funcopt.checkpoint":
                raise self._fail("the funcopt metadata does not describe a funcopt checkpoint (wrong header).")
            if not _is_int(doc.get("version")) or doc["version"] > 1:
                raise self._fail(f"checkpoint format version {doc.get('version')!r} is newer than this funcopt "
                                 "understands (1); upgrade funcopt.")
            if not isinstance(doc.get("tree"), dict) or not isinstance(doc.get("tensors"), dict):
                raise self._fail("the funcopt metadata lacks its tree or tensor table: the header is corrupted.")
            self.doc = doc
            self.tree = doc["tree"]
            self.records = doc["tensors"]
        else:
            keys = sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])
            self.tree = {"t": "dict", "k": keys, "c": [{"t": "tensor", "key": k} for k in keys]}
            self.records = {
                k: {"dtype": dtype_name(_BY_CODE[e["dtype"]]), "shape": e["shape"]} for k, e in self.entries.items()
            }

    def _check_header_crc(self, raw: bytes, meta: dict[str, Any]) -> None:
        crc = meta.get("funcopt.crc32")
        pattern = re.compile(rb'"funcopt\.crc32":"([0-9a-f]{8})"')
        found = pattern.findall(raw)
        if not isinstance(crc, str) or len(found) != 1:
            raise self._fail("the header checksum is missing or malformed: the header is corrupted.")
        zeroed = pattern.sub(b'"funcopt.crc32":"00000000"', raw)
        if f"{zlib.crc32(zeroed):08x}" != crc:
            raise self._fail("the header checksum does not match: the header is corrupted (flipped bytes?).")

    def record(self, key: str, path: str) -> dict[str, Any]:
        """The validated record of tensor ``key``: ``dtype`` name, ``shape``, saved ``device``."""
        rec = self.records.get(key) if isinstance(key, str) else None
        entry = self.entries.get(key) if isinstance(key, str) else None
        if not isinstance(rec, dict) or entry is None:
            raise self._fail(f"the tensor for {path or '<root>'} is missing from the file (corrupted header).")
        dt = dtype_from_name(rec.get("dtype"))
        shape = list(rec.get("shape", [])) + ([2] if dt.is_complex else [])
        if shape != entry["shape"] or storage_code(dt, key) != entry["dtype"]:
            raise self._fail(f"the records for {path or '<root>'} disagree about its shape or dtype (corrupted header).")
        return rec

    def tensor(self, key: str, path: str) -> torch.Tensor:
        """Reads tensor ``key`` into a new CPU tensor, checking its CRC-32 when ``verify``."""
        rec = self.record(key, path)
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._f.seek(self.data_start + begin)
        if end > begin:
            got = self._f.readinto(memoryview(buf.numpy()))
            if got != end - begin:
                raise self._fail(f"could not read the data of {path or '<root>'}: the file is truncated.")
        if self.verify and "crc32" in rec:
            if f"{zlib.crc32(memoryview(buf.numpy())):08x}" != rec["crc32"]:
                raise self._fail(
                    f"the data of the leaf at {path or '<root>'} fails its checksum: the file is corrupted. "
                    "Restore an older checkpoint (CheckpointManager keeps several).")
        dt = dtype_from_name(rec["dtype"])
        stored = _BY_CODE[entry["dtype"]]
        t = buf.view(stored).reshape(entry["shape"])
        if dt.is_complex:
            t = torch.view_as_complex(t)
        return t


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
