"""Safe, atomic checkpoints of pytrees: ``save``, ``load``, ``inspect``, ``device_put``.

A checkpoint is one file in the `safetensors <https://github.com/huggingface/safetensors>`_
layout: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes. Tensors
are keyed by their pytree path (``['params']['w']``, ``['opt_state'][1].mu['w']``). The JSON
header's ``__metadata__`` carries one more JSON document (under the key ``funcopt``) with the
tree structure, the Python scalars, the original dtypes and devices, CRC-32 checksums of every
tensor and the user's metadata; a CRC-32 of the whole header (``funcopt.crc32``) detects a
damaged header. Nothing is ever unpickled and no module named by the file is imported.

NamedTuple types are recorded by name: funcopt's own state types under a stable name that does
not depend on the module defining them (``"funcopt.ScaleByAdamState"``), user classes under the
name given to :func:`register` (default ``"module:QualName"``). Loading without ``like=`` looks
a name up (:func:`resolve_type_name`) among the registered user classes, funcopt's stable names
and the names older funcopt versions recorded (``"funcopt.transforms:ScaleByAdamState"`` in
0.1.0), so files written by any funcopt version keep loading.

The file stays a valid safetensors file, so ``safetensors.torch.load_file`` reads its tensors
too; conversely :func:`load` reads a plain safetensors file as a flat dict of tensors.

Every damaged, truncated, forged or foreign file raises :class:`CheckpointError` naming the file
(only regular files are opened; offsets follow safetensors' rules; a near miss of the magic keys
is refused rather than read as plain safetensors; the funcopt document is validated whole; header
parsing is bounded in memory); otherwise the data is bitwise what was saved. CPU tensors are
memory-mapped copy-on-write (``load(mmap=False)`` copies). A :class:`CheckpointManager` takes a
writer lock on its first save. The user guide is ``docs/checkpoints.md``.

Example:
    >>> tx = funcopt.adam(1e-3)
    >>> funcopt.checkpoint.save("ckpt.safetensors", {"params": params, "opt_state": state})
    >>> template = {"params": params, "opt_state": tx.init(params)}
    >>> restored = funcopt.checkpoint.load("ckpt.safetensors", like=template, device="cuda")
"""

from funcopt.checkpoint._format import CheckpointError, CheckpointInfo, LeafInfo
from funcopt.checkpoint._io import device_put, inspect, load, save
from funcopt.checkpoint._manager import CheckpointManager
from funcopt.checkpoint._names import register, resolve_type_name, type_name
from funcopt.checkpoint._tree import DeviceSpec

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
    "type_name",
    "resolve_type_name",
]
