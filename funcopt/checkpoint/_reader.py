"""The validating reader of checkpoint files (used by :mod:`funcopt.checkpoint`).

It trusts nothing in a file. In this order it: refuses anything but a regular file before reading
(a FIFO or a device would block or never end); recognises pickles and ``torch.save`` zips from
their first bytes; bounds the header (at most :data:`MAX_HEADER` bytes, inside the file; its
JSON objects and arrays are counted outside strings before parsing, so that parsing needs at
most ~10x the header in memory, ~20x for the funcopt document);
validates every tensor entry as the safetensors library does (known dtype, size = dtype x shape,
data offsets contiguous from 0 to the end of the file, no overlap, no gap); then decides what
the file is. A funcopt file is one whose ``__metadata__`` has the keys ``funcopt`` and
``funcopt.crc32``: its header CRC-32 is checked before anything in it is used. A file whose
metadata holds only a near miss of those keys or a funcopt-like document (a flipped bit turns
``funcopt`` into ``guncopt``) is refused as damaged, never read as plain safetensors. The funcopt
document is then checked whole (see :mod:`funcopt.checkpoint._validate`): tree depth, node
shapes, scalar types, every tensor referenced by exactly one leaf and carrying its CRC record.

Tensor data is memory-mapped copy-on-write, as ``safetensors.torch.load_file`` does, and each
tensor's CRC-32 is checked when it is read; ``mmap=False`` reads into fresh memory instead.
"""

from __future__ import annotations

import json
import mmap as _mmap
import os
import re
import stat
import zlib
from typing import Any

import torch

from funcopt.checkpoint._crc import crc32, crc32_many
from funcopt.checkpoint._format import _BY_CODE, _CRC_KEY, CheckpointError, dtype_name
from funcopt.checkpoint._validate import check_document, edit_distance

__all__ = ["Reader", "MAX_HEADER"]

MAX_HEADER = 100 * 1024 * 1024
"""Largest header accepted (safetensors' own limit)."""

_MAGIC = ("funcopt", _CRC_KEY)
_QUOTED = re.compile(r'"[^"]*"')
_DICT_BYTES, _LIST_BYTES = 200, 72
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_MAX_DIM = 1 << 62


def _is_int(x: Any) -> bool:
    return type(x) is int


def json_bounded(text: str, what: str, fail: Any, factor: int) -> Any:
    """``json.loads(text)`` after checking that its objects and arrays cannot need more than about
    ``factor`` times its size in memory (a dict costs ~200 bytes, a list ~72), and converting a
    nesting deeper than the interpreter allows into an error."""
    if len(text) > 4096:
        # outside strings (escaped quotes dropped first, so every quote left delimits a string)
        skeleton = _QUOTED.sub("", text.replace("\\\\", "").replace('\\"', ""))
        objects, arrays = skeleton.count("{"), skeleton.count("[")
        del skeleton
        if _DICT_BYTES * objects + _LIST_BYTES * arrays > factor * len(text):
            raise fail(f"{what} holds {objects} JSON objects and {arrays} arrays in {len(text)} bytes, far more "
                       "than any checkpoint writes: the file is corrupted or forged (refused before parsing).")
    try:
        return json.loads(text)
    except RecursionError:
        raise fail(f"{what} is nested too deeply to be a checkpoint: the file is corrupted or forged.") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise fail(f"{what} is not valid JSON ({e}): the file is corrupted.") from None


def _looks_like_funcopt(meta: dict[str, Any]) -> bool:
    """Whether plain-looking metadata is in fact a funcopt header with a damaged key (funcopt writes
    two metadata keys; damage does not add keys, so long key lists are not checked key by key)."""
    if len(meta) > 16:
        return False
    for k, v in meta.items():
        low = k.lower()
        if "funcopt" in low or "crc32" in low or any(edit_distance(low, m, 3) <= 2 for m in _MAGIC):
            return True
        if isinstance(v, str) and v.lstrip().startswith("{"):
            head = v[:4096].lower()
            if "funcopt" in head or "crc32" in head or ('"tree"' in v and '"tensors"' in v):
                return True
    return False


def open_regular(file: str) -> Any:
    """Opens ``file`` for reading without blocking, refusing directories, FIFOs, sockets and devices."""
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {file}: the file does not exist.", file) from None
    except IsADirectoryError:
        fd = -1
    except OSError as e:
        raise CheckpointError(f"cannot open {file}: {e.strerror or e}.", file) from None
    mode = os.fstat(fd).st_mode if fd >= 0 else stat.S_IFDIR
    if not stat.S_ISREG(mode):
        if fd >= 0:
            os.close(fd)
        if stat.S_ISDIR(mode):
            raise CheckpointError(
                f"{file} is a directory, not a checkpoint file (for a CheckpointManager directory "
                "use CheckpointManager(directory).restore()).", file)
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise CheckpointError(f"{file} is {kind}, not a checkpoint file; only regular files are read.", file)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb", buffering=0)


class Reader:
    """Opens and validates a checkpoint file; reads single tensors by key on demand."""

    def __init__(self, file: str, *, verify: bool = True, mmap: bool = True) -> None:
        self.file = file
        self.verify = verify
        self._map: Any = None
        self._checked: dict[str, bool] = {}  # key -> CRC matched, for keys checked ahead by check_ahead
        self._f = open_regular(file)
        try:
            self._parse()
            if mmap and self.file_size > self.data_start:
                try:
                    self._map = _mmap.mmap(self._f.fileno(), 0, access=_mmap.ACCESS_COPY)
                except (OSError, ValueError):  # a file system without mmap: read instead
                    self._map = None
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()
        self._map = None  # tensors made from the map keep it alive; it unmaps when they die

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: {what}", self.file)

    def _read_header(self) -> str:
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
        raw = first + self._f.read(n - 1)
        if len(raw) != n:
            raise self._fail("the file ended inside its header: it is truncated.")
        if not raw.lstrip(b" ").startswith(b"{"):
            raise self._fail("the header does not start with '{': not a safetensors/funcopt checkpoint (wrong header).")
        self.data_start = 8 + n
        self._raw = raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"the header is not valid UTF-8 ({e}): the file is corrupted.") from None

    def _check_entries(self, header: dict[str, Any]) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        spans = []
        for key, e in header.items():
            if (not isinstance(e, dict) or not _ENTRY_FIELDS <= e.keys() or e["dtype"] not in _BY_CODE
                    or not isinstance(e["shape"], list) or len(e["shape"]) > 64
                    or not all(_is_int(s) and 0 <= s < _MAX_DIM for s in e["shape"])
                    or not isinstance(e["data_offsets"], list) or len(e["data_offsets"]) != 2
                    or not all(_is_int(o) for o in e["data_offsets"])):
                raise self._fail(f"malformed header entry for tensor {key!r} (wrong header or corruption).")
            b, f = e["data_offsets"]
            numel, extent = 1, 1
            for s in e["shape"]:
                numel *= s
                extent *= max(s, 1)
            if not 0 <= b <= f or f - b != numel * _BY_CODE[e["dtype"]].itemsize or extent >= _MAX_DIM:
                raise self._fail(f"header entry for tensor {key!r} has inconsistent offsets {e['data_offsets']} "
                                 f"for shape {e['shape']} and dtype {e['dtype']}: the file is corrupted.")
            self.entries[key] = e
            spans.append((b, f, key))
        spans.sort()
        end = 0
        for b, f, key in spans:
            if b != end:
                what = "overlaps the tensor before it" if b < end else f"leaves a gap of {b - end} bytes before it"
                raise self._fail(f"the data of tensor {key!r} (offsets [{b}, {f}]) {what}: the header is "
                                 "corrupted or forged (safetensors requires contiguous, non-overlapping data).")
            end = f
        if self.data_start + end != self.file_size:
            raise self._fail(
                f"the header describes {end} bytes of tensor data but the file holds "
                f"{self.file_size - self.data_start}: the file is truncated or has trailing bytes.")

    def _parse(self) -> None:
        header = json_bounded(self._read_header(), "the header", self._fail, 10)
        if not isinstance(header, dict):
            raise self._fail("the header is not a JSON object: not a safetensors checkpoint (wrong header).")
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._fail("the header's __metadata__ is not a JSON object of strings (wrong header).")
        self._check_entries(header)
        del header
        self.doc: dict[str, Any] | None = None
        if "funcopt" in meta or _CRC_KEY in meta:
            self._check_header_crc(meta)
            doc = json_bounded(meta.get("funcopt", ""), "the funcopt metadata", self._fail, 20)
            self.doc = check_document(doc, self.entries, self._fail)
            self.tree = doc["tree"]
            self.records = doc["tensors"]
        elif _looks_like_funcopt(meta):
            raise self._fail(
                "the header's metadata looks like a funcopt checkpoint's with a damaged key (a near miss of "
                f"{_MAGIC[0]!r}/{_MAGIC[1]!r}): the file is corrupted. It is not read as plain safetensors, "
                "whose data would go unchecked. Restore an older checkpoint.")
        else:
            keys = sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"])
            self.tree = {"t": "dict", "k": keys, "c": [{"t": "tensor", "key": k} for k in keys]}
            self.records = {
                k: {"dtype": dtype_name(_BY_CODE[e["dtype"]]), "shape": e["shape"]} for k, e in self.entries.items()
            }
        self._raw = b""

    def _check_header_crc(self, meta: dict[str, Any]) -> None:
        crc = meta.get(_CRC_KEY)
        pattern = re.compile(rb'"funcopt\.crc32":"([0-9a-f]{8})"')
        found = pattern.findall(self._raw)
        if "funcopt" not in meta or not isinstance(crc, str) or len(found) != 1 or found[0].decode() != crc:
            raise self._fail("the header checksum is missing or malformed (or the funcopt metadata is missing): "
                             "the header is corrupted.")
        zeroed = pattern.sub(b'"funcopt.crc32":"00000000"', self._raw)
        if f"{zlib.crc32(zeroed):08x}" != crc:
            raise self._fail("the header checksum does not match: the header is corrupted (flipped bytes?).")

    def record(self, key: str, path: str) -> dict[str, Any]:
        """The validated record of tensor ``key``: ``dtype`` name, ``shape``, saved ``device``."""
        rec = self.records.get(key) if isinstance(key, str) else None
        if not isinstance(rec, dict) or key not in self.entries:
            raise self._fail(f"the tensor for {path or '<root>'} is missing from the file (corrupted header).")
        return rec

    def _read(self, begin: int, end: int, path: str) -> torch.Tensor:
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        self._f.seek(self.data_start + begin)
        got = 0
        while got < end - begin:
            n = self._f.readinto(view[got:])
            if not n:
                raise self._fail(f"could not read the data of {path or '<root>'}: the file is truncated.")
            got += n
        return buf

    def _check(self, view: Any, key: str, rec: dict[str, Any], path: str) -> None:
        if not self.verify or "crc32" not in rec:
            return
        ok = self._checked.pop(key) if key in self._checked else f"{crc32(view):08x}" == rec["crc32"]
        if not ok:
            raise self._fail(
                f"the data of the leaf at {path or '<root>'} fails its checksum: the file is corrupted. "
                "Restore an older checkpoint (CheckpointManager keeps several).")

    def check_ahead(self, node: dict[str, Any]) -> None:
        """Checks the CRC-32s of all mapped tensors under ``node`` (a validated tree node) in one
        pass on all threads, where checking each as it is read leaves threads idle at the end of
        each tensor; :meth:`tensor` then reports a failure at the leaf's path, in tree order."""
        if not self.verify or self._map is None:
            return
        keys, stack = [], [node]
        while stack:
            n = stack.pop()
            if n.get("t") == "tensor":
                keys.append(n["key"])
            else:
                stack.extend(n.get("c", ()))
        spans = []
        for key in keys:
            rec, entry = self.records.get(key), self.entries.get(key)
            if isinstance(rec, dict) and entry is not None and "crc32" in rec:
                begin, end = entry["data_offsets"]
                spans.append((key, rec["crc32"], self.data_start + begin, self.data_start + end))
        with memoryview(self._map) as whole:
            views = [whole[b:e] for _, _, b, e in spans]
            try:
                found = crc32_many(views)
            finally:
                for v in views:
                    v.release()
        self._checked = {key: f"{value:08x}" == want for (key, want, _, _), value in zip(spans, found)}

    def tensor(self, key: str, path: str) -> torch.Tensor:
        """Reads tensor ``key`` into a CPU tensor (mapped or fresh), checking its CRC-32 when ``verify``."""
        rec = self.record(key, path)
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        stored = _BY_CODE[entry["dtype"]]
        start = self.data_start + begin
        if end == begin:
            flat = torch.empty(0, dtype=stored)
        elif self._map is None:
            flat = self._read(begin, end, path)
            self._check(memoryview(flat.numpy()), key, rec, path)
            flat = flat.view(stored)
        else:
            with memoryview(self._map) as whole, whole[start:start + end - begin] as view:
                self._check(view, key, rec, path)
                if start % stored.itemsize:  # misaligned data (a foreign file): copy it out
                    flat = torch.frombuffer(bytearray(view), dtype=torch.uint8).view(stored)
                else:
                    flat = torch.frombuffer(self._map, dtype=stored, count=(end - begin) // stored.itemsize,
                                            offset=start)
        try:
            t = flat.reshape(entry["shape"])
        except RuntimeError as e:  # a shape torch cannot index, even when empty
            raise self._fail(f"tensor {key!r} has an unusable shape {entry['shape']}: {e}") from None
        if dtype_name(stored) != rec["dtype"]:  # complex data is stored as pairs of reals
            t = torch.view_as_complex(t)
        return t
