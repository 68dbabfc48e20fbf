"""Whole-document checks of a funcopt checkpoint header (used by :mod:`funcopt.checkpoint`).

:func:`check_document` runs once, before any tensor is read, and iteratively (a forged tree of any
depth cannot exhaust the stack): the document's fields and version; one record per tensor entry
(dtype, shape and storage code agreeing with the safetensors entry, a CRC-32, a device); the tree,
at most :data:`MAX_DEPTH` levels deep, each node of a known kind with fields of the right types
(an ``int`` leaf holds an int, a dict as many keys as children, distinct), and every tensor of
the file referenced by exactly one leaf. Loading code can then index the document freely.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from funcopt.checkpoint._format import FORMAT, FORMAT_VERSION, CheckpointError, dtype_from_name, storage_code

__all__ = ["MAX_DEPTH", "check_document", "edit_distance", "json_depth", "render_path"]

MAX_DEPTH = 128
"""Deepest tree (levels of nested containers) that ``save`` writes and ``load`` reads."""

_FIELDS = frozenset({"format", "version", "torch", "step", "metadata", "tree", "tensors"})
_HEX8 = re.compile(r"[0-9a-f]{8}")
_SCALARS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: type(v) is int,
    "bool": lambda v: type(v) is bool,
    "str": lambda v: type(v) is str,
}


def edit_distance(a: str, b: str, cap: int) -> int:
    """Levenshtein distance of two strings, or ``cap + 1`` once it is known to exceed ``cap``."""
    if abs(len(a) - len(b)) > cap:
        return cap + 1
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        if min(cur) > cap:
            return cap + 1
        prev = cur
    return prev[-1]


def json_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON-like value (dicts and lists), computed without recursion; stops
    counting once it exceeds ``limit``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def render_path(trail: Any) -> str:
    """The pytree path of a node from its trail ``(parent_trail, step)`` (steps: ``("k", key)``,
    ``("i", index)``, ``("f", field)``), built only when an error names it."""
    steps = []
    while trail is not None:
        trail, step = trail
        steps.append(step)
    out = []
    for kind, label in reversed(steps):
        out.append(f"[{label!r}]" if kind == "k" else f"[{label}]" if kind == "i" else f".{label}")
    return "".join(out) or "<root>"


def _float_ok(v: Any) -> bool:
    if type(v) in (int, float):
        return True
    if type(v) is not str or len(v) > 64:
        return False
    try:
        float(v)
    except ValueError:
        return False
    return True


def _check_records(records: Any, entries: dict[str, Any], fail: Callable[[str], CheckpointError]) -> None:
    if not isinstance(records, dict):
        raise fail("the funcopt metadata lacks its tensor table: the header is corrupted.")
    for key in entries:
        if key not in records:
            raise fail(f"tensor {key!r} has no record (dtype, shape, CRC-32) in the funcopt metadata: the header is "
                       "corrupted or forged.")
    for key, rec in records.items():
        if key not in entries:
            raise fail(f"the funcopt metadata records a tensor {key!r} that the file does not hold: the header is "
                       "corrupted or forged.")
        entry = entries[key]
        if not isinstance(rec, dict):
            raise fail(f"the record of tensor {key!r} is not a JSON object: the header is corrupted.")
        try:
            dt = dtype_from_name(rec.get("dtype"))
            code = storage_code(dt, key)
        except CheckpointError as e:
            raise fail(f"tensor {key!r}: {e}") from None
        shape = rec.get("shape")
        if (not isinstance(shape, list) or not all(type(s) is int for s in shape)
                or shape + ([2] if dt.is_complex else []) != entry["shape"] or code != entry["dtype"]):
            raise fail(f"the records of tensor {key!r} disagree about its shape or dtype: the header is corrupted.")
        crc = rec.get("crc32")
        if type(crc) is not str or not _HEX8.fullmatch(crc):
            raise fail(f"tensor {key!r} has no valid CRC-32 record: the header is corrupted or forged, its data "
                       "could not be checked.")
        device = rec.get("device", "cpu")
        try:
            if type(device) is not str or len(device) > 64:
                raise ValueError(device)
            torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise fail(f"tensor {key!r} records the device {device!r}, which is not a device: the header is "
                       "corrupted.") from None


def _children(node: dict[str, Any], kind: str, trail: Any, fail: Callable[[str], CheckpointError]) -> list[Any]:
    children = node.get("c")
    if not isinstance(children, list):
        raise fail(f"the {kind} node at {render_path(trail)} has no list of children: the header is corrupted.")
    if kind in ("list", "tuple"):
        return [(c, (trail, ("i", i))) for i, c in enumerate(children)]
    labels = node.get("k" if kind in ("dict", "odict") else "f")
    if not isinstance(labels, list) or len(labels) != len(children):
        n = len(labels) if isinstance(labels, list) else "no"
        raise fail(f"the {kind} node at {render_path(trail)} has {n} keys for {len(children)} children: the "
                   "header is corrupted or forged.")
    if kind == "namedtuple":
        if type(node.get("cls")) is not str or not all(type(f) is str for f in labels):
            raise fail(f"the NamedTuple at {render_path(trail)} has a malformed type name or field list: the "
                       "header is corrupted.")
        step = "f"
    else:
        if not all(type(k) in (str, int) for k in labels):
            raise fail(f"the dict at {render_path(trail)} has a key that is neither a str nor an int: the header "
                       "is corrupted.")
        step = "k"
    if len(set(labels)) != len(labels):
        raise fail(f"the {kind} node at {render_path(trail)} repeats a key: the header is corrupted or forged.")
    return [(c, (trail, (step, label))) for label, c in zip(labels, children)]


def check_document(doc: Any, entries: dict[str, Any], fail: Callable[[str], CheckpointError]) -> dict[str, Any]:
    """Validates a parsed funcopt document against the file's tensor entries; returns it.

    ``fail(message)`` builds the :class:`CheckpointError` (naming the file) that is raised.
    """
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise fail("the funcopt metadata does not describe a funcopt checkpoint (wrong header).")
    unknown = sorted(str(k) for k in doc if k not in _FIELDS)
    if unknown:
        raise fail(f"the funcopt metadata has unknown fields {unknown[:5]}: the header is corrupted or forged.")
    version = doc.get("version")
    if type(version) is not int or version < 1:
        raise fail(f"the funcopt metadata has an invalid format version {version!r}: the header is corrupted.")
    if version > FORMAT_VERSION:
        raise fail(f"checkpoint format version {version} is newer than this funcopt understands "
                   f"({FORMAT_VERSION}); upgrade funcopt.")
    if not isinstance(doc.get("tree"), dict):
        raise fail("the funcopt metadata lacks its tree: the header is corrupted.")
    step, meta, torch_version = doc.get("step"), doc.get("metadata", {}), doc.get("torch")
    if step is not None and type(step) is not int or not isinstance(meta, dict) or (
            torch_version is not None and type(torch_version) is not str):
        raise fail("the funcopt metadata has a malformed step, metadata or torch version: the header is corrupted.")
    if json_depth(meta) > MAX_DEPTH:
        raise fail(f"the user metadata is nested deeper than {MAX_DEPTH} levels: the header is corrupted or forged.")
    _check_records(doc.get("tensors"), entries, fail)
    seen: set[str] = set()
    stack: list[tuple[Any, Any, int]] = [(doc["tree"], None, 0)]
    while stack:
        node, trail, depth = stack.pop()
        kind = node.get("t") if isinstance(node, dict) else None
        if kind == "tensor":
            key = node.get("key")
            if type(key) is not str or key not in entries:
                raise fail(f"the leaf at {render_path(trail)} points at a tensor {key!r} the file does not hold: "
                           "the header is corrupted or forged.")
            if key in seen:
                raise fail(f"the leaf at {render_path(trail)} points at tensor {key!r}, which another leaf uses too: "
                           "the header is corrupted or forged.")
            seen.add(key)
        elif kind in _SCALARS or kind == "float":
            ok = _float_ok(node.get("v")) if kind == "float" else _SCALARS[kind](node.get("v"))
            if not ok:
                raise fail(f"the {kind} leaf at {render_path(trail)} holds {node.get('v')!r}, not a Python {kind}: "
                           "the header is corrupted or forged.")
        elif kind in ("dict", "odict", "list", "tuple", "namedtuple"):
            if depth >= MAX_DEPTH:
                raise fail(f"the tree is nested deeper than {MAX_DEPTH} levels (at {render_path(trail)}): the "
                           "header is corrupted or forged; funcopt never writes such a file.")
            stack.extend((child, child_trail, depth + 1) for child, child_trail in _children(node, kind, trail, fail))
        elif kind != "none":
            raise fail(f"the tree node at {render_path(trail)} is malformed (kind {kind!r}): the header is "
                       "corrupted or forged.")
    if len(seen) != len(entries):
        orphan = next(k for k in entries if k not in seen)
        raise fail(f"tensor {orphan!r} is not referenced by any leaf of the tree: the header is corrupted or forged.")
    return doc
