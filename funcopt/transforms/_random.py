"""Counter-based random numbers from a seed and a step count held in an optimizer state.

The blocks that draw noise (``add_noise``, ``differentially_private_aggregate``, the Hutchinson
Hessian-diagonal estimator) keep no ``torch.Generator``: their state holds a 0-dim int64 seed
and the step count, and every draw is a pure function of ``(seed, count, stream, leaf index,
element index)``. That makes the noise

* reproducible: the same seed gives the same noise on every run, and a run resumed from a
  checkpoint continues bitwise (the seed and count are ordinary state tensors);
* usable under ``torch.func.vmap`` (no random op is called; a batched seed gives each member
  its own noise) and ``grad``;
* the same on every device: the bits come from integer arithmetic only.

The generator is Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror & Shaw, "Parallel random
numbers: as easy as 1, 2, 3", SC 2011), the counter-based generator JAX uses, written with
int64 tensor operations on 32-bit words (additions, rotations and xors only, so nothing
overflows). A draw's key is Threefry of ``(count, stream)`` under the seed's key; each element
``i`` of leaf ``j`` gets the two 32-bit words Threefry of ``(i, j)`` under that key. Normals come
from the two words by the Box-Muller transform (32-bit uniforms: the tails stop near 6.6
standard deviations). Leaves have at most 2**32 elements.
"""

from __future__ import annotations

from typing import Any

import torch

from funcopt import tree as _tree
from funcopt.base import FuncoptError, PyTree

__all__: list[str] = []

_MASK = 0xFFFFFFFF
_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_PARITY = 0x1BD11BDA
_TWO_PI = 6.283185307179586

# One stream per kind of draw, so that two blocks given the same seed draw independent noise.
STREAM_ADD_NOISE = 1
STREAM_PRIVACY = 2
STREAM_HUTCHINSON = 3


def _rotl(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK


def threefry2x32(k0: Any, k1: Any, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Threefry-2x32-20 of the counter ``(x0, x1)`` under the key ``(k0, k1)``.

    All four are int64 tensors (or Python ints) holding 32-bit words; they broadcast. Returns
    two int64 tensors of 32-bit words.
    """
    ks = (k0, k1, (k0 ^ k1 ^ _PARITY) & _MASK)
    x0 = (x0 + ks[0]) & _MASK
    x1 = (x1 + ks[1]) & _MASK
    for block in range(5):
        for r in range(4):
            x0 = (x0 + x1) & _MASK
            x1 = _rotl(x1, _ROTATIONS[(4 * block + r) % 8]) ^ x0
        s = block + 1
        x0 = (x0 + ks[s % 3]) & _MASK
        x1 = (x1 + ks[(s + 1) % 3] + s) & _MASK
    return x0, x1


def seed_tensor(key: Any, like: PyTree, where: str) -> torch.Tensor:
    """The 0-dim int64 seed tensor a state keeps, on the device of ``like``'s first leaf."""
    if isinstance(key, torch.Tensor):
        if key.dim() != 0 or key.is_floating_point() or key.is_complex() or key.dtype == torch.bool:
            raise FuncoptError(f"{where}: `key` must be an int or a 0-dim integer tensor, got {key!r}.")
        return key.to(torch.int64).clone()
    if isinstance(key, bool) or not isinstance(key, int):
        raise FuncoptError(
            f"{where}: `key` must be an int seed (or a 0-dim integer tensor), got {type(key).__name__}."
        )
    device = next((x.device for x in _tree.leaves(like) if isinstance(x, torch.Tensor)), torch.device("cpu"))
    return torch.tensor(key, dtype=torch.int64, device=device)


def _draw_key(seed: torch.Tensor, count: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    seed = seed.to(torch.int64)
    count = count.to(torch.int64)
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    return threefry2x32(k0, k1, count & _MASK, ((count >> 32) & _MASK) ^ stream)


def _words(key: tuple[torch.Tensor, torch.Tensor], leaves: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The two 32-bit words of every element of every leaf: one Threefry pass over all of them
    per device (element ``i`` of leaf ``j`` is the counter ``(i, j)``)."""
    out: list[Any] = [None] * len(leaves)
    by_device: dict[torch.device, list[int]] = {}
    for j, leaf in enumerate(leaves):
        if leaf.numel() > _MASK + 1:
            raise FuncoptError(f"random draws support leaves of at most 2**32 elements, got {leaf.numel()}.")
        by_device.setdefault(leaf.device, []).append(j)
    for device, idx in by_device.items():
        sizes = [leaves[j].numel() for j in idx]
        x0 = torch.cat([torch.arange(n, dtype=torch.int64, device=device) for n in sizes])
        x1 = torch.cat([torch.full((n,), j, dtype=torch.int64, device=device) for j, n in zip(idx, sizes)])
        y0, y1 = threefry2x32(key[0], key[1], x0, x1)
        for j, a, b in zip(idx, y0.split(sizes, dim=-1), y1.split(sizes, dim=-1)):
            out[j] = (a.reshape(leaves[j].shape), b.reshape(leaves[j].shape))
    return out


def _work_dtype(leaf: torch.Tensor) -> torch.dtype:
    return torch.float64 if leaf.dtype == torch.float64 else torch.float32


def normal_like(tree: PyTree, seed: torch.Tensor, count: torch.Tensor, stream: int) -> PyTree:
    """Standard normal noise shaped like ``tree`` (each leaf's dtype), a pure function of the
    0-dim ``seed`` and ``count`` tensors and the ``stream`` number."""
    leaves = _tree.leaves(tree)
    out = []
    for leaf, (y0, y1) in zip(leaves, _words(_draw_key(seed, count, stream), leaves)):
        dtype = _work_dtype(leaf)
        u1 = (y0.to(dtype) + 1.0) * 2.0**-32  # (0, 1]
        u2 = y1.to(dtype) * 2.0**-32  # [0, 1)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)
        out.append(z.to(leaf.dtype))
    return _tree.structure(tree).unflatten(out)


def rademacher_like(tree: PyTree, seed: torch.Tensor, count: torch.Tensor, stream: int) -> PyTree:
    """Random signs (+1 or -1, each with probability 1/2) shaped like ``tree``, as
    :func:`normal_like` draws them."""
    leaves = _tree.leaves(tree)
    out = []
    for leaf, (y0, _) in zip(leaves, _words(_draw_key(seed, count, stream), leaves)):
        out.append(((y0 & 1) * 2 - 1).to(leaf.dtype))
    return _tree.structure(tree).unflatten(out)
